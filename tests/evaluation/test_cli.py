"""`rwkv-infctx eval-positions` through `rwkv_infctx.cli.main`: outputs, data configs, bad input."""

from __future__ import annotations

import csv
import json
import tempfile

import pytest

from rwkv_infctx.cli import main
from tests.evaluation.conftest import model_file, shakespeare

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def setup(tmp_path, char_tokenizer):
    """Two model files, a text file of 700 characters, and the character tokenizer."""
    text = tmp_path / "sample.txt"
    text.write_text(shakespeare()[:700], encoding="utf-8")
    a, b = model_file(tmp_path / "a.pth", seed=0), model_file(tmp_path / "b.pth", seed=1)
    return tmp_path, text, a, b, str(char_tokenizer)


@pytest.fixture
def quiet_datasets():
    """No `datasets` progress bars on stderr while a data config is built."""
    import datasets

    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


def refuse_mkstemp(*args, **kwargs):
    raise PermissionError(13, "Permission denied")


def one_line_error(capsys, *words: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("rwkv-infctx eval-positions: error: "), err
    for word in words:
        assert word in err, err
    return err


def test_table_csv_and_png(setup, capsys):
    tmp, text, a, b, tok = setup
    out_csv, out_png = tmp / "r.csv", tmp / "r.png"
    args = [str(a), str(b), "--text", str(text), "--tokenizer", tok, "--segment_len", "100"]
    assert main(["eval-positions", *args, "--out_csv", str(out_csv), "--out_png", str(out_png)]) == 0
    out = capsys.readouterr().out
    assert "699 tokens scored" in out and "512-1,024" in out and out.count("loss") == 2
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["model"] for r in rows] == ["a"] * 4 + ["b"] * 4
    assert [(r["bucket_start"], r["bucket_end"], r["tokens"]) for r in rows[:4]] == [
        ("1", "128", "127"),
        ("128", "256", "128"),
        ("256", "512", "256"),
        ("512", "1024", "188"),
    ]
    assert all(float(r["perplexity"]) > 1 for r in rows)
    png = out_png.read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 15_000
    assert sorted(p.name for p in tmp.iterdir() if p.name.startswith(".")) == []  # no temp files left


def test_jsonl_labels_and_max_tokens(setup, capsys):
    tmp, _, a, _, tok = setup
    lines = tmp / "s.jsonl"
    lines.write_text("\n".join(json.dumps({"text": shakespeare()[i : i + 300]}) for i in (0, 300)) + "\n")
    out_csv = tmp / "r.csv"
    args = ["--text", str(lines), "--tokenizer", tok, "--max_tokens", "400", "--labels", "init"]
    assert main(["eval-positions", str(a), *args, "--out_csv", str(out_csv)]) == 0
    assert "2 samples, 400 tokens scored" in capsys.readouterr().out
    rows = list(csv.DictReader(out_csv.open()))
    assert {r["model"] for r in rows} == {"init"} and sum(int(r["tokens"]) for r in rows) == 400


def test_data_config_uses_the_test_split_and_its_tokenizer(setup, capsys, quiet_datasets):
    tmp, _, a, _, tok = setup
    docs = tmp / "docs.jsonl"
    docs.write_text(
        "".join(json.dumps({"text": shakespeare()[i : i + 200]}) + "\n" for i in range(0, 2000, 200))
    )
    config = tmp / "config.yaml"
    config.write_text(
        f"data:\n  source: {docs}\n  tokenizer: {tok}\n  data_path: {tmp / 'prepared'}\n"
        "  test_split: 3\n  test_split_shuffle: false\n"
    )
    assert main(["eval-positions", str(a), "--data", str(config)]) == 0
    out = capsys.readouterr().out
    assert "(test split): 3 samples, 597 tokens scored" in out and f"tokenizer {tok}" in out
    assert main(["eval-positions", str(a), "--data", str(config), "--tokenizer", "neox"]) == 2
    one_line_error(capsys, "--tokenizer")


