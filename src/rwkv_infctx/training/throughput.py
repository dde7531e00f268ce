"""Model FLOPs utilisation: the share of the accelerator's peak that the training step uses.

MFU = F · tokens/s / peak, with F the training FLOPs per token = 3 × the analytic forward FLOPs per
token of the model's family (`ModelFamily.forward_flops_per_token`; RWKV-4 in `model/rwkv4_flops.py`,
RWKV-7 in `model/rwkv7/family.py`: every matmul, 2 FLOPs per weight, the head included and the
embedding lookup not, plus the WKV recurrence's work). The backward counts twice the forward
(exact for the matmuls: one product for the input's gradient, one for the weight's). Segmented
BPTT's extra state-only pass and recomputation are not counted, so MFU measures useful work.
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


def train_flops_per_token(model: nn.Module) -> float:
    """FLOPs of one training token (forward + backward): 3 × the family's forward FLOPs per token."""
    from rwkv_infctx.model.registry import family_of

    return 3.0 * family_of(model).forward_flops_per_token(model.cfg)


def mfu(tokens_per_s: float, flops_per_token: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation in [0, 1]: `flops_per_token` (a training token's) at `tokens_per_s`."""
    return flops_per_token * tokens_per_s / (peak_tflops * 1e12)
