"""Approaching the start pose after arming (issue 11, defect 3): from arms hanging far from where the policy starts,
the controller moves there slowly with every trigger of running active, then runs the policy's chunks. The
controller on the in-process simulated G1 with real ZeroMQ sockets, the manifest's start_pose, the simulated G1's
"pose" request, and `wam-edge hil`'s start_far scenario (processes, DDS on loopback)."""

import json
import os
import time

import numpy as np
import pytest
from test_controller import ARM_IDX, FAST, Rig

from runtime.controller.approach import load_start_pose
from runtime.controller.safety import APPROACHING, ARMING, ESTOP, HOLDING, RUNNING, STOPPED, STOPPING
from runtime.policy.manifest import ManifestError, parse_manifest
from runtime.robot import g1
from runtime.robot.sim_g1 import SimulatedG1

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE_MANIFEST = os.path.join(ROOT, "exported", "reference", "manifest.json")

#: Arms hanging as in zero torque: elbows at 1.31 rad, about 1 rad from where a policy starts (its nominal pose).
HANGING = g1.NOMINAL_POSE.copy()
for _name, _rad in (("left_shoulder_pitch", 0.3), ("right_shoulder_pitch", 0.3), ("left_shoulder_roll", 0.0),
                    ("right_shoulder_roll", 0.0), ("left_elbow", 1.31), ("right_elbow", 1.31)):
    HANGING[g1.JOINT_INDEX[_name]] = _rad
#: Where the stand-in policy below starts, and stays: the nominal pose of the arms.
POLICY_START = g1.NOMINAL_POSE[ARM_IDX].astype(np.float32)


def far_rig(tmp_path, mode, *sets):
    """A controller on a simulated G1 whose arms hang far from the policy's start (Unitree's controller holds them
    there in arm_sdk; in lowcmd they rest there). Watchdog bounds wide enough for a busy machine."""
    sim = SimulatedG1(mode=mode)
    sim.physics.place(HANGING)
    return Rig(tmp_path, f"controller.mode={mode}", "controller.chunk_timeout_s=1.0",
               "controller.heartbeat_timeout_s=2.0", "controller.max_tick_gap_s=1.0", *sets, sim=sim)


def policy_chunk(r, start=POLICY_START, h=32):
    """What a policy that starts near its nominal pose sends, whatever the robot's state: answers now."""
    return r.send(np.repeat(np.asarray(start, np.float32)[None], h, 0), 0.02)


def drive(r, seconds, chunks=True, until=None, every=0.1, start=POLICY_START):
    """Run the controller's own loop for ``seconds`` (or ``until(controller)``), sending a policy chunk and a
    heartbeat every ``every`` s; returns per tick (state, q_cmd, weight, kp, measured q)."""
    c, out = r.controller, []
    end = time.monotonic() + seconds
    due = [0.0]

    def go():
        if c.ticks:
            cmd = r.sim.command
            out.append((c.sm.state, c.q_cmd.copy(), cmd.weight, cmd.kp.copy(), r.sim.reading.q.copy()))
        now = time.monotonic()
        if until is not None and until(c):
            return False
        if chunks and now >= due[0]:
            r.heartbeat()
            policy_chunk(r, start)
            due[0] = now + every
        return now < end

    c.run(go)
    return out


def arm(r):
    r.controller.tick(time.monotonic())  # a fresh robot state, as inside the loop
    reply = r.controller._operator("arm", time.monotonic(), "test")
    assert reply.ok, reply.detail


def states(trace):
    seen = []
    for s, *_ in trace:
        if not seen or seen[-1] != s:
            seen.append(s)
    return seen


def approach_steps(trace):
    """The largest per-tick step of the commanded pose between two approaching ticks."""
    steps = [np.abs(b[1] - a[1]).max() for a, b in zip(trace, trace[1:]) if a[0] == b[0] == APPROACHING]
    return max(steps) if steps else 0.0


def running_and_driven(c):
    return c.sm.state == RUNNING and c.chunks_applied >= 3


# -- from arms hanging: lowcmd and arm_sdk reach running and execute the policy's chunks -------------------------------

