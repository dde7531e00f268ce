"""Crash-safe checkpoints and exact resume.

- `AtomicCheckpointIO`: each checkpoint is written to a hidden temporary file in its folder, fsynced,
  then renamed onto its name (and the folder fsynced): a `.ckpt` is complete or absent. A failed save
  (a full disk, a kill) leaves every earlier checkpoint as it was.
- `ResumeState`: saves the RNG states (torch, CUDA, numpy, python; every rank's) in the checkpoint and
  restores them just before the first batch after a resume, so the run continues as if unbroken.
- `resolve_ckpt_path`: `ckpt_path: auto` picks the complete checkpoint with the highest global step
  (read from the checkpoint, not its name or mtime; ties: the most recently written); an explicit
  path must be a complete checkpoint. Under DeepSpeed a checkpoint is a folder (`read_deepspeed_checkpoint`).

Checkpoints are read back by Lightning with `torch.load(weights_only=True)` (PyTorch's default, and
what `ckpt_path: auto` verifies with): they hold only tensors and plain Python values.
"""

from __future__ import annotations

import errno
import os
import random
import zipfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from rwkv_infctx.errors import UserError
from rwkv_infctx.io.atomic import atomic_path
from rwkv_infctx.training.distributed import deepspeed_config

AUTO = "auto"
CHECKPOINT_KEYS = ("state_dict", "loops", "global_step")
DEEPSPEED_CHECKPOINT_KEYS = ("loops", "global_step")  # Lightning's weights are DeepSpeed's
INCOMPLETE_DEEPSPEED_CHECKPOINT = (
    "not a complete DeepSpeed checkpoint folder (expected 'latest', the model states holding "
    "Lightning's loops and global_step, and every rank's ZeRO shard, each a whole file)"
)
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
    """The checkpoint file at `path` if it loads completely with weights_only=True, else None.

    Memory-mapped: only the pickle (a few MB even for a multi-GB file) is read, not the tensors.
    """
    return _load_plain(path, CHECKPOINT_KEYS)


def _load_plain(path: str | Path, keys: tuple[str, ...]) -> dict[str, Any] | None:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in keys):
        return None
    return ckpt


def read_deepspeed_checkpoint(folder: str | Path) -> dict[str, Any] | None:
    """Lightning's state (without the weights) from a complete DeepSpeed checkpoint folder, else None.

    Complete: `latest` names the tag folder; its model states load with weights_only=True and hold
    `loops` and `global_step`; every rank's ZeRO shard is there (`dp_world_size` of them), and every
    `.pt` file is a whole zip archive (its central directory, written last, is present).
    DeepSpeed writes these folders in place, not atomically, so a killed save leaves such gaps.
    """
    folder = Path(folder)
    try:
        tag = (folder / "latest").read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    tag_dir = folder / tag
    if not tag or not tag_dir.is_dir():
        return None
    states = sorted(tag_dir.glob("*model_states.pt"))
    shards = sorted(tag_dir.glob("*optim_states.pt"))
    if not states or not all(_whole_zip(p) for p in states + shards):
        return None
    ckpt = _load_plain(states[0], DEEPSPEED_CHECKPOINT_KEYS)
    if ckpt is None:
        return None
    world = int(ckpt.get("dp_world_size") or 1)
    zero = ckpt.get("param_shapes") is not None  # ZeRO: the optimizer is sharded, one file per rank
    if len(states) not in (1, world) or (zero and len(shards) != world):
        return None
    return ckpt


def _whole_zip(path: Path) -> bool:
    """True when `path` is a zip archive whose end (the central directory) is intact."""
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def checkpoint_step(path: Path) -> int | None:
    """The global step of a complete checkpoint (a `.ckpt` file or a DeepSpeed folder), else None."""
    ckpt = read_deepspeed_checkpoint(path) if path.is_dir() else read_checkpoint(path)
    return None if ckpt is None else int(ckpt["global_step"])


def _written_at(path: Path) -> int:
    """Modification time (ns) of a checkpoint file, or of a DeepSpeed folder's `latest` (written last)."""
    marker = path / "latest" if path.is_dir() else path
    try:
        return marker.stat().st_mtime_ns
    except OSError:
        return 0


