"""Fixtures for the data tests: corpora written in a temporary folder, and a one-call build.

Every build keeps its `datasets` intermediates in a temporary folder next to `data_path` (the module's
default for local sources), so nothing lands in ~/.cache and test order does not matter.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import pytest

# Nothing in these tests may need the network; make any attempt fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from rwkv_infctx.data import DataConfig, Prepared, prepare
from rwkv_infctx.data.store import load_splits
from rwkv_infctx.tokenizer import load_tokenizer

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world!\nA second line, with unicode: café, 東京, 🙂.",
    "RWKV is an RNN with transformer-level performance.",
    "Short one.",
]
QA = [
    {"instruction": "What is 2+2?", "output": "4", "extra": "x"},
    {"instruction": "Name a colour.", "output": "Blue, like the sky.", "extra": "y"},
    {"instruction": "Translate 'chat' to English.", "output": "cat", "extra": "z"},
]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_texts(folder: Path, texts: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        (folder / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
    return folder


def build(tmp_path: Path, **options: Any) -> tuple[Prepared, Any]:
    """Prepare `options` into tmp_path/prepared (unless data_path is given) and open the splits."""
    options.setdefault("data_path", str(tmp_path / "prepared"))
    done = prepare(DataConfig(**options))
    return done, load_splits(Path(options["data_path"]))


def rows(split: Any) -> list[tuple[list[int], list[int]]]:
    """(input_ids, loss_mask) of every sample, as plain lists."""
    return [(r["input_ids"], r["loss_mask"]) for r in split]


def encode(text: str, tokenizer: str = "neox") -> list[int]:
    return load_tokenizer(tokenizer).encode(text) if text else []


def leftovers(folder: Path) -> list[str]:
    """Build folders left behind next to a data_path (there should be none)."""
    return [p.name for p in folder.iterdir() if ".building-" in p.name]


@pytest.fixture
def docs_jsonl(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "docs.jsonl", [{"text": t, "id": i} for i, t in enumerate(DOCS)])


@pytest.fixture
def qa_jsonl(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "qa.jsonl", QA)