@pytest.mark.parametrize("mode", ["lowcmd", "arm_sdk"])
def test_from_hanging_arms_the_controller_approaches_the_first_chunk_then_runs_the_policy(tmp_path, mode):
    r = far_rig(tmp_path, mode, "controller.approach_velocity=1.0", "controller.arm_ramp_s=0.2")
    c = r.controller
    try:
        assert np.abs(r.sim.read(time.monotonic()).q[ARM_IDX] - POLICY_START).max() > 1.0  # far indeed
        arm(r)
        armed_at = c.q_cmd.copy()
        trace = drive(r, 6.0, until=running_and_driven)
        assert states(trace) == [ARMING, RUNNING, APPROACHING, RUNNING], c.report()["transitions"]
        assert c.chunks_applied >= 3 and "first_step_too_far" not in c.rejects.counts
        tr = c.report()["transitions"]
        assert tr[2]["to"] == APPROACHING and "the first chunk's current action is 1.01 rad" in tr[2]["reason"]
        assert tr[3]["to"] == RUNNING and tr[3]["reason"].startswith("start pose reached")
        # slowly: no approaching tick moves a joint more than approach_velocity / rate_hz, no tick beyond the limit
        step = 1.0 / c.rate_hz
        assert step * 0.5 < approach_steps(trace) <= step + 1e-12
        qs = np.array([t[1] for t in trace])
        assert np.abs(np.diff(qs, axis=0)).max() <= c.limiter.max_step + 1e-12
        assert c.report()["limiter"]["max_step_rad"] <= c.limiter.max_step + 1e-12
        # reached: the commanded pose at the start, the robot within the tolerance, then the policy drives
        done = next(i for i, t in enumerate(trace) if i and trace[i - 1][0] == APPROACHING and t[0] == RUNNING)
        assert np.abs(trace[done][1][ARM_IDX] - POLICY_START).max() < 1e-6
        assert np.abs(trace[done][4][ARM_IDX] - POLICY_START).max() <= c.c["approach_tolerance"]
        last = c.report()["approach"]["last"]
        assert last["result"] == "reached" and last["source"] == "the first chunk's current action"
        assert last["distance_rad"] == pytest.approx(1.01, abs=1e-3) and last["chunks"] >= 1
        # authority: arming ramps it in at the pose measured when armed; the approach moves at full authority
        arming = [t for t in trace if t[0] == ARMING]
        assert all(np.array_equal(t[1], armed_at) for t in arming)
        for t in trace:
            if t[0] == APPROACHING:
                assert (t[2] == 1.0) if mode == "arm_sdk" else np.array_equal(t[3], g1.DEFAULT_KP)
        if mode == "arm_sdk":
            w = [t[2] for t in trace]
            assert w[0] < 0.2 and np.all(np.diff(w) >= 0) and w[-1] == 1.0
        else:
            assert arming[0][3].max() < g1.DEFAULT_KP.max() and np.all(np.diff([t[3][18] for t in trace]) >= 0)
        assert np.abs(r.sim.reading.dq).max() < c.c["max_joint_velocity"]
    finally:
        r.close()


def test_max_first_step_still_rejects_jumps_after_the_approach(tmp_path):
    """One approach per arming, to the first chunk: afterwards a chunk far from the commanded pose is rejected, right
    after the approach as mid-run."""
    r = far_rig(tmp_path, "arm_sdk", "controller.approach_velocity=1.5", "controller.arm_ramp_s=0.05")
    c = r.controller
    try:
        arm(r)
        drive(r, 4.0, until=lambda c: c.sm.state == RUNNING and c.approach.reached)
        assert c.sm.state == RUNNING and c.chunks_applied == 0
        policy_chunk(r, HANGING[ARM_IDX])  # back where the arms hung: 1 rad away
        r.run(0.05)
        assert c.rejects.counts == {"first_step_too_far": 1} and c.sm.state == RUNNING
        drive(r, 2.0, until=running_and_driven)
        assert c.chunks_applied >= 3
        before = c.q_cmd.copy()
        policy_chunk(r, POLICY_START + 0.5)
        r.run(0.05)
        assert c.rejects.counts == {"first_step_too_far": 2} and c.sm.state == RUNNING
        assert np.abs(c.q_cmd - before).max() <= 2 * 0.05 * c.c["max_velocity"]  # the executing chunk, nothing more
        assert c.report()["approach"]["approaches"] == 1
    finally:
        r.close()


