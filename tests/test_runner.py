"""The policy runtime: it answers only fresh frames and fresh robot state, on a regular schedule, over real sockets."""

import time

import numpy as np
import pytest
from conftest import publish_state, read_chunks

from runtime.metrics import HISTOGRAM_EDGES_MS, LatencyRecorder
from runtime.protocol import RobotState, decode, encode_state
from runtime.robot import g1


@pytest.fixture
def rig(runtime_rig):
    def make(*sets):
        rt, pull, pub, _ = runtime_rig(*sets)
        return rt, pull, pub

    return make


def test_answers_fresh_state_with_its_stamp(rig):
    rt, pull, pub = rig()
    publish_state(pub, rt, 123.25)
    rt.step(time.monotonic())
    chunks = read_chunks(pull)
    assert len(chunks) == 1
    c = chunks[0]
    assert c.obs_stamp == 123.25  # the controller's own stamp comes back
    assert c.joints == rt.policy.manifest.action_joints and c.actions.shape == (32, 17)
    assert np.isfinite(c.actions).all()


def test_one_inference_per_period_even_at_start(rig):
    rt, pull, pub = rig("policy.rate_hz=10", "policy.state_max_age_s=5")  # virtual time: no real-time jitter
    publish_state(pub, rt, 1.0)
    now = time.monotonic()
    for k in range(19):  # 19 steps within one 0.1 s period: one chunk, not a burst
        rt.step(now + k * 0.005)
    assert rt.stats.counters["chunks_sent"] == 1
    time.sleep(0.02)  # virtual time runs faster than ZeroMQ's I/O thread drains the 2-deep send queue
    rt.step(now + 0.11)
    assert rt.stats.counters["chunks_sent"] == 2, rt.stats.counters


def test_stale_state_is_not_answered(rig):
    rt, pull, pub = rig("policy.state_max_age_s=0.05")
    publish_state(pub, rt, 5.0)
    time.sleep(0.1)
    rt.step(time.monotonic())
    assert rt.stats.counters["skipped_stale_state"] == 1 and rt.stats.counters["chunks_sent"] == 0
    assert read_chunks(pull) == []


def test_no_state_no_chunk(rig):
    rt, pull, _ = rig()
    rt.step(time.monotonic())
    assert rt.stats.counters["skipped_no_state"] == 1 and read_chunks(pull) == []


def test_stale_frame_is_not_answered(rig):
    rt, pull, pub = rig("camera.fps=0.5", "policy.frame_max_age_s=0.05")
    time.sleep(0.1)
    publish_state(pub, rt, 2.0)
    rt.step(time.monotonic())
    assert rt.stats.counters["skipped_stale_frame"] == 1 and read_chunks(pull) == []


def test_malformed_state_is_dropped_and_counted(rig):
    rt, _, pub = rig()
    pub.send(b"\xc1not msgpack")
    time.sleep(0.05)
    rt._poll_state(time.monotonic())
    assert rt.robot_state is None and rt.rejects.counts == {"malformed": 1}


def _heartbeats(pull):
    out = []
    while pull.poll(50):
        msg = decode(pull.recv(), ("chunk", "heartbeat"))
        if not hasattr(msg, "actions"):
            out.append(msg)
    return out


def test_frozen_camera_is_a_fault_reported_at_once(rig):
    rt, pull, pub = rig("camera.fps=0.5", "policy.frame_fault_s=0.2", "policy.frame_max_age_s=0.05")
    publish_state(pub, rt, 2.0)
    time.sleep(0.3)
    now = time.monotonic()
    rt.step(now)
    hbs = _heartbeats(pull)
    assert rt.health == "fault" and "no fresh camera frame" in rt.detail
    assert hbs and hbs[-1].health == "fault" and "camera" in hbs[-1].detail
    assert rt.stats.counters["chunks_sent"] == 0


def test_inference_overrun_sends_no_chunk_and_reports_a_fault(rig):
    rt, pull, pub = rig("policy.max_inference_s=0.001")
    rt.policy.infer = lambda images, state, _real=rt.policy.infer: (time.sleep(0.005), _real(images, state))[1]
    publish_state(pub, rt, 3.0)
    rt.step(time.monotonic())
    msgs = _heartbeats(pull)
    assert rt.stats.counters["overruns"] == 1 and rt.stats.counters["chunks_sent"] == 0
    assert msgs[-1].health == "fault" and "inference took" in msgs[-1].detail


# -- when to infer: trigger = latency (the default) and fixed --------------------------------------------------------

