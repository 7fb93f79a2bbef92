"""ChunkOutbox: computed chunks held until their release time, handed out in release order.

One path for every chunk: the synchronous runtime submits with release = now and releases at once; in flight
(``policy.max_in_flight`` > 1) a chunk waits for the call's start + its injected latency. Slots are preallocated.
"""

from __future__ import annotations

from typing import List, Optional

import numpy as np


class ChunkOutbox:
    """``capacity`` preallocated slots; per slot the actions and what the chunk's message and statistics need."""

    def __init__(self, capacity: int, horizon: int, action_dim: int) -> None:
        self.capacity = capacity
        self.actions = np.zeros((capacity, horizon, action_dim), dtype=np.float32)
        self.start = [0.0] * capacity  # monotonic time the inference call started
        self.release_at = [0.0] * capacity
        self.state_stamp = [0.0] * capacity  # the controller's stamp of the state it answers
        self.state_at = [0.0] * capacity  # local receipt time of that state: the chunk's start on our clock
        self.frame_stamp = [0.0] * capacity
        self.own_ms = [0.0] * capacity  # the runtime's own time in the inference call
        self.model_ms = [0.0] * capacity  # the model's time: its stages + injected latency, as slept or held
        self.free: List[int] = list(range(capacity))
        self.pending: List[int] = []  # slots, in release order
        self.releases: List[float] = []  # their release times, same order
        self.most_pending = 0  # the most chunks pending at once

    def submit(self, actions: np.ndarray, start: float, release: float, state_stamp: float, state_at: float,
               frame_stamp: float, own_ms: float, model_ms: float) -> None:
        """Copy ``actions`` (the policy's buffer, overwritten by its next call) into a free slot; keep release order
        (a distribution may draw a later start an earlier release). The caller checks ``free`` first."""
        slot = self.free.pop()
        np.copyto(self.actions[slot], actions, casting="same_kind")
        self.start[slot], self.release_at[slot] = start, release
        self.state_stamp[slot], self.state_at[slot], self.frame_stamp[slot] = state_stamp, state_at, frame_stamp
        self.own_ms[slot], self.model_ms[slot] = own_ms, model_ms
        k = len(self.releases)
        while k > 0 and self.releases[k - 1] > release:
            k -= 1
        self.pending.insert(k, slot)
        self.releases.insert(k, release)
        self.most_pending = max(self.most_pending, len(self.pending))

    def pop_due(self, now: float) -> int:
        """The next slot due at ``now`` (its data stays valid until the next submit), or -1 when none is due."""
        if not self.releases or self.releases[0] > now:
            return -1
        slot = self.pending.pop(0)
        self.releases.pop(0)
        self.free.append(slot)
        return slot

    def next_release(self) -> Optional[float]:
        return self.releases[0] if self.releases else None

    def newest_pending_state_at(self) -> Optional[float]:
        """The chunk's start (on our clock) of the pending chunk whose inference started last; None when none."""
        best = -1
        for slot in self.pending:
            if best < 0 or self.start[slot] > self.start[best]:
                best = slot
        return None if best < 0 else self.state_at[best]

    def drop_all(self) -> int:
        """Let none of the pending chunks out (a fault, or stopping); returns how many were dropped."""
        n = len(self.pending)
        self.free.extend(self.pending)
        del self.pending[:]
        del self.releases[:]
        return n
