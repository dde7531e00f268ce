"""RWKV-LM keys ↔ Hugging Face transformers `RwkvForCausalLM` keys and config.

The renaming is the one HF's own RWKV conversion applies: `emb.` → `embeddings.`, block 0's `ln0` →
`pre_ln`, `att.` → `attention.`, `ffn.` → `feed_forward.`, `time_mix_k/v/r` →
`time_mix_key/value/receptance`, and everything but `head.weight` under `rwkv.`.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from rwkv_infctx.model import RWKV4Config

_RENAMES = (
    (r"^emb\.", "embeddings."),
    (r"^blocks\.0\.ln0\.", "blocks.0.pre_ln."),
    (r"\.att\.", ".attention."),
    (r"\.ffn\.", ".feed_forward."),
    (r"\.time_mix_k$", ".time_mix_key"),
    (r"\.time_mix_v$", ".time_mix_value"),
    (r"\.time_mix_r$", ".time_mix_receptance"),
)


def hf_key(key: str) -> str:
    """The transformers name of an RWKV-LM key."""
    for pattern, replacement in _RENAMES:
        key = re.sub(pattern, replacement, key)
    return key if key == "head.weight" else "rwkv." + key


def to_hf_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    return {hf_key(k): v for k, v in sd.items()}


def hf_config_kwargs(cfg: RWKV4Config, context_length: int = 4096) -> dict[str, Any]:
    """Keyword arguments for `transformers.RwkvConfig` describing the same model (no rescaling)."""
    return {
        "vocab_size": cfg.vocab_size,
        "context_length": context_length,
        "hidden_size": cfg.n_embd,
        "num_hidden_layers": cfg.n_layer,
        "attention_hidden_size": cfg.dim_att,
        "intermediate_size": cfg.dim_ffn,
        "layer_norm_epsilon": 1e-5,
        "rescale_every": 0,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 0,
    }


def hf_config_json(cfg: RWKV4Config, dtype: str) -> dict[str, Any]:
    """The `config.json` of an HF RWKV model folder (written without importing transformers)."""
    return {
        "architectures": ["RwkvForCausalLM"],
        "model_type": "rwkv",
        "dtype": dtype,
        "use_cache": True,
        **hf_config_kwargs(cfg),
    }


NEOX_TOKENIZER_CONFIG = {
    "tokenizer_class": "GPTNeoXTokenizer",
    "bos_token": "<|endoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "add_prefix_space": False,
    "model_max_length": 1_000_000_000,
}
