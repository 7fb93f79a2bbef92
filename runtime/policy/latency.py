"""Inference latency: a running estimate for the latency-aware trigger, and injected latency for benchmarks.

``LatencyEstimate``  a running percentile of the last ``window`` inference latencies (the first ``cold_runs`` left
                     out); the policy runtime starts the next inference when the executing chunk's remaining actions
                     last no longer than this estimate plus a margin (``next_trigger_time``).
``parse_latency``    the ``policy.inject_latency`` grammar -> a sampler of seconds (or None for "").
``LatencyInjectingPolicy``  a benchmark/rig stand-in around a Policy that sleeps a drawn latency after each real
                     inference, so a fast machine can stand in for a slow one.
``next_trigger_time_in_flight``  the same rule with several chunks pending at once (``policy.max_in_flight``).

policy.inject_latency grammar (whitespace around tokens is ignored):

  ""                  no injected latency
  "0.35"              a constant, in seconds (>= 0)
  "80%"               a constant fraction of one chunk's duration (horizon * step_s); percent in (0, 1000]
  "uniform(a,b)"      uniform in [a, b] seconds, 0 <= a <= b
  "normal(mu,sigma)"  normal, mu >= 0 and sigma >= 0 seconds, each draw clipped at 0
Distributions draw from a numpy Generator seeded with policy.seed, so a run is reproducible.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

import numpy as np

from runtime.policy.wrapper import PolicyWrapper

#: a plain decimal number (no nan/inf, no hex): what the grammar accepts wherever it takes a number
_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_PERCENT_RE = re.compile(rf"^\s*({_NUMBER})\s*%\s*$")
_SECONDS_RE = re.compile(rf"^\s*({_NUMBER})\s*$")
_DIST_RE = re.compile(rf"^\s*(uniform|normal)\s*\(\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\)\s*$")


class LatencyEstimate:
    """The ``percentile`` of the last ``window`` latencies (seconds), the first ``cold_runs`` added left out.

    ``add`` is called once per inference and recomputes the percentile there (on a preallocated scratch copy, so
    the ring keeps its order); ``value`` is a read of the cached result: None before the first counted sample."""

    def __init__(self, window: int, percentile: float, cold_runs: int = 0) -> None:
        if window < 1:
            raise ValueError(f"latency window must be >= 1, got {window}")
        if not 0.0 <= percentile <= 100.0:
            raise ValueError(f"latency percentile must be in [0, 100], got {percentile}")
        if cold_runs < 0:
            raise ValueError(f"cold_runs must be >= 0, got {cold_runs}")
        self.window = int(window)
        self.percentile = float(percentile)
        self.cold_runs = int(cold_runs)
        self._buf = np.zeros(self.window, dtype=np.float64)
        self._scratch = np.zeros(self.window, dtype=np.float64)
        self._seen = 0  # every sample added, cold ones included
        self._n = 0  # samples counted (after the cold runs)
        self._value: Optional[float] = None

    @property
    def count(self) -> int:
        """Samples counted so far (cold runs not included)."""
        return self._n

    @property
    def value(self) -> Optional[float]:
        """The current percentile in seconds; None before any counted sample."""
        return self._value

    def add(self, seconds: float) -> None:
        self._seen += 1
        if self._seen <= self.cold_runs:
            return
        self._buf[self._n % self.window] = seconds
        self._n += 1
        k = min(self._n, self.window)
        scratch = self._scratch[:k]
        np.copyto(scratch, self._buf[:k])
        self._value = float(np.percentile(scratch, self.percentile, overwrite_input=True))


def next_trigger_time(chunk_start: Optional[float], horizon: int, step_s: float, latency: Optional[float],
                      margin: float, last_start: Optional[float], min_period: float,
                      send_by: Optional[float] = None) -> float:
    """When the next inference may start (trigger = latency); ``now >= next_trigger_time(...)`` means start now.

    The executing chunk began at ``chunk_start`` (the local receipt time of the state it answers) and lasts
    ``horizon * step_s``; the next inference is due when its time left, ``chunk_start + horizon * step_s - now``, is
    <= ``latency + margin``. With no chunk sent yet (``chunk_start`` None) or no estimate yet (``latency`` None) it
    is due at once. ``send_by`` (None: no such bound): the next chunk must be sent by then (the controller holds
    after ``controller.chunk_timeout_s`` without one), so it is also due when ``send_by - now <= latency + margin``.
    Never sooner than ``min_period`` after the last inference started (``last_start``; None: none yet).
    Returns -inf when due at once with nothing to wait for."""
    if chunk_start is None or latency is None:
        due = -math.inf
    else:
        due = chunk_start + horizon * step_s - (latency + margin)
        if send_by is not None:
            due = min(due, send_by - (latency + margin))
    if last_start is not None:
        due = max(due, last_start + min_period)
    return due


def next_trigger_time_in_flight(coverage_end: Optional[float], latency: Optional[float], margin: float,
                                last_start: Optional[float], min_period: float, pending_releases: Sequence[float],
                                max_in_flight: int, send_by: Optional[float] = None) -> float:
    """When the next inference may start with up to ``max_in_flight`` chunks pending at once (computed, held until
    their release time); ``now >= next_trigger_time_in_flight(...)`` means start now.

    The rule of ``next_trigger_time`` against the newest chunk *sent or pending*: it covers the robot until
    ``coverage_end`` (the local receipt time of the state it answers + the chunk's duration), and the next inference
    is due when ``coverage_end - now <= latency + margin`` (or ``send_by - now <= latency + margin``; ``send_by`` is
    the controller's chunk timeout after the newest release, sent or pending). At once with no chunk yet
    (``coverage_end`` None) or no estimate (``latency`` None). Never sooner than ``min_period`` after the last start.
    ``pending_releases``: the release times of the chunks pending now, sorted ascending; while ``max_in_flight`` or
    more are pending, not before enough of them have been released to free a slot. Returns -inf when due at once.
    With nothing pending it equals ``next_trigger_time`` with ``coverage_end = chunk_start + horizon * step_s``."""
    if coverage_end is None or latency is None:
        due = -math.inf
    else:
        due = coverage_end - (latency + margin)
        if send_by is not None:
            due = min(due, send_by - (latency + margin))
    if last_start is not None:
        due = max(due, last_start + min_period)
    n = len(pending_releases)
    if n >= max_in_flight:
        due = max(due, pending_releases[n - max_in_flight])
    return due


def in_flight_needed(latency: float, chunk_s: float, margin: float, cap: int = 16) -> int:
    """How many chunks must be allowed pending at once so that a constant ``latency`` leaves no gap:
    starts come every ``chunk_s - latency - margin`` (the trigger's steady state), so ``latency`` spans
    ``ceil(latency / spacing)`` of them; one more for the jitter. At least 1, at most ``cap`` (also when no spacing
    is left at all: then nothing covers the chunk)."""
    spacing = chunk_s - latency - margin
    if latency <= 0.0:
        return 1
    if spacing <= 0.0:
        return cap
    return max(1, min(cap, int(math.ceil(latency / spacing - 1e-9)) + 1))


def nominal_max_latency(text: str, chunk_s: float) -> Optional[float]:
    """The largest latency ``policy.inject_latency`` ``text`` will usually draw (seconds): the constant itself,
    ``b`` of uniform(a,b), ``mu + 3 sigma`` of normal(mu,sigma); None for "" (none). ValueError as parse_latency."""
    sampler = parse_latency(text, chunk_s)
    if sampler is None:
        return None
    m = _DIST_RE.match(text)
    if m:
        a, b = float(m.group(2)), float(m.group(3))
        return b if m.group(1) == "uniform" else a + 3.0 * b
    return sampler()


def time_left(chunk_start: float, horizon: int, step_s: float, now: float) -> float:
    """Seconds of the chunk that began at ``chunk_start`` still to run at ``now`` (negative: it has run out)."""
    return chunk_start + horizon * step_s - now


class LatencySampler:
    """Draws one injected latency in seconds per call. ``text`` is what it was parsed from."""

    def __init__(self, text: str, draw: Callable[[], float]) -> None:
        self.text = text
        self._draw = draw

    def __call__(self) -> float:
        return self._draw()

    def __repr__(self) -> str:
        return f"LatencySampler({self.text!r})"


def _err(text: str, why: str) -> ValueError:
    return ValueError(f"policy.inject_latency: {text!r}: {why} (forms: 0.35 | 80% | uniform(a,b) | normal(mu,sigma))")


def parse_latency(text: str, chunk_s: float, seed: int = 0) -> Optional[LatencySampler]:
    """``policy.inject_latency`` -> a sampler of seconds, or None for "" (no injected latency). ValueError names
    the text. ``chunk_s`` is one chunk's duration (horizon * step_s), the base of a percentage."""
    if not isinstance(text, str):
        raise _err(str(text), f"must be a string, got {type(text).__name__}")
    if text.strip() == "":
        return None
    m = _PERCENT_RE.match(text)
    if m:
        pct = float(m.group(1))
        if not 0.0 < pct <= 1000.0:
            raise _err(text, f"percent must be in (0, 1000], got {pct:g}")
        if not (math.isfinite(chunk_s) and chunk_s > 0):
            raise _err(text, f"a percentage needs a positive chunk duration, got {chunk_s!r}")
        value = pct / 100.0 * chunk_s
        return LatencySampler(text, lambda: value)
    m = _SECONDS_RE.match(text)
    if m:
        value = float(m.group(1))
        if not (math.isfinite(value) and value >= 0.0):
            raise _err(text, f"seconds must be finite and >= 0, got {value:g}")
        return LatencySampler(text, lambda: value)
    m = _DIST_RE.match(text)
    if m:
        kind, a, b = m.group(1), float(m.group(2)), float(m.group(3))
        if not (math.isfinite(a) and math.isfinite(b)):
            raise _err(text, "parameters must be finite")
        rng = np.random.default_rng(seed)
        if kind == "uniform":
            if a < 0.0 or b < a:
                raise _err(text, f"uniform(a,b) needs 0 <= a <= b seconds, got a={a:g}, b={b:g}")
            return LatencySampler(text, lambda: float(rng.uniform(a, b)))
        if a < 0.0 or b < 0.0:
            raise _err(text, f"normal(mu,sigma) needs mu >= 0 and sigma >= 0 seconds, got mu={a:g}, sigma={b:g}")
        return LatencySampler(text, lambda: max(0.0, float(rng.normal(a, b))))
    raise _err(text, "not understood")


class LatencyInjectingPolicy(PolicyWrapper):
    """Benchmark/rig stand-in around a Policy: each ``infer`` runs the real inference, then sleeps a drawn latency
    (so the caller sees real + injected). Warm-up runs are not delayed. Everything else is the Policy's."""

    def __init__(self, policy: Any, sampler: LatencySampler) -> None:
        super().__init__(policy)
        self.sampler = sampler
        #: the latency injected by the last ``infer`` (seconds)
        self.last_injected_s = 0.0
        #: how long the last ``infer`` really slept for it (seconds): the OS may wake it later than asked
        self.last_slept_s = 0.0

    def infer(self, images: Mapping[str, np.ndarray], state: np.ndarray) -> np.ndarray:
        actions, delay = self.infer_deferred(images, state)
        self.last_slept_s = 0.0
        if delay > 0.0:
            t0 = time.perf_counter()
            time.sleep(delay)
            self.last_slept_s = time.perf_counter() - t0
        return actions

    def infer_deferred(self, images: Mapping[str, np.ndarray], state: np.ndarray) -> Tuple[np.ndarray, float]:
        """The real inference and a drawn latency, without the sleep: for a caller that holds the answer itself
        (``policy.max_in_flight`` > 1) and releases it that long after the call started."""
        actions = self.policy.infer(images, state)
        delay = self.sampler()
        self.last_injected_s = delay
        return actions, delay

    def describe(self) -> str:
        return f"{self.policy.describe()} + injected latency {self.sampler.text}"
