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
from runtime.controller.limits import JointLimiter, Limits
from runtime.controller.record import SIZE, STATE_CODES, CommandRecord
from runtime.controller.safety import APPROACHING, ARMING, ESTOP, HOLDING, IDLE, RUNNING, STOPPED, STOPPING
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
    lim = JointLimiter(Limits(500.0, vmax, margin))
    previous = np.clip(g1.NOMINAL_POSE.copy(), lim.lo, lim.hi)
    out = lim.apply(target.copy(), previous)
    assert np.isfinite(out).all()
    assert (out >= lim.lo - 1e-12).all() and (out <= lim.hi + 1e-12).all()
    assert np.abs(out - previous).max() <= lim.max_step + 1e-12


def test_limiter_passes_small_steps_unchanged_and_counts_clamps():
    lim = JointLimiter(Limits(500.0, 2.0, 0.05))
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

    def __init__(self, tmp_path, *sets, sim=None):
        self.cfg = load_config(None, [f"transport.chunks=ipc://{tmp_path}/chunks",
                                      f"transport.state=ipc://{tmp_path}/state",
                                      f"transport.control=ipc://{tmp_path}/control",
                                      f"controller.latch_file={tmp_path}/estop.latched",
                                      f"controller.command_record={tmp_path}/controller.record", *FAST, *sets])
        self.ctx = zmq.Context()
        self.sim = sim or SimulatedG1(mode=self.cfg["controller"]["mode"])  # pass one on: the same robot
        self.closed = False
        self.controller = Controller(self.cfg, self.sim, self.ctx)
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.connect(self.cfg["transport"]["chunks"])
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(self.cfg["transport"]["state"])
        self.seq = 0
        time.sleep(0.05)

    def run(self, seconds):
        end = time.monotonic() + seconds
        self.controller.run(lambda: time.monotonic() < end)

    def run_until(self, done, seconds=3.0):
        """Run the loop until ``done()`` (a message arrived and was handled), at most ``seconds``: on a busy machine
        a message may take longer than a fixed short run to arrive."""
        end = time.monotonic() + seconds
        self.controller.run(lambda: not done() and time.monotonic() < end)

    def arm(self):
        self.controller.tick(time.monotonic())  # a fresh robot state, as inside the loop
        reply = self.controller._operator("arm", time.monotonic(), "test")
        assert reply.ok, reply.detail
        self.run(0.1)
        assert self.controller.sm.state == RUNNING

    def send(self, actions, step_s=0.02, stamp=None, session="test", seq=None, joints=ARM):
        """A chunk; ``seq`` by default the next of this rig's (a runtime's seq only grows). Returns its bytes."""
        if seq is None:
            self.seq += 1
            seq = self.seq
        c = _chunk(actions, time.monotonic() if stamp is None else stamp, step_s, joints, seq)
        c.session = session
        raw = encode_chunk(c)
        self.push.send(raw)
        return raw

    def heartbeat(self, session="test", health="ok", detail=""):
        self.push.send(encode_heartbeat(Heartbeat(session, 1, time.monotonic(), health, detail)))

    def toward(self, delta, h=32):
        """A chunk from the commanded pose toward pose + delta, as a policy would send."""
        start = self.controller.q_cmd[ARM_IDX]
        return np.linspace(start, _arm_target(delta), h).astype(np.float32)

    def close(self):
        if self.closed:
            return
        self.closed = True
        self.push.close()
        self.sub.close()
        self.controller.close()
        self.ctx.term()

    def crash(self):
        """What kill -9 leaves behind: the command record as the last tick wrote it (no final write), the robot on
        the last command it received."""
        c = self.controller
        c.record.close()
        c.record = None
        for sock in (c._inbox, c._state_pub, c._control, self.push, self.sub):
            sock.close(0)
        self.ctx.term()
        self.closed = True


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
    """Mid-run: a chunk holding the pose runs, then the bad one (first_step_too_far: max_first_step guards every
    chunk once one was applied; the first one after arming is approached instead, test_approach.py)."""
    r = rig()
    r.arm()
    r.send(np.repeat(r.controller.q_cmd[ARM_IDX][None], 50, 0).astype(np.float32), 0.05, seq=0)
    r.run_until(lambda: r.controller.chunks_applied)
    assert r.controller.chunks_applied == 1
    before = r.controller.q_cmd.copy()
    r.push.send(make(r, time.monotonic()))
    r.run(0.1)
    assert r.controller.chunks_applied == 1 and r.controller.sm.state == RUNNING
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


@pytest.mark.parametrize("health", ["stopping", "fault"])
def test_a_chunk_before_a_stopping_heartbeat_in_the_same_tick_does_not_resume_the_hold(rig, health):
    """The runtime's last chunk and its stopping heartbeat arrive together (SIGTERM during an inference): the hold
    stands; the chunk, older than the heartbeat, must not resume the run (found by `wam-edge hil`, restart_runtime)."""
    r = rig()
    r.arm()
    r.send(r.toward(0.0))
    r.run(0.05)
    r.send(r.toward(0.0))
    r.heartbeat(health=health, detail="runtime shutting down")
    time.sleep(0.1)  # both queued before the next tick reads them, in the order sent
    r.controller.tick(time.monotonic())
    assert r.controller.sm.state == HOLDING, r.controller.sm.describe()
    assert r.controller.report()["chunks_superseded_by_hold"] == 1
    r.run(0.05)
    assert r.controller.sm.state == HOLDING


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
        assert not (tmp_path / "estop.latched").exists()
        # the first controller was closed right after the e-stop, its weight (1) recorded: cleared, the robot is
        # stopping until the weight written is down to 0, then stopped
        assert r2.controller.sm.state == STOPPING
        out = _drive(r2.controller, 2.0, until=lambda o: o and o[-1][0] == STOPPED)
        assert out[-1][0] == STOPPED and out[-1][2] == 0.0
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
            f"controller.command_record={tmp_path}/record", "controller.arm_ramp_s=0.1", "controller.stop_ramp_s=0.3"]
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


