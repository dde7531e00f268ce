"""Crash-safe checkpoints and exact resume.

- `AtomicCheckpointIO`: each checkpoint is written to a hidden temporary file in its folder, fsynced,
  then renamed onto its name (and the folder fsynced): a `.ckpt` is complete or absent. A failed save
  (a full disk, a kill) leaves every earlier checkpoint as it was.
- `ResumeState`: saves the RNG states (torch, CUDA, numpy, python; every rank's) in the checkpoint and
  restores them just before the first batch after a resume, so the run continues as if unbroken.
- `resolve_ckpt_path`: `ckpt_path: auto` picks the newest checkpoint that loads completely; an
  explicit path must exist.

Checkpoints are read back by Lightning with `torch.load(weights_only=True)` (PyTorch's default, and
what `ckpt_path: auto` verifies with): they hold only tensors and plain Python values.
"""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from rwkv_infctx.errors import UserError
from rwkv_infctx.io.atomic import atomic_path

AUTO = "auto"
CHECKPOINT_KEYS = ("state_dict", "loops", "global_step")
UNREADABLE_CHECKPOINT = (
    "not a complete Lightning checkpoint of plain tensors and values "
    "(truncated, corrupt, or holding pickled code, which is never run)"
)


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose saves are atomic on the local filesystem (see the module doc)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                torch.save(checkpoint, tmp)
        except OSError as e:
            hint = " (disk full)" if e.errno == errno.ENOSPC else ""
            raise UserError(
                f"checkpoint {path}: save failed{hint}: {e.strerror or e}; earlier checkpoints are intact"
            ) from None


def use_atomic_checkpoints(trainer: pl.Trainer) -> None:
    """Swap the strategy's plain `TorchCheckpointIO` for `AtomicCheckpointIO` (others are left alone)."""
    strategy = trainer.strategy
    if type(getattr(strategy, "checkpoint_io", None)) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


def read_checkpoint(path: str | Path) -> dict[str, Any] | None:
    """The checkpoint at `path` if it loads completely with weights_only=True, else None."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in CHECKPOINT_KEYS):
        return None
    return ckpt


def checkpoint_candidates(trainer: pl.Trainer) -> list[Path]:
    """`*.ckpt` files where this run's checkpoints go, newest first (hidden temporaries excluded)."""
    roots = [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
    patterns = [(r, "*.ckpt") for r in roots]
    for logger in trainer.loggers:
        if getattr(logger, "save_dir", None):
            patterns.append((Path(logger.save_dir), "**/checkpoints/*.ckpt"))
    root = Path(trainer.default_root_dir)
    patterns += [(root, "checkpoints/*.ckpt"), (root, "lightning_logs/*/checkpoints/*.ckpt")]
    found = {p.resolve() for r, pattern in patterns if r.is_dir() for p in r.glob(pattern)}
    files = [p for p in found if p.is_file() and not p.name.startswith(".")]
    return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)


def resolve_ckpt_path(ckpt_path: str | None, trainer: pl.Trainer) -> str | None:
    """`auto`: the newest complete checkpoint of this run's folders (None: start fresh).

    Any other value must be an existing file (or one of Lightning's own keywords: last, best, hpc).
    """
    if ckpt_path is None or ckpt_path in ("last", "best", "hpc", "registry"):
        return ckpt_path
    if ckpt_path != AUTO:
        path = Path(ckpt_path)
        if not path.exists():
            raise UserError(f"ckpt_path {ckpt_path}: not found (expected a .ckpt written by fit, or 'auto')")
        if path.is_file() and read_checkpoint(path) is None:
            raise UserError(f"ckpt_path {ckpt_path}: {UNREADABLE_CHECKPOINT}")
        return ckpt_path
    for candidate in checkpoint_candidates(trainer):
        ckpt = read_checkpoint(candidate)
        if ckpt is not None:
            rank_zero_info(f"ckpt_path auto: resuming from {candidate} (global step {ckpt['global_step']})")
            return str(candidate)
        rank_zero_info(f"ckpt_path auto: skipping {candidate} (incomplete or unreadable)")
    rank_zero_info("ckpt_path auto: no complete checkpoint found, starting from scratch")
    return None


def rng_states() -> dict[str, Any]:
    """This process's RNG states as plain values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))


class ResumeState(pl.Callback):
    """Atomic checkpoint files, and the RNG states of every rank saved with each checkpoint."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        use_atomic_checkpoints(trainer)

    def state_dict(self) -> dict[str, Any]:
        mine = rng_states()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            every: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(every, mine)
            return {"rng": every}
        return {"rng": [mine]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # restored here, not at load time: building the data iterator draws from the torch RNG
        if self._pending is None:
            return
        states = self._pending["rng"]
        set_rng_states(states[trainer.global_rank % len(states)])
        self._pending = None


def check_output_folder(path: str | Path, key: str) -> None:
    """UserError unless files can be created at or under folder `path` (creates nothing)."""
    folder = Path(path).absolute()
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{key} {path}: {probe} is not a folder (expected a writable folder)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{key} {path}: {probe} is not writable (expected a writable folder)")
