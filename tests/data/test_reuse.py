"""`data_path` is reused exactly when its fingerprint matches; otherwise rebuilt, saying why."""

from __future__ import annotations

import inspect
import os
import time
from dataclasses import MISSING, fields

import pytest

from rwkv_infctx.data import DataConfig, RWKVDataModule
from rwkv_infctx.data.store import METADATA_FILE
from rwkv_infctx.errors import UserError
from tests.data.conftest import DOCS, build, encode, rows, write_jsonl


@pytest.mark.filterwarnings("ignore:data. dropped")
def test_reuse_and_rebuild(tmp_path, docs_jsonl):
    first, _ = build(tmp_path, source=str(docs_jsonl))
    assert (first.action, first.reason) == ("built", "data_path did not exist")
    again, _ = build(tmp_path, source=str(docs_jsonl), num_proc=2, batch_size=4)  # not result options
    assert again.action == "reused"
    assert again.metadata == first.metadata

    rechunked, _ = build(tmp_path, source=str(docs_jsonl), rechunk_size=8)
    assert rechunked.action == "built" and "rechunk_size" in rechunked.reason

    world, splits = build(tmp_path, source=str(docs_jsonl), rechunk_size=8, tokenizer="world")
    assert world.action == "built" and world.reason == "changed: tokenizer"
    assert world.metadata["tokenizer"]["spec"] == "world"

    write_jsonl(docs_jsonl, [{"text": t} for t in reversed(DOCS)])
    stamp = time.time() + 5  # a different mtime even on coarse filesystems
    os.utime(docs_jsonl, (stamp, stamp))
    edited, splits = build(tmp_path, source=str(docs_jsonl))
    assert edited.action == "built" and "source" in edited.reason
    assert [ids for ids, _ in rows(splits["train"])] == [encode(t) for t in reversed(DOCS)]


def test_setup_refuses_stale_data_path(tmp_path, docs_jsonl):
    build(tmp_path, source=str(docs_jsonl))
    dm = RWKVDataModule(source=str(docs_jsonl), data_path=str(tmp_path / "prepared"), rechunk_size=16)
    with pytest.raises(UserError, match="out of date \\(rechunk_size\\)"):
        dm.setup("fit")


def test_load_without_source(tmp_path, docs_jsonl):
    build(tmp_path, source=str(docs_jsonl), tokenizer="world", test_split=1)
    dm = RWKVDataModule(data_path=str(tmp_path / "prepared"))
    dm.prepare_data()
    dm.setup("fit")
    assert dm.tokenizer_spec == "world" and dm.eot_id == 0
    longest = max(len(encode(d, "world")) for d in DOCS)
    assert len(dm.val_dataloader()) == 1
    assert max(b["lengths"].max().item() for b in dm.train_dataloader()) + 1 <= longest
    assert dm.vocab_size_needed() == max(max(encode(d, "world")) for d in DOCS) + 1
    dm.check_vocab_size(65536)
    with pytest.raises(UserError, match=r"model\.vocab_size: 100, but data_path .* holds token id"):
        dm.check_vocab_size(100)


def test_val_dataloader_empty_without_test_split(tmp_path, docs_jsonl):
    dm = RWKVDataModule(source=str(docs_jsonl), data_path=str(tmp_path / "p"), batch_size=2)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.val_dataloader() == []
    batches = list(dm.train_dataloader())
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2]


def test_metadata_file_inside_data_path(tmp_path, docs_jsonl):
    done, _ = build(tmp_path, source=str(docs_jsonl))
    assert (tmp_path / "prepared" / METADATA_FILE).is_file()
    fingerprint = done.metadata["fingerprint"]
    assert {"source", "options", "tokenizer", "datasets", "format"} <= set(fingerprint)


def test_datamodule_signature_matches_config():
    params = inspect.signature(RWKVDataModule.__init__).parameters
    names = [p for p in params if p != "self"]
    assert names == [f.name for f in fields(DataConfig)]
    for f in fields(DataConfig):
        assert f.default is not MISSING and params[f.name].default == f.default, f.name


def test_lightning_cli_style_parsing(tmp_path):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(RWKVDataModule, "data")
    cfg = parser.parse_object(
        {"data": {"source": "pkg://tinyshakespeare.txt", "data_path": str(tmp_path / "p"), "test_split": 10}}
    )
    dm = RWKVDataModule(**vars(cfg.data))
    assert dm.config.test_split == 10 and dm.config.test_size(100) == 10
    assert "Samples held out for validation" in parser.format_help()
