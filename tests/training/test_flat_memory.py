"""Flat memory: the peak of a segmented step grows with the sample only by its boundary states.

The peak live bytes of a whole `bptt_step` (state pass, sweep, gradients; `PeakLiveBytes` of
test_grad_memory.py, the parameters left out) for a sample 4× longer, at the same ctx_len, is the
shorter sample's plus one saved boundary state (`fresh_state(B).nbytes`) per extra segment, and
nothing else. Plain autograd over the whole sample, measured the same way, grows several-fold: the
comparison can fail.
"""

from __future__ import annotations

from rwkv_infctx.training.segments import bptt_step
from tests.conftest import family_config, random_family_model

from .batches import make_batch, plain_objective
from .test_grad_memory import PeakLiveBytes

CTX_LEN = 16
SHORT, LONG = 2 * CTX_LEN, 8 * CTX_LEN
SLACK = 0.02
"""Of the short sample's peak, for what else may grow: the step's (B, T) mask and index tensors
(8 bytes per position and row) and which segment activation happens to be alive at the peak.
Measured beyond the states: 12 KB of 3.4 MB (RWKV-7), 3.8 KB of 0.59 MB (RWKV-4)."""


def step_peak(model, batch) -> int:
    model.zero_grad(set_to_none=True)
    with PeakLiveBytes(list(model.parameters())) as mode:
        proxy, _ = bptt_step(model, batch, CTX_LEN)
        proxy.backward()
    return mode.peak


def plain_peak(model, batch) -> int:
    model.zero_grad(set_to_none=True)
    with PeakLiveBytes(list(model.parameters())) as mode:
        plain_objective(model, batch).backward()
    return mode.peak


def test_peak_grows_only_by_the_boundary_states(family):
    model = random_family_model(family_config(family, 97), seed=1)
    short, long = (make_batch([n, n - 5], 97, seed=2) for n in (SHORT, LONG))
    one_state = model.fresh_state(2).nbytes
    peaks = {n: step_peak(model, b) for n, b in ((SHORT, short), (LONG, long))}
    growth = peaks[LONG] - peaks[SHORT]
    states = (LONG - SHORT) // CTX_LEN * one_state  # the saved input state of each extra segment
    print(f"{family}: peak {peaks[SHORT]} -> {peaks[LONG]} B, growth {growth} B, boundary states {states} B")
    assert growth <= states + SLACK * peaks[SHORT], (growth, states, peaks)
    plain = plain_peak(model, long) / plain_peak(model, short)
    assert plain > 2.5, plain  # whole-sample autograd keeps every position's activations
