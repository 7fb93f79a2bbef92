"""Fault injection in the policy runtime (a test rig for `wam-edge hil`): each fault makes the real runtime do what it
must, over real sockets; bad requests change nothing; with faults disabled nothing is bound."""

import logging
import os
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq
from conftest import publish_state

from runtime.cameras.base import CameraSource
from runtime.faults import FAULTS, FaultInjectingBackend, FaultInjectingCamera, FaultInjectingPolicy, FaultInjector
from runtime.policy.policy import Policy
from runtime.protocol import decode, sockets
from runtime.robot import g1


@pytest.fixture
def rig(tmp_path, runtime_rig):
    def make(*sets, enabled=True):
        rt, pull, pub, ctx = runtime_rig(f"faults.endpoint=ipc://{tmp_path}/faults",
                                         f"faults.enabled={str(enabled).lower()}", "policy.state_max_age_s=10", *sets)
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(f"ipc://{tmp_path}/faults")
        reqs.append(req)
        publish_state(pub, rt, 1.0)
        return rt, pull, req

    reqs = []
    yield make
    for req in reqs:
        req.close(0)


def _ask(rt, req, request=None, raw=None):
    """One request, served by the runtime's own step() (its inference is held off meanwhile); the reply map."""
    req.send(msgpack.packb(request) if raw is None else raw)
    deadline = time.monotonic() + 2
    while not req.poll(0):
        rt.next_infer = time.monotonic() + 60  # serve the socket only
        rt.step(time.monotonic())
        assert time.monotonic() < deadline, "no reply"
        time.sleep(0.002)
    return msgpack.unpackb(req.recv(), raw=False)


def _infer_now(rt):
    """One inference step at once (its chunk or fault goes out now)."""
    rt.next_infer = 0.0
    rt.step(time.monotonic())


def _drain(pull):
    chunks, hbs = [], []
    while pull.poll(50):
        msg = decode(pull.recv(), ("chunk", "heartbeat"))
        (chunks if hasattr(msg, "actions") else hbs).append(msg)
    return chunks, hbs


def _spy(rt):
    """Record a copy of what the real Policy returned, under the fault-injecting wrapper."""
    inner = rt.policy.policy
    seen = []
    real = inner.infer
    inner.infer = lambda images, state: (seen.append(real(images, state).copy()), seen[-1])[1]
    return seen


def _limits(rt):
    idx = g1.indices(rt.policy.manifest.action_joints)
    return g1.POSITION_MIN[idx], g1.POSITION_MAX[idx]


def test_wrapped_only_when_enabled_and_said_loudly(rig, caplog):
    with caplog.at_level(logging.WARNING, logger="wam_edge.runtime"):
        rt, _, _ = rig()
    assert isinstance(rt.policy, FaultInjectingPolicy) and isinstance(rt.camera, FaultInjectingCamera)
    assert isinstance(rt.policy.backend, FaultInjectingBackend)
    assert "fault-injecting" in rt.policy.describe()
    assert any("fault injection enabled on ipc://" in r.getMessage() and "not for field use" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)
    assert rt.report()["faults_injected"] == {name: 0 for name in FAULTS if name != "none"}


def test_nan_goes_through_the_executors_own_check(rig):
    rt, pull, req = rig()
    t0 = time.monotonic()
    reply = _ask(rt, req, {"inject": "nan"})
    assert reply["ok"] is True and reply["fault"] == "nan" and t0 <= reply["t"] <= time.monotonic()
    _drain(pull)
    _infer_now(rt)
    chunks, hbs = _drain(pull)
    assert chunks == [] and rt.stats.counters["policy_errors"] == 1 and rt.stats.counters["chunks_sent"] == 0
    assert rt.health == "fault" and "non-finite" in rt.detail
    assert hbs and hbs[-1].health == "fault" and "non-finite" in hbs[-1].detail
    _infer_now(rt)  # still on: still no chunk
    assert _drain(pull)[0] == [] and rt.stats.counters["policy_errors"] == 2

    assert _ask(rt, req, {"inject": "none"})["fault"] == "none"
    _infer_now(rt)
    chunks, _ = _drain(pull)
    assert len(chunks) == 1 and np.isfinite(chunks[0].actions).all() and rt.health == "ok"
    rt.next_heartbeat = 0.0  # the next heartbeat says so
    rt.step(time.monotonic())
    assert _drain(pull)[1][-1].health == "ok"
    assert rt.report()["faults_injected"]["nan"] == 1


