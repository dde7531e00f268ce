"""WKV-7 on the CPU as compiled C (`cpu_kernel.c`): the per-token recurrence, forward and backward.

Same op and conventions as `reference.py`. At the demo's sizes (2 heads of 64, 512-token segments)
the chunked op's batched GEMMs are small and its time goes to the many tensor ops around them; the
recurrence itself is ~5·N² multiply-adds per token and head, which vectorised C does in well under
a microsecond (`python bench/wkv7_cpu.py --kernel` gives the figures).

The C file is compiled at first use with the system's C compiler (`cc` on PATH) into a shared
library cached under `~/.cache/rwkv_infctx/kernels/` (XDG's cache folder), one per source, flags,
compiler and CPU; it takes under a second (`bench/wkv7_cpu.py --kernel --rebuild` times it). Where
no compiler works, `available()` is False with the reason in `unavailable_reason()`, and the
dispatcher uses the chunked op.
float32 only (bf16 inputs are widened; float64 goes to the chunked op, which computes in float64).

Memory: the forward saves the inputs and the state at the start of every CK-token chunk,
T/CK·N² numbers per head; the backward rebuilds one chunk's states at a time, per thread.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from rwkv_infctx.ops.self_check import CheckKey
from rwkv_infctx.ops.wkv4.chunked import _without_autocast
from rwkv_infctx.ops.wkv7.kernel_check import check_against_chunked

CK = 16
"""Tokens between the forward's saved states; the backward rebuilds one such chunk at a time."""

MAX_N = 1024
"""Largest head size the kernel takes (its per-thread buffers are (CK + 2)·N² floats)."""

_SOURCE = Path(__file__).with_name("cpu_kernel.c")
_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-shared", "-fPIC")
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_reason: str | None = None


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rwkv_infctx" / "kernels"


