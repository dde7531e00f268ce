"""The recurrent state type shared by the model, the trainer and the kernels.

A state is a frozen dataclass of tensors, one per named field, each laid out layer-major as
(L, B, ...): L layers, B batch rows. Every RWKV version declares its own fields (RWKV-4: two
token-shift vectors and the WKV numerator/denominator/max); everything outside the model uses
only the generic operations defined here, so it never depends on which fields exist.

Field metadata:
    fill: the value of a fresh state (e.g. 0.0, or -1e38 for a running max).
    fp32: the field stays in float32 whatever dtype the model runs in.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import torch
from torch import Tensor

S = TypeVar("S", bound="RecurrentState")


def state_field(fill: float = 0.0, fp32: bool = False) -> Any:
    """Declare a tensor field of a state class with its fresh value and dtype policy."""
    return dataclasses.field(metadata={"fill": fill, "fp32": fp32})


@dataclasses.dataclass(frozen=True)
class RecurrentState:
    """Base class: generic operations over all tensor fields of a layer-major state."""

    # ---- access ---------------------------------------------------------------------------
    @classmethod
    def field_specs(cls) -> tuple[dataclasses.Field, ...]:
        return dataclasses.fields(cls)

    def tensors(self) -> tuple[Tensor, ...]:
        """All tensors, in field order (for checkpointing and collective ops)."""
        return tuple(getattr(self, f.name) for f in self.field_specs())

    @classmethod
    def from_tensors(cls: type[S], tensors: tuple[Tensor, ...] | list[Tensor]) -> S:
        return cls(*tensors)

    def map(self: S, fn) -> S:
        """A new state with `fn(tensor, field)` applied to every field."""
        return type(self)(*(fn(getattr(self, f.name), f) for f in self.field_specs()))

    @property
    def batch_size(self) -> int:
        return self.tensors()[0].shape[1]

    @property
    def n_layer(self) -> int:
        return self.tensors()[0].shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    # ---- generic operations ---------------------------------------------------------------
    def detach(self: S) -> S:
        return self.map(lambda t, f: t.detach())

    def clone(self: S) -> S:
        return self.map(lambda t, f: t.clone())

    def to(self: S, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> S:
        """Move to a device and/or cast; fields marked fp32 always stay float32."""

        def move(t: Tensor, f: dataclasses.Field) -> Tensor:
            want = torch.float32 if f.metadata["fp32"] else (dtype or t.dtype)
            return t.to(device=device, dtype=want)

        return self.map(move)

    def select(self: S, rows: Tensor | list[int] | slice) -> S:
        """Keep only the given batch rows (index tensor, list or slice)."""
        return self.map(lambda t, f: t[:, rows])

    def fresh_like(self: S) -> S:
        """A fresh state with the same shapes, dtypes and device."""
        return self.map(lambda t, f: torch.full_like(t, f.metadata["fill"]))

    def reset_rows(self: S, reset: Tensor) -> S:
        """Reset the rows where the bool tensor `reset` (B,) is True to the fresh value.

        Differentiable: gradients keep flowing into the rows that are not reset.
        """

        def apply(t: Tensor, f: dataclasses.Field) -> Tensor:
            mask = reset.to(t.device).view(1, -1, *([1] * (t.dim() - 2)))
            return torch.where(mask, torch.full_like(t, f.metadata["fill"]), t)

        return self.map(apply)

    @classmethod
    def cat(cls: type[S], states: list[S]) -> S:
        """Concatenate states along the batch dimension."""
        return cls(*(torch.cat(ts, dim=1) for ts in zip(*(s.tensors() for s in states), strict=True)))

    @classmethod
    def fresh(cls: type[S], shapes: dict[str, tuple[int, ...]], device=None, dtype=torch.float32) -> S:
        """A fresh state from a field name -> shape mapping (shapes are layer-major)."""
        out = []
        for f in cls.field_specs():
            want = torch.float32 if f.metadata["fp32"] else dtype
            out.append(torch.full(shapes[f.name], f.metadata["fill"], device=device, dtype=want))
        return cls(*out)