def test_outside_limits_sends_actions_beyond_every_joint_limit(rig):
    rt, pull, req = rig()
    assert _ask(rt, req, {"inject": "outside_limits"})["ok"]
    _drain(pull)
    _infer_now(rt)
    chunks, _ = _drain(pull)
    _, hi = _limits(rt)
    assert len(chunks) == 1 and rt.health == "ok"
    assert chunks[0].actions.shape == (32, 17) and (chunks[0].actions > hi).all()


def test_jump_stays_inside_the_limits_but_moves_half_a_radian(rig):
    rt, pull, req = rig()
    seen = _spy(rt)
    assert _ask(rt, req, {"inject": "jump"})["ok"]
    _drain(pull)
    _infer_now(rt)
    chunks, _ = _drain(pull)
    lo, hi = _limits(rt)
    a = chunks[0].actions
    assert len(chunks) == 1 and (a >= lo).all() and (a <= hi).all()
    np.testing.assert_allclose(a, np.clip(seen[-1] + 0.5, lo + 0.01, hi - 0.01), atol=1e-6)
    assert np.abs(a - seen[-1]).max() > 0.3  # beyond the controller's default max_first_step


def test_slow_is_an_overrun(rig):
    rt, pull, req = rig("policy.max_inference_s=0.03")
    assert _ask(rt, req, {"inject": "slow"})["ok"]
    _drain(pull)
    _infer_now(rt)
    chunks, hbs = _drain(pull)
    assert chunks == [] and rt.stats.counters["overruns"] == 1
    assert hbs[-1].health == "fault" and "inference took" in hbs[-1].detail


def test_frozen_camera_is_stale_then_a_fault_then_recovers(rig):
    rt, pull, req = rig("policy.frame_max_age_s=0.05", "policy.frame_fault_s=0.2", "policy.rate_hz=50")
    _infer_now(rt)
    assert _drain(pull)[0], "healthy before the fault"
    assert _ask(rt, req, {"inject": "freeze_camera"})["ok"]
    seqs = set()
    deadline = time.monotonic() + 0.6
    while time.monotonic() < deadline:
        _infer_now(rt)
        seqs.add(rt.camera.latest().seq)
        time.sleep(0.01)
    chunks, hbs = _drain(pull)
    assert len(seqs) == 1  # the same frame over and over
    # at most one while the frame was still young
    assert rt.stats.counters["skipped_stale_frame"] > 0 and len(chunks) <= 1
    assert rt.health == "fault" and "no fresh camera frame" in rt.detail
    assert hbs[-1].health == "fault" and "camera" in hbs[-1].detail
    assert rt.report()["camera"]["frozen"] is True

    assert _ask(rt, req, {"inject": "none"})["ok"]
    _infer_now(rt)
    chunks, hbs = _drain(pull)
    assert len(chunks) == 1 and rt.health == "ok" and rt.camera.latest().seq not in seqs


@pytest.mark.parametrize("raw, error", [
    (b"\xc1 not msgpack", "could not decode the request as msgpack"),
    (msgpack.packb([1, 2]), "a request is a msgpack map"),
    (msgpack.packb({"bogus": 1}), "unknown request key 'bogus'"),
    (msgpack.packb({"inject": "explode"}), "unknown fault 'explode'"),
    (msgpack.packb({"inject": 3}), "unknown fault 3"),
    (msgpack.packb({"inject": "nan", "status": True}), "exactly one key"),
    (msgpack.packb({}), "exactly one key"),
    (msgpack.packb({"status": False}), "status takes true"),
    (msgpack.packb({1: "nan"}), "not allowed for map key"),  # non-string keys are refused while decoding
    (msgpack.packb({"inject": "x" * 5000}), "larger than 4096"),
])
def test_bad_requests_are_refused_and_change_nothing(rig, raw, error):
    rt, _, req = rig()
    assert _ask(rt, req, {"inject": "jump"})["ok"]
    reply = _ask(rt, req, raw=raw)
    assert reply["ok"] is False and error in reply["error"], reply
    status = _ask(rt, req, {"status": True})
    assert status["ok"] is True and status["fault"] == "jump"
    assert status["injected"] == {"nan": 0, "outside_limits": 0, "jump": 1, "slow": 0, "freeze_camera": 0}


