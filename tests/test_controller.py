"""The controller: limits in one place, chunk scheduling, the first watchdog, over real ZeroMQ sockets."""

import json
import os
import signal
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
from runtime.controller.controller import Controller
from runtime.controller.limits import JointLimiter
from runtime.controller.safety import ARMING, ESTOP, HOLDING, IDLE, RUNNING, STOPPED, STOPPING
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

FAST = ["controller.chunk_timeout_s=0.2", "controller.hold_s=0.2", "controller.arm_ramp_s=0.05",
        "controller.stop_ramp_s=0.2", "controller.estop_ramp_s=0.05", "controller.hold_before_damp_s=0.1",
        "remote.hold_s=0.05"]


class Rig:
    """A Controller on the in-process simulated G1, with a real PUSH for chunks and a real SUB for state."""

    def __init__(self, tmp_path, *sets):
        self.cfg = load_config(None, [f"transport.chunks=ipc://{tmp_path}/chunks",
                                      f"transport.state=ipc://{tmp_path}/state",
                                      f"transport.control=ipc://{tmp_path}/control",
                                      f"controller.latch_file={tmp_path}/estop.latched", *FAST, *sets])
        self.ctx = zmq.Context()
        self.sim = SimulatedG1(mode=self.cfg["controller"]["mode"])
        self.controller = Controller(self.cfg, self.sim, self.ctx)
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.connect(self.cfg["transport"]["chunks"])
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(self.cfg["transport"]["state"])
        time.sleep(0.05)

    def run(self, seconds):
        end = time.monotonic() + seconds
        self.controller.run(lambda: time.monotonic() < end)

    def arm(self):
        self.controller.tick(time.monotonic())  # a fresh robot state, as inside the loop
        reply = self.controller._operator("arm", time.monotonic(), "test")
        assert reply.ok, reply.detail
        self.run(0.1)
        assert self.controller.sm.state == RUNNING

    def send(self, actions, step_s=0.02, stamp=None, session="test", seq=1, joints=ARM):
        c = _chunk(actions, time.monotonic() if stamp is None else stamp, step_s, joints, seq)
        c.session = session
        self.push.send(encode_chunk(c))

    def toward(self, delta, h=32):
        """A chunk from the commanded pose toward pose + delta, as a policy would send."""
        start = self.controller.q_cmd[ARM_IDX]
        return np.linspace(start, _arm_target(delta), h).astype(np.float32)

    def close(self):
        self.push.close()
        self.sub.close()
        self.controller.close()
        self.ctx.term()


@pytest.fixture
def rig(tmp_path):
    made = []

    def make(*sets):
        made.append(Rig(tmp_path, *sets))
        return made[-1]

    yield make
    for r in made:
        r.close()


def _arm_target(delta):
    return (g1.NOMINAL_POSE[ARM_IDX] + delta).astype(np.float32)


def test_idle_sends_nothing_and_ignores_chunks(rig):
    r = rig()
    r.send(r.toward(0.1))
    r.run(0.2)
    assert r.controller.sm.state == IDLE and r.sim.writes == 0
    assert r.controller.chunks_received == 1 and r.controller.chunks_ignored == 1 and r.controller.chunks_applied == 0


def test_chunk_is_executed_within_limits_after_arming(rig):
    r = rig()
    r.arm()
    start = r.controller.q_cmd.copy()
    for i in range(5):  # a fresh chunk every 0.1 s, as a runtime would send
        r.send(r.toward(0.4, 4), step_s=0.05, seq=i)
        r.run(0.1)
    assert r.controller.sm.state == RUNNING and r.controller.chunks_applied == 5
    assert np.allclose(r.controller.q_cmd[ARM_IDX], _arm_target(0.4), atol=0.05)
    assert np.array_equal(r.controller.q_cmd[:12], start[:12])  # legs held
    rep = r.controller.report()
    assert rep["limiter"]["max_step_rad"] <= r.controller.limiter.max_step + 1e-12
    assert r.sim.command.weight == 1.0


