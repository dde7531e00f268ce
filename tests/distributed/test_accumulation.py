"""Gradient accumulation exact in tokens (`model.loss_normalization: step_tokens`).

Samples of 1, 3, 6 and 10 segments (prompts masked, so learnt tokens ≠ positions), prepared by
RWKVDataModule. Ranks × accumulation × batch must give the gradients of one process holding all of an
optimizer step's samples in one micro-batch (the oracle: `bptt_step` on those samples, collated from
the stored dataset); the old per-micro-step weighting (micro_batch_tokens) must land measurably away
(≥ 10× the tolerance), so each test can fail. `pytest -s` prints the figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from rwkv_infctx.data import RWKVDataModule
from rwkv_infctx.data.collator import collate
from rwkv_infctx.data.store import load_splits
from rwkv_infctx.io.model_file import load_model, read_state_dict, save_model
from rwkv_infctx.training.module import RWKVModule
from rwkv_infctx.training.segments import bptt_step
from tests.conftest import family_config, random_family_model
from tests.distributed.launch import run_ranks
from tests.training.batches import rel

CTX_LEN = 8
LR = 0.1
GRAD_TOL = 1e-6
STEP_TOL = 1e-4
# (masked prompt tokens, learnt answer tokens): 8, 23, 46 and 79 tokens, 1, 3, 6 and 10 segments;
# the first has no prompt, so its first learnt token is only read (never predicted)
ROWS = [(0, 8), (6, 17), (10, 36), (14, 65)]
MODES = ("step_tokens", "micro_batch_tokens")
# RWKV-4 keeps the widths this test always had (dim_att n_embd, dim_ffn 4 · n_embd)
WIDTHS = {"rwkv4": {"dim_att": None, "dim_ffn": None}, "rwkv7": {}}
# `prepared` holds a model of the family it is parametrised with. RWKV-7 runs the one-process and
# DDP cases; the resumed run (the data cursor's step totals) and DeepSpeed's grouping of micro-steps
# do not depend on the family and run for RWKV-4 only (ZeRO for RWKV-7: test_deepspeed.py)
BOTH = pytest.mark.parametrize("prepared", ["rwkv4", "rwkv7"], indirect=True)


@pytest.fixture(scope="module")
def prepared(request, tmp_path_factory) -> tuple[Path, Path]:
    """(data_path, init model): the four samples, in this order, and a tiny fp32 model of the family
    `request.param` (indirect parametrisation)."""
    folder = tmp_path_factory.mktemp(f"accum-{request.param}")
    source = folder / "rows.jsonl"
    source.write_text("".join(json.dumps({"prompt": " p" * a, "answer": " x" * b}) + "\n" for a, b in ROWS))
    data = RWKVDataModule(
        source=str(source),
        data_path=str(folder / "data"),
        multi_column_keys=["prompt", "answer"],
        multi_column_train_mask=[False, True],
    )
    data.prepare_data()
    lengths = [len(r) for r in load_splits(folder / "data")["train"]["input_ids"]]
    assert [-(-(n - 1) // CTX_LEN) for n in lengths] == [1, 3, 6, 10]
    cfg = family_config(request.param, vocab_size=data.vocab_size_needed(), **WIDTHS[request.param])
    return folder / "data", save_model(random_family_model(cfg), folder / "init.pth", "fp32")


def reference_grads(
    prepared, indices: list[int], ctx_len_cutoff: int | None = None, sgd_from: dict | None = None
) -> dict[str, torch.Tensor]:
    """One process, one micro-batch holding the samples `indices` of the stored dataset; at the
    initial weights, or after an SGD step along the gradients `sgd_from`."""
    data_path, model_path = prepared
    rows = load_splits(data_path)["train"].with_format("numpy", columns=["input_ids", "loss_mask"])
    model = load_model(model_path)
    if sgd_from is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p -= LR * sgd_from[name]
    proxy, _ = bptt_step(model, collate([rows[i] for i in indices]), CTX_LEN, ctx_len_cutoff)
    proxy.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def rel_all(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """Relative difference of all gradients as one vector (max |a - b| / max |b|)."""
    names = sorted(want)
    return rel(torch.cat([got[n].flatten() for n in names]), torch.cat([want[n].flatten() for n in names]))


def report(what: str, new: float, old: float, tol: float) -> None:
    figures = f"step_tokens {new:.2e}, micro_batch_tokens {old:.2e} (tolerance {tol:.0e})"
    print(f"\n{what}: relative difference to the reference: {figures}")
    assert new <= tol, (what, new)
    assert old >= 10 * tol, (what, old)


class StepGrads(pl.Callback):
    """Per optimizer step: its samples and its gradients, before the step is taken."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.samples: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.samples += batch["sample_index"].tolist()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = {n: p.grad.clone() for n, p in pl_module.model.named_parameters()}
        self.steps.append({"samples": sorted(self.samples), "grads": grads})
        self.samples = []


def fit_one_process(
    prepared, mode: str, cutoff: int | None = None, shuffle: bool = False, **kwargs
) -> list[dict]:
    """Accumulating 2 batches of 1 sample; each optimizer step's samples and gradients. `kwargs`:
    Trainer arguments, and `ckpt_path` for fit."""
    data_path, model_path = prepared
    module = RWKVModule(
        load_model=str(model_path), ctx_len=CTX_LEN, ctx_len_cutoff=cutoff, optimizer="sgd",
        lr_init=LR, lr_final=LR, layerwise_lr=False, loss_normalization=mode,
    )  # fmt: skip
    grads = StepGrads()
    ckpt_path = kwargs.pop("ckpt_path", None)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, accumulate_grad_batches=2, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        **{"enable_checkpointing": False, **kwargs, "callbacks": [grads, *kwargs.get("callbacks", [])]},
    )  # fmt: skip
    data = RWKVDataModule(data_path=str(data_path), batch_size=1, shuffle=shuffle)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return grads.steps


