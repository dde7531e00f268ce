"""The one table of `python -m bench.gpu`: rows, the guard that turns any failure into a row, timing.

Every measurement returns `Row`s. `guarded` runs one measurement and, whatever it raises (an import
error, CUDA out of memory, a Triton compile error), returns a row that names the error instead: one
failure never stops the table. `render` prints the rows as one markdown table.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch

COLUMNS = ("part", "case", "status", "error vs reference", "time", "anchor (H200)", "MFU", "peak GiB", "note")


@dataclass
class Row:
    """One line of the table; empty cells stay empty."""

    part: str
    case: str
    status: str = "ok"
    error: str = ""
    time: str = ""
    anchor: str = ""
    mfu: str = ""
    peak: str = ""
    note: str = ""

    def cells(self) -> tuple[str, ...]:
        return (
            self.part,
            self.case,
            self.status,
            self.error,
            self.time,
            self.anchor,
            self.mfu,
            self.peak,
            self.note,
        )

    @property
    def failed(self) -> bool:
        return self.status.startswith(("FAIL", "ERROR"))


def render(rows: list[Row]) -> str:
    """The rows as one markdown table (pipes inside cells escaped)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(c.replace("|", "/") for c in row.cells()) + " |")
    return "\n".join(lines)


def short_error(e: BaseException) -> str:
    """One line for a cell (Triton compile errors run to pages); a short traceback goes to stderr."""
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__, limit=-4))
    print(tb[-1500:], file=sys.stderr, flush=True)
    first = (str(e).strip().splitlines() or [""])[0][:160]
    return f"{type(e).__name__}: {first}"


def guarded(part: str, case: str, fn: Callable[[], list[Row]], echo: bool = True) -> list[Row]:
    """fn()'s rows, or one row naming what it raised; device memory is released either way. Each row
    also goes to stderr as it is made, unless `echo` is off (progress, and what is left if the run
    is killed)."""
    try:
        rows = fn()
    except Exception as e:  # OOM, import, compile, kernel errors: a row, never an abort
        rows = [Row(part, case, status=f"ERROR {short_error(e)}")]
    finally:
        free_memory()
    if echo:
        print(render(rows).split("\n", 2)[2], file=sys.stderr, flush=True)
    return rows


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 2) -> float:
    """Median milliseconds of fn() over `reps` runs after `warmup` (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)
