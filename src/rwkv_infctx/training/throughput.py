"""Model FLOPs utilisation: the share of the accelerator's peak that the training step uses.

MFU = 6 · N · tokens/s / peak, with N the parameters that do matrix work per token (everything but the
embedding table, which is a lookup). 6·N counts the forward (2·N) and backward (4·N) multiply-adds;
segmented BPTT's extra state-only pass and recomputation are not counted, so MFU measures useful work.
"""

from __future__ import annotations

import torch
from torch import nn

PEAK_TFLOPS = {
    # dense bf16 tensor-core peaks (TFLOP/s), matched against torch.cuda.get_device_name()
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    "V100": 125.0,
    "T4": 65.0,
}


def device_peak_tflops(device: torch.device) -> float | None:
    """The bf16 dense peak of a known CUDA device, or None (CPU, or a card not in the table)."""
    if device.type != "cuda":
        return None
    return peak_tflops_for_name(torch.cuda.get_device_name(device))


def peak_tflops_for_name(device_name: str) -> float | None:
    """The bf16 dense peak of a device by its name (`torch.cuda.get_device_name`), or None."""
    for key, tflops in PEAK_TFLOPS.items():  # most specific names first
        if key in device_name:
            return tflops
    return None


def matmul_params(model: nn.Module) -> int:
    """N of 6·N: every parameter except the embedding table."""
    emb = getattr(model, "emb", None)
    skip = {id(p) for p in emb.parameters()} if isinstance(emb, nn.Module) else set()
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def mfu(tokens_per_s: float, n_params: int, peak_tflops: float) -> float:
    """Model FLOPs utilisation in [0, 1]."""
    return 6.0 * n_params * tokens_per_s / (peak_tflops * 1e12)
