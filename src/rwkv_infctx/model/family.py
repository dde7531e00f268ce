"""What a model family (RWKV-4, RWKV-7, ...) declares, so that everything outside `model/` and
`ops/` works for every family through `model.registry` instead of knowing any one of them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from rwkv_infctx.state import RecurrentState


@dataclass(frozen=True)
class ModelFamily:
    """One RWKV version: how its files look, how it is built and initialised, how it trains.

    name: the `model.arch` / `init --arch` value ("rwkv4").
    title: how messages name it ("RWKV-4").
    config_cls, model_cls, state_cls: its config dataclass, nn.Module and `RecurrentState`.
    dim_names: config fields a user may set for a new model (checked against a loaded file).
    markers: state-dict keys any one of which identifies a file of this family.
    optional_keys: keys a file may lack (filled from a fresh module; e.g. RWKV-7 layer 0's unused
        value-residual vectors).
    lora_targets: the nn.Linear suffixes that `model.train_mode: lora` adapts by default (every
        time-mix and channel-mix projection).
    infer_config: (state dict, path, **options) -> config, from the tensor shapes.
    init_weights: (model, seed) -> model, the family's initialisation from scratch, in place.
    optim_rule: (parameter name, parameter, layerwise_lr) -> (learning-rate scale, weight decay on?).
    forward_flops_per_token: config -> forward FLOPs of one token (the MFU report, the model summary).
    wkv_flops_per_token: config -> the part of those that is the WKV recurrence's elementwise work
        (a FLOP counter sees only matmuls; the model summary declares this part).
    """

    name: str
    title: str
    config_cls: type
    model_cls: type[nn.Module]
    state_cls: type[RecurrentState]
    dim_names: tuple[str, ...]
    markers: tuple[str, ...]
    infer_config: Callable[..., Any]
    init_weights: Callable[[nn.Module, int], nn.Module]
    optim_rule: Callable[[str, nn.Parameter, bool], tuple[float, bool]]
    forward_flops_per_token: Callable[[Any], float]
    wkv_flops_per_token: Callable[[Any], float]
    optional_keys: tuple[str, ...] = ()
    lora_targets: tuple[str, ...] = ()

    def detects(self, sd: Mapping[str, Tensor]) -> bool:
        """Whether a state dict's keys mark it as this family's."""
        return any(key in sd for key in self.markers)