# -- the command record: a controller killed while driving the robot ----------------------------------------------

def _write(rec, state, weight=1.0, q=None, kp=None, kd=None, immediate=False, stamp=1.0, ticks=7):
    q = g1.NOMINAL_POSE + 0.1 if q is None else q
    rec.write(STATE_CODES[state], immediate, weight, q, g1.DEFAULT_KP if kp is None else kp,
              g1.DEFAULT_KD if kd is None else kd, stamp, ticks)


def test_record_round_trip_and_the_newest_update_wins(tmp_path):
    path = str(tmp_path / "deep" / "er" / "controller.record")  # directories are made
    rec = CommandRecord(path, "arm_sdk")
    assert rec.read() is None  # a new file: nothing to take over
    _write(rec, RUNNING, 1.0, g1.NOMINAL_POSE + 0.05)
    q = g1.NOMINAL_POSE + np.linspace(-0.2, 0.2, g1.NUM_JOINTS)
    kp = g1.DEFAULT_KP * 0.5
    _write(rec, ARMING, 0.375, q, kp=kp, stamp=12.5, ticks=99)
    rec.close()
    assert os.path.getsize(path) == SIZE
    rec = CommandRecord(path, "arm_sdk")
    snap = rec.read()
    assert snap.state == ARMING and snap.mode == "arm_sdk" and snap.weight == 0.375 and snap.pid == os.getpid()
    assert np.array_equal(snap.q, q) and np.array_equal(snap.kp, kp) and np.array_equal(snap.kd, g1.DEFAULT_KD)
    assert snap.stamp == 12.5 and snap.ticks == 99 and not snap.immediate
    _write(rec, STOPPING, 0.25, immediate=True)  # a new writer numbers on from the previous one: it wins
    rec.close()
    rec = CommandRecord(path, "arm_sdk")
    snap = rec.read()
    assert snap.state == STOPPING and snap.weight == 0.25 and snap.immediate
    rec.close()


def test_one_writer_at_a_time(tmp_path):
    rec = CommandRecord(str(tmp_path / "r"), "lowcmd")
    try:
        with pytest.raises(OSError, match="another running controller"):
            CommandRecord(str(tmp_path / "r"), "lowcmd")
    finally:
        rec.close()
    CommandRecord(str(tmp_path / "r"), "lowcmd").close()  # released with the first


def _tear(path, slot):
    """A writer killed in the middle of an update of ``slot``: begin is stored, end is not."""
    from runtime.controller.record import HEADER_BYTES, SLOT

    m = np.memmap(path, SLOT, "r+", offset=HEADER_BYTES, shape=(2,))
    m["begin"][slot] = int(m["end"][slot]) + 2
    m.flush()
    del m


def test_a_torn_record_is_ignored_and_a_torn_newest_update_falls_back_to_the_one_before(tmp_path, caplog):
    path = str(tmp_path / "r")
    rec = CommandRecord(path, "arm_sdk")
    _write(rec, RUNNING, 1.0, g1.NOMINAL_POSE + 0.01)  # write 1: slot 1
    _write(rec, RUNNING, 1.0, g1.NOMINAL_POSE + 0.02)  # write 2: slot 0
    rec.close()
    _tear(path, 0)
    rec = CommandRecord(path, "arm_sdk")
    snap = rec.read()
    rec.close()
    assert np.array_equal(snap.q, g1.NOMINAL_POSE + 0.01) and "newest update was torn" in caplog.text
    _tear(path, 1)
    rec = CommandRecord(path, "arm_sdk")
    assert rec.read() is None and "torn" in caplog.text
    rec.close()


@pytest.mark.parametrize("mode,state,weight,taken", [
    ("arm_sdk", IDLE, 0.0, False),
    ("arm_sdk", STOPPED, 0.0, False),
    ("arm_sdk", ESTOP, 0.0, False),
    ("arm_sdk", ESTOP, 0.4, True),  # killed in the middle of the e-stop ramp: the robot is not released yet
    ("arm_sdk", STOPPED, 0.1, True),
    ("lowcmd", STOPPED, 0.0, False),  # damping: safe to be left on
    ("lowcmd", ESTOP, 0.0, False),
    ("lowcmd", HOLDING, 0.0, True),
    ("arm_sdk", STOPPING, 0.5, True),
])
def test_a_record_left_safe_is_ignored(tmp_path, mode, state, weight, taken):
    rec = CommandRecord(str(tmp_path / "r"), mode)
    _write(rec, state, weight)
    rec.close()
    rec = CommandRecord(str(tmp_path / "r"), mode)
    assert (rec.read() is not None) == taken
    rec.close()


