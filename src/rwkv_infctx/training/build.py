"""The network to train: loaded from an RWKV-LM model file, or built from dims and initialised."""

from __future__ import annotations

from torch import nn

from rwkv_infctx.errors import UserError
from rwkv_infctx.io.model_file import model_from_state_dict, read_state_dict
from rwkv_infctx.model.registry import FAMILIES, family_named, family_of
from rwkv_infctx.tokenizer import MODEL_VOCAB


def resolve_vocab_size(vocab_size: int | str | None) -> int | None:
    """An integer, or the name of a bundled tokenizer ("neox" → 50277, "world" → 65536)."""
    if vocab_size is None or isinstance(vocab_size, int):
        return vocab_size
    if vocab_size in MODEL_VOCAB:
        return MODEL_VOCAB[vocab_size]
    raise UserError(f"model.vocab_size: {vocab_size!r} (expected a positive integer, 'neox' or 'world')")


def build_model(
    load_model: str | None,
    dims: dict[str, int | str | None],
    dropout: float = 0.0,
    seed: int = 0,
    wkv_backend: str = "auto",
    arch: str = "auto",
    wkv_self_check: str = "warn",
) -> nn.Module:
    """The model of family `arch` from `load_model` (dims given in `dims` must agree with the file;
    arch "auto" detects the family) or, without a file, from `dims` with the family's initialisation.

    `dims` maps dim names to values or None (None: read from the file, or the family's default).
    A dim that the family does not have must be None.
    """
    dims = {**dims, "vocab_size": resolve_vocab_size(dims.get("vocab_size"))}
    for name, value in dims.items():
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise UserError(f"model.{name}: {value!r} (expected a positive integer)")
    options = {"dropout": dropout, "wkv_backend": wkv_backend, "wkv_self_check": wkv_self_check}
    if load_model is None:
        if arch == "auto":
            raise UserError(
                f"model.arch: auto needs model.load_model to detect the family from; a new model must "
                f"name its family (model.arch: {' or '.join(FAMILIES)})"
            )
        family = family_named(arch)
        _refuse_foreign_dims(dims, family.dim_names, family.title)
        missing = [n for n in ("n_layer", "n_embd", "vocab_size") if dims.get(n) is None]
        if missing:
            raise UserError(
                f"model.load_model: not given, so model.{', model.'.join(missing)} must be set "
                "(to build a new model), or give load_model: a path to an RWKV-LM .pth"
            )
        given = {n: v for n, v in dims.items() if v is not None}
        try:
            cfg = family.config_cls(**given, **options)
        except ValueError as e:
            raise UserError(f"model: {e}") from None
        return family.init_weights(family.model_cls(cfg), seed)
    try:
        model = model_from_state_dict(read_state_dict(load_model), load_model, arch, **options)
    except ValueError as e:  # an option the family's config refuses (e.g. its WKV backends)
        raise UserError(f"model: {e}") from None
    family = family_of(model)
    _refuse_foreign_dims(dims, family.dim_names, family.title)
    wrong = [
        f"{n}={dims[n]} but the file has {getattr(model.cfg, n)}"
        for n in family.dim_names
        if dims.get(n) is not None and dims[n] != getattr(model.cfg, n)
    ]
    if wrong:
        raise UserError(f"model.load_model {load_model}: dims disagree with the config: {'; '.join(wrong)}")
    return model


def _refuse_foreign_dims(dims: dict[str, int | str | None], allowed: tuple[str, ...], title: str) -> None:
    """A dim that is set but not one of this family's is an error (e.g. dim_att for RWKV-7)."""
    foreign = [n for n, v in dims.items() if v is not None and n not in allowed]
    if foreign:
        raise UserError(
            f"model.{foreign[0]}: {dims[foreign[0]]!r} is set, but an {title} model has no {foreign[0]} "
            f"(its dims: {', '.join(allowed)}); leave it null"
        )
