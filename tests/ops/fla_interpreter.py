"""Test harness only: fla's RWKV-7 chunk kernel on the CPU under Triton's interpreter.

fla 0.6.0's `chunk_rwkv7` runs under TRITON_INTERPRET=1 in float32 (bf16 is wrong there, float64
refused) after three patches, all to the interpreter or to fla's module globals, never to our code:

1. Triton's `Autotuner.prune_configs` keeps the first config: the interpreter cannot benchmark
   (no active driver), and one config is all a correctness test needs.
2. The interpreter's `ASTTransformer` gains a `visit_For` that makes each loop variable a tensor
   at the top of the loop body: fla's kernels call tensor methods on `range` variables, which the
   compiler gives as tensors and the interpreter as Python ints.
3. fla's module-level `gather = tl.gather` (bound into the kernel modules by `from ... import`) is
   replaced by a `triton.jit` wrapper, so that the interpreter calls it as a device function.

TRITON_INTERPRET must be set before triton itself is imported (triton.language's own helpers such
as `tl.cdiv` are decorated then, and fla's kernels call them) and so before lightning, which imports
triton: tests/conftest.py sets it first thing when there is no CUDA. `patched()` refuses to run if
triton or fla was imported without it.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Iterator

FLA_READY = importlib.util.find_spec("fla") is not None and importlib.util.find_spec("triton") is not None
"""Whether fla and triton are installed (the `test` extra installs both)."""

GATHER_MODULES = (
    "fla.ops.utils.op",
    "fla.ops.generalized_delta_rule.dplr.chunk_A_fwd",
    "fla.ops.generalized_delta_rule.dplr.chunk_A_bwd",
    "fla.ops.generalized_delta_rule.dplr.wy_fast_fwd",
)
"""fla's modules that hold `gather` as a global (each imported it from fla.ops.utils.op)."""

if FLA_READY:  # a module-level function: the interpreter rewrites it with this module's globals
    import triton
    import triton.language as tl

    @triton.jit
    def _gather(src, index, axis):
        return tl.gather(src, index, axis)


def _visit_for(self: ast.NodeTransformer, node: ast.For) -> ast.For:
    """`for i in ...: body` -> `for i in ...: i = interpreter_semantic.to_tensor(i, False); body`."""
    node = self.generic_visit(node)
    if isinstance(node.target, ast.Name):
        to_tensor = ast.Attribute(
            value=ast.Name(id="interpreter_semantic", ctx=ast.Load()), attr="to_tensor", ctx=ast.Load()
        )
        convert = ast.Assign(
            targets=[ast.Name(id=node.target.id, ctx=ast.Store())],
            value=ast.Call(
                func=to_tensor,
                args=[ast.Name(id=node.target.id, ctx=ast.Load()), ast.Constant(value=False)],
                keywords=[],
            ),
        )
        node.body = [convert, *node.body]
    return node


@contextlib.contextmanager
def patched() -> Iterator[None]:
    """Inside, fla's `chunk_rwkv7` runs on the CPU under the interpreter; everything is restored after."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("TRITON_INTERPRET=1 must be set before triton is imported (tests/conftest.py)")
    from triton.runtime import autotuner, interpreter

    saved_prune = autotuner.Autotuner.prune_configs
    had_visit_for = "visit_For" in vars(interpreter.ASTTransformer)
    saved_visit_for = vars(interpreter.ASTTransformer).get("visit_For")
    with warnings.catch_warnings():  # "Triton is not supported on current platform, roll back to CPU"
        warnings.simplefilter("ignore")
        modules = [importlib.import_module(name) for name in GATHER_MODULES]
    helpers = (tl.cdiv, sys.modules["fla.ops.utils.op"].exp2)
    if not all(isinstance(f, interpreter.InterpretedFunction) for f in helpers):
        raise RuntimeError("triton or fla was imported before TRITON_INTERPRET=1 was set (tests/conftest.py)")
    saved_gather = [m.gather for m in modules]

    autotuner.Autotuner.prune_configs = lambda self, kwargs: self.configs[:1]
    interpreter.ASTTransformer.visit_For = _visit_for
    for m in modules:
        m.gather = _gather
    try:
        yield
    finally:
        autotuner.Autotuner.prune_configs = saved_prune
        if had_visit_for:
            interpreter.ASTTransformer.visit_For = saved_visit_for
        else:
            del interpreter.ASTTransformer.visit_For
        for m, g in zip(modules, saved_gather, strict=True):
            m.gather = g