def test_a_first_chunk_near_the_pose_runs_at_once_with_no_approach(tmp_path):
    r = Rig(tmp_path, *FAST)
    c = r.controller
    try:
        r.arm()
        drive(r, 1.0, until=running_and_driven)
        assert c.chunks_applied >= 3 and APPROACHING not in [t["to"] for t in c.report()["transitions"]]
        assert c.report()["approach"]["approaches"] == 0
    finally:
        r.close()


# -- the manifest's start pose -----------------------------------------------------------------------------------------

def model_with_start_pose(tmp_path, pose):
    model = tmp_path / "model"
    model.mkdir(parents=True)
    with open(REFERENCE_MANIFEST) as f:
        data = json.load(f)
    data["start_pose"] = pose
    (model / "manifest.json").write_text(json.dumps(data))
    return model


def start_pose_of(q):
    return {name: float(q[g1.JOINT_INDEX[name]]) for name in g1.UPPER_BODY}


def test_a_declared_start_pose_is_approached_right_after_arming_and_chunks_wait(tmp_path):
    start = g1.NOMINAL_POSE.copy()
    start[g1.JOINT_INDEX["left_elbow"]] = start[g1.JOINT_INDEX["right_elbow"]] = 0.5
    model = model_with_start_pose(tmp_path, start_pose_of(start))
    r = far_rig(tmp_path, "lowcmd", f"model.path={model}", "controller.approach_velocity=1.0",
                "controller.arm_ramp_s=0.05")
    c = r.controller
    try:
        assert c.report()["approach"]["start_pose"].startswith("the start_pose of")
        arm(r)
        # the policy's chunks start 0.1 rad off the declared pose: taken as signs of life, never as the target
        trace = drive(r, 2.0, until=lambda c: c.sm.state == APPROACHING and c.approach.started_at is not None
                      and time.monotonic() - c.approach.started_at > 0.3, start=start[ARM_IDX] + 0.1)
        assert states(trace) == [ARMING, APPROACHING] and c.chunks_applied == 0
        assert c.approach.chunks >= 2
        status = c._status(time.monotonic())
        assert status.startswith("armed: approaching the start pose (the start_pose of") and "rad to go" in status
        trace += drive(r, 4.0, until=running_and_driven, start=start[ARM_IDX] + 0.1)
        assert states(trace) == [ARMING, APPROACHING, RUNNING] and c.chunks_applied >= 3
        done = next(i for i, t in enumerate(trace) if t[0] == RUNNING)
        assert np.abs(trace[done][1][ARM_IDX] - start[ARM_IDX]).max() < 1e-6  # the declared pose, exactly
        assert approach_steps(trace) <= 1.0 / c.rate_hz + 1e-12
        assert c.report()["approach"]["last"]["result"] == "reached"
    finally:
        r.close()


def test_manifest_start_pose_is_validated_against_the_action_joints_and_limits():
    with open(REFERENCE_MANIFEST) as f:
        base = json.load(f)
    good = start_pose_of(g1.NOMINAL_POSE)

    def parse(pose):
        data = dict(base, start_pose=pose)
        return parse_manifest(data, "m.json")

    m = parse(good)
    assert m.start_pose == tuple((j, good[j]) for j in m.action_joints)
    assert parse_manifest(base, "m.json").start_pose is None
    for pose, words in (
            (dict(good, left_knee=0.1), "start_pose.left_knee: unknown key"),
            ({k: v for k, v in good.items() if k != "left_elbow"}, "start_pose.left_elbow: missing required key"),
            (dict(good, left_elbow=2.5), "start_pose.left_elbow: 2.5 rad lies outside the joint's limits"),
            (dict(good, left_elbow="high"), "start_pose.left_elbow: expected a number"),
            (dict(good, left_elbow=True), "start_pose.left_elbow: expected a number"),
            (dict(good, left_elbow=float("nan")), "start_pose.left_elbow: must be finite"),
            ([0.0] * 17, "start_pose: expected an object")):
        with pytest.raises(ManifestError) as err:
            parse(pose)
        assert words in str(err.value), str(err.value)