def test_arm_sdk_weight_ramps_in_and_out_and_never_jumps(rig):
    r = rig("controller.arm_ramp_s=0.2", "controller.stop_ramp_s=0.2")
    c = r.controller
    weights = []
    c._operator("arm", time.monotonic(), "test")
    end = time.monotonic() + 0.3
    while time.monotonic() < end:
        c.tick(time.monotonic())
        weights.append(r.sim.command.weight)
        time.sleep(0.002)
    assert weights[0] < 0.1 and weights[-1] == 1.0 and np.all(np.diff(weights) >= 0)
    assert np.diff(weights).max() <= 0.1  # time-based: only a late tick makes a step larger than period / ramp
    c._operator("stop", time.monotonic(), "test")
    out = []
    end = time.monotonic() + 0.4
    while time.monotonic() < end:
        c.tick(time.monotonic())
        out.append(r.sim.command.weight)
        time.sleep(0.002)
    assert c.sm.state == STOPPED and out[-1] == 0.0 and np.all(np.diff(out) <= 0)
    assert -np.diff([1.0] + out).max() <= c.period / 0.2 + 1e-9  # one tick never drops it by more than its share


def test_watchdog_holds_then_stops_and_the_stop_needs_a_person(rig):
    r = rig()
    r.arm()
    r.send(np.repeat(r.controller.q_cmd[ARM_IDX][None], 50, 0).astype(np.float32), 0.05)
    r.run(0.1)
    assert r.controller.sm.state == RUNNING
    r.run(0.25)
    assert r.controller.sm.state == HOLDING
    held = r.controller.q_cmd.copy()
    r.run(0.6)
    assert r.controller.sm.state == STOPPED
    assert np.abs(r.controller.q_cmd - held).max() < 1e-9  # holding and stopping never move the targets
    reasons = [s["reason"] for s in r.controller.report()["stops"]]
    assert "no chunk for 0.2 s" in reasons[0] and "did not resume" in reasons[1]
    r.send(r.toward(0.05))
    r.run(0.1)
    assert r.controller.sm.state == STOPPED and np.abs(r.controller.q_cmd - held).max() < 1e-9
    assert r.controller.chunks_ignored == 1


def test_chunk_running_out_holds_its_last_action(rig):
    r = rig()
    r.arm()
    r.send(np.repeat(r.controller.q_cmd[ARM_IDX][None], 4, 0).astype(np.float32), 0.02)
    r.run(0.15)
    assert r.controller.sm.state == HOLDING and r.controller.report()["stops"][0]["reason"] == "chunk ran out"


@pytest.mark.parametrize("make,reason", [
    (lambda r, now: b"\x00garbage", "malformed"),
    (lambda r, now: encode_chunk(_chunk(np.full((8, len(ARM)), np.nan, np.float32), now)), "non_finite"),
    (lambda r, now: encode_chunk(_chunk(np.zeros((8, 1), np.float32), now, joints=("tail",))), "unknown_joint"),
    (lambda r, now: encode_chunk(_chunk(np.zeros((8, 1), np.float32), now, joints=("left_knee",))),
     "joint_not_driven"),
    (lambda r, now: encode_chunk(_chunk(r.toward(0.0), now - 5.0)), "stale_chunk"),
    (lambda r, now: encode_chunk(_chunk(r.toward(0.0), now + 5.0)), "future_chunk"),
    (lambda r, now: encode_chunk(_chunk(np.full((8, len(ARM)), 3.5, np.float32), now)), "outside_limits"),
    (lambda r, now: encode_chunk(_chunk(np.repeat(_arm_target(0.5)[None], 8, 0), now)), "first_step_too_far"),
    (lambda r, now: b"\x80" * (2 << 20), None),  # over MAXMSGSIZE: ZeroMQ drops it
])
def test_bad_chunks_are_never_applied(rig, make, reason):
    r = rig()
    r.arm()
    before = r.controller.q_cmd.copy()
    r.push.send(make(r, time.monotonic()))
    r.run(0.1)
    assert r.controller.chunks_applied == 0
    assert np.array_equal(r.controller.q_cmd, before)
    if reason:
        assert r.controller.rejects.counts == {reason: 1}


