"""model.boundary_states: cpu keeps the segments' input states in host memory, bit-identically."""

from __future__ import annotations

import pytest
import torch

from rwkv_infctx.errors import UserError
from rwkv_infctx.model import RWKV4Config, RWKV7Config
from rwkv_infctx.training.boundary_states import BoundaryStates
from rwkv_infctx.training.segments import bptt_step
from tests.conftest import random_model, random_rwkv7

from .batches import flat_grad, make_batch

FAMILIES = {
    "rwkv4": lambda: random_model(RWKV4Config(n_layer=2, n_embd=32, vocab_size=97), seed=1),
    "rwkv7": lambda: random_rwkv7(
        RWKV7Config(n_layer=2, n_embd=64, vocab_size=97, wkv_backend="reference"), 1
    ),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_host_boundary_states_give_bit_identical_gradients(family):
    model = FAMILIES[family]()
    batch = make_batch([50, 33], 97, seed=2)
    results = {}
    for place in ("device", "cpu"):
        proxy, report = bptt_step(model, batch, 12, boundary_states=place)
        proxy.backward()
        results[place] = (flat_grad(model), report)
    (g_dev, r_dev), (g_cpu, r_cpu) = results["device"], results["cpu"]
    assert torch.equal(g_dev, g_cpu) and r_dev.ce_sum == r_cpu.ce_sum
    one_state = model.fresh_state(2).nbytes
    assert r_dev.boundary_bytes == r_cpu.boundary_bytes == r_dev.n_segments * one_state


def test_store_releases_each_state_and_prefetches_the_previous_one():
    model = FAMILIES["rwkv4"]()
    store = BoundaryStates("cpu", torch.device("cpu"))
    fresh = model.fresh_state(1)
    states = [fresh.map(lambda t, f, i=i: t + i) for i in range(3)]
    for s in states:
        store.append(s)
    assert store.nbytes == 3 * states[0].nbytes
    taken = store.take(2)
    assert torch.equal(taken.tensors()[0], states[2].tensors()[0])
    assert taken.tensors()[0].data_ptr() != states[2].tensors()[0].data_ptr()  # a copy, not the original
    assert store[2] is None and 1 in store._ready  # released; the next one is on its way
    assert torch.equal(store.take(1).tensors()[0], states[1].tensors()[0])


def test_unknown_place_is_one_line():
    with pytest.raises(UserError, match=r"model.boundary_states: 'disk' \(expected one of device, cpu\)"):
        BoundaryStates("disk", torch.device("cpu"))
