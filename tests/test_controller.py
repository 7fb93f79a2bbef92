"""The controller: limits in one place, chunk scheduling, the first watchdog, over real ZeroMQ sockets."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from runtime.config import load_config
from runtime.controller.controller import HOLDING, RUNNING, STOPPED, WAITING, Controller
from runtime.controller.limits import JointLimiter
from runtime.controller.schedule import ChunkSchedule
from runtime.protocol import ActionChunk, Heartbeat, decode, encode_chunk, encode_heartbeat
from runtime.robot import g1
from runtime.robot.sim_g1 import SimulatedG1

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARM = g1.UPPER_BODY
ARM_IDX = g1.indices(ARM)


# -- limits ---------------------------------------------------------------------------------------------------------

any_float = st.floats(allow_nan=True, allow_infinity=True, width=64)


@given(hnp.arrays(np.float64, g1.NUM_JOINTS, elements=any_float), st.floats(0.01, 20.0), st.floats(0.0, 0.2))
def test_limiter_output_is_always_finite_in_limits_and_within_one_step(target, vmax, margin):
    lim = JointLimiter(500.0, vmax, margin)
    previous = np.clip(g1.NOMINAL_POSE.copy(), lim.lo, lim.hi)
    out = lim.apply(target.copy(), previous)
    assert np.isfinite(out).all()
    assert (out >= lim.lo - 1e-12).all() and (out <= lim.hi + 1e-12).all()
    assert np.abs(out - previous).max() <= lim.max_step + 1e-12


def test_limiter_passes_small_steps_unchanged_and_counts_clamps():
    lim = JointLimiter(500.0, 2.0, 0.05)
    prev = g1.NOMINAL_POSE.copy()
    t = prev + 0.001
    assert np.array_equal(lim.apply(t.copy(), prev), t) and lim.clamped_ticks == 0
    lim.apply(prev + 1.0, prev)
    assert lim.clamped_ticks == 1
    bad = prev.copy()
    bad[3] = np.nan
    out = lim.apply(bad, prev)
    assert out[3] == prev[3] and lim.non_finite_ticks == 1


# -- schedule -------------------------------------------------------------------------------------------------------

def _chunk(actions, obs_stamp, step_s=0.02, joints=ARM, seq=1):
    return ActionChunk("test", 0, seq, obs_stamp, obs_stamp, step_s, tuple(joints), np.asarray(actions, np.float32))


@given(st.integers(2, 64), st.floats(0.001, 0.5), st.floats(-1.0, 70.0))
def test_schedule_interpolates_on_the_controller_clock(h, step_s, f):
    actions = np.arange(h, dtype=np.float32)[:, None] * np.ones((1, len(ARM)), np.float32)
    s = ChunkSchedule()
    s.load(_chunk(actions, 100.0, step_s), ARM_IDX)
    out = np.zeros(g1.NUM_JOINTS)
    more = s.target_at(100.0 + f * step_s, out)
    expected = min(max(f, 0.0), h - 1)
    assert more == (f < h - 1)
    assert np.allclose(out[ARM_IDX], expected, atol=1e-6 * max(1.0, h))
    assert (out[:12] == 0).all()  # joints the chunk does not drive are untouched


# -- the controller over real sockets ---------------------------------------------------------------------------------

@pytest.fixture
def ctl(tmp_path):
    cfg = load_config(None, [f"transport.chunks=ipc://{tmp_path}/chunks", f"transport.state=ipc://{tmp_path}/state",
                             "controller.chunk_timeout_s=0.2", "controller.hold_s=0.2"])
    ctx = zmq.Context()
    controller = Controller(cfg, SimulatedG1(), ctx)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(cfg["transport"]["chunks"])
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(cfg["transport"]["state"])
    time.sleep(0.05)
    yield controller, push, sub
    push.close()
    sub.close()
    controller.close()
    ctx.term()


def _run_for(controller, seconds):
    end = time.monotonic() + seconds
    controller.run(lambda: time.monotonic() < end)


def _arm_target(delta):
    return (g1.NOMINAL_POSE[ARM_IDX] + delta).astype(np.float32)


def test_chunk_is_executed_within_limits(ctl):
    controller, push, _ = ctl
    target = _arm_target(0.4)
    start = controller.command.copy()
    for i in range(5):  # a fresh chunk every 0.1 s, as a runtime would send
        push.send(encode_chunk(_chunk(np.repeat(target[None], 32, 0), time.monotonic(), 0.05, seq=i)))
        _run_for(controller, 0.1)
    assert controller.state == RUNNING and controller.chunks_received == 5
    assert np.allclose(controller.command[ARM_IDX], target, atol=1e-4)
    assert np.array_equal(controller.command[:12], start[:12])  # legs held
    assert controller.report()["limiter"]["max_step_rad"] <= controller.limiter.max_step + 1e-12
    assert controller.limiter.clamped_ticks > 0  # a 0.4 rad jump had to be spread out


def test_watchdog_holds_then_stops_and_the_stop_is_latched(ctl):
    controller, push, _ = ctl
    push.send(encode_chunk(_chunk(np.repeat(_arm_target(0.1)[None], 50, 0), time.monotonic(), 0.05)))
    _run_for(controller, 0.1)
    assert controller.state == RUNNING
    _run_for(controller, 0.25)
    assert controller.state == HOLDING
    held = controller.command.copy()
    _run_for(controller, 0.3)
    assert controller.state == STOPPED
    assert np.abs(controller.command - held).max() < 1e-9  # holding never moves
    reasons = [s["reason"] for s in controller.stops]
    assert "no chunk for 0.2 s" in reasons[0] and "did not resume" in reasons[1]
    push.send(encode_chunk(_chunk(np.repeat(_arm_target(0.3)[None], 32, 0), time.monotonic())))
    _run_for(controller, 0.1)
    assert controller.state == STOPPED and np.abs(controller.command - held).max() < 1e-9
    assert controller.rejects.counts.get("stopped") == 1


def test_chunk_running_out_holds_its_last_action(ctl):
    controller, push, _ = ctl
    push.send(encode_chunk(_chunk(np.repeat(_arm_target(0.05)[None], 4, 0), time.monotonic(), 0.02)))
    _run_for(controller, 0.15)
    assert controller.state == HOLDING and controller.stops[0]["reason"] == "chunk ran out"


@pytest.mark.parametrize("make,reason", [
    (lambda now: b"\x00garbage", "malformed"),
    (lambda now: encode_chunk(_chunk(np.full((8, len(ARM)), np.nan, np.float32), now)), "non_finite"),
    (lambda now: encode_chunk(_chunk(np.zeros((8, 1), np.float32), now, joints=("tail",))), "unknown_joint"),
    (lambda now: encode_chunk(_chunk(np.zeros((8, len(ARM)), np.float32), now - 5.0)), "stale_chunk"),
    (lambda now: encode_chunk(_chunk(np.zeros((8, len(ARM)), np.float32), now + 5.0)), "future_chunk"),
    (lambda now: b"\x80" * (2 << 20), None),  # over MAXMSGSIZE: ZeroMQ drops the connection's message
])
def test_bad_messages_are_never_applied(ctl, make, reason):
    controller, push, _ = ctl
    before = controller.command.copy()
    push.send(make(time.monotonic()))
    _run_for(controller, 0.1)
    assert controller.state == WAITING and controller.chunks_received == 0
    assert np.array_equal(controller.command, before)
    if reason:
        assert controller.rejects.counts == {reason: 1}


def test_fault_heartbeat_holds(ctl):
    controller, push, _ = ctl
    push.send(encode_chunk(_chunk(np.repeat(_arm_target(0.0)[None], 50, 0), time.monotonic(), 0.05)))
    _run_for(controller, 0.05)
    push.send(encode_heartbeat(Heartbeat("test", 1, time.monotonic(), "fault", "camera frozen")))
    _run_for(controller, 0.05)
    assert controller.state == HOLDING and "camera frozen" in controller.stops[0]["reason"]


def test_state_is_published_on_the_controller_clock(ctl):
    controller, _, sub = ctl
    t0 = time.monotonic()
    _run_for(controller, 0.1)
    raw = sub.recv(zmq.NOBLOCK)
    state = decode(raw, ("state",))
    assert state.joints_count == 29 and state.safety == WAITING and t0 <= state.stamp <= time.monotonic()


# -- the controller as its own process ------------------------------------------------------------------------------

def test_controller_process_executes_chunks_and_ends_safe(tmp_path):
    report = tmp_path / "ctl.json"
    ready = tmp_path / "ready"
    sets = [f"transport.chunks=ipc://{tmp_path}/c", f"transport.state=ipc://{tmp_path}/s"]
    cmd = [sys.executable, "-m", "runtime.cli", "controller", "--report", str(report), "--ready-file", str(ready),
           "--seconds", "3"] + [a for s in sets for a in ("--set", s)]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    ctx = zmq.Context()
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(f"ipc://{tmp_path}/s")
        push = ctx.socket(zmq.PUSH)
        push.connect(f"ipc://{tmp_path}/c")
        assert sub.poll(5000), "no robot state from the controller process"
        for i in range(10):  # answer the controller's own state stamps, like the runtime does
            state = decode(sub.recv(), ("state",))
            push.send(encode_chunk(_chunk(np.repeat(_arm_target(0.2)[None], 20, 0), state.stamp, 0.02, seq=i)))
            time.sleep(0.1)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        ctx.destroy(0)
    r = json.loads(report.read_text())
    assert r["chunks_received"] == 10 and r["rejected"] == {}
    assert r["state"] == STOPPED and r["safe"] is True
    assert r["control_ticks"] > 1000
    assert r["limiter"]["max_step_rad"] <= r["limiter"]["max_step_allowed_rad"]
    assert np.allclose(np.array(r["final_q"])[ARM_IDX], _arm_target(0.2), atol=0.05)
