"""What the controller does with the robot state it is given: a LowState whose CRC does not match is refused (it
counts as missing state: the controller stops on its age), and the tilt stop reads the IMU's quaternion (rpy only
where the quaternion is unusable). Real DDS on loopback and the real Controller; the robot is a publisher of
LowState in this process (the hardware we cannot have), or the in-process simulated G1."""

import logging
import math
import random
import threading
import time

import numpy as np
import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st

from runtime.config import ConfigError, load_config
from runtime.controller.controller import Controller
from runtime.controller.safety import RUNNING, STOPPED, STOPPING
from runtime.protocol import Command, decode, encode_command
from runtime.robot import g1, imu
from runtime.robot.driver import ARM_SDK
from runtime.robot.sim_g1 import SimulatedG1

_BASE = random.Random().randint(100, 200)  # DDS domain ids (< 233): one per test, random per run: no cross-talk
_next_domain = [_BASE]


def new_domain() -> int:
    _next_domain[0] += 1
    return _next_domain[0]


def wait_until(cond, timeout=5.0, poll=0.005):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(poll)
    return cond()


# -- roll and pitch from the quaternion ------------------------------------------------------------------------------

angle = st.floats(-1.5, 1.5)


@given(angle, angle, st.floats(-3.1, 3.1))
def test_roll_pitch_come_from_the_quaternion_whatever_rpy_says(roll, pitch, yaw):
    q = imu.quaternion_from_rpy(roll, pitch, yaw)
    r, p, from_quat = imu.roll_pitch(q, (0.0, 0.0, 0.0))
    assert from_quat and abs(r - roll) < 1e-9 and abs(p - pitch) < 1e-9
    assert imu.tilt(q, (9.0, 9.0, 0.0)) == pytest.approx(max(abs(roll), abs(pitch)), abs=1e-9)
    r32, p32, _ = imu.roll_pitch(np.asarray(q, np.float32), (0.0, 0.0, 0.0))  # as it comes off the wire
    assert abs(r32 - roll) < 1e-5 and abs(p32 - pitch) < 1e-5


@pytest.mark.parametrize("quat", [(0.0, 0.0, 0.0, 0.0), (math.nan, 0.0, 0.0, 0.0), (1.0, math.inf, 0.0, 0.0),
                                  (0.5, 0.0, 0.0, 0.0), (2.0, 0.0, 0.0, 0.0), (0.5, 0.5, 0.5, 0.5 + 0.3)])
def test_rpy_is_used_only_where_the_quaternion_is_unusable(quat):
    assert imu.roll_pitch(quat, (0.3, -0.2, 0.1)) == (0.3, -0.2, False)


def test_a_slightly_off_norm_quaternion_is_still_read_without_bias():
    q = np.asarray(imu.quaternion_from_rpy(0.4, -0.3)) * 1.05
    r, p, from_quat = imu.roll_pitch(q, (0.0, 0.0, 0.0))
    assert from_quat and abs(r - 0.4) < 1e-9 and abs(p + 0.3) < 1e-9


# -- the controller on the in-process simulated G1 -------------------------------------------------------------------


def _cfg(tmp_path, *sets):
    return load_config(None, [f"transport.chunks=ipc://{tmp_path}/chunks", f"transport.state=ipc://{tmp_path}/state",
                              f"transport.control=ipc://{tmp_path}/control",
                              f"controller.latch_file={tmp_path}/estop.latched",
                              f"controller.command_record={tmp_path}/controller.record",
                              "controller.arm_ramp_s=0.05", "controller.chunk_timeout_s=10",
                              "controller.heartbeat_timeout_s=30", "controller.estop_ramp_s=0.05", *sets])


