"""Max |logit| differences of our RWKV-4 against HF transformers and the `rwkv` package (CPU, fp32).

    python bench/oracle_diffs.py [--n_layer 4 --n_embd 128 --vocab 1000 --tokens 256 --wkv_backend auto]

Every weight is random (time parameters included). Prints one line per comparison.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import random_model
from rwkv_infctx.convert.hf import hf_config_kwargs, to_hf_state_dict
from rwkv_infctx.io.model_file import save_model
from rwkv_infctx.model import RWKV4Config


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=128)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--wkv_backend", default="auto", help="auto (chunked on the CPU) or reference")
    args = p.parse_args()
    cfg = RWKV4Config(args.n_layer, args.n_embd, args.vocab, wkv_backend=args.wkv_backend)
    model = random_model(cfg, seed=0)
    tokens = torch.randint(0, cfg.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(1))
    ours, _ = model(tokens)
    print(f"model: {cfg}, {args.tokens} tokens, max |logit| {ours.abs().max():.3f}")

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