def test_repeated_rejections_stop(rig):
    r = rig()
    r.arm()
    for i in range(3):
        r.send(np.repeat(_arm_target(0.6)[None], 8, 0), seq=i)
        r.run(0.03)
    assert r.controller.sm.state in (STOPPING, STOPPED)
    assert r.controller.report()["stops"][0]["reason"] == "3 chunks rejected in a row"


def test_a_new_runtime_session_stops_the_robot(rig):
    r = rig()
    r.arm()
    r.send(r.toward(0.0), session="first")
    r.run(0.05)
    r.send(r.toward(0.0), session="second")
    r.run(0.05)
    assert r.controller.sm.state in (STOPPING, STOPPED)
    assert r.controller.rejects.counts == {"new_session": 1}


def test_fault_heartbeat_holds(rig):
    r = rig()
    r.arm()
    r.send(np.repeat(r.controller.q_cmd[ARM_IDX][None], 50, 0).astype(np.float32), 0.05)
    r.run(0.05)
    r.push.send(encode_heartbeat(Heartbeat("test", 1, time.monotonic(), "fault", "camera frozen")))
    r.run(0.05)
    assert r.controller.sm.state == HOLDING and "camera frozen" in r.controller.report()["stops"][0]["reason"]


def test_lost_robot_state_stops_at_once(rig):
    r = rig("controller.state_timeout_s=0.05")
    r.arm()
    t0 = time.monotonic()
    r.sim.frozen = True
    r.run(0.2)
    stop = r.controller.report()["stops"][0]
    assert stop["to"] == STOPPING and "robot state is" in stop["reason"]
    assert stop["t"] - t0 <= 0.05 + 2 * r.controller.period + 0.01
    assert r.controller.sm.state == STOPPED  # the short, immediate stop (estop ramp) is over


@pytest.mark.parametrize("inject,words", [
    (lambda sim: sim.tilt(1.0), "tilt"),
    (lambda sim: setattr(sim, "temperature", 130.0), "C (limit"),
])
def test_robot_thresholds_stop(rig, inject, words):
    r = rig()
    r.arm()
    inject(r.sim)
    r.run(0.05)
    assert r.controller.sm.state in (STOPPING, STOPPED) and words in r.controller.report()["stops"][0]["reason"]


def test_joint_velocity_threshold_stops(rig):
    r = rig("controller.max_joint_velocity=0.5")
    r.arm()
    r.send(r.toward(0.25, 8), step_s=0.02)  # the limiter allows 2 rad/s: above this threshold
    r.run(0.2)
    assert "rad/s (limit 0.5)" in r.controller.report()["stops"][0]["reason"]


def test_missed_deadlines_stop(rig):
    r = rig("controller.max_missed_ticks=3")
    r.arm()
    r.controller._late_in_a_row = 3  # what run() counts when ticks come late
    r.controller.tick(time.monotonic())
    assert r.controller.sm.state == STOPPING and "late in a row" in r.controller.sm.reason


def test_lowcmd_stop_holds_then_damps_and_keeps_sending(rig):
    r = rig("controller.mode=lowcmd")
    r.arm()
    kp_running = r.sim.command.kp.copy()
    assert (kp_running == g1.DEFAULT_KP).all()
    r.controller._operator("stop", time.monotonic(), "test")
    r.run(0.05)
    assert r.controller.sm.state == STOPPING and (r.sim.command.kp == g1.DEFAULT_KP).all()  # holding first
    r.run(0.15)
    writes = r.sim.writes
    assert r.controller.sm.state == STOPPED
    assert (r.sim.command.kp == 0).all() and (r.sim.command.kd == 8.0).all()
    r.run(0.1)
    assert r.sim.writes > writes + 30  # damping is re-sent every tick


def test_estop_is_latched_across_a_restart_until_cleared(rig, tmp_path):
    r = rig()
    r.arm()
    reply = r.controller._operator("estop", time.monotonic(), "test")
    assert reply.ok and r.controller.sm.state == ESTOP
    assert (tmp_path / "estop.latched").exists()
    r.close()
    r2 = Rig(tmp_path)  # a restarted controller
    try:
        assert r2.controller.sm.state == ESTOP
        assert not r2.controller._operator("arm", time.monotonic(), "test").ok
        assert r2.controller._operator("clear_estop", time.monotonic(), "test").ok
        assert r2.controller.sm.state == STOPPED and not (tmp_path / "estop.latched").exists()
        r2.arm()
    finally:
        r2.close()


