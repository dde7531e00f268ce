"""The fast kernels' first-use self-check (`ops/self_check.py`) and the fallback to the chunked ops.

Fast kernels are made to fail on purpose (raise, or return wrong values, or a wrong gradient only):
with `warn` the dispatcher gives the chunked op's result bit for bit after exactly one warning that
names the backend, the check and the figure; `error` stops with one line; `off` runs the kernel
unchecked; the check runs once per key. No fla or GPU is needed: the kernels are replaced.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from rwkv_infctx.errors import UserError
from rwkv_infctx.model import RWKV4Config, RWKV7Config
from rwkv_infctx.ops import self_check
from rwkv_infctx.ops.wkv4 import WKV4State, wkv4
from rwkv_infctx.ops.wkv4 import triton_kernel as wkv4_triton_module
from rwkv_infctx.ops.wkv4.chunked import wkv4_chunked
from rwkv_infctx.ops.wkv7 import fla_kernel, wkv7
from rwkv_infctx.ops.wkv7.chunked import wkv7_chunked


@pytest.fixture(autouse=True)
def _fresh_verdicts():
    self_check.reset()
    yield
    self_check.reset()


def _wkv7_inputs(N: int = 16, T: int = 11, dtype=torch.float32) -> list[torch.Tensor]:
    return [x.requires_grad_() for x in fla_kernel.check_problem(dtype, "cpu", N)[:6]] + [
        (0.3 * torch.randn(2, 2, N, N, generator=torch.Generator().manual_seed(5))).requires_grad_()
    ]


def _raising(*args, **kwargs):
    raise RuntimeError("no kernel image is available for execution on the device\nsecond line")


def _off_by(factor: float):
    """WKV-7 'kernel': the chunked op with y scaled by `factor`."""

    def kernel(r, w, k, v, a, b, state):
        y, S = wkv7_chunked(r, w, k, v, a, b, state)
        return y * factor, S

    return kernel


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient scaled (a kernel right forwards, wrong in its backward)."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


def _wrong_dS0(r, w, k, v, a, b, state):
    return wkv7_chunked(r, w, k, v, a, b, _ScaleGrad.apply(state, 1.5))


def _run7(backend="fla", mode="warn", inputs=None):
    xs = inputs or _wkv7_inputs()
    y, S = wkv7(*xs, backend=backend, self_check=mode)
    grads = torch.autograd.grad((y * y).sum() + S.sum(), xs)
    return y, S, grads


def _assert_bitwise(a, b):
    y1, S1, g1 = a
    y2, S2, g2 = b
    assert torch.equal(y1, y2) and torch.equal(S1, S2)
    assert all(torch.equal(x, z) for x, z in zip(g1, g2, strict=True))


@pytest.mark.parametrize(
    "kernel, figure",
    [
        (_raising, "failed to run (RuntimeError: no kernel image is available for execution on the device)"),
        (_off_by(1.001), "y differs by 1.0e-03 relative, tolerance 1e-04"),
        (_wrong_dS0, "dS0 differs by 5.0e-01 relative, tolerance 1e-04"),
    ],
)
def test_failing_fla_falls_back_with_one_warning(monkeypatch, kernel, figure):
    monkeypatch.setattr(fla_kernel, "wkv7_fla", kernel)
    inputs = _wkv7_inputs()
    with pytest.warns(self_check.SelfCheckWarning) as record:
        got = _run7(inputs=inputs)
        got_again = _run7(inputs=inputs)  # cached: no second check, no second warning
    assert len(record) == 1
    message = str(record[0].message)
    assert "\n" not in message
    assert "WKV-7 backend 'fla' (float32, cpu, size 16) failed its self-check" in message
    assert figure in message
    assert "using the chunked op instead" in message
    want = _run7(backend="chunked", inputs=inputs)
    _assert_bitwise(got, want)
    _assert_bitwise(got_again, want)


def test_error_mode_stops_with_one_line(monkeypatch):
    monkeypatch.setattr(fla_kernel, "wkv7_fla", _off_by(1.1))
    with pytest.raises(UserError) as e, warnings.catch_warnings():
        warnings.simplefilter("error")  # and no warning on the way
        _run7(mode="error")
    text = str(e.value)
    assert "\n" not in text
    assert text.startswith("model.wkv_self_check: error: WKV-7 backend 'fla' (float32, cpu, size 16)")
    assert "y differs by 1.0e-01 relative, tolerance 1e-04" in text


def test_off_runs_the_kernel_unchecked(monkeypatch):
    calls = []

    def kernel(*args):
        calls.append(1)
        return _off_by(2.0)(*args)

    monkeypatch.setattr(fla_kernel, "wkv7_fla", kernel)
    monkeypatch.setattr(fla_kernel, "self_check", lambda key: pytest.fail("the check ran"))
    inputs = _wkv7_inputs()
    y, _, _ = _run7(mode="off", inputs=inputs)
    assert calls == [1]
    assert torch.equal(y, 2.0 * wkv7_chunked(*inputs)[0])


def test_a_passing_kernel_is_used_and_checked_once_per_key(monkeypatch):
    checked, ran = [], []

    def kernel(*args):
        ran.append(args[0].dtype)
        return wkv7_chunked(*args)

    real_check = fla_kernel.self_check

    def counting_check(key):
        checked.append(key)
        return real_check(key)

    monkeypatch.setattr(fla_kernel, "wkv7_fla", kernel)
    monkeypatch.setattr(fla_kernel, "self_check", counting_check)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            _run7()
        _run7(inputs=_wkv7_inputs(dtype=torch.bfloat16))  # a new key: one more check
        _run7(inputs=_wkv7_inputs(N=8))  # another head size: one more
    keys = [(k.dtype, k.size) for k in checked]
    assert keys == [(torch.float32, 16), (torch.bfloat16, 16), (torch.float32, 8)]
    # each check ran the kernel once; then every call did
    assert ran.count(torch.bfloat16) == 2 and ran.count(torch.float32) == 3 + 1 + 2


def test_the_check_leaves_the_global_rng_alone(monkeypatch):
    monkeypatch.setattr(fla_kernel, "wkv7_fla", wkv7_chunked)
    inputs = _wkv7_inputs()
    before = torch.get_rng_state()
    _run7(inputs=inputs)
    assert torch.equal(torch.get_rng_state(), before)


def _wkv4_inputs():
    xs = wkv4_triton_module.check_problem(torch.float32, "cpu", 24)
    return [x.requires_grad_() for x in xs]


def _run4(inputs, backend="triton", mode="warn"):
    td, tf, k, v, aa, bb, pp = inputs
    y, st = wkv4(td, tf, k, v, WKV4State(aa, bb, pp), backend=backend, self_check=mode)
    grads = torch.autograd.grad((y * y).sum() + sum(s.sum() for s in st), inputs)
    return y, torch.stack(list(st)), grads


def test_failing_triton_wkv4_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(wkv4_triton_module, "wkv4_triton", _raising)
    inputs = _wkv4_inputs()
    with pytest.warns(self_check.SelfCheckWarning) as record:
        got = _run4(inputs)
        _run4(inputs)
    assert len(record) == 1
    assert "WKV-4 backend 'triton' (float32, cpu, size 24) failed its self-check" in str(record[0].message)
    td, tf, k, v, aa, bb, pp = inputs
    y, st = wkv4_chunked(td, tf, k, v, WKV4State(aa, bb, pp))
    want = (y, torch.stack(list(st)), torch.autograd.grad((y * y).sum() + sum(s.sum() for s in st), inputs))
    _assert_bitwise(got, want)
    with pytest.raises(UserError, match=r"^model\.wkv_self_check: error: WKV-4 backend 'triton'"):
        _run4(inputs, mode="error")  # the cached failure, now strict


def test_wrong_triton_gradient_is_caught(monkeypatch):
    """A WKV-4 kernel right forwards but wrong on the carried pp's gradient."""

    def kernel(td, tf, k, v, state, **kwargs):
        return wkv4_chunked(td, tf, k, v, WKV4State(state.aa, state.bb, _ScaleGrad.apply(state.pp, 0.5)))

    monkeypatch.setattr(wkv4_triton_module, "wkv4_triton", kernel)
    with pytest.warns(self_check.SelfCheckWarning, match="dpp differs by 5.0e-01 relative"):
        _run4(_wkv4_inputs())


