"""Bounded, preallocated latency recording: percentiles at report time, nothing allocated per sample."""

from __future__ import annotations

import json
import os
from typing import Any, Dict

import numpy as np


class LatencyRecorder:
    """The last ``capacity`` samples (milliseconds) in a ring; ``summary()`` gives p50/p99/max over them."""

    def __init__(self, capacity: int = 100000) -> None:
        self._buf = np.zeros(capacity, dtype=np.float64)
        self._n = 0

    def add(self, value_ms: float) -> None:
        self._buf[self._n % self._buf.shape[0]] = value_ms
        self._n += 1

    @property
    def count(self) -> int:
        return self._n

    def summary(self) -> Dict[str, Any]:
        n = min(self._n, self._buf.shape[0])
        if n == 0:
            return {"count": 0, "p50": None, "p99": None, "max": None}
        data = self._buf[:n]
        p50, p99 = np.percentile(data, [50, 99])
        return {"count": self._n, "p50": round(float(p50), 4), "p99": round(float(p99), 4),
                "max": round(float(data.max()), 4)}


def write_json(path: str, report: Dict[str, Any]) -> None:
    """Write atomically (a reader never sees half a report)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
