"""Crash-safe file writes: write to a temporary name in the same folder, then rename."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from rwkv_infctx.errors import UserError


def _temp_beside(path: Path) -> Path:
    """Create an empty hidden temporary file in `path`'s folder; UserError if that is impossible."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UserError(f"output {path}: folder {folder} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise UserError(f"output {path}: cannot write in {folder} ({e.strerror})") from None
    os.close(fd)
    return Path(tmp)


def check_writable(path: str | Path) -> None:
    """UserError unless `atomic_path(path)` could write there (checked with a probe file, removed)."""
    _temp_beside(Path(path)).unlink()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`
    (then the folder is fsynced, so the rename survives a power cut).

    On any exception the temporary file is removed and `path` is left untouched.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    tmp_path = _temp_beside(path)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes it 0600; give it a normal file's mode
        os.replace(tmp_path, path)
        fsync_dir(folder)
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_folder(path: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success its files are fsynced and it is
    renamed onto `path` (an existing folder there is replaced only with `replace`, after the new one
    is complete). On any exception the temporary folder is removed and `path` is left untouched."""
    import shutil

    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UserError(f"output {path}: folder {folder} does not exist")
    if path.exists() and not (replace and path.is_dir()):
        raise UserError(f"output {path}: already exists" + ("" if replace else " (expected a new name)"))
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder))
    except OSError as e:
        raise UserError(f"output {path}: cannot write in {folder} ({e.strerror})") from None
    old = None
    try:
        yield tmp
        for f in tmp.iterdir():
            with open(f, "rb+") as handle:
                os.fsync(handle.fileno())
        fsync_dir(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists() and replace:
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=folder))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        fsync_dir(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
