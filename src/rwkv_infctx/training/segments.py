"""Long samples in segments: exact backpropagation through time in constant memory.

Shape legend: B batch, T time (the padded sample length), C n_embd, V vocab_size.

A micro-batch of any length T is cut into segments of `ctx_len` tokens; the recurrent state is
carried from segment to segment. `bptt_step` returns a scalar *proxy* tensor. Calling `backward()` on
it (once, as Lightning, DDP and DeepSpeed expect) fills every parameter's `.grad` with exactly the
gradient of unsegmented backpropagation through the whole sample:

- forward (no grad): a state-only pass (no head, no last channel-mix matmuls) over the segments,
  keeping only each segment's input state: a few KB to MB per segment, nothing per token.
- backward: segments in reverse order. Each is recomputed from its saved input state with grad
  enabled, up to its final hidden states h (B, T, C). The head and the loss are differentiated
  eagerly, a chunk of positions at a time (`loss.head_loss_grad`), so a segment's logits never exist
  all at once; this gives dL/dh and the head's gradients. Then one backward of
  `<h_i, dL/dh_i> + <out_state_i, dL/d out_state_i>` gives the other parameter gradients and the
  gradient of its input state, which is handed to the previous segment.
- gradients stream into one accumulator per parameter (`grad_sums.GradSums`) as autograd produces them:
  during the sweep the model's parameters are replaced by detached aliases (leaves sharing their
  storage, no copy) whose post-accumulate hooks move each gradient into its accumulator and drop it,
  so no second full set of gradients ever exists (`aliased_params`). The node returns the sums at
  the end, converted and released one at a time; the real parameters' AccumulateGrad nodes (DDP's and
  DeepSpeed's hooks) see them once, then. `grad_accum_dtype` picks the accumulators' dtype.

So one segment's graph is alive at a time, and the cost is one state-only forward plus an ordinary
forward and backward: about 3F + F_state against 3F unsegmented (docs/training.md has measurements).
The loss value is only known after the backward; it lands in the returned `StepReport`.

bptt: truncated needs no state pass, since no gradient crosses a boundary. Its forward only records
the RNG state (with dropout); its backward runs the segments in forward order, each once with grad
from the previous segment's detached output state, differentiating its loss at once (into the same
`GradSums`, through the same aliases): one forward and backward per segment, 3F. Its dropout masks
are drawn then, from the global RNG rewound to the state recorded at the forward, and the RNG is
left advanced past them: deterministic, fresh every step, but not the masks a plain forward at that
moment would draw (draws made between the forward and the backward are overwritten).

Boundaries come in three kinds (`Segment.entry`):
    "carry":  the state and its gradient cross the boundary (bptt: full).
    "detach": the state's value crosses, its gradient does not (bptt: truncated).
    "fresh":  a new piece starts from a fresh state (ctx_len_cutoff, or the first segment).

What is asked of a model (RWKV-4 here; later versions implement the same three members):
    model.fresh_state(B, device) -> state
        The state before the first token: a `RecurrentState` (`.map`, `.tensors()`). It may depend
        on parameters (RWKV-7's learnt initial state, `training/tuning/state.py`): the sweeps build
        each fresh entry's state with grad, so their gradient reaches those parameters.
    model.hidden(tokens_BT, state, state_only=False, grad_cp=False) -> (h_BTC | None, new_state)
        The final hidden states (after the last norm: what the head reads) and the state after the
        last token. state_only=True may skip work the new state does not need and returns None for
        h. grad_cp=True (honoured only with grad enabled) recomputes each block in backward,
        replaying the forward's RNG state. Row-wise computation: the same tokens and state give the
        same h and new state whatever the batch's other rows.
    model.head: an nn.Module mapping (..., C) hidden states to (..., V) logits, position by position
        (so it can be applied to any chunk of h); its parameters are among model.parameters().
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from rwkv_infctx.errors import UserError
from rwkv_infctx.state import RecurrentState
from rwkv_infctx.training.boundary_states import BoundaryPlace, BoundaryStates, check_boundary_place
from rwkv_infctx.training.grad_sums import GradAccumDtype, GradSums, aliased_params, check_grad_accum_dtype
from rwkv_infctx.training.loss import (
    LOSS_CHUNK,
    check_loss_chunk,
    head_loss_grad,
    head_loss_value,
    token_count,
)

BpttMode = Literal["full", "truncated"]
BPTT_MODES = ("full", "truncated")


@dataclass(frozen=True)
class Segment:
    """Columns [start, end) of the batch, and how the state enters them (see the module doc)."""

    start: int
    end: int
    entry: Literal["fresh", "carry", "detach"]


def plan_segments(
    length: int, ctx_len: int, ctx_len_cutoff: int | None = None, bptt: BpttMode = "full"
) -> list[Segment]:
    """Cut `length` columns into pieces of `ctx_len_cutoff` (None: one piece), each into segments.

    Segments never straddle a piece boundary, so a piece's last segment may be shorter than ctx_len.
    """
    if ctx_len <= 0:
        raise UserError(f"model.ctx_len: {ctx_len} (expected a positive number of tokens)")
    if ctx_len_cutoff is not None and ctx_len_cutoff <= 0:
        raise UserError(
            f"model.ctx_len_cutoff: {ctx_len_cutoff} (expected a positive number of tokens or null)"
        )
    if bptt not in BPTT_MODES:
        raise UserError(f"model.bptt: {bptt!r} (expected one of {', '.join(BPTT_MODES)})")
    piece = ctx_len_cutoff or max(length, 1)
    inner = "carry" if bptt == "full" else "detach"
    segments = []
    for p0 in range(0, length, piece):
        p1 = min(p0 + piece, length)
        segments += [
            Segment(s, min(s + ctx_len, p1), "fresh" if s == p0 else inner) for s in range(p0, p1, ctx_len)
        ]
    return segments


@dataclass
class StepReport:
    """What one micro-batch did. `ce_sum` (and so `loss`) is filled in by the backward pass."""

    n_tokens: float
    """N: unmasked target tokens of the micro-batch (the loss's denominator)."""
    n_segments: int
    """Segments per sample: ceil(T / ctx_len) over the padded length (per piece, summed)."""
    tokens: int
    """Tokens read (B × T, padding included)."""
    ce_sum: float | None = None
    boundary_bytes: int = 0
    """Bytes of the saved segment input states (bptt: full), wherever model.boundary_states keeps them."""

    @property
    def loss(self) -> float | None:
        """Mean cross-entropy per unmasked token (without L2Wrap); 0 when N = 0; None before backward."""
        if self.ce_sum is None:
            return None
        return self.ce_sum / self.n_tokens if self.n_tokens > 0 else 0.0


def unpack_batch(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(input_ids, target_ids, loss_mask), each (B, T); targets are zeroed where the mask is 0."""
    try:
        inputs, targets, mask = batch["input_ids"], batch["target_ids"], batch["loss_mask"]
    except KeyError as e:
        raise UserError(f"batch: missing {e.args[0]!r} (expected input_ids, target_ids, loss_mask)") from None
    if inputs.dim() != 2 or inputs.shape != targets.shape or inputs.shape != mask.shape:
        shapes = ", ".join(f"{k} {tuple(batch[k].shape)}" for k in ("input_ids", "target_ids", "loss_mask"))
        raise UserError(f"batch: {shapes} (expected three (B, T) tensors of one shape)")
    return inputs, torch.where(mask != 0, targets, 0), mask


def check_token_ids(batch: dict[str, Tensor], vocab_size: int) -> None:
    """UserError if a token id is negative or ≥ vocab_size (the embedding would fail obscurely)."""
    inputs, targets, _ = unpack_batch(batch)
    for name, ids in (("input_ids", inputs), ("target_ids", targets)):
        if ids.numel() and (int(ids.max()) >= vocab_size or int(ids.min()) < 0):
            bad = int(ids.max()) if int(ids.max()) >= vocab_size else int(ids.min())
            raise UserError(
                f"data: token id {bad} in {name} is outside the model's vocabulary 0..{vocab_size - 1} "
                "(model.vocab_size and data.tokenizer do not match)"
            )


def bptt_step(
    model: nn.Module,
    batch: dict[str, Tensor],
    ctx_len: int,
    ctx_len_cutoff: int | None = None,
    bptt: BpttMode = "full",
    grad_cp: bool = False,
    n_norm: Tensor | None = None,
    anchor: Tensor | None = None,
    *,
    loss_chunk: int = LOSS_CHUNK,
    grad_accum_dtype: GradAccumDtype = "float32",
    boundary_states: BoundaryPlace = "device",
) -> tuple[Tensor, StepReport]:
    """(proxy, report) for one micro-batch; `proxy.backward()` computes the exact gradients.

    The proxy's value is 0; `report.loss` holds the real loss once the backward has run. The proxy
    may be scaled before backward (gradient accumulation): the gradients scale with it.
    `n_norm` is the objective's denominator: by default the micro-batch's own unmasked token count;
    under data parallelism, the count over all ranks (`training.distributed`). `anchor`, a scalar that
    requires grad, becomes one more input of the autograd node (its gradient is 0), so that a hook on
    its gradient runs once the parameters' gradients exist (DeepSpeed ZeRO-3's leaf-module reduction).
    `loss_chunk`: positions (rows × columns) whose logits exist at a time. `grad_accum_dtype`: the
    dtype of the per-parameter gradient sums over segments (`GRAD_ACCUM_DTYPES`).
    `boundary_states`: where the segments' input states wait for the backward (`boundary_states.py`).
    The module doc lists what is asked of the model.
    """
    check_loss_chunk(loss_chunk)
    check_grad_accum_dtype(grad_accum_dtype)
    check_boundary_place(boundary_states)
    inputs, targets, mask = unpack_batch(batch)
    B, T = inputs.shape
    segments = plan_segments(T, ctx_len, ctx_len_cutoff, bptt)
    report = StepReport(n_tokens=float(token_count(mask)), n_segments=len(segments), tokens=B * T)
    run = _SegmentedRun(
        model, inputs, targets, mask, segments, grad_cp, report, n_norm, loss_chunk, grad_accum_dtype, bptt,
        boundary_states,
    )  # fmt: skip
    return _SegmentedBPTT.apply(run, *run.params, *([] if anchor is None else [anchor])), report


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    batch: dict[str, Tensor],
    ctx_len: int,
    ctx_len_cutoff: int | None = None,
    *,
    loss_chunk: int = LOSS_CHUNK,
) -> StepReport:
    """The loss of a micro-batch without gradients, segment by segment (for validation and test)."""
    check_loss_chunk(loss_chunk)
    inputs, targets, mask = unpack_batch(batch)
    B, T = inputs.shape
    segments = plan_segments(T, ctx_len, ctx_len_cutoff)
    n = token_count(mask)
    ce_total = 0.0
    state = None
    for seg in segments:
        if seg.entry == "fresh":
            state = model.fresh_state(B, inputs.device)
        cols = slice(seg.start, seg.end)
        h, state = model.hidden(inputs[:, cols], state)
        ce_total += float(head_loss_value(model.head, h, targets[:, cols], mask[:, cols], loss_chunk))
    return StepReport(n_tokens=float(n), n_segments=len(segments), tokens=B * T, ce_sum=ce_total)


class _SegmentedBPTT(torch.autograd.Function):
    """One autograd node per micro-batch; its inputs are the parameters (and the anchor, if any),
    its output the proxy."""

    @staticmethod
    def forward(ctx, run: _SegmentedRun, *params: Tensor) -> Tensor:
        if run.bptt == "full":
            run.state_pass()
        else:  # truncated: the segments run in the backward, from here on in the RNG
            run.rng_start = _capture_rng(run.inputs.device) if run.replay_rng else None
        ctx.run = run
        ctx.anchors = len(params) - len(run.params)
        return torch.zeros((), device=run.inputs.device)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        run, ctx.run = ctx.run, None
        return (None, *run.backward_pass(grad_out), *[torch.zeros_like(grad_out)] * ctx.anchors)


@dataclass
class _SegmentedRun:
    """The work of one micro-batch: the saved boundary states and the reverse sweep (bptt: full), or
    the forward-order sweep (bptt: truncated)."""

    model: nn.Module
    inputs: Tensor
    targets: Tensor
    mask: Tensor
    segments: list[Segment]
    grad_cp: bool
    report: StepReport
    n_norm: Tensor | None = None
    loss_chunk: int = LOSS_CHUNK
    grad_accum_dtype: GradAccumDtype = "float32"
    bptt: BpttMode = "full"
    boundary_states: BoundaryPlace = "device"
    rng_states: list[tuple[Tensor, Tensor | None] | None] = field(default_factory=list)
    rng_start: tuple[Tensor, Tensor | None] | None = None

    def __post_init__(self) -> None:
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        head = {id(p) for p in self.model.head.parameters()}
        self.head_index = [j for j, p in enumerate(self.params) if id(p) in head]
        n = token_count(self.mask) if self.n_norm is None else self.n_norm
        self.n_tokens = n.to(self.inputs.device, torch.float64)
        self.segments, self.seg_tokens = _drop_idle_tails(self.segments, self.mask)
        device = self.inputs.device.type
        self.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        self.replay_rng = self.model.training and any(
            isinstance(m, nn.Dropout) and m.p > 0 for m in self.model.modules()
        )
        self.in_states = BoundaryStates(self.boundary_states, self.inputs.device)

    def state_pass(self) -> None:
        """No-grad pass: record each segment's input state (and RNG state, for dropout)."""
        B = self.inputs.shape[0]
        state = None
        for i, seg in enumerate(self.segments):
            if seg.entry == "fresh":
                state = self.model.fresh_state(B, self.inputs.device)
            self.in_states.append(state)
            self.rng_states.append(_capture_rng(self.inputs.device) if self.replay_rng else None)
            last_of_piece = i + 1 == len(self.segments) or self.segments[i + 1].entry == "fresh"
            if not last_of_piece:  # the state after a piece's last segment is never needed
                _, state = self.model.hidden(self.inputs[:, seg.start : seg.end], state, state_only=True)
        self.report.boundary_bytes = self.in_states.nbytes

    def backward_pass(self, grad_out: Tensor) -> list[Tensor]:
        """The sweep of the mode; returns the parameter gradients, scaled by grad_out."""
        sums = GradSums(self.params, self.grad_accum_dtype)
        with aliased_params(self.model, self.params, sums) as aliases:
            if self.bptt == "full":
                self._sweep(grad_out, sums, aliases)
            else:
                self._truncated_sweep(grad_out, sums, aliases)
        return sums.take()

    def _truncated_sweep(self, grad_out: Tensor, sums: GradSums, aliases: list[Tensor]) -> None:
        """The segments in forward order, each run once: its loss differentiated at once, its output
        state detached and handed on. Dropout draws advance the RNG from the forward's state."""
        if self.rng_start is not None:
            _restore_rng(self.rng_start, self.inputs.device)
        state: RecurrentState | None = None
        ce_total = 0.0
        for i, seg in enumerate(self.segments):
            if seg.entry == "fresh":
                state = self._fresh_with_grad()
            has_tokens = self.seg_tokens[i] > 0  # without: run only for the state, without grad
            with torch.set_grad_enabled(has_tokens), self._replay(None):
                outputs, out_grads, ce_sum, out_state = self._segment_graph(
                    seg, state, has_tokens, None, grad_out, sums
                )
            ce_total += ce_sum
            if outputs:
                torch.autograd.backward(outputs, out_grads, inputs=aliases)
            state = out_state.map(lambda t, f: t.detach())
        self.report.ce_sum = ce_total

    def _sweep(self, grad_out: Tensor, sums: GradSums, aliases: list[Tensor]) -> None:
        """The segments in reverse; parameter gradients land in `sums` (the aliases' hooks)."""
        state_grad: tuple[Tensor | None, ...] | None = None
        ce_total = 0.0
        for i in reversed(range(len(self.segments))):
            seg, state = self.segments[i], self.in_states.take(i)
            has_tokens = self.seg_tokens[i] > 0
            if not has_tokens and state_grad is None:
                continue  # contributes nothing: no loss and no gradient flowing through it
            wants_state_grad = seg.entry == "carry"
            if wants_state_grad:
                state = state.map(lambda t, f: t.detach().requires_grad_())
            elif seg.entry == "fresh":  # the same values, now in the graph of any parameter they hold
                state = self._fresh_with_grad()
            with torch.enable_grad(), self._replay(i):
                outputs, out_grads, ce_sum, _ = self._segment_graph(
                    seg, state, has_tokens, state_grad, grad_out, sums
                )
            ce_total += ce_sum
            state_in = list(state.tensors()) if wants_state_grad else []
            if outputs:
                # accumulates into the aliases (their hooks move it to `sums`) and the state leaves
                torch.autograd.backward(outputs, out_grads, inputs=[*aliases, *state_in])
            state_grad = tuple(t.grad for t in state_in) if wants_state_grad and outputs else None
        self.report.ce_sum = ce_total

    def _fresh_with_grad(self) -> RecurrentState:
        """A fresh state built with grad enabled (under `aliased_params`: from the aliases), so that
        a fresh entry's gradient flows into whatever parameters the model's fresh state holds."""
        with torch.enable_grad():
            return self.model.fresh_state(self.inputs.shape[0], self.inputs.device)

    def _segment_graph(
        self,
        seg: Segment,
        state: RecurrentState,
        has_tokens: bool,
        state_grad,
        grad_out: Tensor,
        sums: GradSums,
    ) -> tuple[list[Tensor], list[Tensor], float, RecurrentState]:
        """Run one segment (with grad if enabled), its head and loss chunk by chunk (differentiated
        here; the head's gradients go to `sums` chunk by chunk).

        Returns the outputs still to differentiate (h, out-state tensors), their incoming grads,
        the segment's ce_sum and its output state.
        """
        cols = slice(seg.start, seg.end)
        h, out_state = self.model.hidden(
            self.inputs[:, cols], state, state_only=not has_tokens, grad_cp=self.grad_cp
        )
        outputs: list[Tensor] = []
        out_grads: list[Tensor] = []
        ce_value = 0.0
        if has_tokens:
            dh, ce_sum = head_loss_grad(
                self.model.head,
                h,
                self.targets[:, cols],
                self.mask[:, cols],
                self.n_tokens,
                grad_out,
                lambda k, g: sums.add(self.head_index[k], g),
                self.loss_chunk,
            )
            if h.requires_grad:
                outputs.append(h)
                out_grads.append(dh)
            ce_value = float(ce_sum)
        if state_grad is not None:
            for t, g in zip(out_state.tensors(), state_grad, strict=True):
                if g is not None and t.requires_grad:
                    outputs.append(t)
                    out_grads.append(g)
        return outputs, out_grads, ce_value, out_state

    @contextlib.contextmanager
    def _replay(self, i: int | None) -> Iterator[None]:
        """Run (segment i) under the forward's autocast and (with i) its saved RNG state, on a
        forked RNG; i=None leaves the global RNG as it is (the truncated sweep)."""
        device, dtype, enabled = self.autocast
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
            rng = None if i is None else self.rng_states[i]
            if rng is not None:
                cuda = [self.inputs.device] if rng[1] is not None else []
                stack.enter_context(torch.random.fork_rng(devices=cuda, device_type="cuda"))
                _restore_rng(rng, self.inputs.device)
            yield


def _drop_idle_tails(segments: list[Segment], mask: Tensor) -> tuple[list[Segment], list[int]]:
    """Drop each piece's trailing segments without unmasked tokens (they affect nothing)."""
    per_col = torch.cumsum((mask != 0).sum(0), 0).tolist()
    counts = [per_col[s.end - 1] - (per_col[s.start - 1] if s.start else 0) for s in segments]
    keep = [True] * len(segments)
    tail_idle = True
    for i in reversed(range(len(segments))):
        keep[i] = not (tail_idle and counts[i] == 0)
        tail_idle = counts[i] == 0 and tail_idle
        if segments[i].entry == "fresh":
            tail_idle = True
    return [s for s, k in zip(segments, keep, strict=True) if k], [
        c for c, k in zip(counts, keep, strict=True) if k
    ]


def _capture_rng(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _restore_rng(rng: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(rng[0])
    if rng[1] is not None:
        torch.cuda.set_rng_state(rng[1], device)
