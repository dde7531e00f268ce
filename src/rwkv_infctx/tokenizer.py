"""Tokenizers: `neox` (GPT-NeoX 20B), `world` (RWKV world vocab), or a path to a `tokenizer.json`.

Every tokenizer is wrapped in `Tokenizer`, which gives one interface: `encode`, `encode_batch`,
`decode`, `vocab_size` and the end-of-text id (0 for both bundled vocabularies).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from rwkv_infctx.errors import UserError

NEOX_FILE = "20B_tokenizer.json"
WORLD_FILE = "rwkv_vocab_v20230424.txt"
MODEL_VOCAB = {"neox": 50277, "world": 65536}
"""The model vocabulary (embedding rows) that goes with each bundled tokenizer."""


def default_tokenizer(vocab_size: int) -> str:
    """The bundled tokenizer a model of `vocab_size` rows was most likely trained with: world for
    65536 rows (every RWKV World model, RWKV-7 included), neox otherwise."""
    return "world" if vocab_size == MODEL_VOCAB["world"] else "neox"


def asset_path(name: str) -> Path:
    """Path of a file the package carries in `rwkv_infctx/assets`."""
    return Path(str(resources.files("rwkv_infctx") / "assets" / name))


@dataclass(frozen=True)
class Tokenizer:
    """A loaded tokenizer. `name` is what the user asked for; `fingerprint` identifies its vocabulary."""

    name: str
    backend: Any
    kind: str  # "hf" (tokenizers.Tokenizer), "world" (pyrwkv_tokenizer), "transformers"
    vocab_size: int
    eot_id: int
    fingerprint: str
    pid: int = field(default_factory=os.getpid, compare=False, repr=False)
    """The process that loaded it: a forked child must not use its thread pool (see `encode_batch`)."""

    def encode(self, text: str) -> list[int]:
        if self.kind == "hf":
            return self.backend.encode(text).ids
        if self.kind == "world":
            return self.backend.encode(text)
        return self.backend.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.kind == "hf":
            return [e.ids for e in self.backend.encode_batch(texts)]
        if self.kind == "world":
            # pyrwkv_tokenizer's batch call runs on a thread pool that deadlocks in a process forked
            # after the pool started (e.g. a `datasets.map(num_proc=...)` worker): go one by one there.
            if os.getpid() != self.pid:
                return [self.backend.encode(t) for t in texts]
            return self.backend.encode_batch(texts)
        return self.backend(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        if self.kind == "world":
            return self.backend.decode(ids)
        return self.backend.decode(ids)


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _load_tokenizer_json(path: Path, name: str) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    try:
        backend = HFTokenizer.from_file(str(path))
    except Exception as e:
        raise UserError(f"tokenizer file {path}: not a loadable tokenizer.json ({e})") from None
    eot = backend.token_to_id("<|endoftext|>")
    return Tokenizer(
        name=name,
        backend=backend,
        kind="hf",
        vocab_size=backend.get_vocab_size(with_added_tokens=True),
        eot_id=0 if eot is None else eot,
        fingerprint=_file_digest(path),
    )


@lru_cache(maxsize=8)
def load_tokenizer(spec: str) -> Tokenizer:
    """Load `neox`, `world`, a path to a tokenizer.json, or a locally cached HF tokenizer name."""
    if spec == "neox":
        return _load_tokenizer_json(asset_path(NEOX_FILE), "neox")
    if spec == "world":
        from pyrwkv_tokenizer import RWKVTokenizer

        path = asset_path(WORLD_FILE)
        return Tokenizer(
            name="world",
            backend=RWKVTokenizer(vocab_filepath=str(path)),
            kind="world",
            vocab_size=MODEL_VOCAB["world"],
            eot_id=0,
            fingerprint=_file_digest(path),
        )
    path = Path(spec)
    if path.is_dir() and (path / "tokenizer.json").is_file():
        path = path / "tokenizer.json"
    if path.is_file():
        return _load_tokenizer_json(path, spec)
    if path.suffix == ".json" or spec.startswith((".", "/")):
        raise UserError(f"tokenizer {spec!r}: file not found (expected a tokenizer.json)")
    return _load_hf_pretrained(spec)


def _load_hf_pretrained(spec: str) -> Tokenizer:
    try:
        from transformers import AutoTokenizer

        backend = AutoTokenizer.from_pretrained(spec, local_files_only=True)
    except Exception:
        raise UserError(
            f"tokenizer {spec!r}: expected 'neox', 'world', a path to a tokenizer.json, "
            "or the name of a Hugging Face tokenizer available locally"
        ) from None
    return Tokenizer(
        name=spec,
        backend=backend,
        kind="transformers",
        vocab_size=len(backend),
        eot_id=backend.eos_token_id if backend.eos_token_id is not None else 0,
        fingerprint=hashlib.sha256(repr(sorted(backend.get_vocab().items())).encode()).hexdigest()[:16],
    )
