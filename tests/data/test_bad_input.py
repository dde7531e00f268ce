"""Each bad input is one UserError naming the culprit, and leaves no half-built data_path behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rwkv_infctx.cli import main
from rwkv_infctx.data.store import METADATA_FILE
from rwkv_infctx.errors import UserError
from tests.data.conftest import DOCS, build, leftovers, rows, write_jsonl


def fails(tmp_path: Path, match: str, **options) -> None:
    """The build raises UserError matching `match`, and nothing is left at or next to data_path."""
    data_path = Path(options.setdefault("data_path", str(tmp_path / "prepared")))
    with pytest.raises(UserError, match=match) as info:
        build(tmp_path, **options)
    assert "\n" not in str(info.value)
    assert not data_path.exists() or not (data_path / METADATA_FILE).exists()
    if data_path.parent.is_dir():
        assert leftovers(data_path.parent) == []


def test_missing_file(tmp_path):
    fails(tmp_path, "file or folder not found: .*nope.jsonl", source=str(tmp_path / "nope.jsonl"))


def test_missing_data_files_and_dir(tmp_path):
    fails(
        tmp_path, "data.data_files: file not found: .*nope", source="json", data_files=str(tmp_path / "nope")
    )
    fails(
        tmp_path, "data.source_data_dir: folder not found", source="text", source_data_dir=str(tmp_path / "x")
    )


def test_missing_bundled_file(tmp_path):
    fails(tmp_path, "no bundled file pkg://nope.txt", source="pkg://nope.txt")


def test_unknown_builder(tmp_path, docs_jsonl):
    fails(tmp_path, "unknown builder 'jsonl'", source="jsonl", data_files=str(docs_jsonl))


def test_unknown_extension(tmp_path):
    (tmp_path / "corpus.xyz").write_text("hello", encoding="utf-8")
    fails(tmp_path, "cannot infer the format of corpus.xyz", source=str(tmp_path / "corpus.xyz"))


def test_missing_text_column_lists_columns(tmp_path):
    path = write_jsonl(tmp_path / "body.jsonl", [{"body": "x", "title": "y"}])
    fails(tmp_path, r"data.text_column: column 'text' not in .* \(columns: body, title\)", source=str(path))


def test_missing_multi_column_keys(tmp_path, qa_jsonl):
    fails(
        tmp_path,
        r"data.multi_column_keys: column 'answer' not in .* \(columns: instruction, output, extra\)",
        source=str(qa_jsonl),
        multi_column_keys=["instruction", "answer"],
    )


def test_non_text_column(tmp_path):
    path = write_jsonl(tmp_path / "n.jsonl", [{"text": 3}])
    fails(tmp_path, "column 'text' in .* holds int64, expected text", source=str(path))


def test_invalid_utf8_refused_then_replaced_on_request(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"good text\n" + b"caf\xe9 au lait\n")
    fails(tmp_path, f"data file {bad}: invalid UTF-8 at byte 13 .*encoding_errors: replace", source=str(bad))
    _, splits = build(tmp_path, source=str(bad), source_dataset_params={"encoding_errors": "replace"})
    from rwkv_infctx.tokenizer import load_tokenizer

    [(ids, _)] = rows(splits["train"])
    assert load_tokenizer("neox").decode(ids) == "good text\ncaf\ufffd au lait\n"


def test_invalid_utf8_in_jsonl(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    fails(tmp_path, f"data file {bad}: invalid UTF-8 at byte 28 \\(re-encode", source=str(bad))


def test_empty_after_filtering(tmp_path, docs_jsonl):
    fails(
        tmp_path,
        "no samples left after filtering 4 documents .*4 below min token size",
        source=str(docs_jsonl),
        min_token_size=10_000,
    )


def test_empty_source(tmp_path):
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    fails(tmp_path, "has no rows|could not read", source=str(tmp_path / "empty.jsonl"))


def test_data_path_not_a_dataset(tmp_path, docs_jsonl):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious", encoding="utf-8")
    with pytest.raises(UserError, match="exists but is not a dataset prepared by rwkv-infctx"):
        build(tmp_path, source=str(docs_jsonl), data_path=str(folder))
    assert (folder / "notes.txt").read_text(encoding="utf-8") == "precious"  # never overwritten
    with pytest.raises(UserError, match="not a dataset prepared by rwkv-infctx"):
        build(tmp_path, data_path=str(folder))
    with pytest.raises(UserError, match="no prepared dataset there"):
        build(tmp_path, data_path=str(tmp_path / "absent"))


def test_data_path_built_with_other_tokenizer(tmp_path, docs_jsonl):
    build(tmp_path, source=str(docs_jsonl), tokenizer="world")
    with pytest.raises(UserError, match=r"built with tokenizer 'world', but data\.tokenizer is 'neox'"):
        build(tmp_path, tokenizer="neox")
    done, _ = build(tmp_path, tokenizer="world")
    assert done.action == "loaded"


def test_unwritable_data_path(tmp_path, docs_jsonl):
    (tmp_path / "a_file").write_text("x", encoding="utf-8")
    fails(
        tmp_path,
        "data.data_path .*: not writable",
        source=str(docs_jsonl),
        data_path=str(tmp_path / "a_file" / "p"),
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_parent(tmp_path, docs_jsonl):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        fails(tmp_path, "not writable", source=str(docs_jsonl), data_path=str(parent / "p"))
    finally:
        parent.chmod(0o700)


def test_tokenizer_file_that_does_not_load(tmp_path, docs_jsonl):
    broken = tmp_path / "tokenizer.json"
    broken.write_text("{not json", encoding="utf-8")
    fails(
        tmp_path,
        f"tokenizer file {broken}: not a loadable tokenizer.json",
        source=str(docs_jsonl),
        tokenizer=str(broken),
    )
    fails(
        tmp_path,
        "tokenizer .*: file not found",
        source=str(docs_jsonl),
        tokenizer=str(tmp_path / "none.json"),
    )


def test_hub_dataset_offline_is_one_line(tmp_path):
    fails(tmp_path, "could not load it as a Hugging Face hub dataset", source="someone/missing-dataset")


def test_failed_rebuild_keeps_previous_data_path(tmp_path, docs_jsonl):
    build(tmp_path, source=str(docs_jsonl))
    with pytest.raises(UserError, match="column 'nope'"):
        build(tmp_path, source=str(docs_jsonl), text_column="nope")
    again, splits = build(tmp_path, source=str(docs_jsonl))
    assert again.action == "reused" and len(splits["train"]) == len(DOCS)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"test_split": -1}, "data.test_split: -1"),
        ({"rechunk_size": -2}, "data.rechunk_size: -2"),
        ({"batch_size": 0}, "data.batch_size: 0"),
        ({"rechunk_size": "big"}, "data.rechunk_size: 'big' \\(expected int\\)"),
        (
            {"multi_column_keys": ["a", "b"], "multi_column_prefix": ["x"]},
            "1 entries for 2 multi_column_keys",
        ),
    ],
)
def test_bad_option_values(tmp_path, docs_jsonl, options, match):
    fails(tmp_path, match, source=str(docs_jsonl), **options)


def write_config(path: Path, data: str) -> str:
    path.write_text(
        f"model:\n  arch: rwkv4\n  n_layer: 2\ntrainer:\n  max_steps: 1\ndata:\n{data}", encoding="utf-8"
    )
    return str(path)


def test_cli_preload(tmp_path, docs_jsonl, capsys):
    cfg = write_config(tmp_path / "c.yaml", f"  source: {docs_jsonl}\n  data_path: {tmp_path / 'p'}\n")
    assert main(["preload", "-c", cfg]) == 0
    out = capsys.readouterr().out
    assert "built" in out and f"train: {len(DOCS)} samples" in out
    assert main(["preload", "-c", cfg]) == 0
    assert "reused" in capsys.readouterr().out


def test_cli_preload_accepts_init_args_form(tmp_path, docs_jsonl):
    data = f"  class_path: rwkv_infctx.data.RWKVDataModule\n  init_args:\n    source: {docs_jsonl}\n"
    cfg = write_config(tmp_path / "c.yaml", data + f"    data_path: {tmp_path / 'p'}\n")
    assert main(["preload", "-c", cfg]) == 0


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ("  sorce: x.txt\n  data_path: p\n", "unknown key data.sorce"),
        ("  source: {tmp}/nope.txt\n  data_path: {tmp}/p\n", "file or folder not found"),
        ("  source: {tmp}/bad.txt\n  data_path: {tmp}/p\n", "invalid UTF-8 at byte 3"),
        ("  data_path: {tmp}/p\n", "data.source is empty"),
        ("  - not a mapping\n", "expected a 'data:' section"),
    ],
)
def test_cli_preload_errors_exit_2(tmp_path, capsys, data, match):
    import re

    (tmp_path / "bad.txt").write_bytes(b"abc\xff")
    cfg = write_config(tmp_path / "c.yaml", data.format(tmp=tmp_path))
    assert main(["preload", "-c", cfg]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rwkv-infctx preload: error: ") and "\n" not in err
    assert re.search(match, err)
    assert not (tmp_path / "p").exists()


def test_cli_preload_missing_config(tmp_path, capsys):
    assert main(["preload", "-c", str(tmp_path / "none.yaml")]) == 2
    assert "config" in capsys.readouterr().err
