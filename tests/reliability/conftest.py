"""Fixtures for the reliability tests: a character tokenizer, a tiny corpus, a tiny fit config.

Everything is small enough that a fit step takes milliseconds and a checkpoint a few hundred KB:
a 2-layer, width-32 model over a 40-symbol vocabulary, 12 samples of about 40 characters.
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

CHARS = string.ascii_lowercase + " .,!?'\n"
TEXTS = [
    "the quick brown fox jumps over the lazy dog.",
    "a stitch in time saves nine, they say!",
    "to be or not to be, that is the question.",
    "all that glitters is not gold.",
    "where there's smoke there's fire.",
    "the early bird catches the worm.",
    "actions speak louder than words.",
    "better late than never, or so it goes.",
    "fortune favours the bold and the brave.",
    "knowledge is power, and power is time.",
    "look before you leap into the river.",
    "practice makes perfect, every day.",
]


def write_char_tokenizer(path: Path) -> Path:
    """A tokenizer.json with one token per character (id 0 is <|endoftext|>)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.save(str(path))
    return path


VOCAB = len(CHARS) + 2


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


FAMILY_MODELS: dict[str, dict[str, Any]] = {
    "rwkv4": {"arch": "rwkv4", "n_layer": 2, "n_embd": 32, "wkv_backend": "reference"},
    "rwkv7": {"arch": "rwkv7", "n_layer": 2, "n_embd": 64, "wkv_backend": "chunked"},  # one head of 64
}
"""The tiny model of each family, from scratch (RWKV-7's LoRA dims default to their minimum, 32)."""


def fit_config(
    root: Path, data: Path, tokenizer: Path, family: str = "rwkv4", **overrides: Any
) -> dict[str, Any]:
    """A tiny, deterministic CPU fit config writing under `root`, for the model family `family`."""
    config: dict[str, Any] = {
        "seed_everything": 7,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "deterministic": True,
            "max_steps": 4,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "default_root_dir": str(root),
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(root)},
            },
        },
        "model": {
            **FAMILY_MODELS[family],
            "vocab_size": VOCAB,
            "ctx_len": 16,
            "dropout": 0.1,
            "lr_init": 1e-2,
            "lr_final": 1e-3,
            "warmup_steps": 2,
        },
        "data": {
            "source": str(data),
            "tokenizer": str(tokenizer),
            "data_path": str(root.parent / "prepared"),
            "batch_size": 2,
        },
    }
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if name:
            config[section][name] = value
        else:
            config[section] = value
    return config


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """(corpus.jsonl, tokenizer.json) in a session folder; data_path is built beside them once."""
    from rwkv_infctx.data import DataConfig, prepare

    folder = tmp_path_factory.mktemp("corpus")
    data = write_jsonl(folder / "corpus.jsonl", TEXTS)
    tokenizer = write_char_tokenizer(folder / "tokenizer.json")
    prepare(DataConfig(source=str(data), tokenizer=str(tokenizer), data_path=str(folder / "prepared")))
    return data, tokenizer


@pytest.fixture
def run_root(corpus) -> Path:
    """A fresh run folder next to the prepared data (so data.data_path is reused, not rebuilt)."""
    base = corpus[0].parent
    i = 0
    while (base / f"run{i}").exists():
        i += 1
    root = base / f"run{i}"
    root.mkdir()
    return root