def _run_recording(rt, pub, seconds):
    """Run the real loop for ``seconds`` with fresh robot state at 100 Hz; record, at each inference start, what the
    trigger saw: (now, chunk_start, estimate, last_start)."""
    import threading

    starts = []
    real = rt._infer_and_send

    def recording(now):
        seen = (now, rt.chunk_start, rt.latency.value, rt.last_infer_start)
        started = real(now)
        if started:
            starts.append(seen)
        return started

    rt._infer_and_send = recording
    stop = threading.Event()
    q = g1.NOMINAL_POSE.astype(np.float32)

    def publish():
        k = 0
        while not stop.is_set():
            k += 1
            pub.send(encode_state(RobotState(1, float(k), "running", q, np.zeros_like(q))))
            time.sleep(0.01)

    th = threading.Thread(target=publish, daemon=True)
    th.start()
    end = time.monotonic() + seconds
    try:
        rt.run(lambda: time.monotonic() < end)
    finally:
        stop.set()
        th.join()
    return starts


def test_latency_trigger_starts_when_the_time_left_reaches_the_estimate_plus_margin(rig):
    rt, pull, pub = rig("policy.inject_latency='0.05'", "controller.chunk_timeout_s=5", "policy.cold_runs=1")
    m = rt.policy.manifest
    chunk_s = m.horizon * m.step_s
    margin = rt.trigger_margin_s
    starts = _run_recording(rt, pub, 2.5)
    assert len(starts) >= 4
    judged = 0
    for now, chunk_start, est, _last in starts:
        if chunk_start is None or est is None:
            continue  # the first chunk, and before any estimate: at once
        left = chunk_start + chunk_s - now
        assert left <= est + margin + 1e-9  # never early
        assert left >= est + margin - 0.03  # and not late: the loop woke for it
        assert est >= 0.05
        judged += 1
    assert judged >= 2
    r = rt.report()
    assert r["trigger"] == "latency" and r["latency_estimate_ms"] >= 50.0
    assert r["inference_starts_left_ms"]["count"] == len(starts) - 1
    assert r["injected_latency_ms"]["count"] == len(starts) and r["injected_latency_ms"]["p50"] == 50.0
    assert "injected latency 0.05" in r["backend"]
    c = rt.stats.counters
    assert c["overruns"] == 0 and len(read_chunks(pull)) == c["chunks_sent"] == len(starts)


def test_injected_80_percent_spaces_chunks_by_the_trigger(rig):
    rt, pull, pub = rig("policy.inject_latency=80%", "controller.chunk_timeout_s=5", "policy.cold_runs=0")
    m = rt.policy.manifest
    chunk_s = m.horizon * m.step_s
    starts = _run_recording(rt, pub, 2.4)
    assert len(starts) >= 3
    # latency 0.8 * chunk + margin exceeds what is left after one inference: each starts as soon as the one
    # before is done, so chunk-to-chunk spacing is one inference (>= 0.8 * chunk), never less than the rate limit
    gaps = np.diff([s[0] for s in starts])
    assert (gaps >= 0.8 * chunk_s).all() and (gaps < 0.8 * chunk_s + 0.1).all()
    for now, chunk_start, est, _last in starts[1:]:
        assert chunk_start + chunk_s - now <= est + rt.trigger_margin_s
    r = rt.report()
    assert r["injected_latency_ms"]["p50"] == pytest.approx(800 * chunk_s)
    assert r["inference_starts_left_ms"]["max"] < (0.2 * chunk_s + 0.05) * 1000


def test_fixed_trigger_keeps_the_grid(rig):
    rt, pull, pub = rig("policy.trigger=fixed", "policy.rate_hz=10", "policy.state_max_age_s=5")  # virtual time
    publish_state(pub, rt, 1.0)
    now = time.monotonic()
    rt.step(now)
    assert rt.stats.counters["chunks_sent"] == 1 and rt.next_infer == pytest.approx(now + 0.1)
    rt.step(now + 0.05)
    assert rt.stats.counters["chunks_sent"] == 1
    time.sleep(0.02)  # virtual time runs faster than ZeroMQ's I/O thread drains the 2-deep send queue
    rt.step(now + 0.1)
    assert rt.stats.counters["chunks_sent"] == 2 and rt.next_infer == pytest.approx(now + 0.2), rt.stats.counters
    r = rt.report()
    assert r["trigger"] == "fixed" and "injected_latency_ms" not in r
    assert r["latency_estimate_ms"] is None  # cold runs (2) not counted yet
    assert r["inference_starts_left_ms"]["count"] == 1


def test_injected_latency_counts_toward_the_overrun_limit(rig):
    rt, pull, pub = rig("policy.inject_latency='0.05'", "policy.max_inference_s=0.03")
    publish_state(pub, rt, 4.0)
    rt.step(time.monotonic())
    assert rt.stats.counters["overruns"] == 1 and rt.stats.counters["chunks_sent"] == 0


# -- several inferences in flight (policy.max_in_flight) ------------------------------------------------------------

