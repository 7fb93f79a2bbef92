"""Bounded, preallocated latency recording: percentiles at report time, nothing allocated per sample."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np


def log_edges(lo_ms: float = 0.1, hi_ms: float = 10000.0, bins: int = 40) -> np.ndarray:
    """``bins`` log-spaced bins from ``lo_ms`` to ``hi_ms``: ``bins + 1`` edges, rounded to 6 significant digits (the
    edges a report gives are exactly the ones counted with, and 0.1, 1, 10 ... are exact)."""
    return np.array([float(f"{v:.6g}") for v in np.logspace(np.log10(lo_ms), np.log10(hi_ms), bins + 1)])


#: The fixed bins of every latency histogram in a report: 0.1 ms .. 10 s, 40 bins (8 per decade).
HISTOGRAM_EDGES_MS = log_edges()


class LatencyRecorder:
    """The last ``capacity`` samples (milliseconds) in a ring; ``summary()`` gives p50/p99/max over them. With
    ``keyed``, each sample also keeps an integer key (a chunk's seq): two processes' samples of the same chunk can then
    be paired afterwards (``summary(keyed=True)``)."""

    def __init__(self, capacity: int = 100000, keyed: bool = False) -> None:
        self._buf = np.zeros(capacity, dtype=np.float64)
        self._keys = np.zeros(capacity, dtype=np.int64) if keyed else None
        self._n = 0

    def add(self, value_ms: float, key: int = 0) -> None:
        i = self._n % self._buf.shape[0]
        self._buf[i] = value_ms
        if self._keys is not None:
            self._keys[i] = key
        self._n += 1

    @property
    def count(self) -> int:
        return self._n

    def summary(self, histogram: bool = False, keyed: bool = False) -> Dict[str, Any]:
        """count/p50/p99/max; with ``histogram``, also ``histogram`` (see ``histogram()``); with ``keyed`` (a keyed
        recorder), also ``keyed``: {"key": [...], "ms": [...]}, the stored samples oldest first."""
        n = min(self._n, self._buf.shape[0])
        if n == 0:
            out: Dict[str, Any] = {"count": 0, "p50": None, "p99": None, "max": None}
        else:
            data = self._buf[:n]
            p50, p99 = np.percentile(data, [50, 99])
            out = {"count": self._n, "p50": round(float(p50), 4), "p99": round(float(p99), 4),
                   "max": round(float(data.max()), 4)}
        if histogram:
            out["histogram"] = self.histogram()
        if keyed and self._keys is not None:
            order = np.arange(self._n - n, self._n) % self._buf.shape[0]
            out["keyed"] = {"key": [int(k) for k in self._keys[order]],
                            "ms": [round(float(v), 4) for v in self._buf[order]]}
        return out

    def histogram(self, edges: Optional[Sequence[float]] = None) -> Dict[str, Any]:
        """Counts of the stored samples (the last ``capacity``) over fixed bins, computed now (report time, never per
        sample): ``counts[i]`` holds edges[i] <= v < edges[i + 1] (the last bin includes its right edge);
        ``below`` and ``above`` count samples outside the edges, so counts + below + above = samples."""
        e = HISTOGRAM_EDGES_MS if edges is None else np.asarray(edges, dtype=np.float64)
        n = min(self._n, self._buf.shape[0])
        data = self._buf[:n]
        counts, _ = np.histogram(data, bins=e)
        return {"edges_ms": [float(v) for v in e], "counts": [int(c) for c in counts],
                "below": int(np.count_nonzero(data < e[0])), "above": int(np.count_nonzero(data > e[-1])),
                "samples": int(n)}


def paired_difference(a: Dict[str, Any], b: Dict[str, Any]) -> LatencyRecorder:
    """Per key present in both ``keyed`` samples (LatencyRecorder.summary(keyed=True)["keyed"]), a's value minus
    b's: the samples of one chunk measured in two processes, subtracted chunk by chunk."""
    theirs = dict(zip(b.get("key", []), b.get("ms", [])))
    out = LatencyRecorder(max(len(a.get("key", [])), 1))
    for key, ms in zip(a.get("key", []), a.get("ms", [])):
        if key in theirs:
            out.add(ms - theirs[key])
    return out


def write_json(path: str, report: Dict[str, Any]) -> None:
    """Write atomically (a reader never sees half a report)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


class GapLog:
    """When a loop was late, and by how much: (time, gap) pairs above ``floor_s`` in a preallocated ring, so that a
    rig can ask afterwards whether one of its own processes was starved during a window (docs/hil.md, "When the rig
    itself starves"). ``turn(now)`` once per loop turn records the time since the previous turn; ``note(t, gap_s)``
    records a lateness measured otherwise. Times are time.monotonic(); nothing is allocated per call."""

    def __init__(self, floor_s: float, capacity: int = 4096) -> None:
        self.floor_s = floor_s
        self._t = np.zeros(capacity)
        self._gap = np.zeros(capacity)
        self._n = 0
        self._last: Optional[float] = None
        self.max_s = 0.0

    def turn(self, now: float) -> None:
        last, self._last = self._last, now
        if last is not None:
            self.note(now, now - last)

    def note(self, t: float, gap_s: float) -> None:
        if gap_s > self.max_s:
            self.max_s = gap_s
        if gap_s > self.floor_s:
            i = self._n % self._t.shape[0]
            self._t[i] = t
            self._gap[i] = gap_s
            self._n += 1

    def since(self, since: float) -> List[List[float]]:
        """[[t, gap_s], ...] of the recorded gaps that ended at or after ``since``, oldest first (JSON-safe)."""
        m = min(self._n, self._t.shape[0])
        order = np.arange(self._n - m, self._n) % self._t.shape[0]
        keep = order[self._t[order] >= since]
        return [[float(self._t[i]), float(self._gap[i])] for i in keep]


def worst_gap(gaps: Sequence[Sequence[float]], since: float, until: Optional[float] = None) -> Tuple[float, float]:
    """The longest of ``gaps`` ([[t_end, gap_s], ...], GapLog.since()) that overlaps [since, until]: (gap_s, t_end),
    or (0.0, since) when none does."""
    best = (0.0, since)
    for t, gap in gaps:
        if t >= since and (until is None or t - gap <= until) and gap > best[0]:
            best = (float(gap), float(t))
    return best
