"""Pacer: a loop on absolute deadlines, the one timing the controller's loop and the bench's reference loop share (so
the reference loop measures the machine exactly as the controller is paced).

A wake-up more than one period late is a missed tick and re-anchors the schedule (no burst of catch-up ticks); each
wake-up's lateness goes into ``period_error`` (ms).
"""

from __future__ import annotations

import time

from runtime.metrics import LatencyRecorder


class Pacer:
    def __init__(self, period_s: float) -> None:
        self.period = period_s
        self.period_error = LatencyRecorder()
        self.missed = 0
        self.late = False  # the last wake-up missed its tick
        self._next = time.monotonic()

    def start(self) -> None:
        """The first deadline is now."""
        self._next = time.monotonic()

    def reset(self) -> None:
        """Figures from here on (the loop's scheduling changed)."""
        self.period_error = LatencyRecorder()
        self.missed = 0

    def wait(self) -> float:
        """Sleep until the next deadline; the wake-up time (time.monotonic())."""
        now = time.monotonic()
        delay = self._next - now
        if delay > 0:
            time.sleep(delay)
            now = time.monotonic()
        error = now - self._next
        self.period_error.add(error * 1000.0)
        self.late = error > self.period
        if self.late:
            self.missed += 1
            self._next = now
        self._next += self.period
        return now
