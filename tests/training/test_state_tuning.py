"""State tuning (`model.train_mode: state`): S0's gradient through segments equals one pass, the
truncated mode's sees only the first segment, every fresh entry starts from S0, weights stay frozen."""

from __future__ import annotations

import pytest
import torch

from rwkv_infctx.errors import UserError
from rwkv_infctx.training.module import RWKVModule
from rwkv_infctx.training.optim import OptimConfig, make_optimizer
from rwkv_infctx.training.segments import bptt_step, evaluate_loss
from rwkv_infctx.training.tuning.state import apply_state_tuning, initial_states
from tests.conftest import family_config, random_family_model
from tests.training.batches import make_batch, plain_objective, rel

VOCAB = 97


def state_model(seed: int = 0):
    """The tiny random RWKV-7 in state mode, with a random (non-zero) S0."""
    model = random_family_model(family_config("rwkv7", VOCAB, wkv_backend="chunked"), seed)
    apply_state_tuning(model, None)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for s in initial_states(model):
            s.copy_(0.3 * torch.randn(s.shape, generator=gen))
    return model


def s0_grad(model) -> torch.Tensor:
    grads = [s.grad.clone() for s in initial_states(model)]
    model.zero_grad(set_to_none=True)
    return torch.stack(grads)


def segmented_grad(model, batch, ctx_len, bptt="full", cutoff=None, boundary_states="device"):
    proxy, report = bptt_step(model, batch, ctx_len, cutoff, bptt, boundary_states=boundary_states)
    proxy.backward()
    return s0_grad(model), report


def test_only_the_initial_states_train():
    model = state_model()
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained == [f"init_state.wkv.{i}" for i in range(2)]
    assert all(s.shape == (1, 64, 64) and s.dtype == torch.float32 for s in initial_states(model))
    assert "init_state.wkv.0" not in {k for k, v in model.named_parameters() if not v.requires_grad}
    groups = make_optimizer(model, OptimConfig(lr_init=1e-3, weight_decay=0.1, state_lr=0.5)).param_groups
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0
    assert groups[0]["lr"] == pytest.approx(0.5) and groups[0]["lr_scale"] == pytest.approx(500.0)


def test_s0_gradient_through_four_segments_equals_one_pass():
    model = state_model()
    batch = make_batch([63, 50], VOCAB, seed=3)  # batch 2, 4 segments of 16, the last of 15
    plain_objective(model, batch).backward()
    one_pass = s0_grad(model)
    assert one_pass.abs().max() > 0
    full, report = segmented_grad(model, batch, 16)
    assert report.n_segments == 4
    assert rel(full, one_pass) <= 1e-6
    truncated, _ = segmented_grad(model, batch, 16, "truncated")
    assert rel(truncated, one_pass) >= 1e-3
    first = {k: v[:, :16] for k, v in batch.items() if k != "lengths"}  # the first segment's loss only
    n_all, n_first = batch["loss_mask"].sum(), first["loss_mask"].sum()
    (plain_objective(model, first) * n_first / n_all).backward()
    assert rel(truncated, s0_grad(model)) <= 1e-6


def test_boundary_states_on_cpu_are_bit_identical():
    model = state_model()
    batch = make_batch([63], VOCAB, seed=4)
    on_device, _ = segmented_grad(model, batch, 16)
    on_cpu, _ = segmented_grad(model, batch, 16, boundary_states="cpu")
    assert torch.equal(on_device, on_cpu)


def test_every_ctx_len_cutoff_piece_starts_from_s0():
    model = state_model()
    batch = make_batch([60], VOCAB, seed=5)
    pieces = [{k: v[:, a:b] for k, v in batch.items() if k != "lengths"} for a, b in ((0, 32), (32, 60))]
    n = batch["loss_mask"].sum()
    sum(plain_objective(model, piece) * piece["loss_mask"].sum() / n for piece in pieces).backward()
    expected = s0_grad(model)
    got, _ = segmented_grad(model, batch, 16, cutoff=32)  # two pieces of two segments each
    assert rel(got, expected) <= 1e-6
    with torch.no_grad():
        ce = sum(
            float(
                torch.nn.functional.cross_entropy(
                    model(p["input_ids"])[0][0], p["target_ids"][0], reduction="sum"
                )
            )
            for p in pieces
        )
    assert evaluate_loss(model, batch, 16, 32).loss == pytest.approx(ce / float(n), rel=1e-6)


def test_evaluation_and_generation_start_from_s0():
    model = state_model()
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        from_s0, _ = model(ids)
        zero = model.fresh_state(1)
        zero = type(zero)(zero.att_shift, zero.ffn_shift, torch.zeros_like(zero.wkv))
        from_zero, _ = model(ids, zero)
        assert model.fresh_state(1).att_shift.abs().max() == 0  # the shifts stay zero
    assert rel(from_s0, from_zero) > 1e-3


def test_state_mode_refuses_rwkv4_and_load_state_without_it(tmp_path):
    dims = {"n_layer": 2, "n_embd": 32, "vocab_size": VOCAB}
    with pytest.raises(
        UserError, match=r"^model.train_mode: state needs an RWKV-7 model \(this model is rwkv4\)$"
    ):
        RWKVModule(arch="rwkv4", **dims, train_mode="state")
    with pytest.raises(UserError, match=r"^model\.load_state: .* \(expected train_mode: state\)$"):
        RWKVModule(arch="rwkv7", n_layer=2, n_embd=64, vocab_size=VOCAB, load_state=str(tmp_path / "s.pth"))
    with pytest.raises(UserError, match=r"^model\.lr_init: 0 with train_mode state"):
        RWKVModule(arch="rwkv7", n_layer=2, n_embd=64, vocab_size=VOCAB, train_mode="state", lr_init=0.0)


def test_s0_stays_float32_in_a_bf16_model():
    model = state_model().to(torch.bfloat16)  # what trainer.precision bf16-true does to the module
    assert model.emb.weight.dtype == torch.bfloat16
    assert all(s.dtype == torch.float32 for s in initial_states(model))
    grad, _ = segmented_grad(model, make_batch([40], VOCAB, seed=7), 16)
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().max() > 0
