"""The prepared `data_path`: its metadata file, the reuse decision, and the atomic swap into place.

`data_path` is a `DatasetDict` saved with `save_to_disk` (splits `train` and, with a test split,
`test`) plus `rwkv_infctx_data.json`, which records the fingerprint it was built from, the tokenizer,
and per-split statistics (samples, tokens, longest sample, largest token id).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rwkv_infctx.errors import UserError

if TYPE_CHECKING:
    import datasets

METADATA_FILE = "rwkv_infctx_data.json"
FORMAT_VERSION = 1


def read_metadata(data_path: Path) -> dict[str, Any] | None:
    """The metadata of a prepared `data_path`; None if there is nothing at `data_path`.

    Raises `UserError` when `data_path` exists but is not a dataset prepared by rwkv-infctx.
    """
    if not data_path.exists():
        return None
    file = data_path / METADATA_FILE
    if not file.is_file():
        if data_path.is_dir() and not any(data_path.iterdir()):
            return None
        raise UserError(
            f"data.data_path {data_path}: exists but is not a dataset prepared by rwkv-infctx "
            f"(no {METADATA_FILE}); remove it or choose another path"
        )
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
        if not all(key in meta for key in ("fingerprint", "splits", "tokenizer")):
            raise ValueError("missing keys")
    except (ValueError, TypeError):
        raise UserError(
            f"data.data_path {data_path}: {METADATA_FILE} is damaged (remove the folder)"
        ) from None
    return meta


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Which fingerprint entries differ, options spelled out one by one."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key == "options":
            keys += [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            keys.append(key)
    return keys


def missing_files(data_path: Path) -> list[str]:
    """Files of the saved splits that are absent from `data_path` (empty: complete)."""
    index = data_path / "dataset_dict.json"
    try:
        splits = json.loads(index.read_text(encoding="utf-8"))["splits"]
    except (OSError, ValueError, KeyError, TypeError):
        return ["dataset_dict.json"]
    missing = []
    for split in splits:
        try:
            state = json.loads((data_path / split / "state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            missing.append(f"{split}/state.json")
            continue
        missing += [
            f"{split}/{f['filename']}"
            for f in state.get("_data_files", [])
            if not (data_path / split / f["filename"]).is_file()
        ]
    return missing


def remove_stale_builds(data_path: Path) -> None:
    """Delete build folders of `data_path` left by killed processes of this host (pid not alive)."""
    prefix, host = f".{data_path.name}.building-", socket.gethostname()
    if not data_path.parent.is_dir():
        return
    for entry in data_path.parent.iterdir():
        parts = entry.name[len(prefix) :].rsplit("-", 2) if entry.name.startswith(prefix) else []
        if len(parts) == 3 and parts[0] == host and parts[1].isdigit() and not _alive(int(parts[1])):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def work_dir(data_path: Path) -> Path:
    """A fresh private folder next to `data_path` to build in (same filesystem, so rename is atomic).

    Its name, `.NAME.building-HOST-PID-XXXXXXXX`, lets later builds remove it if the process was killed.
    """
    parent = data_path.parent
    remove_stale_builds(data_path)
    tag = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    work = parent / f".{data_path.name}.building-{tag}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        work.mkdir()
        if data_path.exists() and not os.access(data_path, os.W_OK):
            raise PermissionError("permission denied")
    except OSError as e:
        shutil.rmtree(work, ignore_errors=True)
        raise UserError(f"data.data_path {data_path}: not writable ({e.strerror or e})") from None
    return work


def publish(built: Path, data_path: Path, meta: dict[str, Any], work: Path) -> None:
    """Write the metadata into `built` and move it to `data_path`, replacing what was there."""
    (built / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    if data_path.exists():
        data_path.rename(work / "previous")
    built.rename(data_path)


def load_splits(data_path: Path) -> datasets.DatasetDict:
    """Open the saved splits (memory-mapped)."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(data_path))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise UserError(f"data.data_path {data_path}: not a readable dataset ({e})") from None
    if not isinstance(loaded, datasets.DatasetDict) or "train" not in loaded:
        raise UserError(f"data.data_path {data_path}: expected a dataset with a 'train' split")
    for name, split in loaded.items():
        if "input_ids" not in split.column_names or "loss_mask" not in split.column_names:
            raise UserError(f"data.data_path {data_path}: split {name!r} lacks input_ids/loss_mask")
    return loaded
