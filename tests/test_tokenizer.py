"""The bundled tokenizers."""

from __future__ import annotations

import pytest

from rwkv_infctx.errors import UserError
from rwkv_infctx.tokenizer import asset_path, load_tokenizer


def test_neox_known_ids():
    tok = load_tokenizer("neox")
    ids = tok.encode("Hello world, RWKV!\n\nThe quick brown fox")
    assert ids == [12092, 1533, 13, 416, 27767, 55, 2, 187, 187, 510, 3158, 8516, 30013]
    assert tok.vocab_size == 50277 and tok.eot_id == 0
    assert tok.decode(ids) == "Hello world, RWKV!\n\nThe quick brown fox"


def test_world_round_trips_mixed_scripts():
    tok = load_tokenizer("world")
    text = "Hello, world! 你好，世界。RWKV 很强 🐉🚀 café naïve\n\tend"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.vocab_size == 65536 and max(ids) < 65536
    assert tok.encode_batch([text, "x"]) == [ids, tok.encode("x")]


def test_tokenizer_json_path_is_accepted():
    tok = load_tokenizer(str(asset_path("20B_tokenizer.json")))
    assert tok.encode("Hello") == load_tokenizer("neox").encode("Hello")


def test_bad_tokenizer_specs(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        load_tokenizer(str(tmp_path / "nope.json"))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(UserError, match=r"not a loadable tokenizer\.json"):
        load_tokenizer(str(broken))
    with pytest.raises(UserError, match="expected 'neox', 'world'"):
        load_tokenizer("no-such-tokenizer-name")