def test_a_record_of_the_other_mode_or_invalid_is_ignored(tmp_path, caplog):
    rec = CommandRecord(str(tmp_path / "r"), "lowcmd")
    _write(rec, RUNNING, 0.0)
    rec.close()
    rec = CommandRecord(str(tmp_path / "r"), "arm_sdk")
    assert rec.read() is None and "lowcmd mode" in caplog.text
    _write(rec, RUNNING, 1.0, q=np.full(g1.NUM_JOINTS, np.nan))
    rec.close()
    rec = CommandRecord(str(tmp_path / "r"), "arm_sdk")
    assert rec.read() is None and "non-finite" in caplog.text
    rec.close()
    (tmp_path / "r").write_bytes(b"\x01" * SIZE)  # the right size, not a record
    rec = CommandRecord(str(tmp_path / "r"), "arm_sdk")
    assert rec.read() is None and "not a version 1 command record" in caplog.text
    rec.close()


def test_an_unusable_record_path_refuses_to_start(tmp_path):
    """A controller that could not record its commands would leave the next one blind: it does not start (issue 10:
    it used to log and run without one). tests/test_state_dirs.py covers the process and its exit status."""
    from runtime.service.paths import PathError

    (tmp_path / "a_file").write_text("")
    with pytest.raises(PathError, match="a_file is not a directory"):
        Rig(tmp_path, f"controller.command_record={tmp_path}/a_file/controller.record")


def test_every_tick_is_recorded_and_a_clean_exit_leaves_safe_behind(rig, tmp_path):
    r = rig()
    rec_path = str(tmp_path / "controller.record")
    r.arm()
    r.controller._operator("stop", time.monotonic(), "test")
    r.run(0.5)
    assert r.controller.sm.state == STOPPED
    ticks = r.controller.ticks
    r.close()
    rec = CommandRecord(rec_path, "arm_sdk")
    last = rec.last()
    assert last.state == STOPPED and last.weight == 0.0 and last.ticks == ticks and rec.read() is None
    rec.close()
    r2 = Rig(tmp_path)
    try:
        assert r2.controller.sm.state == IDLE and r2.controller.took_over is None
    finally:
        r2.close()


def _recorded(tmp_path, mode):
    rec = CommandRecord(str(tmp_path / "controller.record"), mode)
    try:
        return rec.read()
    finally:
        rec.close()


def _drive(c, seconds, until=None):
    """Tick on the real clock; every command written, as (state, q, weight, kp, kd)."""
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end and not (until and until(out)):
        c.tick(time.monotonic())
        cmd = c.driver.command
        out.append((c.sm.state, cmd.q.copy(), cmd.weight, cmd.kp.copy(), cmd.kd.copy()))
        time.sleep(0.002)
    return out


@pytest.mark.parametrize("when", ["running", "arming", "approaching"])
def test_arm_sdk_restart_after_a_crash_ramps_out_from_the_recorded_command(rig, tmp_path, caplog, when):
    r = rig(*(["controller.arm_ramp_s=0.2"] if when == "arming" else []))
    if when == "running":
        r.arm()
        for i in range(3):
            r.send(r.toward(0.3, 8), step_s=0.05, seq=i)
            r.run(0.1)
    elif when == "arming":
        r.controller._operator("arm", time.monotonic(), "test")
        _drive(r.controller, 0.1)
    else:  # the first chunk is far: the controller approaches it
        r.arm()
        r.send(np.repeat(_arm_target(0.45)[None], 8, 0), step_s=0.05)
        r.run(0.1)
    assert r.controller.sm.state == {"running": RUNNING, "arming": ARMING, "approaching": APPROACHING}[when]
    r.crash()
    prev = _recorded(tmp_path, "arm_sdk")
    assert prev is not None and prev.state == when
    assert np.array_equal(prev.q, r.controller.q_cmd) and prev.weight == r.sim.command.weight
    assert (prev.weight == 1.0) if when != "arming" else (0.2 < prev.weight < 0.9)
    r2 = Rig(tmp_path, *FAST, "controller.stop_ramp_s=0.3", sim=r.sim)  # a new controller on the same robot
    try:
        c = r2.controller
        assert c.sm.state == STOPPING
        reason = f"controller restarted while driving the robot (previous pid {os.getpid()}, state {when})"
        assert c.sm.reason == reason and reason in caplog.text
        assert [rec.levelname for rec in caplog.records if reason in rec.message] == ["WARNING"]
        out = _drive(c, 2.0, until=lambda o: o and o[-1][0] == STOPPED and o[-1][2] == 0.0)
        state, q, weight, _, _ = out[0]
        assert state == STOPPING and np.array_equal(q, prev.q)  # exactly where the robot was told to be
        assert prev.weight - c.period / 0.3 - 1e-12 <= weight < prev.weight  # one tick's share of the ramp
        weights = [o[2] for o in out]
        assert np.all(np.diff(weights) <= 0) and weights[-1] == 0.0
        assert -np.diff([prev.weight] + weights).max() <= c.period / 0.3 + 1e-12
        qs = np.array([o[1] for o in out])
        assert np.abs(np.diff(np.vstack([prev.q, qs]), axis=0)).max() <= c.limiter.max_step + 1e-12
        assert out[-1][0] == STOPPED
        rep = c.report()
        assert rep["stops"][0]["reason"] == reason and rep["took_over"]["state"] == when
        # nothing moves again until a person arms
        held = c.q_cmd.copy()
        r2.send(r2.toward(0.1))
        r2.run(0.2)
        assert c.sm.state == STOPPED and np.array_equal(c.q_cmd, held) and c.chunks_ignored == 1
        assert r2.sim.command.weight == 0.0
        r2.arm()
    finally:
        r2.close()


