"""Flow-matching schedule, computed once at load.

Convention (shared with tools/reference_model.reference_step):
x_t = t*noise + (1-t)*data, v = noise - data, t runs from 1 (noise) to 0 (data).
Base grid t_i = 1 - i/steps; shifted s(t) = shift*t / (1 + (shift-1)*t);
x <- x + (s(t_{i+1}) - s(t_i)) * v(x, s(t_i)). Distilled one-step models
(steps=1) and multi-step teachers (e.g. steps=10, shift=5) share this path.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np


def shift_time(t: np.ndarray, shift: float) -> np.ndarray:
    """Shifted flow time; shift > 1 spends more steps near the noise end."""
    return shift * t / (1.0 + (shift - 1.0) * t)


class FlowMatchingSchedule:
    """times[i]: flow time fed to the model at step i (float32, what it sees);
    deltas[i]: s(t_{i+1}) - s(t_i) (negative; they sum to -1)."""

    def __init__(self, steps: int, shift: float) -> None:
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError("sampler steps must be an integer >= 1, got %r" % (steps,))
        if not np.isfinite(shift) or shift <= 0.0:
            raise ValueError("sampler shift must be finite and > 0, got %r" % (shift,))
        self.steps = int(steps)
        self.shift = float(shift)
        grid = 1.0 - np.arange(self.steps + 1, dtype=np.float64) / self.steps
        s = shift_time(grid, self.shift)
        s[0], s[-1] = 1.0, 0.0  # exact ends whatever the rounding
        self.times = s[:-1].astype(np.float32)
        self.deltas: Tuple[float, ...] = tuple(float(d) for d in np.diff(s))

    def __repr__(self) -> str:
        return "FlowMatchingSchedule(steps=%d, shift=%g)" % (self.steps, self.shift)