def test_an_unreadable_manifest_leaves_the_approach_to_the_first_chunk(tmp_path, caplog):
    model = model_with_start_pose(tmp_path, dict(start_pose_of(g1.NOMINAL_POSE), left_elbow=9.0))
    assert load_start_pose(str(model), arm_sdk=True) is None
    assert "left_elbow: 9.0 rad lies outside" in caplog.text and "first chunk's current action" in caplog.text
    assert load_start_pose(str(tmp_path / "nowhere"), arm_sdk=True) is None
    idx, rad, where = load_start_pose(str(model_with_start_pose(tmp_path / "ok", start_pose_of(HANGING))), True)
    assert list(idx) == list(ARM_IDX) and np.allclose(rad, HANGING[ARM_IDX]) and "manifest.json" in where


# -- every trigger of running is active during the approach ------------------------------------------------------------

def _inject(r, fault):
    sim, c = r.sim, r.controller
    if fault == "stale_state":
        sim.frozen = True
    elif fault == "estop":
        assert c._operator("estop", time.monotonic(), "test").ok
    elif fault == "tilt":
        sim.tilt(c.c["max_tilt"] + 0.2)
    elif fault == "remote_stop":
        sim.press(*r.cfg["remote"]["stop"])
    elif fault == "joint_velocity":  # knocked: the joint springs back to its target faster than the bound
        sim.physics.q[g1.JOINT_INDEX["left_elbow"]] -= 0.5


@pytest.mark.parametrize("fault,ends,immediate,words", [
    ("stale_state", STOPPED, True, "robot state is"),
    ("estop", ESTOP, True, "e-stop by test"),
    ("tilt", STOPPED, True, "tilt"),
    ("remote_stop", STOPPED, False, "stop by remote"),
    ("chunk_loss", STOPPED, False, "chunks did not resume"),
    ("joint_velocity", STOPPED, False, "left_elbow moves at"),
])
def test_a_fault_during_the_approach_stops_and_latches_as_in_running(tmp_path, fault, ends, immediate, words):
    r = far_rig(tmp_path, "arm_sdk", "controller.approach_velocity=0.2", "controller.arm_ramp_s=0.05")
    c = r.controller
    try:
        arm(r)
        drive(r, 3.0, until=lambda c: c.sm.state == APPROACHING and c.approach.started_at is not None
              and time.monotonic() - c.approach.started_at > 0.2)
        assert c.sm.state == APPROACHING
        goal = c.approach.goal.copy()
        _inject(r, fault)
        trace = drive(r, 4.0, chunks=fault != "chunk_loss", until=lambda c: c.sm.state == ends and c.released)
        assert c.sm.state == ends, c.report()["transitions"]
        stops = [t for t in c.report()["transitions"] if t["to"] in (HOLDING, STOPPING, ESTOP)]
        assert stops and stops[0]["from"] == APPROACHING
        assert any(words in t["reason"] for t in stops), stops
        assert c.sm.immediate == immediate
        assert c.report()["approach"]["last"]["result"].startswith(stops[-1]["to"])
        # once the fault is seen, no target moves toward the start pose again (arm_sdk: hold, the weight ramps out)
        seen = next(i for i, t in enumerate(trace) if t[0] != APPROACHING)
        after = trace[seen:]
        assert all(t[0] != APPROACHING for t in after)
        assert all(np.array_equal(t[1], after[0][1]) for t in after) and after[-1][2] == 0.0
        assert np.abs(after[-1][1] - goal).max() > 0.1  # stopped on the way
        # latched: fresh chunks, a healthy robot: nothing moves until a person arms (and clears an e-stop)
        r.sim.frozen = False
        r.sim.tilt(0.0)
        r.sim.press()
        held = c.q_cmd.copy()
        drive(r, 0.5)
        assert c.sm.state == ends and np.array_equal(c.q_cmd, held) and r.sim.command.weight == 0.0
        if fault == "estop":
            assert os.path.exists(c.latch_file) and c._operator("arm", time.monotonic(), "x").ok is False
    finally:
        r.close()


def test_the_approach_velocity_is_never_exceeded_even_when_max_velocity_is_lower(tmp_path):
    r = far_rig(tmp_path, "lowcmd", "controller.approach_velocity=5.0", "controller.max_velocity=0.8",
                "controller.arm_ramp_s=0.05")
    c = r.controller
    try:
        arm(r)
        trace = drive(r, 5.0, until=lambda c: c.sm.state == RUNNING and c.approach.reached)
        assert c.approach.reached == 1
        assert 0.5 * 0.8 / c.rate_hz < approach_steps(trace) <= 0.8 / c.rate_hz + 1e-12
    finally:
        r.close()


