"""The project's datamodule on 2 DDP ranks: each rank reads its own shard, and over one epoch every
sample is learnt exactly once (no duplicates, none dropped); the ranks run the same number of steps."""

from __future__ import annotations

import json

from rwkv_infctx.data import RWKVDataModule
from rwkv_infctx.io.model_file import save_model
from rwkv_infctx.model import RWKV4Config
from tests.conftest import random_model
from tests.distributed.launch import run_ranks


def test_one_epoch_learns_every_sample_once_across_ranks(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(f"word{i % 37} and more text {i}" for i in range(120)))
    # 12 samples, one held out for validation: 11 to learn
    data = RWKVDataModule(source=str(text), data_path=str(tmp_path / "data"), rechunk_size=64, test_split=1)
    data.prepare_data()
    n = data.stats["train"]["samples"]
    assert n % 2 == 1, "an odd count, so one rank gets a padding batch"
    cfg = RWKV4Config(n_layer=1, n_embd=16, vocab_size=data.vocab_size_needed())
    model = save_model(random_model(cfg), tmp_path / "init.pth", "fp32")

    run_ranks(["ddp", str(tmp_path), str(model), f"data:{tmp_path / 'data'}", "--steps", "-1"])

    ranks = [json.loads((tmp_path / f"samples_rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == (n + 1) // 2  # same number of steps on every rank
    rows = [(i, pad) for batches in ranks for b in batches for i, pad in zip(*b.values(), strict=True)]
    learnt = [i for i, pad in rows if not pad]
    padding = [i for i, pad in rows if pad]
    assert sorted(learnt) == list(range(n))  # every sample once: none duplicated, none dropped
    assert len(padding) == 1
