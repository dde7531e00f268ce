"""The network to train: loaded from an RWKV-LM model file, or built from dims and initialised."""

from __future__ import annotations

from rwkv_infctx.errors import UserError
from rwkv_infctx.io.model_file import check_keys, infer_config, read_state_dict
from rwkv_infctx.model import RWKV4, RWKV4Config
from rwkv_infctx.model.init import init_weights
from rwkv_infctx.tokenizer import MODEL_VOCAB

DIM_NAMES = ("n_layer", "n_embd", "vocab_size", "dim_att", "dim_ffn")


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
) -> RWKV4:
    """RWKV4 from `load_model` (dims given in `dims` must agree with the file) or from `dims`.

    `dims` maps the names in DIM_NAMES to values or None (None: read from the file, or the
    RWKV4Config default for dim_att/dim_ffn).
    """
    dims = {**dims, "vocab_size": resolve_vocab_size(dims.get("vocab_size"))}
    for name in DIM_NAMES:
        value = dims.get(name)
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise UserError(f"model.{name}: {value!r} (expected a positive integer)")
    options = {"dropout": dropout, "wkv_backend": wkv_backend}
    if load_model is None:
        missing = [n for n in ("n_layer", "n_embd", "vocab_size") if dims.get(n) is None]
        if missing:
            raise UserError(
                f"model.load_model: not given, so model.{', model.'.join(missing)} must be set "
                "(to build a new model), or give load_model: a path to an RWKV-LM .pth"
            )
        try:
            cfg = RWKV4Config(**{n: dims.get(n) for n in DIM_NAMES}, **options)
        except ValueError as e:
            raise UserError(f"model: {e}") from None
        return init_weights(RWKV4(cfg), seed)
    sd = read_state_dict(load_model)
    cfg = infer_config(sd, load_model, **options)
    wrong = [
        f"{n}={dims[n]} but the file has {getattr(cfg, n)}"
        for n in DIM_NAMES
        if dims.get(n) is not None and dims[n] != getattr(cfg, n)
    ]
    if wrong:
        raise UserError(f"model.load_model {load_model}: dims disagree with the config: {'; '.join(wrong)}")
    model = RWKV4(cfg)
    check_keys(sd, model.state_dict(), load_model)
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return model
