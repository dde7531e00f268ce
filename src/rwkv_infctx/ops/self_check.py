"""Every fast WKV kernel checks itself at first use against the PyTorch chunked op.

A kernel that is wrong on a user's card, driver or shape must not be found out a week into a run.
So the first time a dispatcher would run a fast kernel (fla's for WKV-7, our Triton one for WKV-4)
for a key (family, backend, dtype, device, head size), it runs the kernel and the chunked op on a
small random problem with a non-zero initial state and compares y, the final state and the gradient
of every input, the initial state's included, within TOLERANCE (relative to the largest magnitude of
the chunked op's tensor). The verdict is cached per key for the life of the process.

On failure (the kernel does not import, does not compile, raises, or disagrees) the `mode` decides:
"warn" prints one warning naming the backend, the check and the figure and the dispatcher falls back
to the chunked op (training goes on); "error" stops with one line (UserError); "off" skips the check
and runs the kernel. The modes are `model.wkv_self_check`, which reaches the ops through the model
config like `wkv_backend`.

The check draws its random problem from its own generator: the global RNG (dropout, sampling) is
untouched, so a run gives the same results with the check on or off.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils._python_dispatch import _disable_current_modes

from rwkv_infctx.errors import UserError

MODES = ("warn", "error", "off")

TOLERANCE: dict[torch.dtype, float] = {
    torch.float32: 1e-4,
    torch.float64: 1e-4,
    torch.bfloat16: 2e-2,
    torch.float16: 2e-2,
}
"""Largest relative difference (max |fast - chunked| / max |chunked|, per tensor) a fast kernel may
show on the check's problem, by the dtype of its inputs."""

SEED = 20261204
"""Seed of the check's problem and output weights (its own generator; the global RNG is untouched)."""


class SelfCheckWarning(UserWarning):
    """A fast WKV kernel failed its self-check; the chunked op runs instead."""


@dataclass(frozen=True)
class CheckKey:
    """What a verdict holds for: one kernel on one dtype, device and head size."""

    family: str  # "WKV-4" or "WKV-7"
    backend: str  # "triton" or "fla"
    dtype: torch.dtype
    device: str
    size: int  # head size N (WKV-7), channels C (WKV-4)

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"{self.family} backend {self.backend!r} ({dtype}, {self.device}, size {self.size})"


_verdicts: dict[CheckKey, str | None] = {}
"""Per key: None when the kernel passed, else what went wrong."""


def reset() -> None:
    """Forget every verdict (tests)."""
    _verdicts.clear()


def check_mode(mode: str) -> None:
    """ValueError unless `mode` is one of MODES."""
    if mode not in MODES:
        raise ValueError(f"wkv_self_check={mode!r}: expected one of {', '.join(MODES)}")


COMPILE_SIZE = 64
"""The size checked when the first use of a kernel is inside torch.compile (see `fast_kernel_allowed`)."""


def fast_kernel_allowed(
    family: str, backend: str, x: Tensor, mode: str, check: Callable[[CheckKey], str | None]
) -> bool:
    """Whether the dispatcher may run `backend`'s kernel on inputs like `x` (its last dim the size),
    checking it first if this is its first use for that key (`use_fast_kernel`).

    Under torch.compile the size is symbolic when the graph is traced, so there the verdict is one
    already given for this kernel, dtype and device (a failed one first), or, if none was, the check
    runs at trace time at size COMPILE_SIZE; either way no graph break."""
    if torch.compiler.is_compiling():
        return _allowed_while_compiling(family, backend, x.dtype, x.device, mode, check)
    key = CheckKey(family, backend, x.dtype, str(x.device), int(x.shape[-1]))
    return use_fast_kernel(key, mode, lambda: check(key))


@torch.compiler.assume_constant_result  # evaluated once per trace, a constant in the graph
def _allowed_while_compiling(
    family: str,
    backend: str,
    dtype: torch.dtype,
    device: torch.device,
    mode: str,
    check: Callable[[CheckKey], str | None],
) -> bool:
    check_mode(mode)
    if mode == "off":
        return True
    same = [
        k
        for k in _verdicts
        if (k.family, k.backend, k.dtype, k.device) == (family, backend, dtype, str(device))
    ]
    failed = [k for k in same if _verdicts[k] is not None]
    key = (failed or same or [CheckKey(family, backend, dtype, str(device), COMPILE_SIZE)])[0]
    return use_fast_kernel(key, mode, lambda: check(key))


