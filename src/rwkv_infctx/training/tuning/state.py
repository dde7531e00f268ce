"""`model.train_mode: state`: RWKV-7's initial WKV state per layer (S0) trained, every weight frozen.

S0 is a `model.rwkv7.initial_state.InitialState` registered on the network as `init_state`, so that
DDP, DeepSpeed, checkpoints and resume see it as one more parameter; `RWKV7.fresh_state` starts every
fresh entry from it (each sample's first segment, each ctx_len_cutoff piece's, validation, test and
generation). Its gradient is exact across segments: the reverse sweep rebuilds a fresh entry's state
from S0 with grad (`training/segments.py`), so with bptt full it collects every segment's loss
through the carried state. Its rate is `state_lr`, without weight decay (`training/optim.py`). The
exported file is a state file (`state_files.py`), never extra keys in an RWKV-LM model file.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from rwkv_infctx.errors import UserError
from rwkv_infctx.model.registry import family_of
from rwkv_infctx.model.rwkv7.initial_state import InitialState
from rwkv_infctx.training.tuning.state_files import check_state_file_name, read_state_file, save_state_file

INIT_STATE_PREFIX = "init_state."
"""The state-dict prefix of S0 on the network (`init_state.wkv.{i}`)."""


def is_initial_state(name: str) -> bool:
    """Whether a parameter name of the network is one of S0's matrices."""
    return name.startswith(INIT_STATE_PREFIX)


def attach_initial_state(
    model: nn.Module, path: str | Path | None = None, what: str = "model.load_state"
) -> nn.Module:
    """Register S0 on an RWKV-7 network as `init_state`: zeros, or the state file at `path` (checked
    against the model's dims; `what` names the option in errors). Returns the model."""
    family = family_of(model).name
    if family != "rwkv7":
        raise UserError(f"{what}: a state file needs an RWKV-7 model (this model is {family})")
    cfg = model.cfg
    init = InitialState(cfg.n_layer, cfg.n_head, cfg.head_size)
    if path is not None:
        for p, s in zip(init.wkv, read_state_file(path, cfg.n_layer, cfg.n_head, cfg.head_size), strict=True):
            p.data.copy_(s)
    model.init_state = init.to(model.emb.weight.device)
    return model


def apply_state_tuning(model: nn.Module, load_state: str | None, export: str | None = None) -> None:
    """Freeze every weight and attach a trainable S0 (zeros, or `load_state`'s); `export`, the
    state file fit will write, must be a .pth name."""
    if export is not None:
        check_state_file_name(export, "model.export")
    for p in model.parameters():
        p.requires_grad_(False)
    attach_initial_state(model, load_state)


def initial_states(model: nn.Module) -> list[Tensor]:
    """S0's per-layer (H, N, N) matrices."""
    return list(model.init_state.wkv)


def save_initial_state(model: nn.Module, path: str | Path) -> Path:
    """Write the network's S0 as a state file."""
    return save_state_file(initial_states(model), path)


def checkpoint_states(sd: dict[str, Tensor]) -> list[Tensor] | None:
    """S0's per-layer matrices from a checkpoint's state dict (prefixes stripped), or None if the
    checkpoint was not trained in state mode."""
    found = {k[len(INIT_STATE_PREFIX) :]: v for k, v in sd.items() if is_initial_state(k)}
    if not found:
        return None
    n = len(found)
    names = [f"wkv.{i}" for i in range(n)]
    if sorted(found) != sorted(names):
        raise UserError(f"checkpoint: initial-state keys {sorted(found)} (expected {', '.join(names)})")
    return [found[name] for name in names]
