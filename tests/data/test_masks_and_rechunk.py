"""Multi-column masks are right to the token; rechunk boundaries and end-of-text tokens are as documented."""

from __future__ import annotations

import pytest

from tests.data.conftest import DOCS, QA, build, encode, rows, write_jsonl

QA_OPTIONS = {
    "multi_column_keys": ["instruction", "output"],
    "multi_column_prefix": ["Q: ", "A: "],
    "multi_column_suffix": ["\n", "\n"],
    "multi_column_separator": "\n",
    "multi_column_train_mask": [False, True],
}


def expected_qa(row: dict[str, str]) -> tuple[list[int], list[int]]:
    prompt = encode("Q: ") + encode(row["instruction"]) + encode("\n") + encode("\n")
    answer = encode("A: ") + encode(row["output"]) + encode("\n")
    return prompt + answer, [0] * len(prompt) + [1] * len(answer)


def test_multi_column_mask_exact(tmp_path, qa_jsonl):
    _, splits = build(tmp_path, source=str(qa_jsonl), **QA_OPTIONS)
    assert rows(splits["train"]) == [expected_qa(r) for r in QA]


def test_multi_column_defaults_learn_everything(tmp_path, qa_jsonl):
    _, splits = build(tmp_path, source=str(qa_jsonl), multi_column_keys=["output", "instruction"])
    for (ids, mask), row in zip(rows(splits["train"]), QA, strict=True):
        assert ids == encode(row["output"]) + encode(row["instruction"])
        assert mask == [1] * len(ids)


def test_multi_column_mask_reaches_batch_targets(tmp_path, qa_jsonl):
    from rwkv_infctx.data import RWKVDataModule

    dm = RWKVDataModule(
        source=str(qa_jsonl), data_path=str(tmp_path / "p"), batch_size=3, shuffle=False, **QA_OPTIONS
    )
    dm.prepare_data()
    batch = next(iter(dm.train_dataloader()))
    ids, mask = expected_qa(QA[0])
    n = len(ids) - 1
    assert batch["target_ids"][0, :n].tolist() == ids[1:]
    assert batch["loss_mask"][0, :n].tolist() == mask[1:]
    first_answer = mask.index(1)  # the first answer token is predicted from the last prompt token
    assert batch["loss_mask"][0, first_answer - 1] == 1 and batch["loss_mask"][0, first_answer - 2] == 0


@pytest.mark.parametrize("size", [5, 7, 1000])
def test_rechunk_boundaries_and_eot(tmp_path, docs_jsonl, size):
    _, splits = build(tmp_path, source=str(docs_jsonl), rechunk_size=size)
    stream = [t for d in DOCS for t in [*encode(d), 0]]
    expected = [stream[i : i + size] for i in range(0, len(stream), size)]
    got = [ids for ids, _ in rows(splits["train"])]
    assert got == expected
    assert all(len(c) == size for c in got[:-1])


def test_rechunk_whole_split_and_masks(tmp_path, qa_jsonl):
    _, splits = build(tmp_path, source=str(qa_jsonl), rechunk_size=-1, **QA_OPTIONS)
    [(ids, mask)] = rows(splits["train"])
    expected_ids, expected_mask = [], []
    for row in QA:
        i, m = expected_qa(row)
        expected_ids += [*i, 0]
        expected_mask += [*m, 1]  # the end-of-text token is learnt
    assert ids == expected_ids and mask == expected_mask


def test_rechunk_many_batches_carry(tmp_path):
    # More documents than one read batch (1000 rows), so chunks straddle batch boundaries.
    texts = [f"doc {i} says {'hi ' * (i % 5)}" for i in range(2500)]
    path = write_jsonl(tmp_path / "many.jsonl", [{"text": t} for t in texts])
    _, splits = build(tmp_path, source=str(path), rechunk_size=64)
    from rwkv_infctx.tokenizer import load_tokenizer

    stream = [t for ids in load_tokenizer("neox").encode_batch(texts) for t in [*ids, 0]]
    flat = [t for ids, _ in rows(splits["train"]) for t in ids]
    assert flat == stream
    assert len(splits["train"]) == -(-len(stream) // 64)


def test_test_split_keeps_order_and_counts(tmp_path, docs_jsonl):
    _, splits = build(tmp_path, source=str(docs_jsonl), test_split=1, test_split_shuffle=False)
    assert [ids for ids, _ in rows(splits["test"])] == [encode(DOCS[-1])]
    assert [ids for ids, _ in rows(splits["train"])] == [encode(d) for d in DOCS[:-1]]
    _, shuffled = build(tmp_path, source=str(docs_jsonl), test_split=0.5, data_path=str(tmp_path / "s"))
    train = [ids for ids, _ in rows(shuffled["train"])]
    test = [ids for ids, _ in rows(shuffled["test"])]
    assert len(train) == len(test) == 2
    everything = [encode(d) for d in DOCS]
    assert sorted(train + test) == sorted(everything)
    assert train == [x for x in everything if x in train]  # order kept


def test_short_samples_dropped_with_one_warning(tmp_path):
    path = write_jsonl(tmp_path / "short.jsonl", [{"text": t} for t in ["", "a", DOCS[0], None]])
    with pytest.warns(UserWarning, match="dropped 3 samples with fewer than 2 tokens"):
        done, splits = build(tmp_path, source=str(path))
    assert [ids for ids, _ in rows(splits["train"])] == [encode(DOCS[0])]
    assert done.metadata["dropped"]["under_2_tokens"] == 3


def test_min_max_token_size(tmp_path, docs_jsonl):
    lengths = [len(encode(d)) for d in DOCS]
    lo, hi = sorted(lengths)[1], sorted(lengths)[2]
    _, splits = build(tmp_path, source=str(docs_jsonl), min_token_size=lo, max_token_size=hi)
    assert [len(ids) for ids, _ in rows(splits["train"])] == [n for n in lengths if lo <= n <= hi]
