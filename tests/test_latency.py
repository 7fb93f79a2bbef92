"""Inference latency: the running percentile, the inject_latency grammar, the trigger arithmetic, the stand-in."""

import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.policy.latency import (
    LatencyEstimate,
    LatencyInjectingPolicy,
    in_flight_needed,
    next_trigger_time,
    next_trigger_time_in_flight,
    nominal_max_latency,
    parse_latency,
    time_left,
)

finite = st.floats(min_value=0.0, max_value=10.0, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(window=st.integers(1, 20), pct=st.floats(0.0, 100.0), cold=st.integers(0, 5),
       samples=st.lists(finite, max_size=60))
def test_estimate_is_the_percentile_of_the_last_window_after_cold_runs(window, pct, cold, samples):
    est = LatencyEstimate(window, pct, cold)
    for k, x in enumerate(samples):
        est.add(x)
        counted = samples[cold:k + 1]
        if not counted:
            assert est.value is None
        else:
            assert est.value == float(np.percentile(np.array(counted[-window:]), pct))
            assert est.count == len(counted)


def test_estimate_none_before_any_sample_and_bad_arguments():
    assert LatencyEstimate(5, 95, 2).value is None
    for args in ((0, 95, 0), (5, 101, 0), (5, -1, 0), (5, 95, -1)):
        with pytest.raises(ValueError):
            LatencyEstimate(*args)


# -- the inject_latency grammar -------------------------------------------------------------------------------------

def test_empty_is_none():
    assert parse_latency("", 0.64) is None
    assert parse_latency("   ", 0.64) is None


@given(x=finite)
def test_seconds(x):
    s = parse_latency(repr(x), 0.64)
    assert s() == x and s() == x


@given(pct=st.floats(min_value=1e-6, max_value=1000.0), chunk=st.floats(min_value=1e-3, max_value=10.0))
def test_percent_of_a_chunk(pct, chunk):
    s = parse_latency(f" {pct!r} % ", chunk)
    assert s() == pct / 100.0 * chunk


def test_percent_examples():
    assert parse_latency("80%", 32 * 0.02)() == pytest.approx(0.512)
    assert parse_latency("1000%", 0.5)() == pytest.approx(5.0)


@given(a=finite, w=finite, seed=st.integers(0, 2**31 - 1))
def test_uniform_in_range_and_reproducible(a, w, seed):
    b = a + w
    s1, s2 = parse_latency(f"uniform({a!r}, {b!r})", 0.64, seed), parse_latency(f"uniform({a!r},{b!r})", 0.64, seed)
    xs = [s1() for _ in range(20)]
    assert xs == [s2() for _ in range(20)]
    assert all(a <= x <= b for x in xs)


@given(mu=finite, sigma=finite, seed=st.integers(0, 2**31 - 1))
def test_normal_clipped_at_zero_and_reproducible(mu, sigma, seed):
    s1, s2 = parse_latency(f"normal({mu!r},{sigma!r})", 0.64, seed), parse_latency(f"normal( {mu!r} , {sigma!r} )",
                                                                                       0.64, seed)
    xs = [s1() for _ in range(20)]
    assert xs == [s2() for _ in range(20)]
    assert all(x >= 0.0 and math.isfinite(x) for x in xs)
    ref = np.random.default_rng(seed)
    assert xs == [max(0.0, float(ref.normal(mu, sigma))) for _ in range(20)]


def test_normal_draws_spread():
    xs = np.array([parse_latency("normal(0.3,0.05)", 0.64, 7)() for _ in range(1)])
    s = parse_latency("normal(0.3,0.05)", 0.64, 7)
    xs = np.array([s() for _ in range(2000)])
    assert abs(xs.mean() - 0.3) < 0.01 and abs(xs.std() - 0.05) < 0.01


@pytest.mark.parametrize("text, why", [
    ("-0.1", ">= 0"), ("nan", "not understood"), ("inf", "not understood"), ("1e999", "finite"),
    ("0%", "(0, 1000]"), ("1000.5%", "(0, 1000]"), ("-5%", "(0, 1000]"), ("%", "not understood"),
    ("uniform(0.3,0.1)", "a <= b"), ("uniform(-0.1,0.1)", "0 <= a"), ("uniform(0.1)", "not understood"),
    ("normal(0.3,-1)", "sigma >= 0"), ("normal(-0.3,0.1)", "mu >= 0"), ("gamma(1,2)", "not understood"),
    ("0.3s", "not understood"), ("uniform(0.1,0.2", "not understood"), ("0x10", "not understood"),
])
def test_errors_name_the_key_and_the_text(text, why):
    with pytest.raises(ValueError) as err:
        parse_latency(text, 0.64)
    msg = str(err.value)
    assert msg.startswith("policy.inject_latency: ") and repr(text) in msg and why in msg


def test_percent_needs_a_chunk():
    with pytest.raises(ValueError, match="policy.inject_latency"):
        parse_latency("50%", 0.0)


# -- the trigger arithmetic -----------------------------------------------------------------------------------------

times = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False)
maybe = st.one_of(st.none(), finite)