def test_lowcmd_restart_after_a_crash_holds_at_the_recorded_gains_then_damps(rig, tmp_path):
    r = rig("controller.mode=lowcmd", "controller.arm_ramp_s=0.4")
    r.controller._operator("arm", time.monotonic(), "test")
    _drive(r.controller, 0.2)  # killed in the middle of arming: the gains are part way up
    r.crash()
    prev = _recorded(tmp_path, "lowcmd")
    assert prev.state == ARMING and 0.2 < prev.kp.max() / g1.DEFAULT_KP.max() < 0.9
    r2 = Rig(tmp_path, "controller.mode=lowcmd", "controller.hold_before_damp_s=0.2", sim=r.sim)
    try:
        c = r2.controller
        assert c.sm.state == STOPPING and "previous pid" in c.sm.reason
        t0 = c.sm.since
        out = _drive(c, 1.0, until=lambda o: len(o) > 20 and o[-20][0] == STOPPED)
        assert np.array_equal(out[0][1], prev.q)
        holding = [o for o in out if o[0] == STOPPING]
        assert holding and c.report()["transitions"][-1]["t"] - t0 >= 0.2
        for _, q, _, kp, kd in holding:  # the recorded targets at the recorded gains: no step on the wire
            assert np.array_equal(q, prev.q) and np.array_equal(kp, prev.kp) and np.array_equal(kd, prev.kd)
        damping = [o for o in out if o[0] == STOPPED]
        assert all((o[3] == 0).all() and (o[4] == 8.0).all() for o in damping)
        assert r2.sim.writes >= len(out)  # re-sent every tick
        r2.send(np.repeat(c.q_cmd[ARM_IDX][None], 8, 0).astype(np.float32))
        r2.run(0.1)
        assert c.sm.state == STOPPED and c.chunks_applied == 0 and (r2.sim.command.kp == 0).all()
    finally:
        r2.close()


@pytest.mark.parametrize("mode", ["arm_sdk", "lowcmd"])
def test_a_latched_estop_wins_over_the_record(rig, tmp_path, mode):
    r = rig(f"controller.mode={mode}")
    r.arm()
    r.crash()
    prev = _recorded(tmp_path, mode)
    assert prev.state == RUNNING
    (tmp_path / "estop.latched").write_text("latched by hand\n")
    r2 = Rig(tmp_path, f"controller.mode={mode}", sim=r.sim)
    try:
        c = r2.controller
        assert c.sm.state == ESTOP and "latched" in c.sm.reason
        out = _drive(c, 0.3)
        assert all(o[0] == ESTOP for o in out)
        if mode == "arm_sdk":  # released from the recorded weight at the e-stop ramp, never at once
            weights = [o[2] for o in out]
            assert np.array_equal(out[0][1], prev.q) and 1.0 - weights[0] <= c.period / 0.05 + 1e-12
            assert np.all(np.diff(weights) <= 0) and weights[-1] == 0.0
        else:  # damping at once
            assert (out[0][3] == 0).all() and (out[0][4] == 8.0).all()
        assert not c._operator("arm", time.monotonic(), "test").ok
    finally:
        r2.close()


def test_a_taken_over_controller_commands_nothing_until_the_robot_state_arrives(rig, tmp_path):
    r = rig("controller.mode=lowcmd")
    r.arm()
    r.crash()
    prev = _recorded(tmp_path, "lowcmd")
    r.sim.frozen = True  # no robot state yet for the new controller (DDS discovery, a robot still booting)
    r2 = Rig(tmp_path, "controller.mode=lowcmd", "controller.hold_before_damp_s=0.3", sim=r.sim)
    try:
        c = r2.controller
        writes = r2.sim.writes
        out = _drive(c, 0.15)
        assert r2.sim.writes == writes  # the robot stays on its last command, as with no controller at all
        assert all(o[0] == STOPPING for o in out) and not c.sm.immediate  # no state yet is not stale state
        r2.sim.frozen = False
        t_state = time.monotonic()
        out = _drive(c, 0.15)
        assert r2.sim.writes > writes and np.array_equal(out[0][1], prev.q)
        assert all(o[0] == STOPPING for o in out) and c.sm.since >= t_state  # the hold counts from the state
        r2.sim.frozen = True  # and state that stops after it came: damping at once
        time.sleep(0.15)
        now = time.monotonic()
        c.tick(now)
        assert c.sm.state == STOPPED and c.sm.immediate
        assert (r2.sim.command.kp == 0).all() and (r2.sim.command.kd == 8.0).all()
        assert "escalated to an immediate stop" in c.sm.transitions()[-2]["reason"]
        assert c.sm.describe().startswith("stop complete (cause: ")  # a stall or the stale state
    finally:
        r2.close()


@pytest.mark.parametrize("mode", ["arm_sdk", "lowcmd"])
def test_a_robot_far_from_the_recorded_command_is_released_at_once(rig, tmp_path, mode):
    r = rig(f"controller.mode={mode}")
    r.arm()
    r.crash()
    r.sim.command.q[ARM_IDX] += 0.5  # since the crash another program commanded the robot elsewhere
    r.sim.read(time.monotonic() + 1.0)  # and it went there
    r2 = Rig(tmp_path, f"controller.mode={mode}", "controller.hold_before_damp_s=5", sim=r.sim)
    try:
        c = r2.controller
        c.tick(time.monotonic())
        cmd = r2.sim.command
        if mode == "arm_sdk":  # no jump back to the recorded pose at full weight: released at once
            assert cmd.weight == 0.0 and c.sm.state == STOPPING
        else:  # damping at once
            assert c.sm.immediate and (cmd.kp == 0).all()
        if mode == "lowcmd":
            assert "from its recorded command" in c.sm.describe()
    finally:
        r2.close()