def test_a_multipart_request_is_refused(rig):
    rt, _, req = rig()
    req.send_multipart([msgpack.packb({"inject": "nan"}), b"more"])
    deadline = time.monotonic() + 2
    while not req.poll(0):
        rt.next_infer = time.monotonic() + 60
        rt.step(time.monotonic())
        assert time.monotonic() < deadline
    reply = msgpack.unpackb(req.recv(), raw=False)
    assert reply["ok"] is False and "one message part" in reply["error"] and rt.faults.fault == "none"


def test_status_says_the_current_fault_and_since_when(rig):
    rt, _, req = rig()
    t = _ask(rt, req, {"inject": "slow"})["t"]
    status = _ask(rt, req, {"status": True})
    assert status["ok"] is True and status["fault"] == "slow" and status["t"] == t


def test_the_running_loop_wakes_for_a_request(rig):
    # nothing else is due for seconds: only the fault socket can wake the loop
    rt, _, _ = rig("policy.rate_hz=0.2", "transport.heartbeat_hz=0.5")
    stop = threading.Event()
    loop = threading.Thread(target=rt.run, args=(lambda: not stop.is_set(),))
    ctx = zmq.Context.instance()
    loop.start()
    try:
        time.sleep(0.1)  # in its long wait now
        t0 = time.monotonic()
        raw = sockets.request(ctx, rt._fault_socket.endpoint, msgpack.packb({"inject": "nan"}), 1.0)
        took = time.monotonic() - t0
    finally:
        stop.set()
        sockets.request(ctx, rt._fault_socket.endpoint, msgpack.packb({"status": True}), 0.2)  # wakes it to end
        loop.join(5)
    assert not loop.is_alive()
    reply = msgpack.unpackb(raw, raw=False)
    assert reply["ok"] and reply["fault"] == "nan" and t0 <= reply["t"] <= t0 + took
    assert took < 0.2, f"the loop answered after {took:.3f} s"


def test_disabled_binds_nothing_and_wraps_nothing(rig, tmp_path):
    rt, _, _ = rig(enabled=False)
    assert type(rt.policy) is Policy and not isinstance(rt.camera, FaultInjectingCamera)
    assert rt.faults is None and rt._fault_socket is None and "faults_injected" not in rt.report()
    assert not os.path.exists(f"{tmp_path}/faults")
    rt.step(time.monotonic())
    ctx = zmq.Context.instance()
    assert sockets.request(ctx, f"ipc://{tmp_path}/faults", msgpack.packb({"status": True}), 0.2) is None


# -- the stand-ins on their own -------------------------------------------------------------------------------------


class _StillCamera(CameraSource):
    """A camera whose frames only change when told to."""

    def __init__(self):
        from runtime.cameras.base import CameraFrame
        self._make = lambda seq: CameraFrame(seq, time.monotonic(), {"head": np.zeros((2, 2, 3), np.uint8)})
        self.frame = self._make(1)

    names = ("head",)

    def start(self):
        pass

    def latest(self):
        return self.frame

    def wait_newer(self, after_seq, timeout):
        return self.frame if self.frame.seq > after_seq else None

    def close(self):
        pass

    def stats(self):
        return {"frames": self.frame.seq}

    def advance(self):
        self.frame = self._make(self.frame.seq + 1)


def test_frozen_camera_keeps_the_frame_it_last_handed_out():
    injector = FaultInjector()
    inner = _StillCamera()
    cam = FaultInjectingCamera(inner, injector)
    first = cam.latest()
    injector.inject("freeze_camera")
    inner.advance()
    assert cam.latest() is first and cam.wait_newer(0, 0.1) is first
    t0 = time.monotonic()
    assert cam.wait_newer(first.seq, 0.05) is None and time.monotonic() - t0 >= 0.05
    injector.inject("none")
    assert cam.latest().seq == 2 and cam.stats()["freezes"] == 1 and cam.stats()["frozen"] is False


def test_unknown_fault_name_raises():
    with pytest.raises(ValueError, match="unknown fault"):
        FaultInjector().inject("gremlins")
