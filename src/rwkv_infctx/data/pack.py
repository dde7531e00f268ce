"""Concatenation ("rechunk") and statistics over prepared token columns, in Arrow, a batch at a time.

Rechunking streams the split's documents in order, puts the end-of-text token after each one, and
cuts the stream into samples of exactly `size` tokens; the last sample holds the remainder. With
`size == -1` the whole split becomes one sample. The end-of-text token is learnt (mask 1).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rwkv_infctx.data.encode import IDS_TYPE, MASK_TYPE
from rwkv_infctx.errors import UserError

if TYPE_CHECKING:
    import datasets

READ_ROWS = 1000
MAX_ONE_SAMPLE = 2**31 - 1  # Arrow list offsets are int32


def _batches(ds: datasets.Dataset) -> Iterator[pa.Table]:
    yield from ds.with_format("arrow").iter(batch_size=READ_ROWS)


def _flat(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The values of list column `name` back to back, and the length of each row."""
    column = table.column(name).combine_chunks()
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
    return column.flatten().to_numpy(zero_copy_only=False), lengths


def _with_eot(table: pa.Table, eot_id: int, if_missing: bool) -> tuple[np.ndarray, np.ndarray]:
    ids, lengths = _flat(table, "input_ids")
    mask, _ = _flat(table, "loss_mask")
    ends = np.cumsum(lengths)
    if if_missing and len(ids):  # only after documents that do not already end with it
        ends = ends[(lengths == 0) | (ids[np.maximum(ends - 1, 0)] != eot_id)]
    return np.insert(ids, ends, eot_id).astype(np.int32), np.insert(mask, ends, 1).astype(np.uint8)


def _rows(ids: np.ndarray, mask: np.ndarray, size: int) -> pa.Table:
    starts = np.arange(0, len(ids), size, dtype=np.int64)
    offsets = pa.array(np.append(starts, len(ids)).astype(np.int32))
    return pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(ids, pa.int32())),
            "loss_mask": pa.ListArray.from_arrays(offsets, pa.array(mask, pa.uint8())),
        }
    )


def rechunk(
    ds: datasets.Dataset, size: int, eot_id: int, path: Path, eot_if_missing: bool = False
) -> datasets.Dataset:
    """Join the documents of `ds` with `eot_id` and cut them into `size`-token samples, via `path`.

    With `eot_if_missing`, a document that already ends with `eot_id` gets no second one.
    """
    import datasets

    schema = pa.schema({"input_ids": IDS_TYPE, "loss_mask": MASK_TYPE})
    carry_ids: list[np.ndarray] = []
    carry_mask: list[np.ndarray] = []
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for table in _batches(ds):
            ids, mask = _with_eot(table, eot_id, eot_if_missing)
            carry_ids.append(ids)
            carry_mask.append(mask)
            if size == -1:
                continue  # everything is one sample: keep collecting
            ids, mask = np.concatenate(carry_ids), np.concatenate(carry_mask)
            full = len(ids) // size * size
            if full:
                writer.write_table(_rows(ids[:full], mask[:full], size))
            carry_ids, carry_mask = [ids[full:]], [mask[full:]]
        ids = np.concatenate(carry_ids) if carry_ids else np.zeros(0, np.int32)
        if len(ids) > MAX_ONE_SAMPLE:
            raise UserError(f"data.rechunk_size: -1 makes a sample of {len(ids)} tokens (at most 2**31 - 1)")
        if len(ids):
            writer.write_table(_rows(ids, np.concatenate(carry_mask), len(ids)))
    return datasets.Dataset.from_file(str(path))


def lengths(ds: datasets.Dataset) -> np.ndarray:
    """Token count of every row, as int64."""
    parts = [_flat(t.select(["input_ids"]), "input_ids")[1] for t in _batches(ds.select_columns("input_ids"))]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def stats(ds: datasets.Dataset) -> dict[str, Any]:
    """Samples, tokens, learnt tokens, longest sample and largest token id of a prepared split."""
    out = {"samples": len(ds), "tokens": 0, "learnt_tokens": 0, "longest": 0, "max_token_id": -1}
    for table in _batches(ds):
        ids, row_len = _flat(table, "input_ids")
        mask, _ = _flat(table, "loss_mask")
        out["tokens"] += len(ids)
        out["learnt_tokens"] += int(mask.sum(dtype=np.int64))
        if len(ids):
            out["longest"] = max(out["longest"], int(row_len.max()))
            out["max_token_id"] = max(out["max_token_id"], int(ids.max()))
    return out
