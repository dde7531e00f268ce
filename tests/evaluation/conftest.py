"""Fixtures for the evaluation tests: a character-level tokenizer.json and tiny model files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from rwkv_infctx.io.model_file import save_model
from rwkv_infctx.model import RWKV4, RWKV4Config
from rwkv_infctx.tokenizer import asset_path
from tests.conftest import random_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def shakespeare() -> str:
    return asset_path("tinyshakespeare.txt").read_text(encoding="utf-8")


def write_char_tokenizer(path: Path) -> Path:
    """A tokenizer.json with one token per character of tiny-shakespeare (id 0: end of text)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = sorted(set(shakespeare()))
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(chars)}, "[UNK]": len(chars) + 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.save(str(path))
    return path


@pytest.fixture(scope="session")
def char_tokenizer(tmp_path_factory) -> Path:
    return write_char_tokenizer(tmp_path_factory.mktemp("tok") / "char.json")


CHAR_VOCAB = 67
"""Vocabulary of the character tokenizer (65 characters, end of text, unknown)."""


def model_file(path: Path, vocab_size: int = CHAR_VOCAB, seed: int = 0) -> Path:
    """A random 2-layer model saved in fp32."""
    cfg = RWKV4Config(n_layer=2, n_embd=32, vocab_size=vocab_size, dim_att=24, dim_ffn=80)
    save_model(random_model(cfg, seed), path, "fp32")
    return path


def tiny_model(vocab_size: int = 97, seed: int = 0) -> RWKV4:
    cfg = RWKV4Config(n_layer=2, n_embd=32, vocab_size=vocab_size, dim_att=24, dim_ffn=80)
    return random_model(cfg, seed).to(torch.float32)