@given(chunk_start=st.one_of(st.none(), times), horizon=st.integers(1, 200), step_s=st.floats(1e-4, 1.0),
       latency=maybe, margin=finite, last_start=st.one_of(st.none(), times), min_period=st.floats(0.0, 10.0),
       send_by=st.one_of(st.none(), times))
def test_next_trigger_time_exactly(chunk_start, horizon, step_s, latency, margin, last_start, min_period, send_by):
    t = next_trigger_time(chunk_start, horizon, step_s, latency, margin, last_start, min_period, send_by)
    due = -math.inf if chunk_start is None or latency is None else chunk_start + horizon * step_s - (latency + margin)
    if send_by is not None and latency is not None and chunk_start is not None:
        due = min(due, send_by - (latency + margin))
    floor = -math.inf if last_start is None else last_start + min_period
    assert t == max(due, floor)
    # the rule it implements: at t (and after) the time left is <= latency + margin and the rate limit is kept
    if math.isfinite(t):
        if chunk_start is not None and latency is not None:
            tol = 1e-9 * (1 + abs(t))
            left_ok = time_left(chunk_start, horizon, step_s, t) <= latency + margin + tol
            assert left_ok or (send_by is not None and send_by - t <= latency + margin + tol)
            assert next_trigger_time(chunk_start, horizon, step_s, latency, margin, None, 0.0, send_by) == due
        if last_start is not None:
            assert t - last_start >= min_period - 1e-9 * (1 + abs(t))


def test_next_trigger_time_examples():
    # a 0.64 s chunk from t=10, latency 0.1 + margin 0.05: due when 0.15 s are left
    assert next_trigger_time(10.0, 32, 0.02, 0.1, 0.05, 10.0, 0.2) == pytest.approx(10.49)
    # the rate limit wins when latency + margin exceed the chunk
    assert next_trigger_time(10.0, 32, 0.02, 0.6, 0.05, 10.0, 0.2) == pytest.approx(10.2)
    # no estimate yet: at once, subject to the rate limit; nothing before: at once
    assert next_trigger_time(10.0, 32, 0.02, None, 0.05, 10.0, 0.2) == pytest.approx(10.2)
    assert next_trigger_time(None, 32, 0.02, None, 0.05, None, 0.2) == -math.inf
    # the controller's chunk timeout comes first: due latency + margin before it
    assert next_trigger_time(10.0, 32, 0.02, 0.1, 0.05, 10.0, 0.2, send_by=10.5) == pytest.approx(10.35)


# -- several inferences in flight ----------------------------------------------------------------------------------

@given(coverage_end=st.one_of(st.none(), times), latency=maybe, margin=finite,
       last_start=st.one_of(st.none(), times), min_period=st.floats(0.0, 10.0),
       pending=st.lists(times, max_size=20).map(sorted), max_in_flight=st.integers(1, 16),
       send_by=st.one_of(st.none(), times))
def test_in_flight_trigger_exactly(coverage_end, latency, margin, last_start, min_period, pending, max_in_flight,
                                   send_by):
    t = next_trigger_time_in_flight(coverage_end, latency, margin, last_start, min_period, pending, max_in_flight,
                                    send_by)
    # nothing pending (or room left): exactly the one-at-a-time rule against the newest chunk's coverage
    if coverage_end is not None:
        one = next_trigger_time(coverage_end, 1, 0.0, latency, margin, last_start, min_period, send_by)
    else:
        one = next_trigger_time(None, 1, 0.0, latency, margin, last_start, min_period, send_by)
    if len(pending) < max_in_flight:
        assert t == one
    else:  # full: not before enough pending chunks are out to free a slot
        assert t == max(one, pending[len(pending) - max_in_flight])
        assert sum(1 for r in pending if r > t) < max_in_flight


def _simulate(chunk_s, latency, margin, min_period, max_in_flight, count):
    """The trigger driving a runtime whose chunks are released ``latency`` after their start (state received at the
    start): returns the starts and releases."""
    starts, releases = [], []
    now, last = 0.0, None
    while len(starts) < count:
        pending = sorted(r for r in releases if r > now)
        coverage_end = starts[-1] + chunk_s if starts else None
        t = next_trigger_time_in_flight(coverage_end, latency, margin, last, min_period, pending, max_in_flight)
        if t <= now:
            starts.append(now)
            releases.append(now + latency)
            last = now
        else:
            now = t
    return starts, releases


