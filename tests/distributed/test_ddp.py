"""DDP over gloo with 2 ranks: uneven segment counts, exact gradients of the whole global batch."""

from __future__ import annotations

import torch

from rwkv_infctx.data.collator import collate
from rwkv_infctx.io.model_file import load_model, save_model
from rwkv_infctx.training.segments import bptt_step
from tests.conftest import family_config, random_family_model
from tests.distributed.launch import run_ranks
from tests.distributed.worker import synthetic_samples
from tests.training.batches import rel

CTX_LEN = 8
LENGTHS = [3 * CTX_LEN, 11 * CTX_LEN]  # rank 0: 3 segments, rank 1: 11 segments
# RWKV-4 keeps the widths this test always had (dim_att n_embd, dim_ffn 4 · n_embd)
WIDTHS = {"rwkv4": {"dim_att": None, "dim_ffn": None}, "rwkv7": {}}


def test_two_ranks_give_the_gradients_of_one_process_with_both_samples(family, tmp_path):
    cfg = family_config(family, vocab_size=100, **WIDTHS[family])
    model_path = save_model(random_family_model(cfg), tmp_path / "init.pth", "fp32")
    run_ranks(["ddp", str(tmp_path), str(model_path), ",".join(map(str, LENGTHS)), "--ctx_len", str(CTX_LEN)])

    model = load_model(model_path)
    batch = collate(synthetic_samples(LENGTHS, cfg.vocab_size))
    proxy, report = bptt_step(model, batch, CTX_LEN)
    proxy.backward()
    assert report.n_segments == 11
    for rank in (0, 1):
        grads = torch.load(tmp_path / f"grads_rank{rank}.pt")
        assert set(grads) == {n for n, _ in model.named_parameters()}
        for name, p in model.named_parameters():
            assert rel(grads[name], p.grad) <= 1e-6, (rank, name, rel(grads[name], p.grad))
