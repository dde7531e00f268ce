"""Our models against independent oracles (CPU): one line per comparison.

    python bench/oracle_diffs.py [--n_layer 4 --n_embd 128 --vocab 1000 --tokens 256 --wkv_backend auto]
    python bench/oracle_diffs.py --arch rwkv7 [--n_layer 3 --n_embd 128 --vocab 300 --tokens 300]

RWKV-4: max |logit| differences against HF transformers and the `rwkv` package (cpu fp32).
RWKV-7: relative differences (max |a − b| / max |b|) against the `rwkv` package (x070, cpu fp32, in a
child process) for logits in one pass and token by token and the final WKV state; greedy tokens in
agreement; gradients of segmented BPTT against one pass (fp32) and against the fp64 functional
forward written from the spec sheet (tests/model/rwkv7_functional.py), and the truncated gradient's
distance. Every weight is random, the zero-initialised matrices included.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import random_model, random_rwkv7
from model import rwkv7_functional
from model.rwkv7_package import run_package
from rwkv_infctx.convert.hf import hf_config_kwargs, to_hf_state_dict
from rwkv_infctx.generation import generate_ids
from rwkv_infctx.io.model_file import save_model
from rwkv_infctx.model import RWKV4Config, RWKV7Config
from rwkv_infctx.training.loss import objective, segment_terms, token_count
from rwkv_infctx.training.segments import bptt_step


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", choices=("rwkv4", "rwkv7"), default="rwkv4")
    p.add_argument("--n_layer", type=int, default=None, help="default 4 (rwkv4), 3 (rwkv7)")
    p.add_argument("--n_embd", type=int, default=128)
    p.add_argument("--vocab", type=int, default=None, help="default 1000 (rwkv4), 300 (rwkv7)")
    p.add_argument("--tokens", type=int, default=None, help="default 256 (rwkv4), 300 (rwkv7)")
    p.add_argument("--wkv_backend", default="auto", help="auto (chunked on the CPU) or reference")
    args = p.parse_args()
    if args.arch == "rwkv7":
        rwkv7_diffs(args.n_layer or 3, args.n_embd, args.vocab or 300, args.tokens or 300, args.wkv_backend)
    else:
        rwkv4_diffs(args.n_layer or 4, args.n_embd, args.vocab or 1000, args.tokens or 256, args.wkv_backend)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def rwkv7_diffs(n_layer: int, n_embd: int, vocab: int, n_tokens: int, backend: str) -> None:
    cfg = RWKV7Config(n_layer, n_embd, vocab, wkv_backend=backend)
    model = random_rwkv7(cfg, seed=1).eval()
    tokens = torch.randint(0, vocab, (n_tokens,), generator=torch.Generator().manual_seed(5)).tolist()
    prompt, steps, greedy = tokens[:10], min(40, n_tokens), 48
    with tempfile.TemporaryDirectory() as tmp:
        path = save_model(model, Path(tmp) / "random_x070.pth", "fp32")
        jobs = {"one_pass": tokens, "step": tokens[:steps], "greedy": (prompt, greedy)}
        ref = run_package(path, jobs, Path(tmp))
    with torch.no_grad():
        logits, state = model(torch.tensor([tokens]))
        step_state, rows = None, []
        for token in tokens[:steps]:
            out, step_state = model(torch.tensor([[token]]), step_state)
            rows.append(out[0, 0])
    print(f"model: {cfg}, {n_tokens} tokens, max |logit| {logits.abs().max():.3f}")
    print(
        f"rwkv package (x070, cpu fp32): logits one pass rel {rel(logits[0], ref['one_pass']['logits']):.2e}"
    )
    wkv = max(rel(state.wkv[i, 0], ref["one_pass"]["state"][3 * i + 1]) for i in range(n_layer))
    print(f"rwkv package: final WKV state rel {wkv:.2e}")
    print(
        f"rwkv package: logits token by token ({steps} tokens) rel {rel(torch.stack(rows), ref['step']):.2e}"
    )
    ours = list(generate_ids(model, prompt, greedy, temperature=0.0))
    same = next((i for i, (a, b) in enumerate(zip(ours, ref["greedy"], strict=True)) if a != b), greedy)
    print(f"rwkv package: greedy tokens equal {same}/{greedy}")
    grads = segment_gradients(model.train(), vocab)
    full = rel(grads["full"], grads["one"])
    print(f"gradients, 69 tokens in 5 segments of 16: vs one pass (fp32) rel {full:.2e}")
    print(f"gradients: truncated vs one pass rel {rel(grads['truncated'], grads['one']):.2e}")
    fp64 = rel(grads["full64"], grads["functional"])
    print(f"gradients (fp64): vs the functional fp64 forward rel {fp64:.2e}")


def segment_gradients(model, vocab: int) -> dict[str, torch.Tensor]:
    """Flat parameter gradients: one pass, segmented full and truncated, fp64, fp64 functional."""
    tokens = torch.randint(0, vocab, (1, 70), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": tokens[:, :-1], "target_ids": tokens[:, 1:], "loss_mask": torch.ones(1, 69)}

    def flat(m) -> torch.Tensor:
        out = torch.cat([p.grad.flatten() for p in m.parameters()])
        m.zero_grad(set_to_none=True)
        return out

    def segmented(m, bptt: str) -> torch.Tensor:
        proxy, _ = bptt_step(m, batch, 16, bptt=bptt)
        proxy.backward()
        return flat(m)

    logits, _ = model(batch["input_ids"])
    ce, l2 = segment_terms(logits, batch["target_ids"], batch["loss_mask"])
    objective(ce, l2, token_count(batch["loss_mask"])).backward()
    out = {"one": flat(model), "full": segmented(model, "full"), "truncated": segmented(model, "truncated")}
    model64 = model.double()
    out["full64"] = segmented(model64, "full")
    params = dict(model64.named_parameters())
    sd = {k: v.detach().requires_grad_(k in params) for k, v in model64.state_dict().items()}
    logits64 = rwkv7_functional.logits(sd, tokens[0, :-1].tolist(), model64.cfg.n_head)
    mask = torch.ones(1, 69, dtype=torch.float64)
    objective(*segment_terms(logits64[None], tokens[:, 1:], mask), token_count(mask)).backward()
    out["functional"] = torch.cat([sd[name].grad.flatten() for name in params])
    return out


@torch.no_grad()
def rwkv4_diffs(n_layer: int, n_embd: int, vocab: int, n_tokens: int, backend: str) -> None:
    cfg = RWKV4Config(n_layer, n_embd, vocab, wkv_backend=backend)
    model = random_model(cfg, seed=0)
    tokens = torch.randint(0, cfg.vocab_size, (1, n_tokens), generator=torch.Generator().manual_seed(1))
    ours, _ = model(tokens)
    print(f"model: {cfg}, {n_tokens} tokens, max |logit| {ours.abs().max():.3f}")

    import transformers

    hf = transformers.RwkvForCausalLM(transformers.RwkvConfig(**hf_config_kwargs(cfg)))
    hf.load_state_dict(to_hf_state_dict(model.state_dict()))
    diff = (ours - hf(tokens).logits).abs().max()
    print(f"HF transformers {transformers.__version__}: max |Δlogit| = {diff:.3e}")

    os.environ.setdefault("RWKV_JIT_ON", "0")
    os.environ.setdefault("RWKV_CUDA_ON", "0")
    import rwkv
    from rwkv.model import RWKV

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.pth"
        save_model(model, path, dtype="fp32")
        pkg = RWKV(str(path), strategy="cpu fp32")
        theirs, _ = pkg.forward(tokens[0].tolist(), None, full_output=True)
    version = getattr(rwkv, "__version__", "?")
    print(f"rwkv package {version} (cpu fp32): max |Δlogit| = {(ours[0] - theirs).abs().max():.3e}")


if __name__ == "__main__":
    main()
