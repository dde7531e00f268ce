"""One rank of a distributed test run, launched by `launch.run_ranks` under torchrun.

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests.distributed.worker \
        STRATEGY OUT_DIR MODEL.pth LENGTHS [--steps N] [--optimizer sgd] [--accumulate K]
        [--batch_size B] [--loss_normalization MODE[,MODE]] [--no-shuffle] [--train_mode lora|state]

Trains `MODEL.pth` with RWKVModule on synthetic samples of the given lengths (one per rank per step,
in order: Lightning's DistributedSampler gives rank r the samples r, r + W, ...) and writes to
OUT_DIR: `grads_rank{r}.pt` (the gradients of the first optimizer step, where the strategy keeps
them in `.grad`), `final_rank{r}.pt` (the trained weights, gathered) and the Lightning checkpoint
`last.ckpt` (a folder under DeepSpeed), and `fit_export.pth` (model.export at the end of fit).
One validation batch runs at the end of the epoch. `--sample PROMPT` adds `GenerateSample` (greedy).
With several `--loss_normalization` modes, one fit per mode runs from the same weights, each writing
to OUT_DIR/MODE.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from rwkv_infctx.data import RWKVDataModule
from rwkv_infctx.data.collator import collate
from rwkv_infctx.training.module import RWKVModule

SAMPLE_TOKENS = 24
LORA_OPTIONS = {"lora_r": 4, "lora_alpha": 8.0}


def synthetic_samples(lengths: list[int], vocab: int, seed: int = 0) -> list[dict]:
    """Samples of `length + 1` token ids each (so `length` scored positions), no loss mask."""
    gen = np.random.default_rng(seed)
    return [{"input_ids": gen.integers(0, vocab, n + 1), "loss_mask": None} for n in lengths]


class RecordSamples(pl.Callback):
    """Writes `samples_rank{r}.json`: per training batch, its sample indices and which are padding."""

    def __init__(self, out: Path) -> None:
        self.out, self.batches = out, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if "sample_index" in batch:
            padding = (batch["loss_mask"] == 0).all(dim=1)
            self.batches.append({"index": batch["sample_index"].tolist(), "padding": padding.tolist()})

    def on_train_end(self, trainer, pl_module) -> None:
        (self.out / f"samples_rank{trainer.global_rank}.json").write_text(json.dumps(self.batches))


class CaptureGrads(pl.Callback):
    """Saves every parameter's `.grad` before the first optimizer step (after DDP's all-reduce)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.done = False

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.done:
            return
        self.done = True
        grads = {
            n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters() if p.grad is not None
        }
        torch.save(grads, self.out / f"grads_rank{trainer.global_rank}.pt")


def make_strategy(name: str):
    if not name.startswith("deepspeed"):
        return name
    from tests.distributed.cpu_deepspeed import CPUDeepSpeedStrategy

    stage = int(name.split("_")[2])
    offload = name.endswith("offload")
    kwargs = {"stage": stage, "offload_optimizer": offload, "offload_parameters": offload and stage == 3}
    strategy = CPUDeepSpeedStrategy(**kwargs)
    # partition every parameter under ZeRO-3 (by default small ones stay whole, hiding the sharding)
    strategy.config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return strategy


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("strategy")
    parser.add_argument("out", type=Path)
    parser.add_argument("model", type=Path)
    parser.add_argument("lengths", help="comma-separated sample lengths, or data:DATA_PATH (prepared)")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--optimizer", default="sgd")
    parser.add_argument("--ctx_len", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--sample", default=None, help="PROMPT: GenerateSample, greedy, 24 tokens")
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--loss_normalization", default="step_tokens")
    parser.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True, help="data: only")
    parser.add_argument(
        "--train_mode", default="full", help="lora: rank-4 adapters (LORA_OPTIONS); state: S0 at --lr"
    )
    args = parser.parse_args()
    modes = args.loss_normalization.split(",")
    for mode in modes:
        out = args.out / mode if len(modes) > 1 else args.out
        out.mkdir(exist_ok=True)
        fit(args, mode, out)


def fit(args: argparse.Namespace, loss_normalization: str, out: Path) -> None:
    """One fit of `args.model` with `loss_normalization`, writing to `out` (see the module doc)."""
    module = RWKVModule(
        load_model=str(args.model),
        ctx_len=args.ctx_len,
        optimizer=args.optimizer,
        lr_init=args.lr,
        lr_final=args.lr,
        layerwise_lr=False,
        export=str(out / "fit_export.pth"),
        export_dtype="fp32",
        loss_normalization=loss_normalization,
        train_mode=args.train_mode,
        **(LORA_OPTIONS if args.train_mode == "lora" else {}),
        **({"state_lr": args.lr} if args.train_mode == "state" else {}),
    )
    if args.lengths.startswith("data:"):  # the project's datamodule (its rank-sharded sampler)
        path = args.lengths.removeprefix("data:")
        data = RWKVDataModule(data_path=path, batch_size=args.batch_size, shuffle=args.shuffle)
        loaders = {"datamodule": data}
    else:
        samples = synthetic_samples([int(n) for n in args.lengths.split(",")], module.model.cfg.vocab_size)
        loader = DataLoader(samples, batch_size=1, shuffle=False, collate_fn=collate)
        loaders = {"train_dataloaders": loader, "val_dataloaders": loader}
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=make_strategy(args.strategy),
        max_steps=args.steps,
        max_epochs=1,
        accumulate_grad_batches=args.accumulate,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(out),
        callbacks=[CaptureGrads(out), RecordSamples(out), *sample_callback(args.sample)],
    )
    trainer.fit(module, **loaders)
    trainer.save_checkpoint(out / "last.ckpt")
    torch.save(gathered_state(trainer, module), out / f"final_rank{trainer.global_rank}.pt")


def sample_callback(prompt: str | None) -> list[pl.Callback]:
    """[GenerateSample] continuing `prompt` greedily (the data's tokenizer), or none."""
    if prompt is None:
        return []
    from rwkv_infctx.training.callbacks import GenerateSample

    return [GenerateSample(prompt=prompt, max_tokens=SAMPLE_TOKENS, temperature=0.0)]


def gathered_state(trainer: pl.Trainer, module: RWKVModule) -> dict[str, torch.Tensor]:
    """The network's full weights on this rank (gathered from the shards under ZeRO-3)."""
    from rwkv_infctx.training.distributed import zero_stage

    if zero_stage(trainer.strategy) != 3:
        return module.model.state_dict()
    import deepspeed

    params = list(module.model.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():  # not left to exit-time destructors (see training/cli.py)
        torch.distributed.destroy_process_group()
    # Every output is written. Skip the interpreter's exit-time destructors: a finished ZeRO-3 rank
    # has still aborted in them now and then ('terminate called without an active exception', -6).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
