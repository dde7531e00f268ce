"""Where segmented BPTT keeps the input state of each segment between its forward and backward.

The state pass saves one state per segment; the reverse sweep takes them back last to first. They
are the one thing that grows with sample length (RWKV-7 1.5B: 12.4 MiB per sample and segment, so
3.2 GiB for a 1M-token sample in 4096-token segments), so `model.boundary_states` chooses:

- "device": they stay where the model runs (no copies).
- "cpu": each is copied to host memory (pinned when the model is on CUDA, asynchronously) as soon as
  it is saved, and brought back to the device one segment ahead of its backward: while segment i
  runs backward, segment i−1's state is already on its way. At most two boundary states are on the
  device at a time. Copies are exact, so results are bit-identical to "device".
"""

from __future__ import annotations

from typing import Literal

import torch

from rwkv_infctx.errors import UserError
from rwkv_infctx.state import RecurrentState

BoundaryPlace = Literal["device", "cpu"]
BOUNDARY_PLACES = ("device", "cpu")


def check_boundary_place(value: str) -> None:
    if value not in BOUNDARY_PLACES:
        raise UserError(f"model.boundary_states: {value!r} (expected one of {', '.join(BOUNDARY_PLACES)})")


class BoundaryStates:
    """A list of segment input states (None for segments that start fresh), stored per `place`."""

    def __init__(self, place: BoundaryPlace, device: torch.device) -> None:
        check_boundary_place(place)
        self.place, self.device = place, device
        self._host = place == "cpu"
        self._pin = self._host and device.type == "cuda"
        self._states: list[RecurrentState | None] = []
        self._ready: dict[int, RecurrentState] = {}
        self.nbytes = 0
        """Bytes of all saved states (wherever they are kept)."""

    def __len__(self) -> int:
        return len(self._states)

    def __getitem__(self, i: int) -> RecurrentState | None:
        """Segment i's state where it is kept (no copy; None once taken)."""
        return self._states[i]

    def append(self, state: RecurrentState | None) -> None:
        if state is not None:
            self.nbytes += state.nbytes
            if self._host:
                state = state.map(lambda t, f: self._to_host(t))
        self._states.append(state)

    def take(self, i: int) -> RecurrentState | None:
        """Segment i's input state on the device (its slot is released); prefetches segment i−1's."""
        state = self._ready.pop(i, None) or self._fetch(i)
        self._states[i] = None
        if i > 0 and self._host and i - 1 not in self._ready:
            prefetched = self._fetch(i - 1)
            if prefetched is not None:
                self._ready[i - 1] = prefetched
        return state

    def _fetch(self, i: int) -> RecurrentState | None:
        state = self._states[i]
        if state is None or not self._host:
            return state
        return state.map(lambda t, f: t.to(self.device, non_blocking=self._pin))

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "cpu" and not self._pin:
            return t.clone()  # same bytes, its own storage: what a copy to the host would give
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=self._pin)
        return host.copy_(t, non_blocking=self._pin)