class Running:
    """A Controller on ``driver``, armed; ``run(s)`` ticks it for s seconds; closed by the fixture."""

    def __init__(self, tmp_path, driver, *sets):
        self.ctx = zmq.Context()
        self.controller = Controller(_cfg(tmp_path, *sets), driver, self.ctx)
        self.run(0.1)  # fresh robot state
        reply = self.controller._operator("arm", time.monotonic(), "test")
        assert reply.ok, reply.detail
        self.run(0.15)
        assert self.controller.sm.state == RUNNING, self.controller.sm.describe()

    def run(self, seconds):
        end = time.monotonic() + seconds
        self.controller.run(lambda: time.monotonic() < end)

    def stop_reason(self):
        stops = self.controller.report()["stops"]
        return stops[0]["reason"] if stops else None

    def close(self):
        self.controller.close()
        self.ctx.term()


@pytest.fixture
def running(tmp_path):
    made = []

    def make(driver, *sets):
        made.append(Running(tmp_path, driver, *sets))
        return made[-1]

    yield make
    for r in made:
        r.close()


def test_a_tilt_only_the_quaternion_shows_stops_the_robot(running):
    sim = SimulatedG1(mode=ARM_SDK)
    r = running(sim, "controller.max_tilt=0.8")
    sim.tilt(0.0, 0.9, rpy=False)  # rpy stays zero, as some sources leave it
    assert sim.reading.rpy.tolist() == [0.0, 0.0, 0.0]
    r.run(0.05)
    assert r.controller.sm.state in (STOPPING, STOPPED) and "tilt 0.90 rad" in r.stop_reason()


def test_rpy_still_stops_the_robot_where_the_quaternion_is_absent(running):
    sim = SimulatedG1(mode=ARM_SDK)
    r = running(sim, "controller.max_tilt=0.8")
    sim.reading.quat[:] = 0.0  # a source that does not fill the quaternion
    r.run(0.05)
    assert r.controller.sm.state == RUNNING
    sim.reading.rpy[0] = -1.0
    r.run(0.05)
    assert r.controller.sm.state in (STOPPING, STOPPED) and "tilt 1.00 rad" in r.stop_reason()


# -- over DDS: a robot publishing LowState ---------------------------------------------------------------------------

try:
    import cyclonedds  # noqa: F401
except ImportError:
    cyclonedds = None
needs_dds = pytest.mark.skipif(cyclonedds is None, reason="cyclonedds (tools/install_dds.sh) is needed for DDS")
if cyclonedds is not None:
    from runtime.robot.dds import transport
    from runtime.robot.dds.cdr_buffers import LowStateBuffer
    from runtime.robot.dds.driver import DdsG1Driver
    from runtime.robot.dds.link import G1Link
    from runtime.robot.dds.sim import SimulatedG1Dds
    from runtime.robot.dds.unitree_hg import LowState_


class LowStateSource:
    """A stand-in for the robot's state stream (not the robot): LowState at ``rate_hz`` on rt/lowstate, level,
    at the nominal pose; a test corrupts its CRC or sets the IMU's quaternion and rpy."""

    def __init__(self, domain_id, rate_hz=250.0, crc=0):
        self.crc = crc  # 0: the right crc; "zero": the field left 0; any other int: xor-ed into the right one
        self.participant = transport.open_participant(domain_id, "lo")
        self.writer = transport.writer(self.participant, transport.LOWSTATE_TOPIC, LowState_)
        self.state = LowStateBuffer()
        st = self.state
        st.mode_machine[0] = 5
        st.q[:g1.NUM_JOINTS] = g1.NOMINAL_POSE
        st.temperature[:] = 40
        st.quaternion[:] = (1.0, 0.0, 0.0, 0.0)
        st.accelerometer[:] = (0.0, 0.0, 9.81)
        self.published = 0
        self._period = 1.0 / rate_hz
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        st = self.state
        while not self._stop.is_set():
            st.tick[0] += 1
            crc = st.seal()
            if self.crc:
                st.rec["crc"][0] = 0 if self.crc == "zero" else crc ^ self.crc
                st.seal_without_crc()
            transport.write_raw(self.writer, st.cdr)
            self.published += 1
            time.sleep(self._period)

    def close(self):
        self._stop.set()
        self._thread.join(5.0)
        transport.delete(self.writer)


@pytest.fixture
def robot():
    made = []

    def make(**kw):
        domain = new_domain()
        src = LowStateSource(domain, **kw)
        made.append(src)
        return domain, src

    yield make
    for src in made:
        src.close()