def checkpoint_candidates(trainer: pl.Trainer) -> list[Path]:
    """`*.ckpt` files and folders where this run's checkpoints go, by path (hidden temporaries excluded)."""
    roots = [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
    patterns = [(r, "*.ckpt") for r in roots]
    for logger in trainer.loggers:
        if getattr(logger, "save_dir", None):
            patterns.append((Path(logger.save_dir), "**/checkpoints/*.ckpt"))
    root = Path(trainer.default_root_dir)
    patterns += [(root, "checkpoints/*.ckpt"), (root, "lightning_logs/*/checkpoints/*.ckpt")]
    found = {p.resolve() for r, pattern in patterns if r.is_dir() for p in r.glob(pattern)}
    return sorted(p for p in found if p.exists() and not p.name.startswith("."))


def latest_checkpoint(paths: list[Path], deepspeed: bool = False) -> tuple[Path, int] | None:
    """(path, global step) of the complete checkpoint with the highest global step (ties: the most
    recently written); DeepSpeed folders when `deepspeed`, else `.ckpt` files. None: there is none.

    The step is read from each checkpoint, not from its name or modification time: copies (`cp -r`,
    rsync without -t) change mtimes, and names are whatever the ModelCheckpoint was configured with.
    """
    best: tuple[int, int, Path] | None = None
    for path in paths:
        if path.is_dir() != deepspeed:
            kind = "a DeepSpeed folder" if path.is_dir() else "a file"
            rank_zero_info(f"ckpt_path auto: skipping {path} ({kind}; this run's strategy reads the other)")
            continue
        step = checkpoint_step(path)
        if step is None:
            rank_zero_info(f"ckpt_path auto: skipping {path} (incomplete or unreadable)")
            continue
        key = (step, _written_at(path), path)
        best = key if best is None or key[:2] > best[:2] else best
    return None if best is None else (best[2], best[0])


def resolve_ckpt_path(ckpt_path: str | None, trainer: pl.Trainer) -> str | None:
    """`auto`: this run's complete checkpoint with the highest global step (None: start fresh).

    Any other value must be an existing, complete checkpoint (a `.ckpt` file, or a DeepSpeed folder
    under a DeepSpeed strategy), or one of Lightning's own keywords: last, best, hpc, registry.
    """
    if ckpt_path is None or ckpt_path in ("last", "best", "hpc", "registry"):
        return ckpt_path
    strategy = getattr(trainer, "strategy", None)
    deepspeed = deepspeed_config(strategy) is not None
    if ckpt_path != AUTO:
        files_too = not deepspeed or bool(getattr(strategy, "load_full_weights", False))
        check_explicit_checkpoint(Path(ckpt_path), deepspeed, files_too)
        return ckpt_path
    found = latest_checkpoint(checkpoint_candidates(trainer), deepspeed)
    if found is None:
        rank_zero_info("ckpt_path auto: no complete checkpoint found, starting from scratch")
        return None
    rank_zero_info(f"ckpt_path auto: resuming from {found[0]} (global step {found[1]})")
    return str(found[0])


def check_explicit_checkpoint(path: Path, deepspeed: bool, files: bool = True) -> None:
    """UserError unless `path` is a complete checkpoint the strategy reads: DeepSpeed folders when
    `deepspeed`, `.ckpt` files when `files` (DeepSpeed reads one only with `load_full_weights`)."""
    if not path.exists():
        raise UserError(f"ckpt_path {path}: not found (expected a .ckpt written by fit, or 'auto')")
    if path.is_dir():
        if not deepspeed:
            raise UserError(
                f"ckpt_path {path}: a folder (a DeepSpeed checkpoint?), but trainer.strategy is not "
                "DeepSpeed (expected a .ckpt file)"
            )
        if read_deepspeed_checkpoint(path) is None:
            raise UserError(f"ckpt_path {path}: {INCOMPLETE_DEEPSPEED_CHECKPOINT}")
    elif not files:
        raise UserError(
            f"ckpt_path {path}: a checkpoint file, but trainer.strategy is DeepSpeed, which resumes from "
            "its checkpoint folders (expected a folder written by a DeepSpeed fit)"
        )
    elif read_checkpoint(path) is None:
        raise UserError(f"ckpt_path {path}: {UNREADABLE_CHECKPOINT}")


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
