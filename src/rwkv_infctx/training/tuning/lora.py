"""`model.train_mode: lora`: peft's LoRA adapters on the family's projections, every base weight frozen.

The adapters are injected into our own network in place (`peft.inject_adapter_in_model`), so the
model class, the segmented BPTT and the state dict keep their shape: a targeted projection
`blocks.0.att.key` becomes peft's `lora.Linear` holding `base_layer.weight` (frozen) and
`lora_A.default.weight` / `lora_B.default.weight` (trained). `merged_state_dict` folds the adapters
back into RWKV-LM's keys with peft's own `get_delta_weight`; files are in `lora_files.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from rwkv_infctx.errors import UserError
from rwkv_infctx.model.registry import family_of

ADAPTER = "default"
"""peft's adapter name: the only adapter a model holds here."""
LoraInit = Literal["default", "pissa"]


@dataclass(frozen=True)
class LoraOptions:
    """The lora_* options of the `model:` section (see configs/example.yaml)."""

    r: int = 32
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] | None = None
    init: LoraInit = "default"
    train_also: tuple[str, ...] = ()
    load_adapter: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise UserError(f"model.lora_r: {self.r!r} (expected an integer ≥ 1)")
        if not self.alpha > 0:
            raise UserError(f"model.lora_alpha: {self.alpha!r} (expected a number > 0)")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.lora_dropout: {self.dropout!r} (expected a number in [0, 1))")
        if self.init not in ("default", "pissa"):
            raise UserError(f"model.lora_init: {self.init!r} (expected default or pissa)")
        if self.targets is not None and not self.targets:
            raise UserError("model.lora_targets: [] (expected module-name suffixes, or null for the default)")
        if self.init == "pissa" and self.load_adapter is not None:
            raise UserError(
                f"model.load_adapter: {self.load_adapter} with lora_init: pissa (PiSSA rewrites the base "
                "weights from their SVD; a loaded adapter brings its own weights: use lora_init: default)"
            )


def lora_options(
    train_mode: str,
    r: int,
    alpha: float,
    dropout: float,
    targets: list[str] | None,
    init: LoraInit,
    train_also: list[str] | None,
    load_adapter: str | None,
) -> LoraOptions | None:
    """The `model.lora_*` settings as LoraOptions in lora mode; None in any other mode, where a LoRA
    setting that is set (not its default) is refused in one line rather than ignored."""
    if train_mode != "lora":
        unused = {"lora_targets": targets, "lora_train_also": train_also or None}
        unused |= {"lora_init": None if init == "default" else init, "load_adapter": load_adapter}
        for key, value in unused.items():
            if value is not None:
                raise UserError(
                    f"model.{key}: {value!r} is set, but model.train_mode is {train_mode} "
                    "(expected train_mode: lora, or leave it unset)"
                )
        return None
    targets = None if targets is None else tuple(targets)
    return LoraOptions(r, alpha, dropout, targets, init, tuple(train_also or ()), load_adapter)


def resolve_targets(model: nn.Module, targets: tuple[str, ...] | None) -> tuple[str, ...]:
    """The target suffixes (the family's default when None), each checked to name a Linear layer."""
    family = family_of(model)
    targets = tuple(targets) if targets is not None else family.lora_targets
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for suffix in targets:
        if not any(name == suffix or name.endswith("." + suffix) for name in linears):
            known = sorted({".".join(n.split(".")[-2:]) for n in linears if n.startswith("blocks.")})
            raise UserError(
                f"model.lora_targets: {suffix!r} names no linear layer of this {family.title} model "
                f"(expected suffixes such as {', '.join(known)})"
            )
    return targets


def lora_config(options: LoraOptions, targets: tuple[str, ...]):
    """peft's LoraConfig of these options (target_modules: the suffixes, matched as peft does)."""
    from peft import LoraConfig

    return LoraConfig(
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=list(targets),
        init_lora_weights="pissa" if options.init == "pissa" else True,
        bias="none",
    )


def apply_lora(model: nn.Module, options: LoraOptions, seed: int = 0) -> nn.Module:
    """Inject the adapters in place (initialised from `seed`; loaded from `options.load_adapter` if
    given), freeze everything else, then unfreeze the parameters that `train_also` names."""
    from peft import inject_adapter_in_model

    config = lora_config(options, resolve_targets(model, options.targets))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # LoRA A's init: the same on every rank and on every resume
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    model.requires_grad_(False)
    for name, p in model.named_parameters():
        if is_adapter_key(name):
            p.requires_grad_(True)
    if options.load_adapter is not None:
        from rwkv_infctx.training.tuning.lora_files import load_adapter_weights

        load_adapter_weights(model, options.load_adapter, "model.load_adapter")
    unfreeze(model, options.train_also)
    return model


def unfreeze(model: nn.Module, patterns: tuple[str, ...]) -> None:
    """Train every parameter whose name contains one of `patterns`; a pattern matching none is an error."""
    named = [(n, p) for n, p in model.named_parameters() if not is_adapter_key(n)]
    for pattern in patterns:
        hits = [p for n, p in named if pattern in n]
        if not hits:
            raise UserError(
                f"model.lora_train_also: {pattern!r} is in no parameter name of this "
                f"{family_of(model).title} model (expected a part of a name such as ln, att.x_, att.w0)"
            )
        for p in hits:
            p.requires_grad_(True)


def is_adapter_key(name: str) -> bool:
    """Whether a parameter or state-dict key belongs to a LoRA adapter (not to the base model)."""
    return ".lora_" in name


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's peft LoRA layers by module name."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """RWKV-LM's state dict of the model with every adapter merged: W + peft's delta (B·A·scale)
    per targeted projection, one projection at a time (no second copy of the model)."""
    layers = lora_layers(model)
    merged: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if not is_adapter_key(key):
            merged[key.replace(".base_layer.", ".")] = value
    with torch.no_grad():
        for name, layer in layers.items():
            weight = layer.get_base_layer().weight
            merged[f"{name}.weight"] = weight + layer.get_delta_weight(ADAPTER).to(weight.dtype)
    return merged


def base_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """A LoRA model's state dict without its adapters, under RWKV-LM's keys (unmerged base)."""
    return {k.replace(".base_layer.", "."): v for k, v in sd.items() if not is_adapter_key(k)}


def has_adapters(sd: dict[str, Tensor]) -> bool:
    return any(is_adapter_key(k) for k in sd)
