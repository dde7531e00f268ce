"""The model families this project knows, and how a file, a name or a model finds its family.

Adding a family (RWKV-6, say) means a model/ package with its `ModelFamily`, its WKV op in ops/,
and one line in FAMILIES.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn

from rwkv_infctx.errors import UserError
from rwkv_infctx.model.family import ModelFamily
from rwkv_infctx.model.rwkv4_family import FAMILY as RWKV4_FAMILY
from rwkv_infctx.model.rwkv7.family import FAMILY as RWKV7_FAMILY

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (RWKV4_FAMILY, RWKV7_FAMILY)}
ARCH_CHOICES = ("auto", *FAMILIES)


def family_named(name: str, key: str = "model.arch") -> ModelFamily:
    """The family called `name` ("rwkv4", "rwkv7"); `key` names the setting in the error."""
    if name not in FAMILIES:
        raise UserError(f"{key}: {name!r} (expected one of {', '.join(FAMILIES)})")
    return FAMILIES[name]


def detect_family(sd: Mapping[str, Tensor], path: str | Path = "<state dict>") -> ModelFamily:
    """The family whose marker keys the state dict has; one line naming what is missing otherwise."""
    found = [f for f in FAMILIES.values() if f.detects(sd)]
    if len(found) == 1:
        return found[0]
    if found:
        raise UserError(f"model file {path}: has keys of {' and '.join(f.title for f in found)} at once")
    expected = "; ".join(f"{f.title}: one of {', '.join(f.markers)}" for f in FAMILIES.values())
    raise UserError(f"model file {path}: not an RWKV model file of a known family (expected {expected})")


def family_of(model: nn.Module) -> ModelFamily:
    """The family of a built model."""
    for family in FAMILIES.values():
        if isinstance(model, family.model_cls):
            return family
    raise TypeError(f"{type(model).__name__}: not a model of a known family")