@torch.compiler.disable  # runs eagerly, once per key
def use_fast_kernel(key: CheckKey, mode: str, check: Callable[[], str | None]) -> bool:
    """Whether the dispatcher may run the fast kernel of `key`. `check()` runs it against the chunked
    op and returns None when they agree, else the disagreement; it runs once per key (cached)."""
    check_mode(mode)
    if mode == "off":
        return True
    if key not in _verdicts:
        try:
            # outside any FLOP counter or other dispatch mode, and with autograd on even in inference mode
            with _disable_current_modes(), torch.inference_mode(False), torch.enable_grad():
                problem = check()
        except Exception as e:  # does not import, compile or run: the same as disagreeing
            first_line = (str(e).strip().splitlines() or [""])[0][:200]
            problem = f"failed to run ({type(e).__name__}: {first_line})"
        _verdicts[key] = problem
        if problem is not None and mode == "warn":
            warnings.warn(
                f"{key.describe()} failed its self-check against the chunked op: {problem}; "
                "using the chunked op instead (model.wkv_self_check: error stops, off skips the check)",
                SelfCheckWarning,
                stacklevel=2,
            )
    problem = _verdicts[key]
    if problem is not None and mode == "error":
        raise UserError(
            f"model.wkv_self_check: error: {key.describe()} failed its self-check against the chunked "
            f"op: {problem} (warn falls back to the chunked op, or choose model.wkv_backend: chunked)"
        )
    return problem is None


def compare(
    fast: Callable[..., Sequence[Tensor]],
    chunked: Callable[..., Sequence[Tensor]],
    inputs: Sequence[Tensor],
    input_names: Sequence[str],
    output_names: Sequence[str],
    tolerance: float,
) -> str | None:
    """Run both ops on copies of `inputs`, put a random weight on every output, and compare the
    outputs and the gradients of all inputs; None if every relative difference is within
    `tolerance`, else the first that is not ("dS0 differs by 3.1e-01 relative, tolerance 2e-02")."""
    results = [_run(op, inputs) for op in (fast, chunked)]
    (fast_out, fast_grads), (ref_out, ref_grads) = results
    pairs = [
        *zip(output_names, fast_out, ref_out, strict=True),
        *(("d" + n, a, b) for n, a, b in zip(input_names, fast_grads, ref_grads, strict=True)),
    ]
    for name, got, want in pairs:
        err = relative_difference(got, want)
        if not err <= tolerance:  # NaN included
            return f"{name} differs by {err:.1e} relative, tolerance {tolerance:.0e}"
    return None


def relative_difference(got: Tensor | None, want: Tensor | None) -> float:
    """max |got - want| / max |want| in float64 (inf for a missing or non-finite result)."""
    if got is None or want is None:
        return 0.0 if got is None and want is None else float("inf")
    got, want = got.detach().double(), want.detach().double()
    if got.shape != want.shape or not torch.isfinite(got).all():
        return float("inf")
    if want.numel() == 0:
        return 0.0
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def _run(op: Callable[..., Sequence[Tensor]], inputs: Sequence[Tensor]) -> tuple[list[Tensor], list]:
    """The op's outputs and the gradients of its inputs for a fixed random weighting of the outputs."""
    device = inputs[0].device
    with torch.enable_grad(), torch.autocast(device.type, enabled=False):
        xs = [x.detach().clone().requires_grad_() for x in inputs]
        outs = list(op(*xs))
        gen = torch.Generator().manual_seed(SEED + 1)
        weights = [torch.randn(o.shape, generator=gen).to(device) for o in outs]
        loss = sum((o.float() * w).sum() for o, w in zip(outs, weights, strict=True))
        grads = torch.autograd.grad(loss, xs, allow_unused=True)
    return [o.detach() for o in outs], list(grads)


def generator() -> torch.Generator:
    """A CPU generator seeded for the check's problem (draw on the CPU, then move to the device)."""
    return torch.Generator().manual_seed(SEED)
