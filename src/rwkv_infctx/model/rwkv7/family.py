"""RWKV-7 ("x070") as a model family: file detection, config from shapes, optimizer rules, FLOPs."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from rwkv_infctx.errors import UserError
from rwkv_infctx.model.family import ModelFamily
from rwkv_infctx.model.rwkv4_family import n_layer_of, require_keys
from rwkv_infctx.model.rwkv7.config import LORA_NAMES, RWKV7Config
from rwkv_infctx.model.rwkv7.init import init_weights
from rwkv_infctx.model.rwkv7.model import RWKV7
from rwkv_infctx.model.rwkv7.state import RWKV7State

LORA_KEYS = dict(zip(LORA_NAMES, ("w1", "a1", "v1", "g1"), strict=True))
"""Config field -> the (C, D) LoRA factor whose width D it is (v1 from layer 1: layer 0's is optional)."""
SHAPE_KEYS = ("emb.weight", "blocks.0.att.r_k", "blocks.0.ffn.key.weight", "blocks.0.att.w1")


def infer_config(sd: dict[str, Tensor], path: str | Path = "<state dict>", **options) -> RWKV7Config:
    """n_layer, n_embd, vocab_size, head size, dim_ffn and the four LoRA dims from the shapes."""
    require_keys(sd, SHAPE_KEYS, path, "an RWKV-7")
    vocab_size, n_embd = sd["emb.weight"].shape
    n_head, head_size = sd["blocks.0.att.r_k"].shape
    if n_head * head_size != n_embd:
        raise UserError(
            f"model file {path}: blocks.0.att.r_k has shape {(n_head, head_size)}, expected (heads, head "
            f"size) with heads × head size = n_embd {n_embd}"
        )
    n_layer = n_layer_of(sd)
    lora_layer = 1 if n_layer > 1 else 0
    dims = {}
    for name, leaf in LORA_KEYS.items():
        key = f"blocks.{lora_layer if leaf == 'v1' else 0}.att.{leaf}"
        if key in sd:
            dims[name] = sd[key].shape[1]
    return RWKV7Config(
        n_layer=n_layer,
        n_embd=n_embd,
        vocab_size=vocab_size,
        head_size=head_size,
        dim_ffn=sd["blocks.0.ffn.key.weight"].shape[0],
        **dims,
        **options,
    )


def optim_rule(name: str, p: nn.Parameter, layerwise_lr: bool) -> tuple[float, bool]:
    """RWKV-LM train_temp: att.w0 at 2× without weight decay (with layerwise_lr); weight decay only on
    matrices named *.weight (emb, head, projections), never on LoRA factors, r_k, lerps or norms."""
    if name.endswith("att.w0"):
        return (2.0 if layerwise_lr else 1.0), False
    return 1.0, p.squeeze().dim() >= 2 and name.endswith(".weight")


WKV_FLOPS_PER_HEAD_CHANNEL = 9
"""WKV-7 FLOPs per token, per head and per N² (9·N² per head): decay S·diag(d) N², S·a 2N², adding
its outer product with b 2N², adding v·kᵀ 2N², y = S·r 2N²."""


def matmul_flops_per_token(cfg: RWKV7Config) -> float:
    """2 FLOPs per weight of every matrix product: the four projections, the channel-mix, the LoRAs
    (layer 0 skips the value-residual LoRA) and the head; the embedding lookup is not one."""
    C, F, V, L = cfg.n_embd, cfg.dim_ffn, cfg.vocab_size, cfg.n_layer
    lora = 2 * C * (cfg.d_decay_lora + cfg.d_aaa_lora + cfg.d_gate_lora)
    weights = L * (4 * C * C + 2 * C * F + lora) + (L - 1) * 2 * C * cfg.d_mv_lora + C * V
    return 2.0 * weights


def wkv_flops_per_token(cfg: RWKV7Config) -> float:
    """The WKV-7 state update and readout over all layers: 9·N² per head."""
    return float(WKV_FLOPS_PER_HEAD_CHANNEL * cfg.head_size * cfg.n_embd * cfg.n_layer)


def forward_flops_per_token(cfg: RWKV7Config) -> float:
    """Matmuls plus the WKV-7 recurrence. Elementwise work elsewhere (lerps, norms, activations,
    the removal-key normalisation, the bonus) is O(C) per layer and not counted, as for RWKV-4."""
    return matmul_flops_per_token(cfg) + wkv_flops_per_token(cfg)


FAMILY = ModelFamily(
    name="rwkv7",
    title="RWKV-7",
    config_cls=RWKV7Config,
    model_cls=RWKV7,
    state_cls=RWKV7State,
    dim_names=("n_layer", "n_embd", "vocab_size", "head_size", "dim_ffn", *LORA_NAMES),
    markers=("blocks.0.att.w0", "blocks.0.att.x_r", "blocks.0.att.k_k", "blocks.0.att.r_k"),
    infer_config=infer_config,
    init_weights=init_weights,
    optim_rule=optim_rule,
    forward_flops_per_token=forward_flops_per_token,
    wkv_flops_per_token=wkv_flops_per_token,
    optional_keys=("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"),
    lora_targets=("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value"),
)