def test_configs_refuse_unknown_modes_and_foreign_backends():
    with pytest.raises(ValueError, match="wkv_self_check='maybe': expected one of warn, error, off"):
        RWKV7Config(n_layer=1, n_embd=64, vocab_size=10, wkv_self_check="maybe")
    with pytest.raises(ValueError, match="wkv_self_check='maybe'"):
        RWKV4Config(n_layer=1, n_embd=64, vocab_size=10, wkv_self_check="maybe")
    with pytest.raises(ValueError, match=r"wkv_backend='fla': expected one of .* for RWKV-4"):
        RWKV4Config(n_layer=1, n_embd=64, vocab_size=10, wkv_backend="fla")
    with pytest.raises(ValueError, match=r"wkv_backend='triton': expected one of .* for RWKV-7"):
        RWKV7Config(n_layer=1, n_embd=64, vocab_size=10, wkv_backend="triton")


def test_the_setting_reaches_the_op_through_the_model(monkeypatch):
    """RWKVModule(wkv_backend=fla, wkv_self_check=...) → every block's op: a broken fla gives one
    warning and the chunked model's logits bit for bit (warn), or stops (error)."""
    from rwkv_infctx.training.module import RWKVModule

    monkeypatch.setattr(fla_kernel, "wkv7_fla", _raising)
    dims = {"arch": "rwkv7", "n_layer": 2, "n_embd": 64, "vocab_size": 50, "seed": 3}
    tokens = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    want, _ = RWKVModule(**dims, wkv_backend="chunked").model(tokens, None)
    with pytest.warns(self_check.SelfCheckWarning) as record:
        got, _ = RWKVModule(**dims, wkv_backend="fla").model(tokens, None)
    assert len(record) == 1 and torch.equal(got, want)
    self_check.reset()
    strict = RWKVModule(**dims, wkv_backend="fla", wkv_self_check="error")
    with pytest.raises(UserError, match=r"^model\.wkv_self_check: error: WKV-7 backend 'fla'"):
        strict.model(tokens, None)