def _machine_tag() -> str:
    """What a -march=native build depends on: the CPU's model and flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return "\n".join([platform.machine(), platform.processor(), *lines])


def _build(cc: str, out: Path) -> None:
    """Compile the kernel into `out` (atomically: a temporary file, then a rename); with OpenMP when
    the compiler has it, else single-threaded."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        errors = []
        for extra in (["-fopenmp"], []):
            cmd = [cc, *_FLAGS, *extra, str(_SOURCE), "-o", tmp]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode == 0:
                os.replace(tmp, out)
                return
            errors.append((done.stderr.strip().splitlines() or ["no message"])[-1])
        raise OSError(f"{cc} failed: {errors[-1][:200]}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _compiler() -> str | None:
    return shutil.which("cc") or shutil.which("gcc")


def library_path() -> Path | None:
    """Where the compiled kernel for this source, flags, compiler and CPU is cached (whether or not
    it is built yet); None without a C compiler."""
    cc = _compiler()
    if cc is None:
        return None
    parts = [_SOURCE.read_bytes(), " ".join(_FLAGS).encode(), cc.encode(), _machine_tag().encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    return _cache_dir() / f"wkv7_cpu_{key}.so"


def _load() -> ctypes.CDLL | None:
    """The compiled kernel, built and cached on first call; None (reason kept) when it cannot be."""
    global _lib, _reason
    with _lock:
        if _lib is not None or _reason is not None:
            return _lib
        path = library_path()
        if path is None:
            _reason = "no C compiler (cc) on PATH"
            return None
        try:
            if not path.exists():
                _build(_compiler(), path)
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            _reason = f"could not build or load the C kernel: {e}"
            return None
        for name in ("wkv7_cpu_forward", "wkv7_cpu_backward"):
            getattr(lib, name).restype = ctypes.c_int
        _lib = lib
        return _lib


def available() -> bool:
    """Whether the compiled kernel can run here (it is built on the first call)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    """Why `available()` is False; None when it is True or has not been asked yet."""
    return _reason


def _ptr(t: Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


def _f32(x: Tensor) -> Tensor:
    return x.detach().to(torch.float32).contiguous()


def _call(name: str, B: int, T: int, H: int, N: int, tensors: list[Tensor | None]) -> None:
    lib = _load()
    if lib is None:
        raise RuntimeError(f"WKV-7 CPU kernel unavailable: {_reason}")
    threads = max(1, min(torch.get_num_threads(), B * H))  # one head per thread at most
    ints = [ctypes.c_int(x) for x in (B, T, H, N, CK, threads)]
    if getattr(lib, name)(*ints, *map(_ptr, tensors)) != 0:
        raise MemoryError(f"WKV-7 CPU kernel: {name} could not allocate its per-thread buffers")


class WKV7Cpu(torch.autograd.Function):
    """Autograd node for WKV-7 with state in and out, on the compiled kernel (float32)."""

    @staticmethod
    @_without_autocast
    def forward(ctx, r, w, k, v, a, b, state):
        B, T, H, N = r.shape
        lam = -_f32(w).exp()  # the log-decay; the kernel takes the decay d = e^λ
        xs = [_f32(x) for x in (r, k, v, a, b)]
        xs.insert(1, lam.exp())
        s0 = _f32(state)
        y = torch.empty((B, T, H, N), dtype=torch.float32)
        s_out = torch.empty((B, H, N, N), dtype=torch.float32)
        grad = any(ctx.needs_input_grad)
        ckpt = torch.empty((B, H, -(-T // CK), N, N), dtype=torch.float32) if grad else None
        if T > 0:
            _call("wkv7_cpu_forward", B, T, H, N, [*xs, s0, y, s_out, ckpt])
        else:
            s_out.copy_(s0)
        ctx.dtypes = [x.dtype for x in (r, w, k, v, a, b, state)]
        if grad:
            ctx.save_for_backward(*xs, lam, ckpt)
        return y.to(r.dtype), s_out

    @staticmethod
    @once_differentiable  # the saved chunk states are constants: no second derivatives
    @_without_autocast
    def backward(ctx, dy, ds_out):
        *xs, lam, ckpt = ctx.saved_tensors
        B, T, H, N = xs[0].shape
        dy = torch.zeros(B, T, H, N) if dy is None else _f32(dy)
        ds_out = torch.zeros(B, H, N, N) if ds_out is None else _f32(ds_out)
        grads = [torch.empty(B, T, H, N) for _ in range(6)]
        ds0 = torch.empty(B, H, N, N)
        if T > 0:
            _call("wkv7_cpu_backward", B, T, H, N, [*xs, ckpt, dy, ds_out, *grads, ds0])
        else:
            ds0.copy_(ds_out)
        grads[1].mul_(xs[1]).mul_(lam)  # dw = dd·d·λ, λ = -e^w
        return tuple(g.to(d) for g, d in zip([*grads, ds0], ctx.dtypes, strict=True))


def supports(r: Tensor, state: Tensor) -> bool:
    """Whether the kernel takes these inputs: CPU tensors, not float64, head size ≤ MAX_N."""
    return (
        r.device.type == "cpu"
        and state.device.type == "cpu"
        and torch.float64 not in (r.dtype, state.dtype)
        and r.shape[-1] <= MAX_N
    )


@torch.compiler.disable  # model.compile: the op stays eager (a graph break), its own backward kept
def wkv7_cpu(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor
) -> tuple[Tensor, Tensor]:
    """Same contract as `wkv7_reference` for float32/bf16 CPU inputs: y (B, T, H, N) in r's dtype
    and the final state (B, H, N, N) in float32."""
    from rwkv_infctx.ops.wkv7.chunked import _check_shapes

    _check_shapes(r, w, k, v, a, b, state)
    return WKV7Cpu.apply(r, w, k, v, a, b, state)


def self_check(key: CheckKey) -> str | None:
    """The C kernel against the chunked op (see `ops/self_check.py`)."""
    return check_against_chunked(wkv7_cpu, key)
