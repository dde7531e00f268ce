"""Already-tokenized documents in Megatron's `MMapIndexedDataset` files (`NAME.bin` + `NAME.idx`).

This is what RWKV-LM's `make_data.py` writes. The `.idx` file is, all integers little-endian:

    9 bytes   magic b"MMIDIDX\\x00\\x00"
    uint64    version (1)
    uint8     dtype code of the tokens: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 8 uint16
              (6 and 7 are floating point: float64, and float32 in Megatron but float64 in fairseq
              and RWKV-LM; neither holds token ids, so both are refused)
    uint64    n, the number of sequences
    uint64    m, the length of the document index
    int32     sizes[n]      tokens in sequence i
    int64     pointers[n]   byte offset of sequence i in `.bin`
    int64     doc_idx[m]    first sequence of each document, plus the total (not used here)

`.bin` holds the tokens back to back. Each sequence (index entry) becomes one document. Nothing is
read into memory whole: the index through memory maps, the tokens a window at a time, written to
an Arrow file of `input_ids` (int32) and `loss_mask` (all 1).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from rwkv_infctx.data.config import DataConfig
from rwkv_infctx.data.encode import IDS_TYPE, MASK_TYPE
from rwkv_infctx.errors import UserError

if TYPE_CHECKING:
    import datasets

MAGIC = b"MMIDIDX\x00\x00"
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, document index entries
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
FLOAT_CODES = {6: "float64", 7: "float32/float64"}
SUFFIXES = (".bin", ".idx")
WINDOW_TOKENS = 1 << 22
"""Tokens read per window (16 MB of int32 ids); a longer sequence is read alone."""
INDEX_CHUNK = 1 << 20
"""Index entries checked per step."""


def find(source: str) -> tuple[Path, Path] | None:
    """(`.bin`, `.idx`) if `source` names a binidx pair by prefix or by either file, else None.

    Raises `UserError` when one file of the pair is there and the other is missing.
    """
    path = Path(source).expanduser()
    if path.suffix in SUFFIXES:
        prefix = path.with_suffix("")
        if not any(prefix.with_suffix(s).is_file() for s in SUFFIXES):
            raise UserError(f"data.source: file or folder not found: {source}")
    elif not path.exists() and any(Path(f"{path}{s}").is_file() for s in SUFFIXES):
        prefix = path
    else:
        return None
    bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    for file in (bin_path, idx_path):
        if not file.is_file():
            raise UserError(
                f"data.source {source}: {file} is missing (a binidx source needs {bin_path.name} "
                f"and {idx_path.name} side by side)"
            )
    return bin_path.resolve(), idx_path.resolve()


def check_options(config: DataConfig, source: str) -> None:
    """Refuse options that pick text out of rows: a binidx source holds token ids only."""
    for key in ("text_column", "multi_column_keys", "messages_column", "source_dataset_params"):
        if getattr(config, key) is not None:
            raise UserError(f"data.{key}: not used with data.source {source} (binidx files hold token ids)")


@dataclass(frozen=True)
class BinIdx:
    """An opened, checked binidx pair."""

    bin_path: Path
    idx_path: Path
    dtype: np.dtype
    count: int  # sequences (documents)
    sizes_at: int  # byte offset of sizes[] in the .idx file

    @property
    def name(self) -> str:
        return str(self.bin_path.with_suffix(""))

    def sizes(self) -> np.ndarray:
        return np.memmap(self.idx_path, np.int32, "r", self.sizes_at, (self.count,))

    def pointers(self) -> np.ndarray:
        return np.memmap(self.idx_path, np.int64, "r", self.sizes_at + 4 * self.count, (self.count,))


def open_binidx(bin_path: Path, idx_path: Path) -> BinIdx:
    """Read and check the header of `idx_path`, and that every sequence lies inside `bin_path`."""
    name = str(bin_path.with_suffix(""))
    idx_size = idx_path.stat().st_size
    with idx_path.open("rb") as f:
        head = f.read(HEADER.size)
    if head[: len(MAGIC)] != MAGIC:
        raise UserError(
            f"data.source {name}: {idx_path.name} does not start with the MMIDIDX magic "
            f"(found {head[: len(MAGIC)]!r}); not a Megatron/RWKV-LM binidx index"
        )
    if len(head) < HEADER.size:
        raise UserError(
            f"data.source {name}: {idx_path.name} is truncated ({idx_size} bytes, header needs 34)"
        )
    _, version, code, count, doc_count = HEADER.unpack(head)
    if version != 1:
        raise UserError(f"data.source {name}: {idx_path.name} has version {version} (expected 1)")
    if code not in DTYPES:
        what = f"a {FLOAT_CODES[code]} code, not token ids" if code in FLOAT_CODES else "unknown"
        codes = ", ".join(f"{k} {np.dtype(v).name}" for k, v in DTYPES.items())
        raise UserError(
            f"data.source {name}: {idx_path.name} has dtype code {code}, {what} (expected {codes})"
        )
    needed = HEADER.size + 12 * count + 8 * doc_count
    if idx_size < needed:
        raise UserError(
            f"data.source {name}: {idx_path.name} is truncated ({idx_size} bytes; {count} sequences "
            f"and {doc_count} document index entries need {needed})"
        )
    if count == 0:
        raise UserError(f"data.source {name}: {idx_path.name} lists no sequences (expected at least one)")
    found = BinIdx(bin_path, idx_path, np.dtype(DTYPES[code]), count, HEADER.size)
    _check_extents(found)
    return found


def _check_extents(b: BinIdx) -> None:
    """Every size and pointer is non-negative and every sequence ends inside `.bin`."""
    bin_size = b.bin_path.stat().st_size
    sizes, pointers = b.sizes(), b.pointers()
    for start in range(0, b.count, INDEX_CHUNK):
        s = sizes[start : start + INDEX_CHUNK].astype(np.int64)
        p = np.asarray(pointers[start : start + INDEX_CHUNK])
        ends = p + s * b.dtype.itemsize
        bad = np.flatnonzero((s < 0) | (p < 0) | (ends > bin_size))
        if len(bad):
            i = int(bad[0])
            raise UserError(
                f"data.source {b.name}: sequence {start + i} (bytes {int(p[i])} to {int(ends[i])}) runs past "
                f"the end of {b.bin_path.name} ({bin_size} bytes)"
            )


def windows(b: BinIdx) -> Iterator[tuple[int, int]]:
    """Ranges `[i, j)` of sequences stored back to back in `.bin`, about `WINDOW_TOKENS` each."""
    sizes, pointers = b.sizes(), b.pointers()
    for start in range(0, b.count, INDEX_CHUNK):
        s = sizes[start : start + INDEX_CHUNK].astype(np.int64)
        p = np.asarray(pointers[start : start + INDEX_CHUNK])
        # a window may not span a gap or a jump between sequences
        breaks = np.flatnonzero(p[1:] != p[:-1] + s[:-1] * b.dtype.itemsize) + 1
        breaks = np.append(breaks, len(s))
        before = np.concatenate([[0], np.cumsum(s)])  # tokens before sequence k of this chunk
        i = 0
        for stop in breaks:
            while i < stop:
                j = int(np.searchsorted(before, before[i] + WINDOW_TOKENS, side="right")) - 1
                j = min(max(j, i + 1), int(stop))
                yield start + i, start + j
                i = j


def _window_table(b: BinIdx, i: int, j: int, vocab_size: int, tokenizer: str) -> pa.Table:
    sizes = b.sizes()[i:j].astype(np.int64)
    total = int(sizes.sum())
    first = int(b.pointers()[i])
    if total:
        raw = np.memmap(b.bin_path, b.dtype, "r", first, (total,))
        low, high = int(raw.min()), int(raw.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise UserError(
                f"data.source {b.name}: token id {bad} in sequences {i} to {j - 1} does not fit "
                f"data.tokenizer {tokenizer!r} (vocab_size {vocab_size}: ids 0 to {vocab_size - 1})"
            )
        ids = raw.astype(np.int32)
        del raw  # unmap: pages read so far no longer count as this process's memory
    else:
        ids = np.zeros(0, np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32))
    return pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(ids, pa.int32())),
            "loss_mask": pa.ListArray.from_arrays(offsets, pa.array(np.ones(total, np.uint8))),
        }
    )


def to_dataset(b: BinIdx, vocab_size: int, tokenizer: str, path: Path) -> datasets.Dataset:
    """One row per sequence of `b` (`input_ids`, `loss_mask` all 1), written to `path` and mapped.

    Raises `UserError` naming the tokenizer when a token id is negative or not below `vocab_size`.
    """
    import datasets
    from tqdm.auto import tqdm

    schema = pa.schema({"input_ids": IDS_TYPE, "loss_mask": MASK_TYPE})
    with (
        pa.OSFile(str(path), "wb") as sink,
        pa.ipc.new_stream(sink, schema) as writer,
        tqdm(total=b.count, desc="Reading binidx", unit=" docs") as bar,
    ):
        for i, j in windows(b):
            writer.write_table(_window_table(b, i, j, vocab_size, tokenizer))
            bar.update(j - i)
    return datasets.Dataset.from_file(str(path))