# -- a stalled control loop -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["arm_sdk", "lowcmd"])
def test_a_stalled_loop_stops_the_robot_at_once(rig, mode):
    r = rig(f"controller.mode={mode}", "controller.chunk_timeout_s=5", "controller.heartbeat_timeout_s=5")
    r.arm()
    c = r.controller
    t = time.monotonic()
    c.tick(t)
    c.tick(t + 0.09)  # late, under the gap: nothing
    assert c.sm.state == RUNNING
    c.tick(t + 0.09 + 0.3125)  # the process was paused
    stop = c.report()["stops"][0]
    assert stop["from"] == RUNNING and stop["to"] == STOPPING and c.sm.immediate
    assert stop["reason"] == "control loop stalled for 312 ms (limit 250 ms)"
    if mode == "lowcmd":  # damping at that tick
        assert c.sm.state == STOPPED and (r.sim.command.kp == 0).all() and (r.sim.command.kd == 8.0).all()
    else:  # the e-stop ramp from that tick
        assert c.sm.state == STOPPING and r.sim.command.weight == 1.0 - c.period / 0.05


def test_a_wait_before_the_loop_starts_is_no_stall(rig):
    r = rig("controller.chunk_timeout_s=5", "controller.heartbeat_timeout_s=5", "controller.max_tick_gap_s=0.05")
    r.arm()
    time.sleep(0.2)
    r.run(0.05)
    assert r.controller.sm.state == RUNNING


# -- the controller killed as a process --------------------------------------------------------------------------------

def _start_controller(tmp_path, name, *extra):
    ready = tmp_path / f"{name}.ready"
    sets = [f"transport.chunks=ipc://{tmp_path}/c", f"transport.state=ipc://{tmp_path}/s",
            f"transport.control=ipc://{tmp_path}/k", f"controller.latch_file={tmp_path}/latch",
            f"controller.command_record={tmp_path}/record", "controller.arm_ramp_s=0.1",
            "controller.chunk_timeout_s=10", "controller.heartbeat_timeout_s=10", *extra]
    cmd = [sys.executable, "-m", "runtime.cli", "controller", "--report", str(tmp_path / f"{name}.json"),
           "--ready-file", str(ready)] + [a for s in sets for a in ("--set", s)]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert ready.exists(), "the controller process did not get ready"
    return proc


def _until_state(endpoint, ctx, state, seconds=5.0):
    from runtime.controller import operator

    deadline = time.monotonic() + seconds
    while True:
        reply = operator.send(endpoint, "status", "test", ctx=ctx)
        if reply.state == state or time.monotonic() > deadline:
            return reply
        time.sleep(0.02)


@pytest.mark.slow
def test_controller_process_killed_while_driving_is_stopped_by_the_next_one(tmp_path):
    from runtime.controller import operator

    endpoint = f"ipc://{tmp_path}/k"
    ctx = zmq.Context()
    procs = []
    try:
        first = _start_controller(tmp_path, "first")
        procs.append(first)
        assert operator.send(endpoint, "arm", "test", ctx=ctx).ok
        assert _until_state(endpoint, ctx, RUNNING).state == RUNNING
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        second = _start_controller(tmp_path, "second", "controller.stop_ramp_s=1.0")
        procs.append(second)
        reply = operator.send(endpoint, "status", "test", ctx=ctx)
        reason = f"controller restarted while driving the robot (previous pid {first.pid}, state running)"
        assert reply.state == STOPPING and reply.detail == reason
        assert not operator.send(endpoint, "arm", "test", ctx=ctx).ok  # not while stopping
        second.send_signal(signal.SIGTERM)
        assert second.wait(20) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        ctx.destroy(0)
    rep = json.loads((tmp_path / "second.json").read_text())
    assert rep["stops"][0]["from"] == IDLE and rep["stops"][0]["reason"] == reason
    assert rep["took_over"]["pid"] == first.pid and rep["state"] == STOPPED and rep["safe"] is True
    rec = CommandRecord(str(tmp_path / "record"), "arm_sdk")
    try:  # the clean exit left the robot safe behind: a third start would come up idle
        assert rec.last().state == STOPPED and rec.last().weight == 0.0 and rec.read() is None
    finally:
        rec.close()


@pytest.mark.slow
def test_controller_process_paused_while_driving_stops_the_robot_when_it_runs_again(tmp_path):
    from runtime.controller import operator

    endpoint = f"ipc://{tmp_path}/k"
    ctx = zmq.Context()
    proc = None
    try:
        proc = _start_controller(tmp_path, "ctl", "controller.estop_ramp_s=1.0")
        assert operator.send(endpoint, "arm", "test", ctx=ctx).ok
        assert _until_state(endpoint, ctx, RUNNING).state == RUNNING
        proc.send_signal(signal.SIGSTOP)
        time.sleep(0.4)
        proc.send_signal(signal.SIGCONT)
        reply = _until_state(endpoint, ctx, STOPPING)
        assert reply.state == STOPPING and reply.detail.startswith("control loop stalled for ")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        ctx.destroy(0)
    rep = json.loads((tmp_path / "ctl.json").read_text())
    stop = rep["stops"][0]
    assert stop["from"] == RUNNING and stop["to"] == STOPPING and "(limit 250 ms)" in stop["reason"]
    assert int(stop["reason"].split()[4]) >= 250


# -- execution of overlapping chunks: seams, stalls ------------------------------------------------------------------

