"""Peak memory of this run, and what was measured.

- On a CUDA device: `torch.cuda.max_memory_allocated` (the caching allocator's peak of tensors).
- On the CPU: `VmHWM` of /proc/self/status, the peak resident set of this program. The kernel resets
  it when a program is executed, so a run started from a large parent process reports its own peak.
- Where /proc is absent (macOS): `ru_maxrss`, which Linux and macOS carry over from the parent
  across fork and exec; the figure may then be the parent's.

No torch import unless the device is a GPU (this module is also read by small helper processes).
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import Any

STATUS = Path("/proc/self/status")

SOURCES = {
    "cuda": "CUDA allocator peak",
    "vmhwm": "peak RSS of this process, VmHWM",
    "ru_maxrss": "ru_maxrss, may include the parent process's peak",
}
"""What each measure is, as the training summary names it."""


def peak_memory_mb(device: Any = None) -> tuple[float, str]:
    """(peak MiB, the key of `SOURCES` it comes from) for `device` (a torch.device; None: the CPU)."""
    if device is not None and getattr(device, "type", None) == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda"
    kib = vm_hwm_kib()
    if kib is not None:
        return kib / 1024, "vmhwm"
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / (2**20 if sys.platform == "darwin" else 1024), "ru_maxrss"  # bytes on macOS


def vm_hwm_kib(status: Path | None = None) -> int | None:
    """The VmHWM line of a /proc status file (default `STATUS`) in KiB, or None where there is none."""
    try:
        text = (status or STATUS).read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            fields = line.split()
            return int(fields[1]) if len(fields) >= 2 and fields[1].isdigit() else None
    return None
