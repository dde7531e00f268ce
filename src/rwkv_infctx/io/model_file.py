"""RWKV-LM model files: `.pth` state dicts (and `.safetensors` with the same keys).

Keys and shapes are exactly RWKV-LM's (`emb.weight`, `blocks.N.att.time_decay`, ...), so files move
between this project, RWKV-LM, ChatRWKV (the `rwkv` package) and, after renaming, HF transformers.
Loading never runs pickled code (`torch.load(weights_only=True)`).
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from torch import Tensor

from rwkv_infctx.errors import UserError
from rwkv_infctx.io.atomic import atomic_path
from rwkv_infctx.model import RWKV4, RWKV4Config

STRIPPED_PREFIXES = ("_forward_module.", "module.")
SAVE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a `.pth` or `.safetensors` file into a CPU state dict, with wrapper prefixes stripped."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model file {path}: not found")
    if not path.is_file():
        raise UserError(f"model file {path}: not a file")
    sd = _read_safetensors(path) if path.suffix == ".safetensors" else _read_pth(path)
    return _strip_prefixes(sd, path)


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:
        raise UserError(f"model file {path}: not a readable safetensors file ({_short(e)})") from None


def _read_pth(path: Path) -> dict[str, Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # corrupt bytes and pickled code look alike to the weights_only unpickler: both are refused
        raise UserError(
            f"model file {path}: not a readable state dict of tensors; refused (corrupt, or pickled "
            "objects that would run code; expected an RWKV-LM .pth)"
        ) from None
    except Exception as e:  # torch.load raises many types for damaged input
        raise UserError(
            f"model file {path}: not a readable model file, truncated or corrupt ({_short(e)})"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # a Lightning checkpoint
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UserError(f"model file {path}: expected a dict of tensors (an RWKV-LM state dict)")
    return obj


def _short(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


def _strip_prefixes(sd: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        name = key
        for prefix in STRIPPED_PREFIXES:
            name = name.removeprefix(prefix)
        if name.startswith("model."):  # our LightningModule keeps the network under `model`
            name = name[len("model.") :]
        if name in out:
            raise UserError(f"model file {path}: key {name!r} appears twice after stripping wrapper prefixes")
        out[name] = value
    return out


def infer_config(sd: dict[str, Tensor], path: str | Path = "<state dict>", **options) -> RWKV4Config:
    """Read n_layer, n_embd, vocab_size, dim_att and dim_ffn from the tensor shapes."""
    for key in ("emb.weight", "blocks.0.att.key.weight", "blocks.0.ffn.key.weight"):
        if key not in sd:
            raise UserError(f"model file {path}: missing key {key!r}; is this an RWKV-4 model?")
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    n_layer = max(layers) + 1
    vocab_size, n_embd = sd["emb.weight"].shape
    return RWKV4Config(
        n_layer=n_layer,
        n_embd=n_embd,
        vocab_size=vocab_size,
        dim_att=sd["blocks.0.att.key.weight"].shape[0],
        dim_ffn=sd["blocks.0.ffn.key.weight"].shape[0],
        **options,
    )


def check_keys(sd: dict[str, Tensor], expected: dict[str, Tensor], path: str | Path) -> None:
    """Raise one UserError that names every missing, unexpected and wrongly shaped key."""
    problems = [
        f"missing key {k!r} (expected shape {tuple(v.shape)})" for k, v in expected.items() if k not in sd
    ]
    problems += [f"unexpected key {k!r} (shape {tuple(sd[k].shape)})" for k in sd if k not in expected]
    problems += [
        f"key {k!r} has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if problems:
        raise UserError(f"model file {path}: " + "; ".join(problems))


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, **options) -> RWKV4:
    """Build an RWKV4 from a model file; dims come from the shapes, `options` set the rest."""
    sd = read_state_dict(path)
    model = RWKV4(infer_config(sd, path, **options))
    check_keys(sd, model.state_dict(), path)
    model.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()})
    return model.to(dtype)


def save_state_dict(sd: dict[str, Tensor], path: str | Path, dtype: str = "bf16") -> Path:
    """Write a state dict as RWKV-LM does (`.pth`) or as `.safetensors`, atomically."""
    if dtype not in SAVE_DTYPES:
        raise UserError(f"dtype {dtype!r}: expected one of {', '.join(SAVE_DTYPES)}")
    path = Path(path)
    out = {k: v.detach().to("cpu", SAVE_DTYPES[dtype]).contiguous() for k, v in sd.items()}
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(out, str(tmp))
        else:
            torch.save(out, tmp)
    return path


def save_model(model: RWKV4, path: str | Path, dtype: str = "bf16") -> Path:
    return save_state_dict(model.state_dict(), path, dtype)
