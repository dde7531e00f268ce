"""The compiled CPU WKV-7 kernel against autograd of the per-token reference in float64, its build
cache and its dispatch."""

from __future__ import annotations

import pytest
import torch

from rwkv_infctx.errors import UserError
from rwkv_infctx.ops import self_check
from rwkv_infctx.ops.wkv7 import cpu_kernel, wkv7
from rwkv_infctx.ops.wkv7.chunked import wkv7_chunked
from rwkv_infctx.ops.wkv7.reference import wkv7_reference

from .test_wkv7_chunked import NAMES, _rel, _run, generic_inputs, model_inputs

pytestmark = pytest.mark.skipif(
    not cpu_kernel.available(), reason=f"no C compiler here: {cpu_kernel.unavailable_reason()}"
)
CK = cpu_kernel.CK


@pytest.mark.parametrize(
    "B,T,H,N",
    [
        (1, 1, 1, 4),
        (2, CK - 1, 2, 8),
        (1, CK, 1, 16),
        (2, CK + 1, 3, 8),
        (1, 3 * CK + 5, 2, 64),
        (1, 100, 1, 32),
    ],
)
def test_matches_fp64_reference(B, T, H, N):
    """y, the final state and all seven gradients, across chunk boundaries of the saved states, the
    head size 64 that the kernel specialises included."""
    inputs = model_inputs(B, T, H, N, seed=T)
    outs, grads = _run(cpu_kernel.wkv7_cpu, inputs)
    outs64, grads64 = _run(wkv7_reference, [x.double() for x in inputs])
    for name, a, b in zip(("y", "S_T", *NAMES), outs + grads, outs64 + grads64, strict=True):
        assert _rel(a, b) < 2e-6, name


def test_generic_inputs_and_fast_decays():
    """Unstructured inputs and decays far outside the model's range (d underflows to 0)."""
    inputs = [x.float() for x in generic_inputs(2, 40, 2, 8, seed=4, w_scale=4.0)]
    outs, grads = _run(cpu_kernel.wkv7_cpu, inputs)
    outs64, grads64 = _run(wkv7_reference, [x.double() for x in inputs])
    for name, a, b in zip(("y", "S_T", *NAMES), outs + grads, outs64 + grads64, strict=True):
        assert _rel(a, b) < 1e-5, name


def test_same_bits_whatever_the_thread_count():
    """Heads run independently, each on one thread: the result cannot depend on the threads."""
    inputs = model_inputs(2, 50, 3, 16, seed=2)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(_run(cpu_kernel.wkv7_cpu, inputs))
    finally:
        torch.set_num_threads(before)
    (o1, g1), (o2, g2) = results
    assert all(torch.equal(a, b) for a, b in zip(o1 + g1, o2 + g2, strict=True))


def test_bf16_inputs_give_bf16_outputs_and_an_fp32_state():
    inputs = model_inputs(1, 20, 2, 8)
    inputs = [x.bfloat16() for x in inputs[:6]] + [inputs[6]]
    outs, grads = _run(cpu_kernel.wkv7_cpu, inputs)
    assert outs[0].dtype == torch.bfloat16 and outs[1].dtype == torch.float32
    assert [g.dtype for g in grads] == [torch.bfloat16] * 6 + [torch.float32]
    outs32, _ = _run(wkv7_chunked, inputs)
    assert _rel(outs[1], outs32[1]) < 1e-5


def test_empty_sequence_returns_the_state():
    inputs = [x.requires_grad_() for x in model_inputs(1, 0, 2, 8)]
    y, S = cpu_kernel.wkv7_cpu(*inputs)
    assert y.shape == (1, 0, 2, 8) and torch.equal(S, inputs[6])
    S.sum().backward()
    assert torch.equal(inputs[6].grad, torch.ones_like(S))


def test_saved_memory_is_inputs_plus_one_state_per_chunk():
    from .test_wkv7_chunked import _saved_bytes

    B, T, H, N = 1, 100, 2, 16
    inputs = [x.requires_grad_() for x in model_inputs(B, T, H, N)]
    # r, d, k, v, a, b, λ and the state at each chunk start
    assert (
        _saved_bytes(cpu_kernel.wkv7_cpu, inputs) == 7 * B * T * H * N * 4 + -(-T // CK) * B * H * N * N * 4
    )


def test_built_once_and_cached(tmp_path, monkeypatch):
    """A fresh cache folder gets one library; a second process-level load reuses it."""
    monkeypatch.setattr(cpu_kernel, "_cache_dir", lambda: tmp_path)
    monkeypatch.setattr(cpu_kernel, "_lib", None)
    monkeypatch.setattr(cpu_kernel, "_reason", None)
    assert cpu_kernel.available()
    built = list(tmp_path.iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(cpu_kernel, "_lib", None)
    assert cpu_kernel.available() and built[0].stat().st_mtime_ns == stamp


def test_without_a_compiler_auto_uses_the_chunked_op_and_cpu_refuses(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "_lib", None)
    monkeypatch.setattr(cpu_kernel, "_reason", None)
    monkeypatch.setattr(cpu_kernel.shutil, "which", lambda name: None)
    inputs = model_inputs(1, 20, 2, 8)
    y, S = wkv7(*inputs, backend="auto")
    y_c, S_c = wkv7_chunked(*inputs)
    assert torch.equal(y, y_c) and torch.equal(S, S_c)
    with pytest.raises(UserError, match=r"model.wkv_backend: cpu: no C compiler"):
        wkv7(*inputs, backend="cpu")


def test_dispatch_auto_on_the_cpu_runs_the_kernel_after_its_self_check():
    self_check.reset()
    inputs = [x.requires_grad_() for x in model_inputs(1, 20, 2, 8)]
    y, _ = wkv7(*inputs, backend="auto")
    assert type(y.grad_fn).__name__ == "WKV7CpuBackward"
    assert [k.backend for k in self_check._verdicts] == ["cpu"]
    assert list(self_check._verdicts.values()) == [None]
    y64, _ = wkv7(*[x.detach().double() for x in inputs], backend="auto")  # float64: the chunked op
    assert type(y64.grad_fn).__name__ != "WKV7CpuBackward"
    with pytest.raises(UserError, match="not float64"):
        wkv7(*[x.detach().double() for x in inputs], backend="cpu")
