"""RWKV-4 ("v4neo") as a model family: file detection, config from shapes, optimizer rules; its FLOPs
are in `rwkv4_flops.py`."""

from __future__ import annotations

import re
from pathlib import Path

from torch import Tensor, nn

from rwkv_infctx.errors import UserError
from rwkv_infctx.model.config import RWKV4Config
from rwkv_infctx.model.family import ModelFamily
from rwkv_infctx.model.init import init_weights
from rwkv_infctx.model.rwkv4 import RWKV4
from rwkv_infctx.model.rwkv4_flops import forward_flops_per_token, wkv_flops_per_token
from rwkv_infctx.model.state import RWKV4State

LAYERWISE_SCALES = {"time_decay": 2.0, "time_first": 3.0}
"""With layerwise_lr: time_decay learns at 2× and time_first at 3× the base rate (RWKV-LM v4)."""


def n_layer_of(sd: dict[str, Tensor]) -> int:
    """1 + the highest `blocks.N.` index among the keys."""
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    return max(layers) + 1 if layers else 0


def require_keys(sd: dict[str, Tensor], keys: tuple[str, ...], path: str | Path, title: str) -> None:
    """One UserError naming every key of `keys` the file lacks."""
    missing = [k for k in keys if k not in sd]
    if missing:
        raise UserError(f"model file {path}: {title} file without key(s) {', '.join(map(repr, missing))}")


def infer_config(sd: dict[str, Tensor], path: str | Path = "<state dict>", **options) -> RWKV4Config:
    """Read n_layer, n_embd, vocab_size, dim_att and dim_ffn from the tensor shapes."""
    require_keys(sd, ("emb.weight", "blocks.0.att.key.weight", "blocks.0.ffn.key.weight"), path, "an RWKV-4")
    vocab_size, n_embd = sd["emb.weight"].shape
    return RWKV4Config(
        n_layer=n_layer_of(sd),
        n_embd=n_embd,
        vocab_size=vocab_size,
        dim_att=sd["blocks.0.att.key.weight"].shape[0],
        dim_ffn=sd["blocks.0.ffn.key.weight"].shape[0],
        **options,
    )


def optim_rule(name: str, p: nn.Parameter, layerwise_lr: bool) -> tuple[float, bool]:
    """RWKV-LM v4: time_decay 2×, time_first 3× (with layerwise_lr); weight decay on matrices."""
    scale = next((s for key, s in LAYERWISE_SCALES.items() if name.endswith(key)), 1.0)
    return (scale if layerwise_lr else 1.0), p.squeeze().dim() >= 2


FAMILY = ModelFamily(
    name="rwkv4",
    title="RWKV-4",
    config_cls=RWKV4Config,
    model_cls=RWKV4,
    state_cls=RWKV4State,
    dim_names=("n_layer", "n_embd", "vocab_size", "dim_att", "dim_ffn"),
    markers=("blocks.0.att.time_decay", "blocks.0.att.time_first", "blocks.0.att.time_mix_k"),
    infer_config=infer_config,
    init_weights=init_weights,
    optim_rule=optim_rule,
    forward_flops_per_token=forward_flops_per_token,
    wkv_flops_per_token=wkv_flops_per_token,
    lora_targets=(
        "att.key",
        "att.value",
        "att.receptance",
        "att.output",
        "ffn.key",
        "ffn.value",
        "ffn.receptance",
    ),
)