def _status(controller):
    raw = controller._command_reply(encode_command(Command("status", "test")), time.monotonic())
    return decode(raw, ("reply",), 4096).detail


@needs_dds
def test_a_bad_crc_lowstate_stream_stops_the_controller_on_stale_state(robot, running):
    domain, src = robot()
    drv = DdsG1Driver(ARM_SDK, domain, "lo")
    assert drv.link.wait_for_state(10.0)
    r = running(drv, "controller.state_timeout_s=0.3")
    src.crc = 0x1  # from now on every LowState's crc is wrong; the stream itself goes on
    sent = src.published
    r.run(1.0)
    assert src.published > sent + 50  # the robot kept publishing throughout
    assert r.controller.sm.state in (STOPPING, STOPPED)
    assert "robot state is" in r.stop_reason() and "old (limit 300 ms)" in r.stop_reason()
    link = r.controller.report()["robot_link"]
    assert link["lowstate_crc"] == "check" and link["states_refused"]["bad_crc"] > 50
    assert link["states_refused"]["non_finite"] == 0 and link["states_refused"]["unparsed"] == 0
    assert "robot state refused: " in _status(r.controller) and " bad crc" in _status(r.controller)


@needs_dds
def test_a_tilt_only_the_quaternion_shows_stops_the_robot_over_dds(robot, running):
    domain, src = robot()
    drv = DdsG1Driver(ARM_SDK, domain, "lo")
    assert drv.link.wait_for_state(10.0)
    r = running(drv, "controller.max_tilt=0.8", "controller.state_timeout_s=0.3")
    src.state.quaternion[:] = imu.quaternion_from_rpy(-0.95, 0.1, 2.0)  # rpy stays zero on the wire
    r.run(0.3)
    assert drv.reading.rpy.tolist() == [0.0, 0.0, 0.0]
    assert r.controller.sm.state in (STOPPING, STOPPED) and "tilt 0.95 rad" in r.stop_reason()


@needs_dds
def test_lowstate_crc_ignore_takes_a_simulator_s_zero_crc_and_says_so_loudly(robot, caplog):
    domain, src = robot(crc="zero")  # as unitree_mujoco leaves it
    checked = G1Link(domain, "lo")
    with caplog.at_level(logging.WARNING, logger="wam_edge.dds"):
        ignoring = G1Link(domain, "lo", lowstate_crc="ignore")
    assert any(rec.levelno == logging.WARNING and "WITHOUT checking its CRC" in rec.getMessage()
               for rec in caplog.records)
    assert ignoring.wait_for_state(5.0) and ignoring.crc_errors == 0
    assert not checked.wait_for_state(0.5) and checked.crc_errors > 10 and checked.reading.count == 0
    assert checked.report()["states_refused"]["bad_crc"] == checked.crc_errors
    checked.close()
    ignoring.close()
    with pytest.raises(ConfigError, match="lowstate_crc"):
        load_config(None, ["dds.lowstate_crc=maybe"])


@needs_dds
def test_the_dds_simulator_publishes_right_crcs_and_a_quaternion_that_matches_its_tilt():
    domain = new_domain()
    sim = SimulatedG1Dds(domain_id=domain, interface="lo").start()
    link = G1Link(domain, "lo")  # lowstate_crc: check, the default
    try:
        assert link.wait_for_state(10.0)
        sim.set_tilt(0.3, -0.25, 1.2)
        assert wait_until(lambda: (link.poll(), abs(link.reading.rpy[0] - 0.3) < 1e-6)[1], 5.0)
        roll, pitch, from_quat = imu.roll_pitch(link.reading.quat, (0.0, 0.0, 0.0))
        assert from_quat and abs(roll - 0.3) < 1e-5 and abs(pitch + 0.25) < 1e-5
        count = link.reading.count
        assert wait_until(lambda: (link.poll(), link.reading.count)[1] > count + 20, 5.0)
        assert link.crc_errors == 0 and link.unparsed == 0
    finally:
        link.close()
        sim.close()
