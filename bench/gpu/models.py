"""The two 1.5B-shaped models built straight on the device, and the steps the BPTT rows time.

Shape legend: B batch, T time, V vocab_size.

A model is constructed on the meta device and materialised where it runs with `cheap_init`: random
matrices (std 0.5/√fan_in), an N(0, 1) embedding, LayerNorms at (1, 0); RWKV-4's time_decay ~
U(-5, 3), time_first ~ U(-2, 1), time_mix ~ U(0, 1); RWKV-7's per-layer vectors (lerps, w0, a0,
v0, k_k, k_a, r_k, ln_x) as train_temp sets them. No 1.5B-parameter CPU initialisation, no
orthogonalisation of a 65536 × 2048 head.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rwkv_infctx.model import RWKV4, RWKV7, RWKV4Config, RWKV7Config
from rwkv_infctx.training import throughput
from rwkv_infctx.training.loss import objective, segment_terms, token_count
from rwkv_infctx.training.segments import bptt_step


def config(family: str, quick: bool, backend: str) -> RWKV4Config | RWKV7Config:
    """The 1.5B of each family (RWKV-7: official dims, RWKV7.md §2), or tiny dims in quick mode."""
    if quick:
        dims = {"n_layer": 2, "n_embd": 128, "vocab_size": 256}
    else:
        dims = {"n_layer": 24, "n_embd": 2048, "vocab_size": 65536 if family == "rwkv7" else 50277}
    cls = RWKV7Config if family == "rwkv7" else RWKV4Config
    return cls(**dims, wkv_backend=backend)


@torch.no_grad()
def cheap_init(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter on its own device (see the module doc)."""
    for i, (name, p) in enumerate(model.named_parameters()):
        g = torch.Generator(device=p.device).manual_seed(seed * 1000 + i)
        x = torch.empty(p.shape, device=p.device, dtype=torch.float32)
        if name.endswith("time_decay"):
            x.uniform_(-5, 3, generator=g)
        elif name.endswith("time_first"):
            x.uniform_(-2, 1, generator=g)
        elif "time_mix" in name:
            x.uniform_(0, 1, generator=g)
        elif ".ln" in name or name.startswith("ln_"):
            x.fill_(1.0 if name.endswith("weight") else 0.0)
        elif name == "emb.weight":
            x.normal_(0, 1, generator=g)
        else:
            x.normal_(0, 0.5 / p.shape[-1] ** 0.5, generator=g)
        p.copy_(x)
    if isinstance(model, RWKV7):
        from rwkv_infctx.model.rwkv7.init import _layer_values

        params = dict(model.named_parameters())
        for layer in range(model.cfg.n_layer):
            for name, value in _layer_values(model, layer).items():
                if name in params:  # layer 0 has no v0
                    params[name].copy_(value.view(params[name].shape))
    return model


def build_model(cfg: RWKV4Config | RWKV7Config, dev: torch.device, dtype: torch.dtype, seed: int = 0):
    """The model allocated directly on `dev` in `dtype` (meta construction, then `cheap_init`)."""
    with torch.device("meta"):
        model = RWKV7(cfg) if isinstance(cfg, RWKV7Config) else RWKV4(cfg)
    return cheap_init(model.to(dtype).to_empty(device=dev), seed)


def random_batch(vocab: int, T: int, dev: torch.device, seed: int = 0) -> dict[str, Tensor]:
    """input_ids, target_ids (random tokens) and an all-ones loss_mask, each (1, T)."""
    g = torch.Generator(device=dev).manual_seed(seed)
    ids = torch.randint(vocab, (1, T + 1), device=dev, generator=g)
    return {"input_ids": ids[:, :-1], "target_ids": ids[:, 1:], "loss_mask": torch.ones(1, T, device=dev)}


def whole_step(model: nn.Module, batch: dict[str, Tensor]) -> float:
    """Unsegmented forward, the objective of `bptt_step` (CE + L2Wrap over N tokens), backward."""
    logits, _ = model(batch["input_ids"])
    ce_sum, l2_sum = segment_terms(logits, batch["target_ids"], batch["loss_mask"])
    n = token_count(batch["loss_mask"])
    objective(ce_sum, l2_sum, n).backward()
    return float(ce_sum.detach()) / float(n)


def segmented_step(
    model: nn.Module, batch: dict[str, Tensor], ctx_len: int, grad_cp: bool = False, boundary: str = "device"
) -> tuple[float, int]:
    """Exact segmented BPTT through `bptt_step`: (mean cross-entropy, boundary-state bytes)."""
    proxy, report = bptt_step(model, batch, ctx_len=ctx_len, grad_cp=grad_cp, boundary_states=boundary)
    proxy.backward()
    return float(report.loss), report.boundary_bytes


def grads(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def grad_errors(got: dict[str, Tensor], ref: dict[str, Tensor]) -> tuple[float, float, str, list[str]]:
    """(max |got-ref| / max |ref| over all parameters, the worst per-parameter ratio, its name,
    names whose gradient is missing or not finite)."""
    bad = [
        n for n in ref if n not in got or not torch.isfinite(got[n]).all() or not torch.isfinite(ref[n]).all()
    ]
    num = den = worst = 0.0
    worst_name = ""
    for n, r in ref.items():
        if n in bad:
            continue
        d = (got[n].double() - r.double()).abs().max().item()
        m = r.double().abs().max().item()
        num, den = max(num, d), max(den, m)
        ratio = d / m if m > 0 else (0.0 if d == 0 else float("inf"))
        if ratio > worst:
            worst, worst_name = ratio, n
    return (num / den if den > 0 else 0.0), worst, worst_name, bad


def mfu(model: nn.Module, tok_s: float, peak_tflops: float | None) -> float | None:
    """The trainer's MFU (`training/throughput.py`: 3 × the family's forward FLOPs per token over
    the card's bf16 peak); None when the peak is unknown (the CPU, an unlisted card)."""
    if not peak_tflops:
        return None
    return throughput.mfu(tok_s, throughput.train_flops_per_token(model), peak_tflops)
