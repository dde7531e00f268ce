"""Samples to evaluate: from a text/jsonl file or a prepared dataset, truncated to a token budget.

A sample is `(input_ids, loss_mask)`, two int lists of equal length; n tokens give n - 1 predictions.
`--max_tokens` counts predictions: samples are cut (and later ones dropped) once the budget is spent.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import Tensor

from rwkv_infctx.errors import UserError

Sample = tuple[list[int], list[int]]


@dataclass(frozen=True)
class Samples:
    """Samples ready to evaluate, the tokenizer they were made with, and where they came from."""

    samples: list[Sample]
    tokenizer: str
    vocab_size: int
    """Size of the tokenizer's vocabulary: every model must have at least this many embeddings."""
    source: str


def read_texts(path: Path) -> list[tuple[str, str]]:
    """(where, text) per sample: a .txt file is one sample; a .jsonl file one per line (`text` field)."""
    if not path.is_file():
        raise UserError(f"--text {path}: file not found")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"--text {path}: not UTF-8 text") from None
    if path.suffix != ".jsonl":
        return [(str(path), content)]
    texts = []
    for n, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"--text {where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise UserError(f"--text {where}: expected an object with a string 'text' field")
        texts.append((where, row["text"]))
    if not texts:
        raise UserError(f"--text {path}: no samples (expected one JSON object per line)")
    return texts


def from_text_file(path: Path, tokenizer_spec: str, max_tokens: int | None) -> Samples:
    """Tokenize a .txt (one sample) or .jsonl (one sample per line) file; every token is scored."""
    from rwkv_infctx.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_spec)
    samples = []
    for where, text in read_texts(path):
        ids = tokenizer.encode(text)
        if len(ids) < 2:
            raise UserError(f"--text {where}: sample has {len(ids)} tokens (expected at least 2)")
        samples.append((ids, [1] * len(ids)))
    return Samples(truncate(samples, max_tokens), tokenizer_spec, tokenizer.vocab_size, str(path))


def from_data_config(config_path: str, max_tokens: int | None) -> Samples:
    """The prepared dataset of a YAML's `data:` section (built first if needed): `test` split, else
    `train`. Samples under 2 tokens are skipped, as in training."""
    from rwkv_infctx.data.build import prepare
    from rwkv_infctx.data.config import config_from_yaml
    from rwkv_infctx.data.store import load_splits

    config = config_from_yaml(config_path)
    meta = prepare(config).metadata
    splits = load_splits(Path(config.data_path or ""))
    name = "test" if "test" in splits else "train"
    rows = splits[name].with_format("numpy", columns=["input_ids", "loss_mask"])
    tokenizer = meta["tokenizer"]
    needed = max(s["max_token_id"] for s in meta["splits"].values()) + 1
    vocab = max(int(tokenizer.get("vocab_size", 0)), needed)
    samples = truncate(_rows(rows), max_tokens)
    return Samples(samples, str(tokenizer["spec"]), vocab, f"{config.data_path} ({name} split)")


def _rows(rows: Iterable[dict]) -> Iterator[Sample]:
    for row in rows:
        ids = np.asarray(row["input_ids"])
        if len(ids) >= 2:
            yield ids.tolist(), np.asarray(row["loss_mask"]).astype(np.int64).tolist()


def truncate(samples: Iterable[Sample], max_tokens: int | None) -> list[Sample]:
    """Keep samples in order until `max_tokens` predictions (n - 1 per n-token sample) are taken."""
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"--max_tokens: {max_tokens} (expected at least 1)")
    out: list[Sample] = []
    left = max_tokens
    for ids, mask in samples:
        if left is not None:
            if left <= 0:
                break
            ids, mask = ids[: left + 1], mask[: left + 1]
            left -= len(ids) - 1
        out.append((ids, mask))
    return out


def batches(samples: list[Sample], batch_size: int) -> Iterator[dict[str, Tensor]]:
    """Collated batches of `batch_size` samples of similar length (sorted longest first)."""
    from rwkv_infctx.data.collator import collate

    order = sorted(samples, key=lambda s: len(s[0]), reverse=True)
    for i in range(0, len(order), batch_size):
        yield collate([{"input_ids": ids, "loss_mask": mask} for ids, mask in order[i : i + batch_size]])