def _run_armed(c):
    """Arm the controller (the operator's command) and tick it until it runs; the time of the last tick."""
    t = time.monotonic()
    c.tick(t)
    assert c._operator("arm", t, "test").ok
    while c.sm.state != RUNNING:
        t += c.period
        c.tick(t)
    return t


def _policy_run(rig, seam, every_s, horizon, offset, seconds=1.2, latency=0.03, step_s=0.02, speed=0.15):
    """Drive the controller on a synthetic clock like a policy with latency would: every ``every_s`` a chunk
    answering the state ``latency`` ago, along one trajectory, each chunk offset from the one before by ``offset``
    (alternating sides). Returns the controller and the commanded positions, one row per tick."""
    r = rig(f"controller.seam={seam}", "controller.heartbeat_timeout_s=30", "controller.chunk_timeout_s=1.0",
            "controller.hold_s=1.0", "controller.command_record=")  # no record: two of these run side by side
    c = r.controller
    t = _run_armed(c)
    base = c.q_cmd[ARM_IDX].copy()
    direction = np.sign((g1.POSITION_MIN + g1.POSITION_MAX)[ARM_IDX] / 2 - base)
    t0 = t
    qs, next_chunk, k = [], t, 0
    while t < t0 + seconds:
        if t >= next_chunk:
            obs = t - latency
            when = obs + step_s * np.arange(horizon)[:, None] - t0
            side = 0.5 * offset * (1 if k % 2 else -1)
            actions = base + direction * (speed * np.clip(when, 0, None) + side)
            r.send(actions.astype(np.float32), step_s, stamp=obs, seq=k)
            assert c._inbox.poll(1000)  # delivered before the next tick takes messages in
            next_chunk += every_s
            k += 1
        t += c.period
        c.tick(t)
        qs.append(c.q_cmd.copy())
    return c, np.array(qs), k


@pytest.mark.parametrize("seam", ["replace", "crossfade", "ensemble"])
def test_overlapping_chunks_never_stall_and_no_seam_steps_past_the_limit(rig, seam):
    c, qs, sent = _policy_run(rig, seam, every_s=0.1, horizon=16, offset=0.06)
    ex = c.report()["execution"]
    assert c.sm.state == RUNNING and c.chunks_applied == sent
    assert np.abs(np.diff(qs, axis=0)).max() <= c.limiter.max_step + 1e-12
    assert ex["seam"] == seam and ex["stalls"] == 0 and ex["seams"] == sent - 1
    assert 0.0 < ex["seam_max_step_rad"] <= c.limiter.max_step + 1e-12
    assert ex["seam_max_accel_rad_s2"] > 0 and ex["seam_max_jerk_rad_s3"] > 0
    age = ex["chunk_age_ms"]  # latency, plus the period until the next tick takes the chunk in
    assert age["count"] == sent and age["p50"] == pytest.approx(30.0 + c.period * 1000, abs=0.1)
    assert ex["chunks_dropped"] == 0


def test_chunks_arriving_after_the_executing_one_runs_out_are_stalls(rig):
    c, qs, sent = _policy_run(rig, "crossfade", every_s=0.3, horizon=8, offset=0.0)
    ex = c.report()["execution"]
    assert c.chunks_applied == sent and ex["seams"] == sent - 1
    # each chunk covers 0.14 s - 0.03 s of latency; the next comes 0.3 s after: about 0.19 s of stall each time
    assert ex["stalls"] >= (sent - 1) * 0.15 * c.rate_hz
    assert np.abs(np.diff(qs, axis=0)).max() <= c.limiter.max_step + 1e-12


def test_crossfade_seams_step_less_than_replace(rig):
    steps, clamped = {}, {}
    for seam in ("replace", "crossfade"):
        c, qs, _ = _policy_run(rig, seam, every_s=0.1, horizon=16, offset=0.06)
        ex = c.report()["execution"]
        steps[seam], clamped[seam] = ex["seam_max_step_rad"], ex["seam_clamped_ticks"]
    assert steps["crossfade"] < steps["replace"]
    assert clamped["replace"] > 0 and clamped["crossfade"] == 0  # the crossfade needs no help from the limiter


def test_chunks_superseded_in_one_tick_or_stale_are_counted_as_dropped(rig):
    r = rig()
    r.arm()
    now = time.monotonic()
    for i in range(3):
        r.send(r.toward(0.01), stamp=now, seq=i)
    r.send(r.toward(0.01), stamp=now - 5.0, seq=9)
    r.run(0.1)
    ex = r.controller.report()["execution"]
    assert r.controller.chunks_applied >= 1
    assert ex["chunks_dropped"] == 4 - r.controller.chunks_applied


