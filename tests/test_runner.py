"""The policy runtime: it answers only fresh frames and fresh robot state, on a regular schedule, over real sockets."""

import time

import numpy as np
import pytest
import zmq

from runtime.config import load_config
from runtime.protocol import RobotState, decode, encode_state
from runtime.robot import g1
from runtime.runner import PolicyRuntime


@pytest.fixture
def rig(tmp_path):
    def make(*sets):
        cfg = load_config(None, [f"transport.chunks=ipc://{tmp_path}/chunks", f"transport.state=ipc://{tmp_path}/state",
                                 "policy.warmup_runs=1", *sets])
        ctx = zmq.Context()
        pull = ctx.socket(zmq.PULL)
        pull.bind(cfg["transport"]["chunks"])
        pub = ctx.socket(zmq.PUB)
        pub.bind(cfg["transport"]["state"])
        rt = PolicyRuntime(cfg, ctx)
        rt.start(cfg["policy"]["warmup_runs"])
        made.append((rt, pull, pub, ctx))
        time.sleep(0.1)  # let the SUB connect
        return rt, pull, pub

    made = []
    yield make
    for rt, pull, pub, ctx in made:
        rt.close()
        pull.close(0)
        pub.close(0)
        ctx.term()


def _publish_state(pub, rt, stamp):
    q = g1.NOMINAL_POSE.astype(np.float32)
    pub.send(encode_state(RobotState(1, stamp, "running", q, np.zeros_like(q))))
    deadline = time.monotonic() + 2
    while rt.robot_state is None or rt.robot_state.stamp != stamp:
        rt._poll_state(time.monotonic())
        assert time.monotonic() < deadline, "state never arrived"
        time.sleep(0.005)


def _chunks(pull):
    out = []
    while pull.poll(50):
        msg = decode(pull.recv(), ("chunk", "heartbeat"))
        if hasattr(msg, "actions"):
            out.append(msg)
    return out


def test_answers_fresh_state_with_its_stamp(rig):
    rt, pull, pub = rig()
    _publish_state(pub, rt, 123.25)
    rt.step(time.monotonic())
    chunks = _chunks(pull)
    assert len(chunks) == 1
    c = chunks[0]
    assert c.obs_stamp == 123.25  # the controller's own stamp comes back
    assert c.joints == rt.policy.manifest.action_joints and c.actions.shape == (32, 17)
    assert np.isfinite(c.actions).all()


def test_one_inference_per_period_even_at_start(rig):
    rt, pull, pub = rig("policy.rate_hz=10")
    _publish_state(pub, rt, 1.0)
    now = time.monotonic()
    for k in range(19):  # 19 steps within one 0.1 s period: one chunk, not a burst
        rt.step(now + k * 0.005)
    assert rt.counters["chunks_sent"] == 1
    rt.step(now + 0.11)
    assert rt.counters["chunks_sent"] == 2


def test_stale_state_is_not_answered(rig):
    rt, pull, pub = rig("policy.state_max_age_s=0.05")
    _publish_state(pub, rt, 5.0)
    time.sleep(0.1)
    rt.step(time.monotonic())
    assert rt.counters["skipped_stale_state"] == 1 and rt.counters["chunks_sent"] == 0
    assert _chunks(pull) == []


def test_no_state_no_chunk(rig):
    rt, pull, _ = rig()
    rt.step(time.monotonic())
    assert rt.counters["skipped_no_state"] == 1 and _chunks(pull) == []


def test_stale_frame_is_not_answered(rig):
    rt, pull, pub = rig("camera.fps=0.5", "policy.frame_max_age_s=0.05")
    time.sleep(0.1)
    _publish_state(pub, rt, 2.0)
    rt.step(time.monotonic())
    assert rt.counters["skipped_stale_frame"] == 1 and _chunks(pull) == []


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
    _publish_state(pub, rt, 2.0)
    time.sleep(0.3)
    now = time.monotonic()
    rt.step(now)
    hbs = _heartbeats(pull)
    assert rt.health == "fault" and "no fresh camera frame" in rt.detail
    assert hbs and hbs[-1].health == "fault" and "camera" in hbs[-1].detail
    assert rt.counters["chunks_sent"] == 0


def test_inference_overrun_sends_no_chunk_and_reports_a_fault(rig):
    rt, pull, pub = rig("policy.max_inference_s=0.001")
    rt.policy.infer = lambda images, state, _real=rt.policy.infer: (time.sleep(0.005), _real(images, state))[1]
    _publish_state(pub, rt, 3.0)
    rt.step(time.monotonic())
    msgs = _heartbeats(pull)
    assert rt.counters["overruns"] == 1 and rt.counters["chunks_sent"] == 0
    assert msgs[-1].health == "fault" and "inference took" in msgs[-1].detail
