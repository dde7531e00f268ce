"""Callbacks: per-step metrics (loss, lr, tokens/s, segments, peak memory) and a closing sample."""

from __future__ import annotations

import sys
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from rwkv_infctx.training.distributed import gathered_network
from rwkv_infctx.training.peak_memory import SOURCES, peak_memory_mb
from rwkv_infctx.training.throughput import device_peak_tflops, mfu, train_flops_per_token


class StepMetrics(pl.Callback):
    """Logs, per micro-batch: loss, lr, tokens/s, segments (per sample), peak_mem_mb and, on a GPU
    of known (or configured) peak, mfu. Prints a one-line summary at the end of fit.

    The loss is logged here, after backward, because segmented BPTT only knows it then.
    tokens/s counts real tokens (padding excluded) over the wall time from the previous batch's end.

    Args:
        peak_tflops: The accelerator's peak TFLOP/s for MFU; None looks the device up in
            `throughput.PEAK_TFLOPS` (no MFU on the CPU or an unknown card).
    """

    def __init__(self, peak_tflops: float | None = None) -> None:
        self._last: float | None = None
        self._lr = 0.0
        self.peak_tflops = peak_tflops
        self._flops_per_token = 0.0
        self._tokens = 0
        self._seconds = 0.0
        self._last_loss: float | None = None
        self._boundary_bytes = 0
        self._boundary_place = "device"

    def on_train_start(self, trainer, pl_module) -> None:
        self._flops_per_token = train_flops_per_token(pl_module.model)
        self._boundary_place = pl_module.hparams.get("boundary_states", "device")
        if self.peak_tflops is None:
            self.peak_tflops = device_peak_tflops(pl_module.device)

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
        self._tokens += tokens
        self._seconds += elapsed
        self._last_loss = report.loss
        self._boundary_bytes = max(self._boundary_bytes, report.boundary_bytes)
        rate = tokens / max(elapsed, 1e-9)
        log = pl_module.log
        log("loss", report.loss, prog_bar=True, batch_size=max(int(report.n_tokens), 1))
        log("tokens_per_s", rate, prog_bar=True, batch_size=1)
        log("segments", float(report.n_segments), batch_size=1)
        log("peak_mem_mb", peak_memory_mb(pl_module.device)[0], batch_size=1)
        log("lr", self._lr, batch_size=1)
        if self.peak_tflops:
            log("mfu", mfu(rate, self._flops_per_token, self.peak_tflops), batch_size=1)

    def summary(self, device: torch.device) -> str:
        """One line: tokens, time, tokens/s, MFU (where known), peak memory and what measured it
        (`training.peak_memory`), the largest step's saved boundary states (model.boundary_states),
        last loss."""
        rate = self._tokens / max(self._seconds, 1e-9)
        parts = [f"{self._tokens:,} tokens in {self._seconds:.1f} s", f"{rate:,.0f} tokens/s"]
        if self.peak_tflops:
            parts.append(f"MFU {100 * mfu(rate, self._flops_per_token, self.peak_tflops):.1f}%")
        peak, source = peak_memory_mb(device)
        parts.append(f"peak memory {peak:,.0f} MiB ({SOURCES[source]})")
        if self._boundary_bytes:
            where = "host memory" if self._boundary_place == "cpu" else "on the device"
            parts.append(f"boundary states up to {self._boundary_bytes / 2**20:,.2f} MiB per step ({where})")
        if self._last_loss is not None:
            parts.append(f"last loss {self._last_loss:.4f}")
        return "training summary: " + ", ".join(parts) + " (this rank)"

    def on_fit_end(self, trainer, pl_module) -> None:
        if self._tokens:
            rank_zero_info(self.summary(pl_module.device))


class GenerateSample(pl.Callback):
    """At the end of fit, print a sample from the trained model (tokenizer: the data's).

    Rank 0 generates; under ZeRO-3 every rank first gathers the full weights (the whole network must
    fit on one device, as it must for a ZeRO-3 step here: docs/distributed.md).

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

    def on_fit_end(self, trainer, pl_module) -> None:
        # every rank enters (gathering ZeRO-3's partitioned weights is a collective); rank 0 samples
        model = pl_module.model
        was_training = model.training
        model.eval()
        try:
            with gathered_network(model, trainer.strategy) as network:
                if trainer.is_global_zero:
                    self.print_sample(network, getattr(trainer.datamodule, "tokenizer_spec", None) or "neox")
        finally:
            model.train(was_training)

    def print_sample(self, network, tokenizer_spec: str) -> None:
        """Stream the sample to stdout (the header to stderr)."""
        from rwkv_infctx.generation import generate_text
        from rwkv_infctx.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_spec)
        print(f"\n--- sample ({self.max_tokens} tokens, temperature {self.temperature}) ---", file=sys.stderr)
        print(self.prompt, end="", flush=True)
        generate_text(
            network,
            tokenizer,
            self.prompt,
            self.max_tokens,
            self.temperature,
            self.top_p,
            self.seed,
            on_text=lambda s: print(s, end="", flush=True),
        )
        print(flush=True)
