"""Chat conversations (a column of `{role, content}` turns) to `input_ids` and `loss_mask`.

A turn of role r is three pieces, each tokenized on its own and the ids concatenated, so every
token belongs to one piece and the mask is exact to the token:

    prefix[r]                       e.g. "Assistant:"     always prompt (mask 0)
    content_prefix + content        e.g. " Hello."        learnt (mask 1) if r is a learnt role
    separator                       e.g. "\\n\\n"           learnt (mask 1) if r is a learnt role

The default template is RWKV World's (`User: hi\\n\\nAssistant: Hello.\\n\\n`). The content is
tokenized with the space in front of it, as the chat runtimes produce it: they feed a prompt ending
in "Assistant:" and the model writes " Hello.\\n\\n". A whole conversation is one sample.

A row that does not fit (no turns, a missing or unknown role, a missing or non-text content, no turn
of a learnt role) is described in one line naming the row (its index in the source split, from 0).
`chat_bad_rows: stop` raises it as a `UserError`; `drop` leaves the row out and counts it.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rwkv_infctx.data.config import DataConfig
from rwkv_infctx.data.encode import encode_pieces
from rwkv_infctx.errors import UserError

if TYPE_CHECKING:
    import datasets

ERROR_COLUMN = "chat_error"


class BadRow(ValueError):
    """A conversation that does not fit the template; the message says why."""


@dataclass(frozen=True)
class ChatTemplate:
    """How turns are written out, and which roles are learnt."""

    roles: tuple[tuple[str, str], ...]  # (role, prefix) pairs
    learnt: tuple[str, ...]
    content_prefix: str = " "
    separator: str = "\n\n"
    collapse_newlines: bool = True

    @classmethod
    def from_config(cls, config: DataConfig) -> ChatTemplate:
        return cls(
            roles=tuple(config.roles.items()),
            learnt=tuple(config.learnt_roles),
            content_prefix=config.chat_content_prefix,
            separator=config.chat_separator,
            collapse_newlines=config.chat_collapse_newlines,
        )

    def clean(self, content: str) -> str:
        """The content as it is written: with `collapse_newlines`, CRLF -> LF, stripped, and every run
        of newlines made one newline (so no blank line, the turn separator, appears inside a turn)."""
        if not self.collapse_newlines:
            return content
        return re.sub(r"\n+", "\n", content.replace("\r\n", "\n").strip())

    def pieces(self, messages: Any) -> list[tuple[str, int]]:
        """(text, mask) pieces of one conversation, in order; raises `BadRow` if it does not fit."""
        if not isinstance(messages, list) or not messages:
            raise BadRow("has no turns (expected a list of {role, content})")
        prefixes = dict(self.roles)
        out: list[tuple[str, int]] = []
        learnt_turns = 0
        for k, turn in enumerate(messages):
            role = turn.get("role") if isinstance(turn, dict) else None
            content = turn.get("content") if isinstance(turn, dict) else None
            if role not in prefixes:
                known = ", ".join(prefixes)
                what = "has no role" if role is None else f"has unknown role {role!r}"
                raise BadRow(f"turn {k} {what} (known: {known})")
            if not isinstance(content, str):
                what = "no content" if content is None else f"content of type {type(content).__name__}"
                raise BadRow(f"turn {k} ({role}) has {what} (expected text)")
            text = self.clean(content)
            if not text:
                continue  # an empty turn (often an empty system prompt) is left out
            mask = int(role in self.learnt)
            learnt_turns += mask
            out += [(prefixes[role], 0), (self.content_prefix + text, mask), (self.separator, mask)]
        if not learnt_turns:
            raise BadRow(f"has no {' or '.join(self.learnt)} turn with content (nothing to learn)")
        return [(text, mask) for text, mask in out if text]


@dataclass(frozen=True)
class ChatEncoder:
    """Picklable batched map function (with indices): conversations to `input_ids`, `loss_mask` and
    `chat_error` (empty, or the line that describes a bad row)."""

    tokenizer: str
    template: ChatTemplate
    column: str
    source: str
    drop: bool

    def __call__(self, table: pa.Table, indices: list[int]) -> pa.Table:
        pieces: list[str] = []
        rows: list[int] = []
        masks: list[int] = []
        errors = [""] * table.num_rows
        column = table.column(self.column)
        for row, messages in enumerate(column.to_pylist()):
            try:
                turns = self.template.pieces(_decoded(messages, column.type))
            except BadRow as e:
                errors[row] = f"data.source {self.source} row {indices[row]}: {e}"
                if not self.drop:
                    raise UserError(f"{errors[row]} (or set data.chat_bad_rows: drop)") from None
                continue
            for text, mask in turns:
                pieces.append(text)
                rows.append(row)
                masks.append(mask)
        encoded = encode_pieces(self.tokenizer, pieces, rows, masks, table.num_rows)
        return encoded.append_column(ERROR_COLUMN, pa.array(errors, pa.string()))


def _is_json(kind: pa.DataType) -> bool:
    """A `datasets` Json column: JSON text per value (what the JSON loader makes of mixed turn keys)."""
    return getattr(kind, "extension_name", None) == "arrow.json"


def _decoded(messages: Any, kind: pa.DataType) -> Any:
    """The turns as Python values: Json values arrive as JSON text."""
    if _is_json(kind) and isinstance(messages, str):
        return json.loads(messages)
    item = getattr(kind, "value_type", None)
    if item is not None and _is_json(item) and isinstance(messages, list):
        return [json.loads(m) if isinstance(m, str) else m for m in messages]
    return messages


def check_column(raw: datasets.Dataset, column: str, source: str) -> None:
    """`column` exists and holds lists of structs (the `{role, content}` turns), or JSON."""
    schema = raw.data.schema
    if column not in schema.names:
        have = ", ".join(schema.names) or "none"
        raise UserError(f"data.messages_column: column {column!r} not in {source} (columns: {have})")
    kind = schema.field(column).type
    is_list = pa.types.is_list(kind) or pa.types.is_large_list(kind)
    if not (
        _is_json(kind) or (is_list and (pa.types.is_struct(kind.value_type) or _is_json(kind.value_type)))
    ):
        raise UserError(
            f"data.messages_column: column {column!r} in {source} holds {kind}, "
            "expected a list of {role, content} turns"
        )


def tokenize_chats(
    raw: datasets.Dataset, config: DataConfig, tokenizer: str, source: str
) -> tuple[datasets.Dataset, dict[str, int]]:
    """Tokenize every conversation of `raw`; returns the samples and `{"bad_chat_rows": n}`."""
    from datasets import Features, List, Value

    column = config.messages_column or "messages"
    check_column(raw, column, source)
    drop = config.chat_bad_rows == "drop"
    encoder = ChatEncoder(tokenizer, ChatTemplate.from_config(config), column, source, drop)
    features = Features(
        {
            "input_ids": List(Value("int32")),
            "loss_mask": List(Value("uint8")),
            ERROR_COLUMN: Value("string"),
        }
    )
    num_proc = config.num_proc if config.num_proc and config.num_proc > 1 else None
    encoded = (
        raw.with_format("arrow")
        .map(
            encoder,
            batched=True,
            with_indices=True,
            num_proc=num_proc,
            remove_columns=raw.column_names,
            features=features,
            desc="Tokenizing chats",
        )
        .with_format(None)
    )
    bad, first = _bad_rows(encoded)
    if len(bad) == len(encoded):
        raise UserError(f"data: every row ({len(bad)}) is a bad chat row, nothing to learn (first: {first})")
    if len(bad):
        warnings.warn(
            f"data: dropped {len(bad)} chat rows that do not fit the template (first: {first})", stacklevel=3
        )
        encoded = encoded.select(np.setdiff1d(np.arange(len(encoded)), bad))
    return encoded.remove_columns(ERROR_COLUMN), {"bad_chat_rows": len(bad)}


def _bad_rows(ds: datasets.Dataset) -> tuple[np.ndarray, str]:
    """Positions of the rows with an error, and the first error line."""
    positions: list[np.ndarray] = []
    first, seen = "", 0
    for table in ds.select_columns(ERROR_COLUMN).with_format("arrow").iter(batch_size=10_000):
        errors = table.column(ERROR_COLUMN)
        hits = np.flatnonzero(pc.not_equal(errors, "").to_numpy(zero_copy_only=False))
        if len(hits):
            first = first or errors[int(hits[0])].as_py()
            positions.append(hits + seen)
        seen += table.num_rows
    return (np.concatenate(positions) if positions else np.zeros(0, np.int64)), first