def test_every_target_masked_is_refused(setup, capsys, quiet_datasets):
    tmp, _, a, _, tok = setup
    docs = tmp / "qa.jsonl"
    docs.write_text("".join(json.dumps({"q": shakespeare()[i : i + 50]}) + "\n" for i in range(0, 200, 50)))
    config = tmp / "config.yaml"
    config.write_text(
        f"data:\n  source: {docs}\n  tokenizer: {tok}\n  data_path: {tmp / 'prepared'}\n"
        "  multi_column_keys: [q]\n  multi_column_train_mask: [false]\n"
    )
    assert main(["eval-positions", str(a), "--data", str(config)]) == 2
    one_line_error(capsys, "no tokens to evaluate")


def test_mismatched_vocabularies_name_both_models(setup, capsys):
    tmp, text, a, _, tok = setup
    big = model_file(tmp / "big.pth", vocab_size=97)
    assert main(["eval-positions", str(a), str(big), "--text", str(text), "--tokenizer", tok]) == 2
    one_line_error(capsys, "vocabulary sizes differ", f"{a} 67", f"{big} 97")


def test_tokenizer_larger_than_the_model_is_refused(setup, capsys):
    _, text, a, _, _ = setup
    assert main(["eval-positions", str(a), "--text", str(text), "--tokenizer", "neox"]) == 2
    one_line_error(capsys, f"model {a}", "vocabulary of 67", "'neox' has 50277 tokens")


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("", ["sample.txt", "0 tokens"]),
        ('{"text": "Hi there"}\n{"text": ""}\n', ["line 2", "0 tokens"]),
        ('{"text": "Hi there"}\n{"txt": "x"}\n', ["line 2", "'text' field"]),
        ("not json\n", ["line 1", "not valid JSON"]),
    ],
)
def test_empty_or_malformed_samples(setup, capsys, content, words):
    tmp, _, a, _, tok = setup
    path = tmp / ("sample.txt" if content == "" else "s.jsonl")
    path.write_text(content)
    assert main(["eval-positions", str(a), "--text", str(path), "--tokenizer", tok]) == 2
    one_line_error(capsys, *words)


def test_missing_files_and_bad_options(setup, capsys):
    tmp, text, a, _, tok = setup
    base = ["--text", str(text), "--tokenizer", tok]
    cases = [
        ([str(tmp / "nope.pth"), *base], ["nope.pth", "not found"]),
        ([str(a), "--text", str(tmp / "nope.txt"), "--tokenizer", tok], ["nope.txt", "not found"]),
        ([str(a), "--data", str(tmp / "nope.yaml")], ["nope.yaml", "not found"]),
        ([str(a), *base, "--out_csv", str(tmp / "no" / "r.csv")], ["does not exist"]),
        ([str(a), *base, "--labels", "x", "y"], ["2 labels for 1 models"]),
        ([str(a), *base, "--max_tokens", "0"], ["--max_tokens"]),
        ([str(a), *base, "--segment_len", "0"], ["--segment_len"]),
    ]
    for argv, words in cases:
        assert main(["eval-positions", *argv]) == 2, argv
        one_line_error(capsys, *words)


def test_unwritable_output_folder_fails_before_evaluating(setup, capsys, monkeypatch):
    tmp, text, a, _, tok = setup
    monkeypatch.setattr(tempfile, "mkstemp", refuse_mkstemp)  # tests run as root: chmod would not stop us
    monkeypatch.setattr("rwkv_infctx.commands.eval_positions.evaluate", None)  # must not be reached
    args = [str(a), "--text", str(text), "--tokenizer", tok, "--out_png", str(tmp / "r.png")]
    assert main(["eval-positions", *args]) == 2
    one_line_error(capsys, "r.png", "cannot write", "Permission denied")
    assert not (tmp / "r.png").exists()


def test_write_failure_leaves_no_partial_file(setup, monkeypatch):
    from rwkv_infctx.errors import UserError
    from rwkv_infctx.evaluation import report
    from rwkv_infctx.evaluation.positions import BucketRow

    tmp = setup[0]
    results = {"a": [BucketRow(1, 128, 10, 2.0, 7.39)]}
    monkeypatch.setattr(tempfile, "mkstemp", refuse_mkstemp)
    with pytest.raises(UserError, match="cannot write"):
        report.write_csv(tmp / "r.csv", results)
    assert not (tmp / "r.csv").exists()
