"""The RWKV-7 model's dimensions and options."""

from __future__ import annotations

import math
from dataclasses import dataclass

from rwkv_infctx.ops.self_check import MODES as SELF_CHECK_MODES
from rwkv_infctx.ops.wkv7 import BACKENDS as WKV7_BACKENDS

HEAD_SIZE = 64
"""N: the head size of every released RWKV-7 model (RWKV-LM: "don't change")."""

OFFICIAL_LORA_DIMS: dict[int, tuple[int, int, int, int]] = {
    # n_embd -> (decay, in-context learning rate, value residual, gate) LoRA dims of released models
    768: (64, 64, 32, 128),  # 0.1B
    1024: (64, 64, 32, 128),  # 0.4B
    2048: (96, 96, 64, 256),  # 1.5B
    2560: (96, 96, 64, 320),  # 2.9B
    4096: (128, 128, 96, 480),  # 7.2B
}
LORA_DIM_FACTORS = (2.5, 2.5, 1.7, 5.0)
"""RWKV-LM train_temp's suggestion: max(32, round(factor · √C / 32) · 32), for other widths."""
LORA_NAMES = ("d_decay_lora", "d_aaa_lora", "d_mv_lora", "d_gate_lora")


def default_lora_dims(n_embd: int) -> tuple[int, int, int, int]:
    """The released models' LoRA dims for their widths, else train_temp's formula."""
    if n_embd in OFFICIAL_LORA_DIMS:
        return OFFICIAL_LORA_DIMS[n_embd]
    root = math.sqrt(n_embd)
    return tuple(max(32, round(f * root / 32) * 32) for f in LORA_DIM_FACTORS)  # type: ignore[return-value]


@dataclass(frozen=True)
class RWKV7Config:
    """Dimensions of an RWKV-7 ("x070", Goose) model.

    n_layer: number of blocks.
    n_embd: model width C, a multiple of head_size.
    vocab_size: rows of the embedding and of the head.
    head_size: N, the width of a head (64 in every released model); H = n_embd / head_size heads.
    dim_ffn: hidden width of the channel-mix (default 4 · n_embd, as released models).
    d_decay_lora, d_aaa_lora, d_mv_lora, d_gate_lora: inner dims of the decay, in-context learning
        rate, value-residual and gate LoRAs (default: the released model of that width, else
        RWKV-LM train_temp's formula).
    dropout: dropout after each time-mix and channel-mix (0 disables it).
    wkv_backend: "auto" picks the fastest WKV-7 op for the device (fla's kernel on CUDA when fla
        imports, the C kernel on the CPU when it builds, the chunked op elsewhere); "fla", "cpu",
        "chunked" force one; "reference" forces the per-token PyTorch definition, for debugging.
    wkv_self_check: what a fast kernel's (fla, cpu) first-use check against the chunked op does
        when it fails: "warn" (one warning, then the chunked op), "error" (stop) or "off" (no check).
    """

    n_layer: int
    n_embd: int
    vocab_size: int
    head_size: int = HEAD_SIZE
    dim_ffn: int | None = None
    d_decay_lora: int | None = None
    d_aaa_lora: int | None = None
    d_mv_lora: int | None = None
    d_gate_lora: int | None = None
    dropout: float = 0.0
    wkv_backend: str = "auto"
    wkv_self_check: str = "warn"

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_embd", "vocab_size", "head_size"):
            _check_positive(name, getattr(self, name))
        if self.n_embd % self.head_size:
            raise ValueError(f"n_embd={self.n_embd}: expected a multiple of head_size={self.head_size}")
        if self.dim_ffn is None:
            object.__setattr__(self, "dim_ffn", 4 * self.n_embd)
        for name, default in zip(LORA_NAMES, default_lora_dims(self.n_embd), strict=True):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        for name in ("dim_ffn", *LORA_NAMES):
            _check_positive(name, getattr(self, name))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r}: expected a value in [0, 1)")
        if self.wkv_backend not in WKV7_BACKENDS:
            raise ValueError(
                f"wkv_backend={self.wkv_backend!r}: expected one of {', '.join(WKV7_BACKENDS)} for RWKV-7"
            )
        if self.wkv_self_check not in SELF_CHECK_MODES:
            raise ValueError(
                f"wkv_self_check={self.wkv_self_check!r}: expected one of {', '.join(SELF_CHECK_MODES)}"
            )

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size


def _check_positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r}: expected a positive integer")
