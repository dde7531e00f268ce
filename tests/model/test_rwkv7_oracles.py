"""RWKV-7 against independent oracles: the `rwkv` package (forward, state, greedy decoding, loss by
position) and an fp64 functional forward written from the spec sheet (gradients through segments)."""

from __future__ import annotations

import pytest
import torch

from rwkv_infctx.evaluation.positions import bucket_index, evaluate
from rwkv_infctx.generation import generate_ids
from rwkv_infctx.io.model_file import save_model
from rwkv_infctx.model import RWKV7Config
from rwkv_infctx.training.loss import objective, segment_terms, token_count
from rwkv_infctx.training.segments import bptt_step
from tests.conftest import random_rwkv7
from tests.training.batches import flat_grad, rel

from . import rwkv7_functional
from .rwkv7_package import run_package

BACKEND = "auto"  # the op training runs on the CPU (the C kernel; the chunked op without a compiler)
CFG = RWKV7Config(
    n_layer=3, n_embd=128, vocab_size=300, d_decay_lora=32, d_aaa_lora=32, d_mv_lora=16, d_gate_lora=64,
    wkv_backend=BACKEND,
)  # fmt: skip
TOKENS = torch.randint(0, CFG.vocab_size, (300,), generator=torch.Generator().manual_seed(5)).tolist()
STEP_TOKENS, PROMPT, GREEDY = 40, TOKENS[:10], 48


@pytest.fixture(scope="module")
def model():
    return random_rwkv7(CFG, seed=1).eval()


@pytest.fixture(scope="module")
def package(model, tmp_path_factory):
    """The package's results for every job, from one child process."""
    tmp = tmp_path_factory.mktemp("rwkv7_package")
    path = save_model(model, tmp / "random_x070.pth", "fp32")
    jobs = {"one_pass": TOKENS, "step": TOKENS[:STEP_TOKENS], "greedy": (PROMPT, GREEDY)}
    return run_package(path, jobs, tmp)


@torch.no_grad()
def test_logits_and_state_match_the_package_in_one_pass(model, package):
    logits, state = model(torch.tensor([TOKENS]))
    ref = package["one_pass"]
    assert ref["logits"].std() > 0.1  # the random weights reach the logits
    assert rel(logits[0], ref["logits"]) <= 1e-5
    for i in range(CFG.n_layer):  # the package's state: att shift, WKV [value, key], ffn shift per layer
        assert rel(state.att_shift[i, 0], ref["state"][3 * i]) <= 1e-5
        assert rel(state.wkv[i, 0], ref["state"][3 * i + 1]) <= 1e-5
        assert rel(state.ffn_shift[i, 0], ref["state"][3 * i + 2]) <= 1e-5


@torch.no_grad()
def test_logits_match_the_package_token_by_token(model, package):
    state, rows = None, []
    for token in TOKENS[:STEP_TOKENS]:
        logits, state = model(torch.tensor([[token]]), state)
        rows.append(logits[0, 0])
    assert rel(torch.stack(rows), package["step"]) <= 1e-5


def test_greedy_decoding_equals_the_package(model, package):
    ours = list(generate_ids(model, PROMPT, GREEDY, temperature=0.0))
    assert len(set(ours)) > 5  # not a degenerate repetition
    assert ours == package["greedy"]


@torch.no_grad()
def test_loss_by_position_in_segments_equals_the_package_in_one_pass(model, package):
    ids = torch.tensor([TOKENS])
    batch = {"input_ids": ids[:, :-1], "target_ids": ids[:, 1:], "loss_mask": torch.ones(1, len(TOKENS) - 1)}
    rows = evaluate(model, [batch], segment_len=37).rows()
    ce = torch.nn.functional.cross_entropy(
        package["one_pass"]["logits"][:-1].double(), ids[0, 1:], reduction="none"
    )
    bucket = bucket_index(torch.arange(1, len(TOKENS)))
    assert len(rows) == int(bucket.max()) + 1 >= 2
    for i, row in enumerate(rows):
        assert row.tokens == int((bucket == i).sum())
        assert row.mean_loss == pytest.approx(float(ce[bucket == i].mean()), rel=1e-5)


def _fp64_reference_grads(model, tokens: torch.Tensor) -> torch.Tensor:
    """Gradients of the training objective through the functional float64 forward (autograd)."""
    params = dict(model.named_parameters())
    sd = {k: v.detach().double().requires_grad_(k in params) for k, v in model.state_dict().items()}
    logits = rwkv7_functional.logits(sd, tokens[0, :-1].tolist(), CFG.n_head)
    mask = torch.ones(1, tokens.shape[1] - 1, dtype=torch.float64)
    ce, l2 = segment_terms(logits[None], tokens[:, 1:], mask)
    objective(ce, l2, token_count(mask)).backward()
    return torch.cat([sd[name].grad.flatten() for name, _ in model.named_parameters()])


def test_gradients_through_carried_segments_equal_one_pass_and_fp64_reference():
    model = random_rwkv7(CFG, seed=2).train()
    tokens = torch.randint(0, CFG.vocab_size, (1, 70), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": tokens[:, :-1], "target_ids": tokens[:, 1:], "loss_mask": torch.ones(1, 69)}

    def segmented(m, bptt="full"):
        proxy, _ = bptt_step(m, batch, 16, bptt=bptt)  # 5 segments, the last of 5 tokens
        proxy.backward()
        return flat_grad(m)

    logits, _ = model(batch["input_ids"])
    objective(
        *segment_terms(logits, batch["target_ids"], batch["loss_mask"]), token_count(batch["loss_mask"])
    ).backward()
    one_pass = flat_grad(model)
    assert rel(segmented(model), one_pass) <= 1e-6
    assert rel(segmented(model, "truncated"), one_pass) >= 1e-3  # the state's gradient matters

    model64 = model.double()
    assert rel(segmented(model64), _fp64_reference_grads(model64, tokens)) <= 1e-10