def test_seam_traces_record_the_commanded_position_around_the_first_seam(rig):
    from runtime.controller.seam_recorder import SEAM_TRACE_AFTER, SEAM_TRACE_BEFORE

    r = rig("controller.heartbeat_timeout_s=30", "controller.chunk_timeout_s=1.0", "controller.hold_s=1.0")
    c = r.controller
    t = _run_armed(c)
    for _ in range(SEAM_TRACE_BEFORE + 10):  # more ticks since arming than the ring keeps
        t += c.period
        c.tick(t)
    start = c.q_cmd[ARM_IDX].copy()
    moves = np.zeros(len(ARM))
    moves[[4, 1, 6]] = [0.3, 0.2, 0.1]  # the joints moving most, in order
    t_first = t
    for seq in range(2):  # two overlapping chunks along one trajectory: one seam
        actions = start + ((t - t_first + 0.02 * np.arange(64)) / 1.28)[:, None] * moves
        r.send(actions.astype(np.float32), 0.02, stamp=t, seq=seq)
        assert c._inbox.poll(1000)
        for _ in range(SEAM_TRACE_AFTER + 20 if seq else 20):
            t += c.period
            c.tick(t)
    ex = c.report()["execution"]
    assert ex["seams"] == 1 and len(ex["seam_traces"]) == 1
    tr = ex["seam_traces"][0]
    assert tr["seam"] == 1 and tr["seam_index"] == SEAM_TRACE_BEFORE and tr["tick"] > 0
    assert tr["joints"] == [ARM[4], ARM[1], ARM[6]]
    assert tr["period_ms"] == pytest.approx(c.period * 1000) and tr["t0_ms"] == pytest.approx(-50 * c.period * 1000)
    assert len(tr["q"]) == 3 and all(len(q) == SEAM_TRACE_BEFORE + SEAM_TRACE_AFTER for q in tr["q"])
    q = np.array(tr["q"])
    assert np.isfinite(q).all() and (np.diff(q[0]) >= -1e-9).all() and q[0, -1] > q[0, 0]  # toward the chunk


# -- seq: duplicates, replays and older plans (issue 10, item 8) -----------------------------------------------------

def _still(r, h=50):
    """A chunk that holds the commanded pose (always within max_first_step of it)."""
    return np.repeat(r.controller.q_cmd[ARM_IDX][None], h, 0).astype(np.float32)


def test_a_byte_exact_replay_is_rejected_as_stale_seq(rig):
    r = rig("controller.chunk_timeout_s=5", "controller.heartbeat_timeout_s=5")
    r.arm()
    raw = r.send(_still(r), step_s=0.05, seq=5)
    r.run(0.05)
    assert r.controller.chunks_applied == 1
    r.push.send(raw)  # the same bytes again, well within max_chunk_age_s
    r.run(0.05)
    assert r.controller.chunks_applied == 1 and r.controller.rejects.counts == {"stale_seq": 1}
    assert r.controller.sm.state == RUNNING


def test_an_older_plan_never_replaces_a_newer_one(rig):
    r = rig("controller.chunk_timeout_s=5", "controller.heartbeat_timeout_s=5")
    r.arm()
    r.send(r.toward(0.03, 8), seq=2)
    r.run(0.03)
    r.send(r.toward(-0.03, 8), seq=1)  # an older plan, arriving late
    r.run(0.4)
    c = r.controller
    assert c.chunks_applied == 1 and c.rejects.counts == {"stale_seq": 1}
    assert np.allclose(c.q_cmd[ARM_IDX], _arm_target(0.03), atol=1e-3)


def test_the_newest_chunk_by_seq_wins_within_a_tick(rig):
    r = rig("controller.chunk_timeout_s=5", "controller.heartbeat_timeout_s=5")
    c = r.controller
    t = _run_armed(c)
    for seq, delta in ((5, -0.03), (7, 0.03), (6, -0.03)):  # received in this order, taken in by one tick
        r.send(r.toward(delta, 8), stamp=t, seq=seq)
    assert c._inbox.poll(1000)
    time.sleep(0.05)  # all three delivered
    for _ in range(200):
        t += c.period
        c.tick(t)
    assert c.chunks_applied == 1 and c.rejects.counts == {"stale_seq": 1}
    assert c.report()["execution"]["chunks_dropped"] == 1  # seq 5, superseded by 7 in that tick
    assert np.allclose(c.q_cmd[ARM_IDX], _arm_target(0.03), atol=1e-3)


def test_replays_in_a_row_stop_like_any_other_rejected_chunks(rig):
    r = rig("controller.chunk_timeout_s=5", "controller.heartbeat_timeout_s=5")
    r.arm()
    raw = r.send(_still(r), step_s=0.05)
    r.run(0.03)
    for _ in range(3):
        r.push.send(raw)
        r.run(0.03)
    assert r.controller.rejects.counts == {"stale_seq": 3}
    assert r.controller.report()["stops"][0]["reason"] == "3 chunks rejected in a row"


def test_seq_is_kept_across_re_arming_with_the_same_runtime_and_a_new_session_starts_afresh(rig):
    r = rig("controller.chunk_timeout_s=5", "controller.heartbeat_timeout_s=5")
    c = r.controller
    r.arm()
    raw = r.send(_still(r), step_s=0.05, seq=40)
    r.run(0.05)
    c._operator("stop", time.monotonic(), "test")
    r.run(0.3)
    assert c.sm.state == STOPPED
    r.arm()
    r.push.send(raw)  # from before the stop, still within max_chunk_age_s: a replay after re-arming
    r.run(0.05)
    assert c.rejects.counts == {"stale_seq": 1} and c.chunks_applied == 1
    r.send(_still(r), step_s=0.05, seq=41)  # the same runtime carries on
    r.run(0.05)
    assert c.chunks_applied == 2
    c._operator("stop", time.monotonic(), "test")
    r.run(0.3)
    r.arm()
    r.send(_still(r), step_s=0.05, session="restarted", seq=0)  # a new runtime, armed with: its seq starts over
    r.run(0.05)
    assert c.chunks_applied == 3 and c.rejects.counts == {"stale_seq": 1} and c.sm.state == RUNNING


# -- heartbeats: only from the session armed with (issue 10, item 14) ------------------------------------------------

