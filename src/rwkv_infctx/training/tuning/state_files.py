"""State files: the learnt initial WKV states of `model.train_mode: state`, as RWKV-7 runtimes read them.

A state file is a `.pth` (torch.save) dict with one key per layer, `blocks.{i}.att.time_state`, each a
(H, N, N) float32 tensor (N = head size, 64 in released models). Its orientation is the `rwkv` pip
package's: rows indexed by value, columns by key, so that a runtime puts it into that package's state
list as `state[3*i + 1]` directly, without a transpose. Our `RWKV7State.wkv` has the same layout, so
the tensors are written and read as they are.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from torch import Tensor

from rwkv_infctx.errors import UserError
from rwkv_infctx.io.atomic import atomic_path

STATE_KEY = "blocks.{}.att.time_state"
_KEY_PATTERN = re.compile(r"^blocks\.(\d+)\.att\.time_state$")


def check_state_file_name(path: str | Path, what: str) -> None:
    """UserError unless `path` names a .pth: a state file is torch.save's format, as runtimes read it."""
    if Path(path).suffix == ".safetensors":
        raise UserError(
            f"{what}: {path} (a state file is a .pth written by torch.save; expected a .pth name)"
        )


def save_state_file(states: list[Tensor], path: str | Path) -> Path:
    """Write one (H, N, N) tensor per layer as a state file (float32, atomically)."""
    path = Path(path)
    check_state_file_name(path, "state file")
    out = {
        STATE_KEY.format(i): s.detach().to("cpu", torch.float32).contiguous() for i, s in enumerate(states)
    }
    with atomic_path(path) as tmp:
        torch.save(out, tmp)
    return path


def read_state_file(path: str | Path, n_layer: int, n_head: int, head_size: int) -> list[Tensor]:
    """The per-layer (H, N, N) float32 states of a state file, checked against the model's dims:
    UserError naming the file, the key and the expected shape otherwise."""
    sd = _load(Path(path))
    shape = (n_head, head_size, head_size)
    for key in sd:
        match = _KEY_PATTERN.match(key)
        if match is None or int(match.group(1)) >= n_layer:
            raise UserError(
                f"state file {path}: unexpected key {key!r} (expected {STATE_KEY.format('i')} for "
                f"i < {n_layer}, the model's {n_layer} layers, each of shape {shape})"
            )
    states = []
    for i in range(n_layer):
        key = STATE_KEY.format(i)
        if key not in sd:
            raise UserError(
                f"state file {path}: missing key {key!r} (expected one of shape {shape} for each of the "
                f"model's {n_layer} layers)"
            )
        t = sd[key]
        if tuple(t.shape) != shape:
            raise UserError(f"state file {path}: key {key!r} has shape {tuple(t.shape)}, expected {shape}")
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise UserError(f"state file {path}: key {key!r} holds non-finite or non-float values")
        states.append(t.to(torch.float32))
    return states


def _load(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise UserError(f"state file {path}: {'not a file' if path.exists() else 'not found'}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(
            f"state file {path}: not a readable dict of tensors; refused (corrupt, or pickled objects)"
        ) from None
    except Exception as e:  # torch.load raises many types for damaged input
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"state file {path}: not readable, truncated or corrupt ({reason})") from None
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UserError(f"state file {path}: expected a dict of tensors ({STATE_KEY.format('i')} per layer)")
    return obj
