"""Sampling text from a model: one parallel pass over the prompt, then token by token via the state."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from rwkv_infctx.model import RWKVModel
from rwkv_infctx.tokenizer import Tokenizer


def sample_token(logits_V: Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """Greedy when temperature is 0; otherwise nucleus sampling with the given temperature."""
    if temperature <= 0:
        return int(torch.argmax(logits_V))
    probs = torch.softmax(logits_V.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, 0) - sorted_probs < top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


@torch.no_grad()
def generate_ids(
    model: RWKVModel,
    prompt_ids: list[int],
    max_tokens: int,
    temperature: float = 1.0,
    top_p: float = 0.85,
    seed: int = 0,
    stop_id: int | None = None,
) -> Iterator[int]:
    """Yield up to `max_tokens` new token ids after `prompt_ids` (stops early at `stop_id`)."""
    if not prompt_ids:
        raise ValueError("the prompt must contain at least one token")
    device = model.emb.weight.device
    gen = torch.Generator().manual_seed(seed)
    logits, state = model(torch.tensor([prompt_ids], device=device))
    last = logits[0, -1]
    for _ in range(max_tokens):
        token = sample_token(last.cpu(), temperature, top_p, gen)
        if token == stop_id:
            return
        yield token
        logits, state = model(torch.tensor([[token]], device=device), state)
        last = logits[0, -1]


def generate_text(
    model: RWKVModel,
    tokenizer: Tokenizer,
    prompt: str,
    max_tokens: int = 100,
    temperature: float = 1.0,
    top_p: float = 0.85,
    seed: int = 0,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """Generate a continuation of `prompt`; `on_text` receives each new piece of text as it appears.

    Text is emitted only once it decodes cleanly, so multi-token characters are never split.
    """
    ids: list[int] = []
    emitted = ""
    ids_iter = generate_ids(
        model, tokenizer.encode(prompt), max_tokens, temperature, top_p, seed, stop_id=tokenizer.eot_id
    )
    for token in ids_iter:
        ids.append(token)
        text = tokenizer.decode(ids)
        if "\ufffd" not in text[len(emitted) :] and len(text) > len(emitted):
            if on_text:
                on_text(text[len(emitted) :])
            emitted = text
    text = tokenizer.decode(ids) if ids else ""
    if on_text and len(text) > len(emitted):
        on_text(text[len(emitted) :])
    return text