def test_heartbeats_of_another_session_never_keep_the_robot_running(rig):
    r = rig("controller.chunk_timeout_s=5", "controller.heartbeat_timeout_s=0.2")
    c = r.controller
    r.arm()
    r.heartbeat("test", "ok")
    r.send(_still(r), step_s=0.05)
    r.run(0.05)
    assert c.session == "test" and c.policy_health == "ok"
    end = time.monotonic() + 0.5
    while time.monotonic() < end and c.sm.state == RUNNING:  # the armed runtime fell silent; another one talks
        r.heartbeat("intruder", "degraded")
        r.run(0.04)
    assert c.sm.state == HOLDING and c.report()["stops"][0]["reason"] == "no policy heartbeat for 0.2 s"
    assert c.rejects.counts["foreign_session"] >= 3 and c.heartbeats == 1 and c.policy_health == "ok"


def test_a_fault_heartbeat_of_another_session_does_not_hold(rig):
    r = rig("controller.chunk_timeout_s=5", "controller.heartbeat_timeout_s=5")
    c = r.controller
    r.arm()
    r.send(_still(r), step_s=0.05)
    r.run(0.05)
    r.heartbeat("intruder", "fault", "made up")
    r.run(0.05)
    assert c.sm.state == RUNNING and c.rejects.counts == {"foreign_session": 1} and c.policy_health == "unknown"
    r.heartbeat("test", "fault", "camera frozen")  # the armed runtime's own fault holds, as always
    r.run(0.05)
    assert c.sm.state == HOLDING and "camera frozen" in c.report()["stops"][0]["reason"]


def test_the_first_heartbeat_after_arming_binds_the_session(rig):
    r = rig("controller.chunk_timeout_s=5", "controller.heartbeat_timeout_s=5")
    c = r.controller
    r.heartbeat("before", "ok")  # idle: taken for the record, binds nothing
    r.run(0.03)
    assert c.session is None and c.policy_health == "ok" and c.rejects.counts == {}
    c.tick(time.monotonic())
    assert c._operator("arm", time.monotonic(), "test").ok
    r.heartbeat("armed", "ok")
    r.run(0.1)
    assert c.sm.state == RUNNING and c.session == "armed"
    r.send(_still(r), step_s=0.05, session="other")  # a chunk from another runtime than the one armed with
    r.run(0.05)
    assert c.sm.state in (STOPPING, STOPPED) and c.rejects.counts == {"new_session": 1}
    assert "armed with 'armed'" in c.report()["stops"][0]["reason"]


# -- stopped only once the command written let go (issue 10, item 11) ------------------------------------------------

def test_stopped_is_reported_only_once_the_weight_written_is_0_even_after_late_ticks(rig):
    r = rig("controller.stop_ramp_s=0.2", "controller.chunk_timeout_s=5", "controller.heartbeat_timeout_s=5")
    c = r.controller
    t = _run_armed(c)
    assert c._operator("stop", t, "test").ok
    share = c.period / 0.2
    out = []
    while c.sm.state != STOPPED and len(out) < 1000:
        t += 3 * c.period  # every tick late, under max_tick_gap_s: the clock runs 3 times faster than the ticks
        c.tick(t)
        out.append((c.sm.state, r.sim.command.weight, c.released))
    assert all(w == 0.0 for state, w, _ in out if state == STOPPED)
    assert out[-1][0] == STOPPED and out[-1][1] == 0.0 and out[-1][2] and c.report()["released"]
    assert not any(released for state, _, released in out if state != STOPPED)
    weights = [1.0] + [w for _, w, _ in out]
    assert -np.diff(weights).max() <= share + 1e-12  # never more than one tick's share of the ramp per tick
    assert c.report()["transitions"][-1]["t"] - c.report()["stops"][0]["t"] > 0.2  # later than the stop's clock
    assert len([o for o in out if o[0] == STOPPING]) == int(round(1.0 / share))


def test_on_time_ticks_end_the_ramp_and_the_stop_together(rig):
    r = rig("controller.stop_ramp_s=0.14", "controller.chunk_timeout_s=5", "controller.heartbeat_timeout_s=5")
    c = r.controller
    t = _run_armed(c)
    c._operator("stop", t, "test")
    n = 0
    while c.sm.state != STOPPED and n < 1000:
        t += c.period
        c.tick(t)
        n += 1
    # 0.14 s: 1 - 70 * (0.002 / 0.14) leaves a rounding residue above 0, which must not cost a tick
    assert n == int(round(0.14 / c.period)) + 1 and r.sim.command.weight == 0.0


def test_an_estop_cleared_during_its_ramp_is_stopping_until_the_weight_is_0(rig):
    r = rig("controller.estop_ramp_s=0.2", "controller.chunk_timeout_s=5", "controller.heartbeat_timeout_s=5")
    c = r.controller
    t = _run_armed(c)
    c._operator("estop", t, "test")
    for _ in range(10):
        t += c.period
        c.tick(t)
    assert c.sm.state == ESTOP and 0.0 < r.sim.command.weight < 1.0 and not c.released
    assert c._operator("clear_estop", t, "test").ok
    assert c.sm.state == STOPPING and not c._operator("arm", t, "test").ok
    out = []
    while c.sm.state != STOPPED and len(out) < 1000:
        t += c.period
        c.tick(t)
        out.append((c.sm.state, r.sim.command.weight))
    weights = [w for _, w in out]
    assert out[-1] == (STOPPED, 0.0) and weights[0] > 0.0 and np.all(np.diff(weights) <= 0)
    assert all(w == 0.0 for state, w in out if state == STOPPED)
    assert c.sm.describe() == "stop complete (cause: e-stop by test)"
    assert c._operator("arm", t, "test").ok
