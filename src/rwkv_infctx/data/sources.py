"""Turn `data.source` (and friends) into a `datasets.Dataset` of raw rows.

A source is one of: a hub dataset name, a builder (`text`, `json`, `csv`, `parquet`, `arrow`) with
`source_data_dir` or `data_files`, a path to a file or folder (the builder is inferred from the file
extensions; a folder written by `save_to_disk` is loaded as is), a binidx pair (`NAME.bin` and
`NAME.idx`, named by prefix or either file; read by `binidx`, not here), or `pkg://NAME` for a file
bundled in `rwkv_infctx/assets`. Local sources never touch the network.

Text files are read as one document per file (`sample_by: document`) unless `source_dataset_params`
says otherwise. Local text, JSON and CSV files must be valid UTF-8: a bad file is refused with its
name and byte offset before anything is built. For text and CSV, `encoding_errors: replace` in
`source_dataset_params` opts into replacement characters instead.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rwkv_infctx.data import binidx
from rwkv_infctx.data.config import BUILDERS, DataConfig
from rwkv_infctx.errors import UserError

if TYPE_CHECKING:
    import datasets

EXTENSIONS = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
}
COMPRESSION = (".gz", ".bz2", ".xz", ".zst")
PKG_PREFIX = "pkg://"


@dataclass(frozen=True)
class Source:
    """A resolved source: how to load it and what identifies its content."""

    kind: str  # "local" (builder over files), "saved" (save_to_disk folder), "binidx" or "hub"
    name: str  # what the user wrote, for messages
    builder: str | None = None
    files: dict[str, list[str]] = field(default_factory=dict)  # split -> absolute paths
    path: str | None = None  # the "saved" folder

    def identity(self) -> dict[str, Any]:
        """What the prepared data depends on: file sizes and modification times, or the hub name."""
        if self.kind == "hub":
            return {"kind": "hub", "name": self.name}
        paths = sorted(str(p) for p in Path(self.path).rglob("*")) if self.path else []
        files = {split: sorted(paths) for split, paths in self.files.items()} or {"saved": paths}
        return {"kind": self.kind, "builder": self.builder, "files": _stamp(files)}


def _stamp(files: dict[str, list[str]]) -> dict[str, list[list[Any]]]:
    out = {}
    for split, paths in files.items():
        out[split] = []
        for p in paths:
            if not Path(p).is_file():
                continue
            stat = Path(p).stat()
            # Bundled assets are named and digested: their path and mtime change with every install.
            if _is_asset(p):
                digest = hashlib.sha256(Path(p).read_bytes()).hexdigest()[:16]
                out[split].append([PKG_PREFIX + Path(p).name, stat.st_size, digest])
            else:
                out[split].append([p, stat.st_size, stat.st_mtime_ns])
    return out


def _is_asset(path: str) -> bool:
    from rwkv_infctx.tokenizer import asset_path

    return Path(path).parent == asset_path("x").parent


def builder_for(path: Path) -> str | None:
    """The builder that reads `path`, judged by its extension (compression suffixes ignored)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSION:
        suffixes = suffixes[:-1]
    return EXTENSIONS.get(suffixes[-1]) if suffixes else None


def resolve_source(config: DataConfig) -> Source:
    """Decide what `data.source` names, checking that local files exist."""
    src = config.source
    assert src is not None
    if config.source_data_dir is not None or config.data_files is not None:
        if src in BUILDERS:
            return _builder_source(config, src)
        if "/" in src and not Path(src).exists():
            return Source(kind="hub", name=src)
        raise UserError(
            f"data.source: unknown builder {src!r} for data_files/source_data_dir "
            f"(expected one of {', '.join(BUILDERS)})"
        )
    if src.startswith(PKG_PREFIX):
        return _path_source(_asset(src[len(PKG_PREFIX) :]), src, config.source_split)
    pair = binidx.find(src)
    if pair is not None:
        return Source(kind="binidx", name=src, files={config.source_split: [str(p) for p in pair]})
    path = Path(src).expanduser()
    if path.exists():
        return _path_source(path, src, config.source_split)
    if src in BUILDERS:
        raise UserError(f"data.source {src!r}: a builder needs data.data_files or data.source_data_dir")
    if src.startswith((".", "/", "~")) or builder_for(path) is not None or src.count("/") > 1:
        raise UserError(f"data.source: file or folder not found: {src}")
    return Source(kind="hub", name=src)


def _asset(name: str) -> Path:
    from rwkv_infctx.tokenizer import asset_path

    path = asset_path(name)
    if not name or not path.is_file():
        raise UserError(f"data.source: no bundled file {PKG_PREFIX}{name} (looked in {path.parent})")
    return path


def _path_source(path: Path, name: str, split: str) -> Source:
    if path.is_file():
        builder = builder_for(path)
        if builder is None:
            raise UserError(
                f"data.source {name}: cannot infer the format of {path.name} "
                f"(known extensions: {', '.join(EXTENSIONS)}); set data.source to a builder and data_files"
            )
        return Source(kind="local", name=name, builder=builder, files={split: [str(path.resolve())]})
    if _is_saved_dataset(path):
        return Source(kind="saved", name=name, path=str(path.resolve()))
    files = _data_files_in(path, None, f"data.source {name}")
    return Source(kind="local", name=name, builder=_one_builder(files, name), files={split: files})


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "dataset_info.json").is_file() and (path / "state.json").is_file()
    )


