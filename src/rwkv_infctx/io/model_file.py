"""RWKV-LM model files: `.pth` state dicts (and `.safetensors` with the same keys).

Keys and shapes are exactly RWKV-LM's (`emb.weight`, `blocks.N.att.time_decay` for RWKV-4,
`blocks.N.att.w0` for RWKV-7, ...), so files move between this project, RWKV-LM, the `rwkv` package
and (RWKV-4, after renaming) HF transformers. The family of a file is detected from its keys
(`model.registry`).
Loading never runs pickled code (`torch.load(weights_only=True)`).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import Tensor, nn

from rwkv_infctx.errors import UserError
from rwkv_infctx.io.atomic import atomic_path
from rwkv_infctx.model.registry import detect_family, family_named

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


def infer_config(sd: dict[str, Tensor], path: str | Path = "<state dict>", **options):
    """The config of the file's family (detected from its keys), read from the tensor shapes."""
    return detect_family(sd, path).infer_config(sd, path, **options)


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


def model_from_state_dict(
    sd: dict[str, Tensor], path: str | Path = "<state dict>", arch: str = "auto", **options
) -> nn.Module:
    """The model of the file's family (`arch`: "auto" detects it, a family name must match it), with
    dims from the shapes, `options` (dropout, wkv_backend) set, and the file's weights in float32."""
    family = detect_family(sd, path)
    if arch != "auto" and family_named(arch).name != family.name:
        raise UserError(f"model file {path}: an {family.title} file, but model.arch is {arch}")
    model = family.model_cls(family.infer_config(sd, path, **options))
    expected = model.state_dict()
    sd = {**{k: expected[k] for k in family.optional_keys if k in expected and k not in sd}, **sd}
    check_keys(sd, expected, path)
    model.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()})
    return model


def load_model(
    path: str | Path, dtype: torch.dtype = torch.float32, arch: str = "auto", **options
) -> nn.Module:
    """Build the model of a file's family; dims come from the shapes, `options` set the rest."""
    return model_from_state_dict(read_state_dict(path), path, arch, **options).to(dtype)


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


def save_model(model: nn.Module, path: str | Path, dtype: str = "bf16") -> Path:
    return save_state_dict(model.state_dict(), path, dtype)
