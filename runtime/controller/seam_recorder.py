"""Seam statistics and traces: what the commanded position does where one chunk hands over to the next.

The loop calls the recorder on each chunk load (a seam when a chunk was executing) and on each position command;
the report's "execution" section and `wam-edge bench`'s plots read it. Preallocated: nothing is allocated per tick.
docs/safety.md, "Seams between chunks", says what the figures mean.
"""

from __future__ import annotations

from typing import Any, Dict, List

import numpy as np

from runtime.metrics import LatencyRecorder
from runtime.protocol import ActionChunk
from runtime.robot import g1

#: Seam traces (report()["execution"]["seam_traces"]): the first this many seams after arming whose windows do not
#: overlap, the commanded position of SEAM_TRACE_JOINTS joints from SEAM_TRACE_BEFORE ticks before the seam to
#: SEAM_TRACE_AFTER ticks from it (the seam's tick first).
SEAM_TRACES = 3
SEAM_TRACE_JOINTS = 3
SEAM_TRACE_BEFORE = 50
SEAM_TRACE_AFTER = 100


class SeamRecorder:
    """Per run: the largest commanded step, and per seam window the step, acceleration, jerk and clamped ticks."""

    def __init__(self, rate_hz: float, seam: str, crossfade_s: float) -> None:
        self.rate_hz = rate_hz
        self.period = 1.0 / rate_hz
        self.seam = seam
        self.crossfade_s = crossfade_s
        self.max_step = 0.0  # the largest commanded step of the run (report()["limiter"])
        self.seams = 0
        self.seam_clamped_ticks = 0
        self._seam_until = -1.0
        self._seam_max_step = 0.0
        self._seam_max_accel = 0.0
        self._seam_max_jerk = 0.0
        self.chunk_age_ms = LatencyRecorder(10000)
        self._hist = [np.zeros(g1.NUM_JOINTS) for _ in range(3)]  # commanded positions 1, 2, 3 ticks ago
        self._hist_n = 0
        self._diff = np.zeros(g1.NUM_JOINTS)
        self._step = np.zeros(g1.NUM_JOINTS)
        # seam traces, preallocated: a ring of the last commanded positions, copied out at a seam, then filled
        self._ring = np.zeros((SEAM_TRACE_BEFORE, g1.NUM_JOINTS))
        self._ring_i = 0  # the next row to write
        self._ring_n = 0  # rows written since arming (capped at SEAM_TRACE_BEFORE)
        self._traces = np.full((SEAM_TRACES, SEAM_TRACE_BEFORE + SEAM_TRACE_AFTER, SEAM_TRACE_JOINTS), np.nan)
        self._trace_joints = np.zeros((SEAM_TRACES, SEAM_TRACE_JOINTS), dtype=np.intp)
        self._trace_meta = []  # per trace started: (seam number, tick of the seam, ticks before it)
        self._trace_len = np.zeros(SEAM_TRACES, dtype=np.int64)  # rows filled per trace
        self._trace_filling = -1  # the trace being filled, or -1

    def arm(self) -> None:
        """Seam traces start from this arming."""
        self._ring_n = 0

    def on_load(self, chunk: ActionChunk, joints: np.ndarray, now: float, ticks: int, seam: bool) -> None:
        """A chunk (for motor indices ``joints``) is loaded at controller tick ``ticks``; ``seam``: it takes over
        from one executing."""
        if seam:
            self.seams += 1
            self._seam_until = now + self._window(chunk)
            if self._trace_filling < 0 and len(self._trace_meta) < SEAM_TRACES:
                self._start_trace(chunk, joints, ticks)
        self.chunk_age_ms.add((now - chunk.obs_stamp) * 1000.0)

    def on_command(self, now: float, q: np.ndarray, previous: np.ndarray, clamped: bool) -> None:
        """A limited position command ``q`` after ``previous``; ``clamped``: the limiter acted on it."""
        np.subtract(q, previous, out=self._step)
        np.abs(self._step, out=self._step)
        step = float(self._step.max())
        if step > self.max_step:
            self.max_step = step
        if now <= self._seam_until:
            self._seam_tick(q, step, clamped)
        self._shift_history(q)
        if self._trace_filling >= 0 or len(self._trace_meta) < SEAM_TRACES:
            self._trace_tick(q)

    def on_release(self) -> None:
        """No position command this tick (idle, or damping): the differences start again."""
        self._hist_n = 0

    def report(self) -> Dict[str, Any]:
        return {
            "seams": self.seams,
            "seam_max_step_rad": round(self._seam_max_step, 6),
            "seam_max_accel_rad_s2": round(self._seam_max_accel, 3),
            "seam_max_jerk_rad_s3": round(self._seam_max_jerk, 1),
            "seam_clamped_ticks": self.seam_clamped_ticks,
            "chunk_age_ms": self.chunk_age_ms.summary(),
        }

    def _window(self, chunk: ActionChunk) -> float:
        """How long after a load the seam counters watch: crossfade_s for a crossfade, else 2 action steps."""
        if self.seam == "crossfade" and self.crossfade_s > 0.0:
            return self.crossfade_s
        return 2.0 * chunk.step_s

    def _seam_tick(self, q: np.ndarray, step: float, clamped: bool) -> None:
        """Within a seam window: the commanded step, and the second and third differences of the commanded position
        over the last ticks (per nominal period: rad/s^2 and rad/s^3)."""
        if clamped:
            self.seam_clamped_ticks += 1
        if step > self._seam_max_step:
            self._seam_max_step = step
        h1, h2, h3 = self._hist
        d = self._diff
        if self._hist_n >= 2:  # q - 2 h1 + h2
            np.subtract(q, h1, out=d)
            d -= h1
            d += h2
            np.abs(d, out=d)
            accel = float(d.max()) * self.rate_hz * self.rate_hz
            if accel > self._seam_max_accel:
                self._seam_max_accel = accel
        if self._hist_n >= 3:  # q - 3 h1 + 3 h2 - h3
            np.subtract(h2, h1, out=d)
            d *= 3.0
            d += q
            d -= h3
            np.abs(d, out=d)
            jerk = float(d.max()) * self.rate_hz ** 3
            if jerk > self._seam_max_jerk:
                self._seam_max_jerk = jerk

    def _start_trace(self, chunk: ActionChunk, idx: np.ndarray, ticks: int) -> None:
        """At a seam: the joints the new chunk moves most, and the ring's last ticks as the trace's start."""
        k = len(self._trace_meta)
        a = chunk.actions
        travel = np.abs(a[-1] - a[0]) if a.shape[0] > 1 else np.zeros(len(idx))
        order = np.argsort(-travel, kind="stable")[:SEAM_TRACE_JOINTS]
        joints = self._trace_joints[k]
        joints[:] = idx[order[0]] if len(order) else 0  # fewer driven joints than traced: repeat the first
        joints[:len(order)] = idx[order]
        n = min(self._ring_n, SEAM_TRACE_BEFORE)
        for i in range(n):  # oldest first
            np.take(self._ring[(self._ring_i - n + i) % SEAM_TRACE_BEFORE], joints, out=self._traces[k, i])
        self._trace_len[k] = n
        self._trace_meta.append((self.seams, ticks, n))
        self._trace_filling = k

    def _trace_tick(self, q: np.ndarray) -> None:
        """After the command is shaped: keep the ring of the last ticks, and fill the trace being filled."""
        np.copyto(self._ring[self._ring_i], q)
        self._ring_i = (self._ring_i + 1) % SEAM_TRACE_BEFORE
        if self._ring_n < SEAM_TRACE_BEFORE:
            self._ring_n += 1
        k = self._trace_filling
        if k >= 0:
            n = int(self._trace_len[k])
            np.take(q, self._trace_joints[k], out=self._traces[k, n])
            self._trace_len[k] = n + 1
            if n + 1 - self._trace_meta[k][2] >= SEAM_TRACE_AFTER:
                self._trace_filling = -1

    def traces(self) -> List[Dict[str, Any]]:
        """The seam traces for the report: per trace the joints, the seam (its number and the controller tick), t0_ms
        (the first row's time from the seam), period_ms, q per joint (one value per tick) and seam_index (the row of
        the seam's tick)."""
        period_ms = self.period * 1000.0
        out = []
        for k, (seam, tick, before) in enumerate(self._trace_meta):
            n = int(self._trace_len[k])
            out.append({
                "seam": seam, "tick": tick,
                "joints": [g1.JOINT_NAMES[int(j)] for j in self._trace_joints[k]],
                "t0_ms": round(-before * period_ms, 4), "period_ms": round(period_ms, 4), "seam_index": before,
                "q": [[round(float(v), 6) for v in self._traces[k, :n, j]] for j in range(SEAM_TRACE_JOINTS)],
            })
        return out

    def _shift_history(self, q: np.ndarray) -> None:
        h = self._hist
        h[0], h[1], h[2] = h[2], h[0], h[1]
        np.copyto(h[0], q)
        if self._hist_n < 3:
            self._hist_n += 1