def _data_files_in(folder: Path, builder: str | None, what: str) -> list[str]:
    """Data files under `folder` (recursively, hidden ones skipped) that `builder` reads."""
    files = sorted(
        str(p.resolve())
        for p in folder.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and builder_for(p) is not None
        and (builder is None or builder_for(p) == builder)
    )
    if not files:
        kinds = f"{builder} " if builder else ""
        raise UserError(f"{what}: no {kinds}data files in folder {folder}")
    return files


def _one_builder(files: list[str], name: str) -> str:
    builders = sorted({builder_for(Path(f)) or "" for f in files})
    if len(builders) > 1:
        raise UserError(
            f"data.source {name}: folder mixes formats ({', '.join(builders)}); "
            "pick one with data.source: BUILDER and data.data_files"
        )
    return builders[0]


def _builder_source(config: DataConfig, builder: str) -> Source:
    base = Path.cwd()
    if config.source_data_dir is not None:
        base = Path(config.source_data_dir).expanduser()
        if not base.is_dir():
            raise UserError(f"data.source_data_dir: folder not found: {config.source_data_dir}")
    if config.data_files is None:
        files = {config.source_split: _data_files_in(base, builder, "data.source_data_dir")}
    elif isinstance(config.data_files, dict):
        files = {split: _expand(base, patterns) for split, patterns in config.data_files.items()}
    else:
        files = {config.source_split: _expand(base, config.data_files)}
    return Source(kind="local", name=builder, builder=builder, files=files)


def _expand(base: Path, patterns: str | list[str]) -> list[str]:
    out: list[str] = []
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        full = base / Path(pattern).expanduser()
        matches = sorted(glob.glob(str(full), recursive=True)) if glob.has_magic(pattern) else [str(full)]
        matches = [m for m in matches if Path(m).is_file()]
        if not matches:
            raise UserError(f"data.data_files: file not found: {full}")
        out += [str(Path(m).resolve()) for m in matches]
    return out


def load_source(source: Source, config: DataConfig, cache_dir: str | None) -> datasets.Dataset:
    """Load the raw rows of the `source_split` split."""
    import datasets

    params = dict(config.source_dataset_params or {})
    if source.kind == "saved":
        loaded = datasets.load_from_disk(source.path)
        if isinstance(loaded, datasets.DatasetDict):
            if config.source_split not in loaded:
                raise UserError(
                    f"data.source_split: {config.source_split!r} not in {source.path} "
                    f"(splits: {', '.join(loaded)})"
                )
            loaded = loaded[config.source_split]
        return loaded
    if source.kind == "hub":
        return _load_hub(source, config, params, cache_dir)
    if source.builder == "text":
        params = {"sample_by": "document", **params}
    if source.builder == "csv" and any(f.endswith(".tsv") for fs in source.files.values() for f in fs):
        params = {"sep": "\t", **params}
    _check_utf8(source, params)
    if config.source_split not in source.files:
        raise UserError(
            f"data.source_split: {config.source_split!r} not in data.data_files "
            f"(splits: {', '.join(source.files)})"
        )
    try:
        return datasets.load_dataset(
            source.builder, data_files=source.files, split=config.source_split, cache_dir=cache_dir, **params
        )
    except UserError:
        raise
    except Exception as e:
        raise _read_error(source, e) from None


def _load_hub(source: Source, config: DataConfig, params: dict[str, Any], cache_dir: str | None):
    import datasets

    extra = {"data_dir": config.source_data_dir} if config.source_data_dir else {}
    if config.data_files is not None:
        extra["data_files"] = config.data_files
    try:
        return datasets.load_dataset(
            source.name, split=config.source_split, cache_dir=cache_dir, **extra, **params
        )
    except Exception as e:
        raise UserError(
            f"data.source {source.name!r}: could not load it as a Hugging Face hub dataset "
            f"({_innermost(e)}); check the name, the network, or HF_HUB_OFFLINE"
        ) from None


def _innermost(e: BaseException) -> str:
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _check_utf8(source: Source, params: dict[str, Any]) -> None:
    """Refuse local text, JSON and CSV files that are not valid UTF-8, naming the file and byte.

    The text and CSV readers honour `encoding_errors` (e.g. `replace`), so setting it skips the check;
    the JSON reader ignores it, so JSON files are always checked.
    """
    if source.builder not in ("text", "json", "csv") or params.get("encoding", "utf-8") != "utf-8":
        return
    if source.builder != "json" and params.get("encoding_errors") not in (None, "strict"):
        return
    for path in (f for fs in source.files.values() for f in fs):
        offset = first_invalid_utf8(Path(path))
        if offset is not None:
            hint = "re-encode it as UTF-8"
            if source.builder != "json":
                hint += ", or set data.source_dataset_params: {encoding_errors: replace}"
            raise UserError(f"data file {path}: invalid UTF-8 at byte {offset} ({hint})")


def _read_error(source: Source, error: Exception) -> UserError:
    files = [f for fs in source.files.values() for f in fs]
    empty = [f for f in files if Path(f).is_file() and Path(f).stat().st_size == 0]
    if empty:
        return UserError(
            f"data.source {source.name}: {empty[0]} is empty, it has no rows (expected at least one document)"
        )
    return UserError(f"data.source {source.name}: could not read {files[0]} ... ({_innermost(error)})")


def first_invalid_utf8(path: Path, chunk: int = 1 << 23) -> int | None:
    """Byte offset of the first invalid UTF-8 sequence in a plain (uncompressed) file, or None."""
    if path.suffix in COMPRESSION or builder_for(path) in ("parquet", "arrow"):
        return None
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as f:
        while block := f.read(chunk):
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                return offset - pending + e.start
            offset += len(block)
        pending = len(decoder.getstate()[0])
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as e:
            return offset - pending + e.start
    return None