def test_the_check_runs_outside_flop_counters_and_inference_mode(monkeypatch):
    """A FLOP counter around the first call (the model summary) sees the call, not the check."""
    from torch.utils.flop_counter import FlopCounterMode

    monkeypatch.setattr(fla_kernel, "wkv7_fla", wkv7_chunked)
    inputs = [x.detach() for x in _wkv7_inputs()]
    with FlopCounterMode(display=False) as first, torch.inference_mode():
        wkv7(*inputs, backend="fla")
    assert self_check._verdicts  # the check ran, and passed
    with FlopCounterMode(display=False) as second, torch.inference_mode():
        wkv7(*inputs, backend="fla")
    assert first.get_total_flops() == second.get_total_flops() > 0


def test_under_torch_compile(monkeypatch):
    """First use inside torch.compile: the check runs at trace time (size COMPILE_SIZE), once; a
    failing kernel falls back with one warning and the compiled result is the chunked op's."""
    monkeypatch.setattr(fla_kernel, "wkv7_fla", _raising)
    inputs = [x.detach() for x in _wkv7_inputs()]

    def f(*xs):
        return wkv7(*xs, backend="fla")[0]

    torch._dynamo.reset()
    with pytest.warns(self_check.SelfCheckWarning) as record:
        got = torch.compile(f, backend="aot_eager")(*inputs)
        torch.compile(f, backend="aot_eager")(*inputs)
    assert len(record) == 1 and f"size {self_check.COMPILE_SIZE})" in str(record[0].message)
    assert torch.equal(got, wkv7_chunked(*inputs)[0])
    torch._dynamo.reset()
