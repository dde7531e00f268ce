"""MFU arithmetic and the end-of-fit summary line."""

from __future__ import annotations

import pytest
import torch

from rwkv_infctx.model import RWKV4, RWKV4Config
from rwkv_infctx.training.callbacks import StepMetrics
from rwkv_infctx.training.throughput import device_peak_tflops, mfu, train_flops_per_token


def test_train_flops_are_three_forwards():
    model = RWKV4(RWKV4Config(2, 32, 100))
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert linear == model.num_params() - 100 * 32 - sum(  # all but the embedding and vectors
        p.numel() for n, p in model.named_parameters() if p.squeeze().dim() < 2
    )
    assert train_flops_per_token(model) == 3 * (2 * linear + 23 * 2 * 32)


def test_mfu_formula_and_cpu_has_no_default_peak():
    assert mfu(tokens_per_s=1000.0, flops_per_token=6e9, peak_tflops=600.0) == pytest.approx(0.01)
    assert device_peak_tflops(torch.device("cpu")) is None


def test_summary_line():
    metrics = StepMetrics(peak_tflops=1.0)
    metrics._flops_per_token, metrics._tokens, metrics._seconds, metrics._last_loss = 6e6, 5000, 2.0, 3.25
    line = metrics.summary(torch.device("cpu"))
    assert line.startswith("training summary: 5,000 tokens in 2.0 s, 2,500 tokens/s, MFU 1.5%")
    assert "MiB (peak RSS of this process, VmHWM)" in line and "last loss 3.2500" in line


def test_summary_line_reports_the_boundary_states_and_where_they_are():
    metrics = StepMetrics()
    metrics._tokens, metrics._seconds = 100, 1.0
    assert "boundary states" not in metrics.summary(torch.device("cpu"))  # none saved: not shown
    metrics._boundary_bytes, metrics._boundary_place = 3 * 2**20, "cpu"
    assert "boundary states up to 3.00 MiB per step (host memory)" in metrics.summary(torch.device("cpu"))
