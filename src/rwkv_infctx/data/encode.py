"""Rows of text to `input_ids` and `loss_mask`, as a batched `datasets.map` function.

A sample is made of one or more columns. Column i contributes `prefix[i] + value + suffix[i]`, and
columns are joined by `separator`. Each of these pieces is tokenized on its own and the ids are
concatenated, so every token belongs to exactly one piece and the mask is exact to the token.

`loss_mask[j]` says whether token j is learnt, i.e. whether predicting it (from tokens < j) counts
in the loss. It is 1 for the prefix, value and suffix of a column whose train mask is true, 0 for
those of a prompt column; a separator takes the mask of the column before it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from rwkv_infctx.data.config import DataConfig
from rwkv_infctx.errors import UserError

if TYPE_CHECKING:
    import datasets

IDS_TYPE = pa.list_(pa.int32())
MASK_TYPE = pa.list_(pa.uint8())


def token_features() -> datasets.Features:
    """Schema of a prepared split: int32 token ids and a uint8 mask of the same length."""
    from datasets import Features, List, Value

    return Features({"input_ids": List(Value("int32")), "loss_mask": List(Value("uint8"))})


@dataclass(frozen=True)
class Column:
    """One column of a sample and the text around it."""

    name: str
    prefix: str = ""
    suffix: str = ""
    train: bool = True


def columns_for(config: DataConfig, available: dict[str, str], source: str) -> tuple[Column, ...]:
    """The columns a sample is made of, checked against the source's `{name: type}`."""
    if config.multi_column_keys is None:
        name = config.text_column or "text"
        _check_present([name], available, "data.text_column", source)
        return (Column(name),)
    keys = config.multi_column_keys
    _check_present(keys, available, "data.multi_column_keys", source)
    prefix = config.multi_column_prefix or [""] * len(keys)
    suffix = config.multi_column_suffix or [""] * len(keys)
    train = config.multi_column_train_mask or [True] * len(keys)
    parts = zip(keys, prefix, suffix, train, strict=True)
    return tuple(Column(k, p or "", s or "", bool(t)) for k, p, s, t in parts)


def _check_present(names: list[str], available: dict[str, str], key: str, source: str) -> None:
    missing = [n for n in names if n not in available]
    if missing:
        have = ", ".join(available) or "none"
        raise UserError(f"{key}: column {', '.join(map(repr, missing))} not in {source} (columns: {have})")
    for name in names:
        if available[name] not in ("string", "large_string", "null"):
            raise UserError(f"{key}: column {name!r} in {source} holds {available[name]}, expected text")


@dataclass(frozen=True)
class Encoder:
    """Picklable map function: loads the tokenizer by spec in whichever process runs it."""

    tokenizer: str
    columns: tuple[Column, ...]
    separator: str = ""

    def __call__(self, table: pa.Table) -> pa.Table:
        pieces, rows, masks = self._pieces(table)
        return encode_pieces(self.tokenizer, pieces, rows, masks, table.num_rows)

    def _pieces(self, table: pa.Table) -> tuple[list[str], list[int], list[int]]:
        """The non-empty texts to tokenize, in order, with the row and mask of each."""
        try:
            values = [table.column(c.name).to_pylist() for c in self.columns]
        except UnicodeDecodeError as e:
            raise UserError(
                f"data: a source column holds invalid UTF-8 ({e.reason}); re-encode the source"
            ) from None
        pieces: list[str] = []
        rows: list[int] = []
        masks: list[int] = []
        last = len(self.columns) - 1
        for row in range(table.num_rows):
            for i, column in enumerate(self.columns):
                sep = self.separator if i < last else ""
                for text in (column.prefix, values[i][row] or "", column.suffix, sep):
                    if text:
                        pieces.append(text)
                        rows.append(row)
                        masks.append(int(column.train))
        return pieces, rows, masks


def encode_pieces(
    tokenizer: str, pieces: list[str], rows: list[int], masks: list[int], num_rows: int
) -> pa.Table:
    """Tokenize each piece on its own and join the ids of each row, in order, with the piece's mask.

    `rows[k]` is the row (0 .. num_rows - 1) piece k belongs to and `masks[k]` its mask (0 or 1); a row
    without pieces comes out empty.
    """
    from rwkv_infctx.tokenizer import load_tokenizer

    ids = load_tokenizer(tokenizer).encode_batch(pieces) if pieces else []
    piece_len = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    total = int(piece_len.sum())
    values = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=total)
    row_len = np.bincount(np.asarray(rows, dtype=np.int64), weights=piece_len, minlength=num_rows)
    offsets = pa.array(np.concatenate([[0], np.cumsum(row_len.astype(np.int64))]).astype(np.int32))
    mask = np.repeat(np.asarray(masks, dtype=np.uint8), piece_len)
    return pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(values, pa.int32())),
            "loss_mask": pa.ListArray.from_arrays(offsets, pa.array(mask, pa.uint8())),
        }
    )


def tokenize(raw: datasets.Dataset, encoder: Encoder, num_proc: int | None) -> datasets.Dataset:
    """Tokenize every row of `raw` (batched, in `num_proc` processes); other columns are dropped."""
    return (
        raw.with_format("arrow")
        .map(
            encoder,
            batched=True,
            num_proc=num_proc if num_proc and num_proc > 1 else None,
            remove_columns=raw.column_names,
            features=token_features(),
            desc="Tokenizing",
        )
        .with_format(None)
    )
