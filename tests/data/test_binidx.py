"""binidx sources (Megatron `MMapIndexedDataset`, as RWKV-LM's make_data.py writes them).

The files are written here, by a few lines that follow the published layout (magic, version, dtype
code, counts, sizes, pointers, document index), not by the reader's code.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from rwkv_infctx.cli import main
from rwkv_infctx.data import binidx
from tests.data.conftest import build, rows
from tests.data.test_bad_input import fails

CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
# make_data.py style: every document ends with token 0 (end of text)
DOCS = [[11, 12, 13, 0], [21, 22, 0], [31, 0], [41, 42, 43, 44, 45, 0]]


def write_binidx(
    prefix: Path,
    docs: list[list[int]],
    code: int = 8,
    *,
    magic: bytes = b"MMIDIDX\x00\x00",
    order: list[int] | None = None,
    gap: int = 0,
) -> Path:
    """Write prefix.bin/.idx. `order` stores the documents in another order in .bin (pointers follow),
    and `gap` puts that many junk bytes before each document."""
    dtype = np.dtype(CODES.get(code, np.uint16))
    order = order if order is not None else list(range(len(docs)))
    data, pointers = b"", [0] * len(docs)
    for i in order:
        data += b"\xff" * gap
        pointers[i] = len(data)
        data += np.asarray(docs[i], dtype=dtype).tobytes()
    Path(f"{prefix}.bin").write_bytes(data)
    n = len(docs)
    header = (
        magic
        + struct.pack("<Q", 1)
        + struct.pack("<B", code)
        + struct.pack("<Q", n)
        + struct.pack("<Q", n + 1)
    )
    sizes = struct.pack(f"<{n}i", *[len(d) for d in docs])
    body = sizes + struct.pack(f"<{n}q", *pointers) + struct.pack(f"<{n + 1}q", *range(n + 1))
    Path(f"{prefix}.idx").write_bytes(header + body)
    return prefix


@pytest.mark.parametrize("code", sorted(CODES))
def test_every_integer_dtype_reads_the_documents(tmp_path, code):
    prefix = write_binidx(tmp_path / "corpus", DOCS, code)
    done, splits = build(tmp_path, source=str(prefix), tokenizer="world")
    assert rows(splits["train"]) == [(d, [1] * len(d)) for d in DOCS]
    assert done.metadata["splits"]["train"]["max_token_id"] == 45


def test_prefix_bin_or_idx_name_the_same_source(tmp_path):
    prefix = write_binidx(tmp_path / "corpus", DOCS)
    for k, name in enumerate((str(prefix), f"{prefix}.bin", f"{prefix}.idx")):
        _, splits = build(tmp_path, source=name, tokenizer="world", data_path=str(tmp_path / f"p{k}"))
        assert [ids for ids, _ in rows(splits["train"])] == DOCS


def test_pointers_are_followed_when_documents_are_out_of_order(tmp_path, monkeypatch):
    docs = [[i * 10 + k for k in range(1, 3 + i % 5)] for i in range(1, 40)]
    prefix = write_binidx(tmp_path / "corpus", docs, 4, order=list(range(len(docs)))[::-1], gap=3)
    monkeypatch.setattr(binidx, "WINDOW_TOKENS", 7)  # many windows, several documents each
    _, splits = build(tmp_path, source=str(prefix), tokenizer="neox")
    assert [ids for ids, _ in rows(splits["train"])] == docs


def test_windows_cover_contiguous_documents_in_order(tmp_path, monkeypatch):
    docs = [[1 + (i + k) % 50 for k in range(2 + i % 9)] for i in range(300)]
    prefix = write_binidx(tmp_path / "corpus", docs)
    monkeypatch.setattr(binidx, "WINDOW_TOKENS", 20)
    monkeypatch.setattr(binidx, "INDEX_CHUNK", 64)
    found = binidx.open_binidx(Path(f"{prefix}.bin"), Path(f"{prefix}.idx"))
    spans = list(binidx.windows(found))
    assert [i for i, _ in spans] == [0] + [j for _, j in spans[:-1]] and spans[-1][1] == len(docs)
    assert all(j - i == 1 or sum(len(d) for d in docs[i:j]) <= 20 for i, j in spans)
    _, splits = build(tmp_path, source=str(prefix), tokenizer="neox")
    assert [ids for ids, _ in rows(splits["train"])] == docs


def test_rechunk_adds_end_of_text_only_where_missing(tmp_path):
    # two documents end with 0 (make_data.py), two do not (Megatron without --append-eod)
    docs = [[11, 12, 0], [21, 22], [31, 0], [41]]
    prefix = write_binidx(tmp_path / "corpus", docs)
    _, splits = build(tmp_path, source=str(prefix), tokenizer="world", rechunk_size=4)
    stream = [11, 12, 0, 21, 22, 0, 31, 0, 41, 0]
    assert rows(splits["train"]) == [(stream[i : i + 4], [1] * len(stream[i : i + 4])) for i in (0, 4, 8)]


def test_test_split_and_token_size_filters(tmp_path):
    prefix = write_binidx(tmp_path / "corpus", DOCS)
    done, splits = build(
        tmp_path,
        source=str(prefix),
        tokenizer="world",
        min_token_size=3,
        test_split=1,
        test_split_shuffle=False,
    )
    assert [ids for ids, _ in rows(splits["train"])] == [DOCS[0], DOCS[1]]
    assert [ids for ids, _ in rows(splits["test"])] == [DOCS[3]]
    assert done.metadata["dropped"]["below_min_token_size"] == 1


def test_reused_until_a_file_changes(tmp_path):
    prefix = write_binidx(tmp_path / "corpus", DOCS)
    assert build(tmp_path, source=str(prefix), tokenizer="world")[0].action == "built"
    assert build(tmp_path, source=str(prefix), tokenizer="world")[0].action == "reused"
    write_binidx(prefix, DOCS[:2])
    done, splits = build(tmp_path, source=str(prefix), tokenizer="world")
    assert done.action == "built" and len(splits["train"]) == 2


def test_token_id_beyond_the_tokenizer_vocab(tmp_path):
    prefix = write_binidx(tmp_path / "corpus", [[1, 2, 3], [4, 60000, 0]])
    fails(
        tmp_path,
        r"token id 60000 .* does not fit data.tokenizer 'neox' \(vocab_size 50277",
        source=str(prefix),
        tokenizer="neox",
    )
    _, splits = build(tmp_path, source=str(prefix), tokenizer="world")  # 65536 ids: fits
    assert rows(splits["train"])[1][0] == [4, 60000, 0]


def test_negative_token_id(tmp_path):
    prefix = write_binidx(tmp_path / "corpus", [[1, 2, 3], [4, -5, 0]], code=3)
    fails(
        tmp_path, r"token id -5 .* does not fit data.tokenizer 'world'", source=str(prefix), tokenizer="world"
    )


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        ("magic", r"corpus.idx does not start with the MMIDIDX magic"),
        ("code9", r"dtype code 9, unknown \(expected 1 uint8, .* 8 uint16\)"),
        ("code6", r"dtype code 6, a float64 code, not token ids"),
        ("version", r"corpus.idx has version 2 \(expected 1\)"),
        ("short_bin", r"sequence 3 \(bytes 18 to 30\) runs past the end of corpus.bin \(28 bytes\)"),
        (
            "short_idx",
            r"corpus.idx is truncated \(.* bytes; 4 sequences and 5 document index entries need 122\)",
        ),
        ("no_idx", r"corpus.idx is missing \(a binidx source needs corpus.bin and corpus.idx side by side\)"),
        ("no_bin", r"corpus.bin is missing"),
        ("neither", r"data.source: file or folder not found: .*corpus.bin"),
    ],
)
def test_bad_files_are_one_line_and_leave_nothing(tmp_path, damage, match):
    prefix = tmp_path / "corpus"
    if damage == "magic":
        write_binidx(prefix, DOCS, magic=b"TNTIDX\x00\x00\x00")
    elif damage.startswith("code"):
        write_binidx(prefix, DOCS, code=int(damage[4:]))
    else:
        write_binidx(prefix, DOCS)
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    if damage == "version":
        idx.write_bytes(idx.read_bytes()[:9] + struct.pack("<Q", 2) + idx.read_bytes()[17:])
    elif damage == "short_bin":
        bin_.write_bytes(bin_.read_bytes()[:-2])
    elif damage == "short_idx":
        idx.write_bytes(idx.read_bytes()[:-8])
    elif damage == "no_idx":
        idx.unlink()
    elif damage == "no_bin":
        bin_.unlink()
    elif damage == "neither":
        bin_.unlink()
        idx.unlink()
        prefix = bin_
    fails(tmp_path, match, source=str(prefix), tokenizer="world")


def test_options_that_need_text_are_refused(tmp_path):
    prefix = write_binidx(tmp_path / "corpus", DOCS)
    fails(
        tmp_path,
        r"data.text_column: not used with data.source .*corpus \(binidx",
        source=str(prefix),
        text_column="x",
    )


def test_preload_cli_reads_binidx_and_reports_bad_files(tmp_path, capsys):
    prefix = write_binidx(tmp_path / "corpus", DOCS)
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  source: {prefix}\n  tokenizer: world\n  data_path: {tmp_path / 'p'}\n")
    assert main(["preload", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert "train: 4 samples, 15 tokens (15 learnt)" in out and "largest token id 45" in out
    Path(f"{prefix}.idx").unlink()
    assert main(["preload", "-c", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "corpus.idx is missing" in err
