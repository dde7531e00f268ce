"""MFU arithmetic and the end-of-fit summary line."""

from __future__ import annotations

import pytest
import torch

from rwkv_infctx.model import RWKV4, RWKV4Config
from rwkv_infctx.training.callbacks import StepMetrics
from rwkv_infctx.training.throughput import device_peak_tflops, matmul_params, mfu


def test_matmul_params_excludes_only_the_embedding():
    model = RWKV4(RWKV4Config(2, 32, 100))
    assert matmul_params(model) == model.num_params() - 100 * 32


def test_mfu_formula_and_cpu_has_no_default_peak():
    assert mfu(tokens_per_s=1000.0, n_params=10**9, peak_tflops=600.0) == pytest.approx(0.01)
    assert device_peak_tflops(torch.device("cpu")) is None


def test_summary_line():
    metrics = StepMetrics(peak_tflops=1.0)
    metrics._n_params, metrics._tokens, metrics._seconds, metrics._last_loss = 10**6, 5000, 2.0, 3.25
    line = metrics.summary(torch.device("cpu"))
    assert line.startswith("training summary: 5,000 tokens in 2.0 s, 2,500 tokens/s, MFU 1.5%")
    assert "peak memory" in line and "last loss 3.2500" in line
