"""Optimizer parameter groups and the learning-rate schedule (RWKV-LM's conventions).

Groups come from the model family's rule (`ModelFamily.optim_rule`): RWKV-4 puts `weight_decay` on
matrices (squeezed dim ≥ 2) and, with `layerwise_lr`, `time_decay` at 2× and `time_first` at 3× the
base rate; RWKV-7 (RWKV-LM train_temp) decays only matrices named `*.weight` and runs `att.w0` at 2×
without decay. RWKV-7's learnt initial states (`model.train_mode: state`) form their own group at
`state_lr`, without weight decay.

Schedule (per optimizer step s, multiplying every group's base rate):
    warmup:  lr_init · (s + 1) / warmup_steps          for s < warmup_steps
    decay:   from lr_init to lr_final over the remaining steps up to `total_steps`, shaped
             cosine, linear or exponential; constant lr_init when total_steps is unknown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from rwkv_infctx.errors import UserError
from rwkv_infctx.model.registry import family_of
from rwkv_infctx.training.tuning.state import is_initial_state

OptimizerName = Literal["adamw", "adam", "sgd"]
DecayName = Literal["cosine", "linear", "exponential"]


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer options of the `model:` section (see configs/example.yaml)."""

    optimizer: OptimizerName = "adamw"
    lr_init: float = 6e-4
    lr_final: float = 1e-5
    warmup_steps: int = 0
    lr_decay: DecayName = "cosine"
    beta1: float = 0.9
    beta2: float = 0.99
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    layerwise_lr: bool = True
    state_lr: float = 1.0
    """The rate of the initial states (state tuning) after warmup; the schedule scales it as lr_init."""

    def __post_init__(self) -> None:
        if self.optimizer not in ("adamw", "adam", "sgd"):
            raise UserError(f"model.optimizer: {self.optimizer!r} (expected adamw, adam or sgd)")
        if self.lr_decay not in ("cosine", "linear", "exponential"):
            raise UserError(f"model.lr_decay: {self.lr_decay!r} (expected cosine, linear or exponential)")
        if self.lr_init < 0 or self.lr_final < 0:
            raise UserError(f"model.lr_init/lr_final: {self.lr_init}/{self.lr_final} (expected ≥ 0)")
        if self.lr_decay == "exponential" and (self.lr_init <= 0 or self.lr_final <= 0):
            raise UserError("model.lr_decay: exponential needs lr_init and lr_final above 0")
        if self.warmup_steps < 0:
            raise UserError(f"model.warmup_steps: {self.warmup_steps} (expected ≥ 0)")
        if self.weight_decay < 0:
            raise UserError(f"model.weight_decay: {self.weight_decay} (expected ≥ 0)")
        if not self.state_lr > 0:
            raise UserError(f"model.state_lr: {self.state_lr} (expected a number > 0)")


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Parameter groups with their own `lr` (base × layerwise scale) and `weight_decay`."""
    rule = family_of(model).optim_rule
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_initial_state(name):
            scale, decays = state_lr_scale(cfg), False
        else:
            scale, decays = rule(name, p, cfg.layerwise_lr)
        decay = cfg.weight_decay if decays else 0.0
        groups.setdefault((scale, decay), []).append(p)
    return [
        {"params": ps, "lr": cfg.lr_init * scale, "weight_decay": decay, "lr_scale": scale}
        for (scale, decay), ps in sorted(groups.items())
    ]


def state_lr_scale(cfg: OptimConfig) -> float:
    """state_lr as a multiple of lr_init (the schedule multiplies every group's rate alike)."""
    if cfg.lr_init <= 0:
        raise UserError(
            "model.lr_init: 0 with train_mode state (the schedule scales state_lr by lr / lr_init; "
            "expected lr_init > 0)"
        )
    return cfg.state_lr / cfg.lr_init


def make_optimizer(model: nn.Module, cfg: OptimConfig, cpu_offload: bool = False) -> torch.optim.Optimizer:
    """The optimizer over `param_groups`; `cpu_offload` (DeepSpeed *_offload): DeepSpeed's CPU Adam(W)."""
    groups = param_groups(model, cfg)
    if cpu_offload:
        if cfg.optimizer == "sgd":
            raise UserError("model.optimizer: sgd with a DeepSpeed offload strategy (expected adamw or adam)")
        from rwkv_infctx.training.distributed import cpu_adam

        return cpu_adam(groups, cfg.optimizer == "adamw", cfg.lr_init, (cfg.beta1, cfg.beta2), cfg.adam_eps)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr_init, momentum=0.0)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=cfg.lr_init, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps)


def lr_at(step: int, cfg: OptimConfig, total_steps: float) -> float:
    """The base learning rate (layerwise scale 1) at optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr_init * (step + 1) / cfg.warmup_steps
    span = total_steps - cfg.warmup_steps
    if not math.isfinite(span) or span <= 0:
        return cfg.lr_init
    progress = min(max((step - cfg.warmup_steps) / span, 0.0), 1.0)
    if cfg.lr_decay == "linear":
        return cfg.lr_init + (cfg.lr_final - cfg.lr_init) * progress
    if cfg.lr_decay == "exponential":
        return cfg.lr_init * (cfg.lr_final / cfg.lr_init) ** progress
    return cfg.lr_final + (cfg.lr_init - cfg.lr_final) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR applying `lr_at` to every group (each keeps its layerwise scale)."""
    if cfg.lr_init == 0:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_at(step, cfg, total_steps) / cfg.lr_init
    )