@settings(max_examples=300, deadline=None)
@given(chunk_s=st.floats(0.05, 5.0), frac=st.floats(0.0, 0.98), margin_frac=st.floats(0.0, 1.0),
       rate_frac=st.floats(0.0, 1.0), extra=st.integers(0, 3))
def test_in_flight_steady_state_leaves_no_gap(chunk_s, frac, margin_frac, rate_frac, extra):
    latency = frac * chunk_s
    margin = margin_frac * (chunk_s - latency) * 0.99  # leaves spacing > 0
    spacing = chunk_s - latency - margin
    min_period = rate_frac * spacing  # the rate limit never binds beyond the trigger's own spacing
    n = in_flight_needed(latency, chunk_s, margin, cap=10 ** 6) + extra
    if n > 200:
        return  # too many to simulate quickly; the arithmetic is the same
    starts, releases = _simulate(chunk_s, latency, margin, min_period, n, 3 * n + 10)
    tol = 1e-9 * (1.0 + chunk_s * len(starts))
    for k in range(1, len(starts)):
        assert releases[k] <= starts[k - 1] + chunk_s + tol  # arrives before the previous coverage ends
        assert starts[k] - starts[k - 1] >= min_period - tol
        assert sum(1 for r in releases[:k] if r > starts[k]) < n  # never more than n pending


def test_one_in_flight_above_half_a_chunk_leaves_a_gap():
    starts, releases = _simulate(0.64, 0.512, 0.05, 0.2, 1, 6)
    assert any(releases[k] > starts[k - 1] + 0.64 for k in range(1, 6))
    starts, releases = _simulate(0.64, 0.512, 0.05, 0.02, in_flight_needed(0.512, 0.64, 0.05), 40)
    assert all(releases[k] <= starts[k - 1] + 0.64 for k in range(1, 40))


def test_in_flight_needed_and_nominal_max_latency():
    assert in_flight_needed(0.512, 0.64, 0.05) == 8  # ceil(0.512 / 0.078) + 1
    assert in_flight_needed(0.01, 0.64, 0.05) == 2
    assert in_flight_needed(0.0, 0.64, 0.05) == 1
    assert in_flight_needed(0.63, 0.64, 0.05) == 16  # no spacing left: the cap
    assert in_flight_needed(0.6, 0.64, 0.0, cap=4) == 4
    assert nominal_max_latency("", 0.64) is None
    assert nominal_max_latency("80%", 0.64) == pytest.approx(0.512)
    assert nominal_max_latency("0.35", 0.64) == 0.35
    assert nominal_max_latency("uniform(0.1,0.3)", 0.64) == 0.3
    assert nominal_max_latency("normal(0.2,0.05)", 0.64) == pytest.approx(0.35)


# -- the stand-in ---------------------------------------------------------------------------------------------------

class _FakePolicy:
    manifest = "m"
    backend = "b"
    last_stage_ms = {"world": 1.0}
    last_preprocess_ms = 0.5

    def __init__(self):
        self.calls = []

    def infer(self, images, state):
        self.calls.append("infer")
        return np.zeros((2, 2), np.float32)

    def warmup(self, *args, **kwargs):
        self.calls.append("warmup")

    def describe(self):
        return "fake"

    def close(self):
        self.calls.append("close")


def test_injecting_policy_defers_without_sleeping():
    inner = _FakePolicy()
    p = LatencyInjectingPolicy(inner, parse_latency("0.2", 1.0))
    t0 = time.perf_counter()
    actions, delay = p.infer_deferred({}, np.zeros(3))
    assert time.perf_counter() - t0 < 0.1 and delay == 0.2 and p.last_injected_s == 0.2 and actions.shape[0] >= 1


def test_injecting_policy_sleeps_after_inference_and_delegates():
    inner = _FakePolicy()
    p = LatencyInjectingPolicy(inner, parse_latency("0.05", 0.64))
    t0 = time.perf_counter()
    p.warmup(3)
    assert time.perf_counter() - t0 < 0.04  # no injected latency during warm-up
    t0 = time.perf_counter()
    out = p.infer({}, np.zeros(2))
    assert time.perf_counter() - t0 >= 0.05 and out.shape == (2, 2)
    assert p.last_injected_s == 0.05
    assert p.manifest == "m" and p.backend == "b" and p.last_stage_ms == {"world": 1.0}
    assert p.last_preprocess_ms == 0.5
    assert p.describe() == "fake + injected latency 0.05"
    p.close()
    assert inner.calls == ["warmup", "infer", "close"]
