"""The RWKV-4 model's dimensions and options."""

from __future__ import annotations

from dataclasses import dataclass

from rwkv_infctx.ops.self_check import MODES as SELF_CHECK_MODES
from rwkv_infctx.ops.wkv4 import BACKENDS as WKV4_BACKENDS


@dataclass(frozen=True)
class RWKV4Config:
    """Dimensions of an RWKV-4 ("v4neo") model.

    n_layer: number of blocks.
    n_embd: model width C.
    vocab_size: rows of the embedding and of the head.
    dim_att: width of the time-mix key/value/receptance (default n_embd).
    dim_ffn: hidden width of the channel-mix (default 4 * n_embd).
    dropout: dropout after each time-mix and channel-mix (0 disables it).
    wkv_backend: "auto" picks the fastest WKV op for the device (the Triton kernel on CUDA, the
        chunked op elsewhere); "triton", "chunked" force one; "reference" forces the plain PyTorch
        definition, for debugging.
    wkv_self_check: what the Triton kernel's first-use check against the chunked op does when it
        fails: "warn" (one warning, then the chunked op), "error" (stop) or "off" (no check).
    """

    n_layer: int
    n_embd: int
    vocab_size: int
    dim_att: int | None = None
    dim_ffn: int | None = None
    dropout: float = 0.0
    wkv_backend: str = "auto"
    wkv_self_check: str = "warn"

    def __post_init__(self) -> None:
        if self.dim_att is None:
            object.__setattr__(self, "dim_att", self.n_embd)
        if self.dim_ffn is None:
            object.__setattr__(self, "dim_ffn", 4 * self.n_embd)
        for name in ("n_layer", "n_embd", "vocab_size", "dim_att", "dim_ffn"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r}: expected a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r}: expected a value in [0, 1)")
        if self.wkv_backend not in WKV4_BACKENDS:
            raise ValueError(
                f"wkv_backend={self.wkv_backend!r}: expected one of {', '.join(WKV4_BACKENDS)} for RWKV-4"
            )
        if self.wkv_self_check not in SELF_CHECK_MODES:
            raise ValueError(
                f"wkv_self_check={self.wkv_self_check!r}: expected one of {', '.join(SELF_CHECK_MODES)}"
            )