def test_remote_buttons_arm_estop_and_cycle_tasks(rig):
    r = rig("controller.tasks=[pick, place]")
    r.sim.press("L1", "A")
    r.run(0.15)
    assert r.controller.sm.state == RUNNING
    r.sim.press()
    r.run(0.02)
    r.sim.press("right")
    r.run(0.02)
    assert r.controller.report()["task"] == "place"
    r.sim.press("select")
    r.run(0.02)
    assert r.controller.sm.state == ESTOP
    r.sim.press("L1", "R1", "X")
    r.run(0.1)
    assert r.controller.sm.state == STOPPED


def test_operator_commands_over_the_control_socket(rig):
    from runtime.controller import operator

    r = rig()
    endpoint = r.cfg["transport"]["control"]
    import threading

    stop = threading.Event()
    t = threading.Thread(target=lambda: r.controller.run(lambda: not stop.is_set()))
    t.start()
    try:
        assert operator.send(endpoint, "status", "t", ctx=r.ctx).state == IDLE
        assert operator.send(endpoint, "clear_estop", "t", ctx=r.ctx).ok is False
        reply = operator.send(endpoint, "arm", "t", ctx=r.ctx)
        assert reply.ok and reply.state == ARMING
        time.sleep(0.1)
        assert operator.send(endpoint, "estop", "t", ctx=r.ctx).state == ESTOP
    finally:
        stop.set()
        t.join()
    assert "e-stop by t" in r.controller.sm.reason


def test_state_is_published_on_the_controller_clock(rig):
    r = rig()
    t0 = time.monotonic()
    r.run(0.1)
    state = decode(r.sub.recv(zmq.NOBLOCK), ("state",))
    assert state.joints_count == 29 and state.safety == IDLE and t0 <= state.stamp <= time.monotonic()
    assert state.task == "pick up the cup"


# -- the controller as its own process ------------------------------------------------------------------------------

def test_controller_process_arms_executes_chunks_and_stops_on_sigterm(tmp_path):
    from runtime.controller import operator

    report = tmp_path / "ctl.json"
    ready = tmp_path / "ready"
    sets = [f"transport.chunks=ipc://{tmp_path}/c", f"transport.state=ipc://{tmp_path}/s",
            f"transport.control=ipc://{tmp_path}/k", f"controller.latch_file={tmp_path}/latch",
            "controller.arm_ramp_s=0.1", "controller.stop_ramp_s=0.3"]
    cmd = [sys.executable, "-m", "runtime.cli", "controller", "--report", str(report), "--ready-file", str(ready)]
    cmd += [a for s in sets for a in ("--set", s)]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    ctx = zmq.Context()
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert operator.send(f"ipc://{tmp_path}/k", "arm", "test", ctx=ctx).ok
        time.sleep(0.2)
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(f"ipc://{tmp_path}/s")
        push = ctx.socket(zmq.PUSH)
        push.connect(f"ipc://{tmp_path}/c")
        assert sub.poll(5000), "no robot state from the controller process"
        for i in range(10):  # answer the controller's own state stamps, like the runtime does
            state = decode(sub.recv(), ("state",))
            here = state.q[ARM_IDX].astype(np.float32)
            actions = np.linspace(here, _arm_target(0.2), 20).astype(np.float32)
            push.send(encode_chunk(_chunk(actions, state.stamp, 0.02, seq=i)))
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        ctx.destroy(0)
    r = json.loads(report.read_text())
    assert r["chunks_applied"] >= 9 and r["rejected"] == {}
    assert r["state"] == STOPPED and r["safe"] is True
    assert [t["to"] for t in r["transitions"]][-2:] == [STOPPING, STOPPED]
    assert r["limiter"]["max_step_rad"] <= r["limiter"]["max_step_allowed_rad"]
    assert np.allclose(np.array(r["final_q"])[ARM_IDX], _arm_target(0.2), atol=0.05)