@BOTH
def test_one_process_accumulating_2_gives_the_gradient_of_batch_2(prepared):
    """Samples 0, 1 | 2: three batches, the epoch's last step holds one (limit_train_batches 3);
    ctx_len_cutoff 20 cuts the longer samples into pieces."""
    cutoff = 20
    new, old = (fit_one_process(prepared, m, cutoff, limit_train_batches=3) for m in MODES)
    assert len(new) == len(old) == 2
    want = None
    for step, indices in enumerate([[0, 1], [2]]):
        assert new[step]["samples"] == old[step]["samples"] == indices
        want = reference_grads(prepared, indices, cutoff, sgd_from=want)
        figures = rel_all(new[step]["grads"], want), rel_all(old[step]["grads"], want)
        report(f"1 process, accumulate 2, step {step + 1}", *figures, GRAD_TOL)


@pytest.mark.parametrize("prepared", ["rwkv4"], indirect=True)
def test_a_run_resumed_between_two_steps_divides_by_the_same_step_totals(prepared, tmp_path):
    """Shuffled; resumed from the checkpoint of step 1: step 2 is the uninterrupted run's, and the
    gradient of its two samples in one batch (the cursor keeps the samples' places in the epoch)."""
    every_step = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
    straight = fit_one_process(
        prepared, "step_tokens", shuffle=True, max_steps=2, enable_checkpointing=True, callbacks=[every_step]
    )
    ckpt = tmp_path / "epoch=0-step=1.ckpt"
    resumed = fit_one_process(prepared, "step_tokens", shuffle=True, max_steps=2, ckpt_path=ckpt)
    assert len(straight) == 2 and len(resumed) == 1
    assert resumed[0]["samples"] == straight[1]["samples"]
    want = reference_grads(prepared, straight[1]["samples"], sgd_from=straight[0]["grads"])
    assert rel_all(straight[1]["grads"], want) <= GRAD_TOL
    assert rel_all(resumed[0]["grads"], want) <= GRAD_TOL


def step_samples(out: Path) -> list[list[int]]:
    """Per rank, the samples of its two batches of the first optimizer step (RecordSamples)."""
    ranks = [json.loads((out / f"samples_rank{r}.json").read_text()) for r in (0, 1)]
    assert not any(p for r in ranks for b in r[:2] for p in b["padding"])
    return [[i for b in r[:2] for i in b["index"]] for r in ranks]


# not shuffled: micro-step 1 holds samples 0 and 1 (7 + 17 learnt tokens), micro-step 2 samples 2 and
# 3 (36 + 65); rank 0 holds samples 0 and 2 (43), rank 1 samples 1 and 3 (82)
DEALT = [[0, 2], [1, 3]]


@BOTH
def test_ddp_2_ranks_accumulating_2_give_the_gradient_of_batch_4(prepared, tmp_path):
    data_path, model_path = prepared
    args = ["ddp", str(tmp_path), str(model_path), f"data:{data_path}", "--steps", "1", "--accumulate", "2"]
    run_ranks([*args, "--ctx_len", str(CTX_LEN), "--no-shuffle", "--loss_normalization", ",".join(MODES)])

    assert step_samples(tmp_path / "step_tokens") == step_samples(tmp_path / "micro_batch_tokens") == DEALT
    want = reference_grads(prepared, [0, 1, 2, 3])
    got = {m: [torch.load(tmp_path / m / f"grads_rank{r}.pt") for r in (0, 1)] for m in MODES}
    for rank in (0, 1):
        new, old = (rel_all(got[m][rank], want) for m in MODES)
        report(f"DDP 2 ranks x accumulate 2, rank {rank}, gradient", new, old, GRAD_TOL)
    initial = read_state_dict(model_path)
    final = {m: torch.load(tmp_path / m / "final_rank0.pt") for m in MODES}
    change = {m: {k: final[m][k] - initial[k] for k in want} for m in MODES}
    sgd = {k: -LR * g for k, g in want.items()}
    new, old = (rel_all(change[m], sgd) for m in MODES)
    report("DDP 2 ranks x accumulate 2, weight change", new, old, STEP_TOL)


@pytest.mark.slow
@pytest.mark.parametrize("prepared", ["rwkv4"], indirect=True)
def test_deepspeed_stage_2_on_2_ranks_accumulating_2_takes_the_step_of_batch_4(prepared, tmp_path):
    pytest.importorskip("deepspeed")
    data_path, model_path = prepared
    args = ["deepspeed_stage_2", str(tmp_path), str(model_path), f"data:{data_path}", "--steps", "1"]
    args += ["--accumulate", "2", "--ctx_len", str(CTX_LEN), "--no-shuffle"]
    run_ranks([*args, "--loss_normalization", ",".join(MODES)])

    assert step_samples(tmp_path / "step_tokens") == step_samples(tmp_path / "micro_batch_tokens") == DEALT
    want = reference_grads(prepared, [0, 1, 2, 3])
    initial = read_state_dict(model_path)
    sgd = {k: -LR * g for k, g in want.items()}
    for rank in (0, 1):
        final = {m: torch.load(tmp_path / m / f"final_rank{rank}.pt") for m in MODES}
        new, old = (rel_all({k: final[m][k] - initial[k] for k in want}, sgd) for m in MODES)
        report(f"DeepSpeed stage 2, 2 ranks x accumulate 2, rank {rank}, weight change", new, old, STEP_TOL)