def test_in_flight_at_80_percent_sends_each_chunk_before_the_last_runs_out(rig):
    from runtime.policy.latency import in_flight_needed

    chunk_s = 0.64  # the reference model: 32 steps of 20 ms (checked below)
    n = in_flight_needed(0.8 * chunk_s, chunk_s, 0.05)
    rt, pull, pub = rig("policy.inject_latency=80%", f"policy.max_in_flight={n}", "policy.rate_hz=50",
                        "policy.max_inference_s=2", "controller.chunk_timeout_s=5")
    m = rt.policy.manifest
    assert m.horizon * m.step_s == pytest.approx(chunk_s) and rt.in_flight
    sent = []  # (state_at of the chunk, time it was sent), from the runner's own bookkeeping
    real = rt._release_due

    def recording(now):
        while rt.outbox.pending and rt.outbox.releases[0] <= now:  # one chunk at a time, to see each
            before = rt.stats.counters["chunks_sent"]
            real(rt.outbox.releases[0])
            if rt.stats.counters["chunks_sent"] > before:
                sent.append((rt.chunk_start, rt.last_sent_at))

    rt._release_due = recording
    starts = _run_recording(rt, pub, 3.0)
    # start-up: before the first latency is measured the trigger starts at once (at most n pending), so the first
    # chunks bunch up and leave a gap once; judged are the chunks started once an estimate existed
    t_est = min(now for now, _cs, est, _ls in starts if est is not None)
    judged = [(cs, at) for cs, at in sent if cs >= t_est]
    assert len(judged) >= 15  # one every ~0.07 s
    for (start_prev, _), (_, at) in zip(judged, judged[1:]):
        assert at < start_prev + chunk_s  # no gap: sent before the previous chunk's coverage ends
    r = rt.report()
    assert r["max_in_flight"] == n and 2 <= r["in_flight_max"] <= n
    assert r["latency_ms"]["inference"]["p50"] >= 0.8 * chunk_s * 1000 - 1
    assert r["latency_estimate_ms"] >= 0.8 * chunk_s * 1000 - 1
    assert rt.stats.counters["overruns"] == 0 and rt.stats.counters["faults"] == 0
    chunks = read_chunks(pull)
    assert len(chunks) == rt.stats.counters["chunks_sent"]
    assert [c.seq for c in chunks] == sorted(c.seq for c in chunks)
    assert np.diff([c.obs_stamp for c in chunks]).min() > 0  # in order: each answers newer state


def test_in_flight_fault_drops_pending_chunks(rig):
    rt, pull, pub = rig("policy.inject_latency=0.3", "policy.max_in_flight=4", "policy.rate_hz=50")
    publish_state(pub, rt, 1.0)
    now = time.monotonic()
    rt.step(now)
    assert len(rt.outbox.pending) == 1 and rt.stats.counters["chunks_sent"] == 0
    rt._fault(now, "test fault")
    assert rt.outbox.pending == [] and rt.stats.counters["chunks_dropped"] == 1
    rt.step(now + 0.35)  # its release time has passed: nothing goes out
    assert rt.stats.counters["chunks_sent"] == 0 and read_chunks(pull) == []
    publish_state(pub, rt, 2.0)
    rt.next_infer = 0.0
    rt.step(time.monotonic())
    assert len(rt.outbox.pending) == 1
    rt.stop()
    c = rt.stats.counters
    assert rt.outbox.pending == [] and c["chunks_dropped"] == 2 and c["chunks_sent"] == 0
    assert sorted(rt.outbox.free) == [0, 1, 2, 3]


def test_in_flight_overrun_is_never_sent(rig):
    rt, pull, pub = rig("policy.inject_latency=0.3", "policy.max_in_flight=4", "policy.max_inference_s=0.1")
    publish_state(pub, rt, 1.0)
    rt.step(time.monotonic())
    assert rt.stats.counters["overruns"] == 1 and rt.outbox.pending == [] and rt.health == "fault"


def test_latency_histogram_counts_the_stored_samples_over_fixed_log_bins():
    e = HISTOGRAM_EDGES_MS
    assert len(e) == 41 and e[0] == pytest.approx(0.1) and e[-1] == pytest.approx(10000.0)
    assert np.allclose(np.diff(np.log10(e)), 0.125)  # log-spaced: 8 bins per decade
    rec = LatencyRecorder(capacity=8)
    assert sum(rec.histogram()["counts"]) == 0 and rec.histogram()["samples"] == 0
    for v in (0.05, 0.1, 0.12, 1.0, 1.2, 50.0, 10000.0, 2e4):
        rec.add(v)
    h = rec.summary(histogram=True)["histogram"]
    assert h["samples"] == 8 and sum(h["counts"]) + h["below"] + h["above"] == 8
    assert h["below"] == 1 and h["above"] == 1
    assert h["counts"][0] == 2  # 0.1 (its left edge) and 0.12 (< 0.1334)
    assert h["counts"][8] == 2  # 1.0 and 1.2 in [1.0, 1.33)
    assert h["counts"][int(np.log10(50.0 / 0.1) * 8)] == 1 and h["counts"][-1] == 1  # 10 s: the last bin's edge
    rec.add(0.5)  # the ring holds the last 8: the oldest (0.05, below) goes
    h = rec.histogram([0.1, 1.0, 100.0])
    assert h["counts"] == [3, 3] and h["below"] == 0 and h["above"] == 2 and h["samples"] == 8
    assert "histogram" not in rec.summary()
