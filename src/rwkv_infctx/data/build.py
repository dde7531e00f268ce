"""`prepare(config)`: reuse `data_path` if its fingerprint matches, else build it from the source.

Build order: load the source split, tokenize (batched, `num_proc` processes), drop documents outside
`min_token_size`/`max_token_size` and samples under 2 tokens, rechunk, hold out `test_split` samples
(order kept in both splits), save. Everything happens in a private folder next to
`data_path`, which replaces `data_path` only once complete; a failure leaves `data_path` untouched.
"""

from __future__ import annotations

import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rwkv_infctx.data import binidx, pack, store
from rwkv_infctx.data.chat import tokenize_chats
from rwkv_infctx.data.config import DataConfig
from rwkv_infctx.data.encode import Encoder, columns_for, tokenize
from rwkv_infctx.data.sources import Source, load_source, resolve_source
from rwkv_infctx.errors import UserError
from rwkv_infctx.tokenizer import Tokenizer, load_tokenizer

if TYPE_CHECKING:
    import datasets

DEFAULT_TOKENIZER = "neox"


@dataclass(frozen=True)
class Prepared:
    """What `prepare` did ("built", "reused" or "loaded"), why, and the metadata of `data_path`."""

    action: str
    reason: str
    metadata: dict[str, Any]
    seconds: float = 0.0

    def message(self, data_path: str) -> str:
        took = f" in {self.seconds:.1f} s" if self.action == "built" else ""
        return f"data_path {data_path}: {self.action}{took} ({self.reason})"


def prepare(config: DataConfig) -> Prepared:
    """Make sure `config.data_path` holds the tokenized dataset the config describes."""
    data_path = Path(config.data_path or "")
    if config.source is None:
        meta = loadable_metadata(config)
        return Prepared("loaded", "data.source is empty: using the prepared data as is", meta)
    tokenizer = load_tokenizer(config.tokenizer or DEFAULT_TOKENIZER)
    source = resolve_source(config)
    fingerprint = make_fingerprint(config, source, tokenizer)
    old = store.read_metadata(data_path)
    missing = store.missing_files(data_path) if old is not None else []
    if old is not None and old["fingerprint"] == fingerprint and not missing:
        return Prepared("reused", "same source, tokenizer and options", old)
    if old is None:
        reason = "data_path did not exist"
    elif missing:
        reason = f"incomplete: {', '.join(missing[:3])} missing"
    else:
        reason = "changed: " + ", ".join(store.changed_keys(old["fingerprint"], fingerprint))
    start = time.perf_counter()
    meta = _build(config, source, tokenizer, fingerprint, data_path)
    return Prepared("built", reason, meta, time.perf_counter() - start)


def loadable_metadata(config: DataConfig) -> dict[str, Any]:
    """Metadata of a prepared `data_path`, checked against `data.tokenizer` when that is set."""
    data_path = Path(config.data_path or "")
    meta = store.read_metadata(data_path)
    if meta is None:
        hint = "set data.source to build it" if config.source is None else "run prepare_data first"
        raise UserError(f"data.data_path {data_path}: no prepared dataset there ({hint})")
    missing = store.missing_files(data_path)
    if missing:
        raise UserError(
            f"data.data_path {data_path}: incomplete ({', '.join(missing[:3])} missing); "
            "set data.source to rebuild it"
        )
    if config.tokenizer is not None:
        wanted = load_tokenizer(config.tokenizer)
        built = meta["tokenizer"]
        if wanted.fingerprint != built["fingerprint"]:
            raise UserError(
                f"data.data_path {data_path}: built with tokenizer {built['spec']!r}, "
                f"but data.tokenizer is {config.tokenizer!r} (set data.source to rebuild, or fix it)"
            )
    return meta


def make_fingerprint(config: DataConfig, source: Source, tokenizer: Tokenizer) -> dict[str, Any]:
    """Everything the prepared data depends on."""
    import datasets

    return {
        "format": store.FORMAT_VERSION,
        "source": source.identity(),
        "options": config.result_options(),
        "tokenizer": tokenizer.fingerprint,
        "datasets": datasets.__version__,
    }


