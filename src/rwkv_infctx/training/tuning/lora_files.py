"""LoRA files: peft's adapter folder (written, read, attached to a base model) and the LoRA options of
a `fit` checkpoint.

An adapter folder is what `PeftModel.save_pretrained` writes: `adapter_config.json` (peft's
LoraConfig, `target_modules` = our module-name suffixes such as `att.key`) and
`adapter_model.safetensors` with keys `base_model.model.blocks.0.att.key.lora_A.weight`, ..., so
`peft.PeftModel.from_pretrained(RWKV7(cfg), folder)` loads it as well as we do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rwkv_infctx.errors import UserError
from rwkv_infctx.io.atomic import atomic_folder
from rwkv_infctx.model.registry import family_of
from rwkv_infctx.training.tuning.lora import ADAPTER, LoraOptions, apply_lora, lora_layers

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
"""The key prefix of peft's files (a PeftModel holds the model as base_model.model)."""


def save_adapter(model: nn.Module, folder: str | Path, replace: bool = False) -> Path:
    """Write the model's adapter in peft's format, as one folder renamed into place when complete."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    config = model.peft_config[ADAPTER]
    sd = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    out = {PEFT_PREFIX + k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}
    with atomic_folder(folder, replace=replace) as tmp:
        save_file(out, str(tmp / ADAPTER_WEIGHTS))
        config.save_pretrained(str(tmp))
    return Path(folder)


def read_adapter(folder: str | Path, key: str) -> tuple[Any, dict[str, Tensor]]:
    """peft's LoraConfig and the adapter weights (keys without peft's prefix) of an adapter folder;
    `key` (the option or flag that named it) starts every error line."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    folder = Path(folder)
    expected = f"expected a peft adapter folder with {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}"
    if not folder.is_dir():
        raise UserError(f"{key} {folder}: not found or not a folder ({expected})")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / name).is_file():
            raise UserError(f"{key} {folder}: no {name} ({expected})")
    try:
        raw = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        if raw.get("peft_type") != "LORA":
            raise ValueError(f"peft_type {raw.get('peft_type')!r}, expected 'LORA'")
        config = LoraConfig.from_pretrained(str(folder))
        sd = load_file(str(folder / ADAPTER_WEIGHTS), device="cpu")
    except Exception as e:  # json, peft and safetensors raise many types for damaged files
        raise UserError(f"{key} {folder}: not a readable LoRA adapter ({_short(e)})") from None
    return config, {k.removeprefix(PEFT_PREFIX): v for k, v in sd.items()}


def _short(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def adapted_modules(sd: dict[str, Tensor]) -> set[str]:
    """The module names that an adapter state dict holds LoRA factors for."""
    return {k.split(".lora_")[0] for k in sd if ".lora_" in k}


def load_adapter_weights(model: nn.Module, folder: str | Path, key: str) -> None:
    """Load an adapter folder into a model whose adapters are injected: the folder must adapt exactly
    the same layers, with the same rank and alpha."""
    from peft import set_peft_model_state_dict

    config, sd = read_adapter(folder, key)
    ours = model.peft_config[ADAPTER]
    _check_layers(adapted_modules(sd), set(lora_layers(model)), folder, key, family_of(model).title)
    for pattern in ("rank_pattern", "alpha_pattern"):
        if getattr(config, pattern, None):
            raise UserError(f"{key} {folder}: adapter with a per-layer {pattern} (expected one r and alpha)")
    for field, option in (("r", "lora_r"), ("lora_alpha", "lora_alpha")):
        theirs = getattr(config, field)
        if theirs != getattr(ours, field):
            raise UserError(
                f"{key} {folder}: adapter {field} {theirs}, but this run has {getattr(ours, field)} "
                f"(expected model.{option} to match the adapter)"
            )
    _set_weights(set_peft_model_state_dict, model, sd, folder, key)


def _set_weights(setter, model: nn.Module, sd: dict[str, Tensor], folder: Path | str, key: str) -> None:
    try:
        result = setter(model, sd, adapter_name=ADAPTER)
    except RuntimeError as e:  # a shape that differs from the model's layers
        raise UserError(f"{key} {folder}: weights do not fit this model ({_short(e)})") from None
    if result.unexpected_keys:
        raise UserError(f"{key} {folder}: unexpected key(s) {', '.join(result.unexpected_keys[:3])}")


def _check_layers(theirs: set[str], ours: set[str], folder: Path | str, key: str, title: str) -> None:
    if theirs == ours:
        return
    extra, missing = sorted(theirs - ours), sorted(ours - theirs)
    parts = ([f"adapts {', '.join(extra[:4])} which this run does not target"] if extra else []) + (
        [f"has no weights for {', '.join(missing[:4])}"] if missing else []
    )
    raise UserError(
        f"{key} {folder}: wrong targets for this {title} model: {'; '.join(parts)} "
        "(expected the layers that model.lora_targets selects)"
    )


def attach_adapter(model: nn.Module, folder: str | Path, key: str = "--adapter") -> nn.Module:
    """A base model with an adapter folder's LoRA layers injected and loaded (run-time, unmerged)."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    config, sd = read_adapter(folder, key)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = sorted(adapted_modules(sd) - linears)
    if missing or not sd:
        what = f"adapts {', '.join(missing[:4])}, not linear layers of" if missing else "holds no weights for"
        raise UserError(f"{key} {folder}: wrong targets: it {what} this {family_of(model).title} model")
    config.init_lora_weights = True  # the weights come from the file; never rewrite the base (PiSSA)
    config.inference_mode = True
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    _check_layers(adapted_modules(sd), set(lora_layers(model)), folder, key, family_of(model).title)
    _set_weights(set_peft_model_state_dict, model, sd, folder, key)
    return model


LORA_HPARAMS = {
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "lora_targets": "targets",
    "lora_init": "init",
    "lora_train_also": "train_also",
}
"""`RWKVModule` hyperparameter -> `LoraOptions` field (load_adapter is not needed to rebuild a model)."""


def options_from_hparams(hparams: dict[str, Any]) -> LoraOptions:
    """The LoRA options that a `fit` checkpoint was trained with."""
    given = {field: hparams[h] for h, field in LORA_HPARAMS.items() if h in hparams}
    if given.get("targets") is not None:
        given["targets"] = tuple(given["targets"])
    given["train_also"] = tuple(given.get("train_also") or ())
    return LoraOptions(**given)


def model_with_adapters(
    base: nn.Module, sd: dict[str, Tensor], options: LoraOptions, path: Path
) -> nn.Module:
    """`base` (built from the checkpoint's base weights) with the checkpoint's adapters injected and
    every weight of the checkpoint loaded."""
    apply_lora(base, LoraOptions(**{**options.__dict__, "init": "default", "load_adapter": None}))
    expected = base.state_dict()
    odd = sorted(set(expected) ^ set(sd))
    if odd:
        raise UserError(
            f"checkpoint {path}: its LoRA weights do not match its lora_* settings (key {odd[0]!r}); "
            "expected a checkpoint written by fit in lora mode"
        )
    base.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items()})
    return base
