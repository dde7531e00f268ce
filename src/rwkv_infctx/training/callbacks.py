"""Callbacks: per-step metrics (loss, lr, tokens/s, segments, peak memory) and a closing sample."""

from __future__ import annotations

import resource
import sys
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on `device`, or the process's peak RSS on CPU, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class StepMetrics(pl.Callback):
    """Logs, per micro-batch: loss, lr, tokens/s, segments (per sample) and peak_mem_mb.

    The loss is logged here, after backward, because segmented BPTT only knows it then.
    tokens/s counts real tokens (padding excluded) over the wall time from the previous batch's end.
    """

    def __init__(self) -> None:
        self._last: float | None = None
        self._lr = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._last is None:
            self._last = time.perf_counter()
        group = trainer.optimizers[0].param_groups[0]  # the lr this step uses (layerwise scale 1)
        self._lr = group["lr"] / group.get("lr_scale", 1.0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        elapsed, self._last = now - (self._last or now), now
        report = pl_module.last_report
        if report is None or report.loss is None:
            return
        lengths = batch.get("lengths")
        tokens = int(lengths.sum()) if lengths is not None else report.tokens
        log = pl_module.log
        log("loss", report.loss, prog_bar=True, batch_size=max(int(report.n_tokens), 1))
        log("tokens_per_s", tokens / max(elapsed, 1e-9), prog_bar=True, batch_size=1)
        log("segments", float(report.n_segments), batch_size=1)
        log("peak_mem_mb", peak_memory_mb(pl_module.device), batch_size=1)
        log(
            "lr",
            self._lr,
            batch_size=1,
        )


class GenerateSample(pl.Callback):
    """At the end of fit, print a sample from the trained model (tokenizer: the data's).

    Args:
        prompt: Text the sample continues.
        max_tokens: Tokens to generate.
        temperature: Sampling temperature (0: greedy).
        top_p: Nucleus sampling threshold.
        seed: Sampling seed.
    """

    def __init__(
        self,
        prompt: str = "\n",
        max_tokens: int = 200,
        temperature: float = 1.0,
        top_p: float = 0.85,
        seed: int = 0,
    ) -> None:
        self.prompt, self.max_tokens, self.temperature, self.top_p, self.seed = (
            prompt,
            max_tokens,
            temperature,
            top_p,
            seed,
        )

    @rank_zero_only
    def on_fit_end(self, trainer, pl_module) -> None:
        from rwkv_infctx.generation import generate_text
        from rwkv_infctx.tokenizer import load_tokenizer

        spec = getattr(trainer.datamodule, "tokenizer_spec", None) or "neox"
        tokenizer = load_tokenizer(spec)
        was_training = pl_module.model.training
        pl_module.model.eval()
        print(f"\n--- sample ({self.max_tokens} tokens, temperature {self.temperature}) ---", file=sys.stderr)
        print(self.prompt, end="", flush=True)
        generate_text(
            pl_module.model,
            tokenizer,
            self.prompt,
            self.max_tokens,
            self.temperature,
            self.top_p,
            self.seed,
            on_text=lambda s: print(s, end="", flush=True),
        )
        print(flush=True)
        pl_module.model.train(was_training)
