"""Short no-grad calls of `wkv7_chunked` (token-by-token generation) run the per-token recurrence."""

from __future__ import annotations

import pytest
import torch

from rwkv_infctx.ops.wkv7.chunked import SHORT_T, WKV7Chunked, wkv7_chunked
from rwkv_infctx.ops.wkv7.reference import wkv7_reference
from tests.ops.test_wkv7_chunked import model_inputs


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("T", [1, 5, SHORT_T, SHORT_T + 1])
def test_no_grad_calls_agree_with_the_chunked_node_and_fp64(T):
    inputs = model_inputs(2, T, 2, 64, seed=T)
    with torch.no_grad():
        y, S = wkv7_chunked(*inputs)
        y_node, S_node = WKV7Chunked.apply(*inputs, None)
        y64, S64 = wkv7_reference(*(x.double() for x in inputs))
    assert y.dtype == torch.float32 and S.dtype == torch.float32 and S.shape == (2, 2, 64, 64)
    assert S.data_ptr() != inputs[6].data_ptr()
    for ours, node, exact in ((y, y_node, y64), (S, S_node, S64)):
        assert _rel(ours, exact) < 1e-5 and _rel(node, exact) < 1e-5
    if T <= SHORT_T:  # the recurrence itself, not the chunked node
        y_ref, S_ref = wkv7_reference(*inputs)
        assert torch.equal(y, y_ref) and torch.equal(S, S_ref)


def test_calls_needing_gradients_keep_the_chunked_node():
    inputs = [x.requires_grad_() for x in model_inputs(1, 3, 2, 8)]
    y, S = wkv7_chunked(*inputs)
    assert type(y.grad_fn).__name__ == "WKV7ChunkedBackward" and S.grad_fn is y.grad_fn
    with torch.no_grad():  # the same leaves without gradients: the recurrence
        assert all(
            torch.equal(p, q) for p, q in zip(wkv7_chunked(*inputs), wkv7_reference(*inputs), strict=True)
        )


def test_short_calls_check_shapes():
    r, w, k, v, a, b, S0 = model_inputs(1, 2, 2, 4)
    with torch.no_grad(), pytest.raises(ValueError, match="state"):
        wkv7_chunked(r, w, k, v, a, b, S0[:, :1])