def _build(
    config: DataConfig, source: Source, tokenizer: Tokenizer, fingerprint: dict, data_path: Path
) -> dict[str, Any]:
    work = store.work_dir(data_path)
    try:
        tokens, bad_rows = _tokens(config, source, tokenizer, work)
        tokens, dropped = _filter(tokens, config)
        dropped.update(bad_rows)
        if config.rechunk:
            # a binidx document may already end with the end-of-text token (RWKV-LM's make_data.py)
            eot_if_missing = source.kind == "binidx"
            path = work / "rechunked.arrow"
            tokens = _rechunk(tokens, config.rechunk, tokenizer.eot_id, path, dropped, eot_if_missing)
        splits = _split(tokens, config)
        _warn_short(dropped)
        meta = _metadata(fingerprint, config, tokenizer, splits, dropped)
        built = work / "dataset"
        _save(splits, built)
        store.publish(built, data_path, meta, work)
        return meta
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _tokens(
    config: DataConfig, source: Source, tokenizer: Tokenizer, work: Path
) -> tuple[datasets.Dataset, dict[str, int]]:
    """`input_ids` and `loss_mask` of every document of the source split, and counts of rows dropped."""
    spec = config.tokenizer or DEFAULT_TOKENIZER
    if source.kind == "binidx":
        binidx.check_options(config, source.name)
        bin_path, idx_path = (Path(f) for f in source.files[config.source_split])
        found = binidx.open_binidx(bin_path, idx_path)
        return binidx.to_dataset(found, tokenizer.vocab_size, spec, work / "binidx.arrow"), {}
    cache = config.cache_dir or (None if source.kind == "hub" else str(work / "cache"))
    raw = load_source(source, config, cache)
    if len(raw) == 0:
        raise UserError(f"data.source {source.name}: split {config.source_split!r} has no rows")
    if config.messages_column is not None:
        return tokenize_chats(raw, config, spec, source.name)
    available = {k: getattr(f, "dtype", type(f).__name__) for k, f in raw.features.items()}
    columns = columns_for(config, available, source.name)
    encoder = Encoder(spec, columns, config.multi_column_separator)
    return tokenize(raw, encoder, config.num_proc), {}


def _filter(ds: datasets.Dataset, config: DataConfig) -> tuple[datasets.Dataset, dict[str, int]]:
    """Drop documents outside the token-size limits, and (without rechunk) those under 2 tokens."""
    n = pack.lengths(ds)
    too_short = n < (1 if config.rechunk else 2)
    below = (n < config.min_token_size) & ~too_short if config.min_token_size else np.zeros_like(too_short)
    above = n > config.max_token_size if config.max_token_size else np.zeros_like(too_short)
    keep = ~(too_short | below | above)
    dropped = {
        "under_2_tokens" if not config.rechunk else "empty": int(too_short.sum()),
        "below_min_token_size": int(below.sum()),
        "above_max_token_size": int((above & ~too_short & ~below).sum()),
    }
    if not keep.any():
        detail = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in dropped.items() if v)
        raise UserError(f"data: no samples left after filtering {len(n)} documents ({detail})")
    return (ds if keep.all() else ds.select(np.flatnonzero(keep))), dropped


def _split(ds: datasets.Dataset, config: DataConfig) -> dict[str, datasets.Dataset]:
    test_n = config.test_size(len(ds))
    if test_n == 0:
        return {"train": ds}
    if test_n >= len(ds):
        raise UserError(
            f"data.test_split: {config.test_split} holds out {test_n} of {len(ds)} samples, "
            "leaving none to train on"
        )
    if config.test_split_shuffle:
        test = np.sort(np.random.default_rng(config.test_split_seed).permutation(len(ds))[:test_n])
    else:
        test = np.arange(len(ds) - test_n, len(ds))
    train = np.setdiff1d(np.arange(len(ds)), test)
    return {"train": ds.select(train), "test": ds.select(test)}


def _rechunk(
    ds: datasets.Dataset, size: int, eot_id: int, path: Path, dropped: dict[str, int], if_missing: bool
):
    chunks = pack.rechunk(ds, size, eot_id, path, if_missing)
    n = pack.lengths(chunks)
    short = n < 2
    if short.any():
        dropped["under_2_tokens"] = dropped.get("under_2_tokens", 0) + int(short.sum())
        chunks = chunks.select(np.flatnonzero(~short))
    return chunks


def _warn_short(dropped: dict[str, int]) -> None:
    if dropped.get("under_2_tokens"):
        warnings.warn(
            f"data: dropped {dropped['under_2_tokens']} samples with fewer than 2 tokens (nothing to learn)",
            stacklevel=3,
        )


def _metadata(
    fingerprint: dict, config: DataConfig, tokenizer: Tokenizer, splits: dict, dropped: dict
) -> dict[str, Any]:
    spec = config.tokenizer or DEFAULT_TOKENIZER
    return {
        "fingerprint": fingerprint,
        "tokenizer": {
            "spec": spec,
            "fingerprint": tokenizer.fingerprint,
            "eot_id": tokenizer.eot_id,
            "vocab_size": tokenizer.vocab_size,
        },
        "splits": {name: pack.stats(ds) for name, ds in splits.items()},
        "dropped": dropped,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _save(splits: dict[str, datasets.Dataset], path: Path) -> None:
    import datasets

    datasets.DatasetDict(splits).save_to_disk(str(path))