def test_an_approach_that_times_out_stops_gently_and_needs_a_person(tmp_path):
    r = far_rig(tmp_path, "arm_sdk", "controller.approach_velocity=0.05", "controller.approach_timeout_s=0.5",
                "controller.arm_ramp_s=0.05")
    c = r.controller
    try:
        arm(r)
        trace = drive(r, 3.0, until=lambda c: c.sm.state == STOPPED and c.released)
        assert states(trace)[-3:] == [APPROACHING, STOPPING, STOPPED], states(trace)
        stop = next(t for t in c.report()["transitions"] if t["to"] == STOPPING)
        assert stop["from"] == APPROACHING and stop["reason"] == "the start pose was not reached within 0.5 s"
        assert not c.sm.immediate and c._status(time.monotonic()).startswith("stop complete (cause: the start pose")
        entered = next(t["t"] for t in c.report()["transitions"] if t["to"] == APPROACHING)
        assert stop["t"] - entered >= 0.5
        assert c.report()["approach"]["last"]["result"].startswith("stopping: the start pose was not reached")
        assert r.sim.command.weight == 0.0 and c.chunks_applied == 0
        drive(r, 0.3)
        assert c.sm.state == STOPPED and c.chunks_applied == 0
    finally:
        r.close()


# -- the simulated G1's "pose" request --------------------------------------------------------------------------------

def test_the_simulated_g1_pose_request_is_checked_whole():
    from runtime.robot.dds.sim import ControlError, check_control

    assert check_control({"pose": {"left_elbow": 1.31, "right_elbow": 1}}) == {
        "pose": {"left_elbow": 1.31, "right_elbow": 1.0}}
    for bad, words in (({"pose": []}, "pose: expected a map"), ({"pose": {}}, "pose: expected a map"),
                       ({"pose": {"tail": 0.0}}, "'tail' is not a G1 joint name"),
                       ({"pose": {"left_elbow": 2.5}}, "pose.left_elbow: 2.5 rad lies outside"),
                       ({"pose": {"left_elbow": float("nan")}}, "pose.left_elbow: expected a finite number"),
                       ({"pose": {"left_elbow": True}}, "pose.left_elbow: expected a finite number"),
                       ({"pose": {"left_elbow": 0.1}, "tilt": [0.0]}, "tilt: expected 3 numbers")):
        with pytest.raises(ControlError) as err:
            check_control(bad)
        assert words in str(err.value)


def test_the_simulated_g1_takes_a_pose_at_rest_and_holds_it(tmp_path):
    pytest.importorskip("cyclonedds", reason="cyclonedds (tools/install_dds.sh) is needed for DDS")
    from test_dds import new_domain

    from runtime.robot.dds.sim import SimulatedG1Dds

    sim = SimulatedG1Dds(domain_id=new_domain(), interface="lo")
    try:
        reply = sim.apply({"pose": {"left_elbow": 1.31, "right_elbow": 1.31}})
        assert reply["ok"]
        now = time.monotonic()
        sim.step(now, 0.002)
        for k in range(1, 50):
            sim.step(now + 0.002 * k, 0.002)
        q = np.array(sim.summary()["q"])
        assert q[g1.JOINT_INDEX["left_elbow"]] == pytest.approx(1.31) and q[g1.JOINT_INDEX["right_elbow"]] == \
            pytest.approx(1.31)
        assert q[g1.JOINT_INDEX["left_shoulder_roll"]] == pytest.approx(0.2)  # the others stay
        assert np.abs(sim.dq).max() < 1e-9 and sim.summary()["commands"] == 0  # at rest; no command involved
    finally:
        sim.close()


# -- wam-edge hil: start_far, processes and DDS ------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lowcmd", "arm_sdk"])
def test_hil_start_far_approaches_then_runs_with_no_step_beyond_the_limit(tmp_path, mode):
    from test_hil import FAST as HIL_FAST
    from test_hil import STEP, _dds, _explain, _run_hil

    _dds()
    report = _run_hil(tmp_path, HIL_FAST + [f"controller.mode={mode}"], ["start_far"])
    assert report["ok"], _explain(report)
    row = report["rows"][0]
    assert row["final_state"] == "stopped" and 0.0 <= row["reaction_s"] <= row["bound_s"]
    assert row["wire"]["steps_over_limit"] == 0 and row["wire"]["max_step_rad"] <= STEP + 1e-5
