"""The G1 DDS link: the LowCmd CRC, wire layouts against cyclonedds' serializer, and real DDS on loopback between
G1Link / DdsG1Driver and SimulatedG1Dds (in a thread, and in a separate process)."""

import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from typing import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip(
    "cyclonedds",
    reason="cyclonedds (the CycloneDDS Python binding) is not installed: run tools/install_dds.sh to test the DDS link",
)

from runtime.robot import (
    g1,  # noqa: E402
    remote,  # noqa: E402
)
from runtime.robot.dds import crc as crcmod  # noqa: E402
from runtime.robot.dds import idl_layout, transport  # noqa: E402
from runtime.robot.dds.cdr_buffers import LowCmdBuffer, LowStateBuffer  # noqa: E402
from runtime.robot.dds.driver import DdsG1Driver, release_motion_control  # noqa: E402
from runtime.robot.dds.link import G1Link  # noqa: E402
from runtime.robot.dds.sim import SimulatedG1Dds  # noqa: E402
from runtime.robot.dds.unitree_hg import (  # noqa: E402
    HandCmd_,
    HandState_,
    IMUState_,
    LowCmd_,
    LowState_,
    MotorCmd_,
    MotorState_,
)
from runtime.robot.driver import ARM_SDK, LOWCMD  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BASE = random.Random().randint(100, 200)  # DDS domain ids (< 233): one per test, random per run: no cross-talk
_next_domain = [_BASE]


def new_domain() -> int:
    _next_domain[0] += 1
    return _next_domain[0]


def wait_until(cond: Callable[[], bool], timeout: float = 5.0, poll: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(poll)
    return cond()


def drive(drv: DdsG1Driver, seconds: float, period: float = 0.002) -> None:
    """A minimal controller loop: read, write, at ~500 Hz."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        drv.read(time.monotonic())
        drv.write()
        time.sleep(period)


# -- CRC --------------------------------------------------------------------------------------------------------------


def mpeg2_bytewise(data: bytes) -> int:
    """CRC-32/MPEG-2 byte by byte, MSB first (a second, independent reference)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) & 0xFFFFFFFF if crc & 0x80000000 else (crc << 1) & 0xFFFFFFFF
    return crc


def test_crc_test_vector_all_zero_lowcmd():
    zero = bytes(idl_layout.LOWCMD_LAYOUT.c_size)
    assert crcmod.crc32_reference(zero[:1000]) == crcmod.ZERO_LOWCMD_CRC == 0xFE172F9F
    assert crcmod.crc32_words(zero[:1000]) == 0xFE172F9F
    assert crcmod.lowcmd_crc(zero) == 0xFE172F9F
    packed = crcmod.pack_lowcmd()
    assert len(packed) == 1004 and struct.unpack_from("<I", packed, 1000)[0] == 0xFE172F9F
    assert crcmod.idl_lowcmd_crc(LowCmd_()) == 0xFE172F9F


def test_mpeg2_reference_check_value_and_zlib_identity():
    assert mpeg2_bytewise(b"123456789") == 0x0376E6E7  # the catalogued check value of CRC-32/MPEG-2
    rev8 = bytes(int("{:08b}".format(i)[::-1], 2) for i in range(256))
    for data in (b"123456789", bytes(range(256)), os.urandom(1000)):
        x = zlib.crc32(data.translate(rev8)) ^ 0xFFFFFFFF
        assert int("{:032b}".format(x)[::-1], 2) == mpeg2_bytewise(data)


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=0, max_size=1100).map(lambda b: b[:len(b) // 4 * 4]))
def test_fast_crc_equals_reference(data):
    ref = crcmod.crc32_reference(data)
    assert crcmod.crc32_words(data) == ref
    # word-at-a-time MSB first == MPEG-2 over the byte-swapped words
    swapped = b"".join(data[i:i + 4][::-1] for i in range(0, len(data), 4))
    assert mpeg2_bytewise(swapped) == ref


f32 = st.floats(-1e6, 1e6, width=32)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 255), st.integers(0, 255), st.lists(st.integers(0, 255), min_size=35, max_size=35),
       st.lists(f32, min_size=35 * 5, max_size=35 * 5), st.lists(st.integers(0, 2 ** 32 - 1), min_size=4, max_size=4))
def test_packed_lowcmd_crc_matches_reference_and_idl_struct(mode_pr, mode_machine, modes, floats, reserve):
    v = np.array(floats, dtype=np.float32).reshape(5, 35)
    packed = crcmod.pack_lowcmd(mode_pr, mode_machine, np.array(modes), v[0], v[1], v[2], v[3], v[4],
                                reserve=np.array(reserve, dtype=np.uint32))
    crc = struct.unpack_from("<I", packed, 1000)[0]
    assert crc == crcmod.crc32_reference(packed[:1000])
    msg = LowCmd_(mode_pr=mode_pr, mode_machine=mode_machine, reserve=list(reserve), motor_cmd=[
        MotorCmd_(mode=modes[i], q=float(v[0, i]), dq=float(v[1, i]), tau=float(v[2, i]), kp=float(v[3, i]),
                  kd=float(v[4, i])) for i in range(35)])
    assert crcmod.idl_lowcmd_crc(msg) == crc


def test_crc_speed_is_fit_for_500_hz():
    buf = LowCmdBuffer()
    buf.q[:] = np.linspace(-1, 1, 35)
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        buf.seal()
    per = (time.perf_counter() - t0) / n
    assert per < 200e-6, "crc + CDR layout took {:.1f} us".format(per * 1e6)


# -- types and layouts ------------------------------------------------------------------------------------------------


def test_type_names_and_sizes():
    for cls in (MotorCmd_, LowCmd_, MotorState_, IMUState_, LowState_, HandCmd_, HandState_):
        assert cls.__idl_typename__ == "unitree_hg.msg.dds_." + cls.__name__
    assert idl_layout.LOWCMD_DTYPE.itemsize == 1004 and idl_layout.LOWSTATE_DTYPE.itemsize == 2092
    assert idl_layout.LOWCMD_DTYPE.fields["motor_cmd"][1] == 4 and idl_layout.LOWCMD_DTYPE.fields["crc"][1] == 1000
    assert idl_layout.LOWSTATE_DTYPE.fields["motor_state"][1] == 72
    assert idl_layout.LOWSTATE_DTYPE.fields["crc"][1] == 2088
    # XCDR1: a 4-byte encapsulation header (little-endian plain CDR) + payload. CDR aligns each primitive but does
    # not pad struct ends, so its payload is 4 bytes shorter than the C struct; with the header, the same size.
    low_cmd = LowCmd_().serialize()
    low_state = LowState_().serialize()
    assert low_cmd[:4] == b"\x00\x01\x00\x00" and low_state[:4] == b"\x00\x01\x00\x00"
    assert len(low_cmd) == 4 + idl_layout.LOWCMD_LAYOUT.cdr_size == 1004
    assert len(low_state) == 4 + idl_layout.LOWSTATE_LAYOUT.cdr_size == 2092


def fill_lowcmd(buf: LowCmdBuffer, rng) -> None:
    buf.mode_pr[0], buf.mode_machine[0] = rng.integers(0, 256, 2)
    buf.mode[:] = rng.integers(0, 256, 35)
    for name in ("q", "dq", "tau", "kp", "kd"):
        getattr(buf, name)[:] = rng.normal(size=35) * 10
    buf.rec["motor_cmd"][0]["reserve"] = rng.integers(0, 2 ** 32, 35)
    buf.rec["reserve"][0] = rng.integers(0, 2 ** 32, 4)


def fill_lowstate(buf: LowStateBuffer, rng) -> None:
    buf.rec["version"][0] = rng.integers(0, 2 ** 32, 2)
    buf.mode_pr[0], buf.mode_machine[0] = rng.integers(0, 256, 2)
    buf.tick[0] = rng.integers(0, 2 ** 32)
    for name in ("quaternion", "gyroscope", "accelerometer", "rpy"):
        getattr(buf, name)[:] = rng.normal(size=getattr(buf, name).shape)
    buf.rec["imu_state"]["temperature"] = rng.integers(-300, 300)
    ms = buf.rec["motor_state"][0]
    ms["mode"] = rng.integers(0, 256, 35)
    for name in ("q", "dq", "ddq", "tau_est", "vol"):
        ms[name] = rng.normal(size=35)
    ms["temperature"] = rng.integers(-100, 200, (35, 2))
    ms["sensor"] = rng.integers(0, 2 ** 32, (35, 2))
    ms["motorstate"] = rng.integers(0, 2 ** 32, 35)
    ms["reserve"] = rng.integers(0, 2 ** 32, (35, 4))
    buf.wireless_remote[:] = rng.integers(0, 256, 40)
    buf.rec["reserve"][0] = rng.integers(0, 2 ** 32, 4)


def test_lowcmd_bytes_equal_cyclonedds_serialization():
    rng = np.random.default_rng(1)
    for _ in range(5):
        buf = LowCmdBuffer()
        fill_lowcmd(buf, rng)
        crc = buf.seal()
        msg = LowCmd_.deserialize(buf.cdr.tobytes())
        assert msg.serialize() == buf.cdr.tobytes()  # our layout is cyclonedds' layout, byte for byte
        assert msg.crc == crc == crcmod.idl_lowcmd_crc(msg)
        assert msg.motor_cmd[7].q == float(buf.q[7]) and msg.motor_cmd[34].mode == buf.mode[34]
        back = LowCmdBuffer()
        assert back.load(msg.serialize()) and back.crc_ok()
        assert np.array_equal(back.c, buf.c)


def test_lowstate_bytes_equal_cyclonedds_serialization():
    rng = np.random.default_rng(2)
    for _ in range(5):
        buf = LowStateBuffer()
        fill_lowstate(buf, rng)
        buf.seal()
        msg = LowState_.deserialize(buf.cdr.tobytes())
        assert msg.serialize() == buf.cdr.tobytes()
        assert msg.tick == int(buf.tick[0]) and list(msg.wireless_remote) == buf.wireless_remote.tolist()
        assert msg.motor_state[3].temperature == buf.temperature[3].tolist()
        assert msg.imu_state.rpy[1] == float(buf.rpy[1])
        back = LowStateBuffer()
        assert back.load(msg.serialize()) and back.crc_ok()
        assert np.array_equal(back.c, buf.c)
    # whatever a sender leaves in CDR padding, the C image (and so the crc) has zero padding
    noisy = bytearray(msg.serialize())
    state = idl_layout.LOWSTATE_LAYOUT
    pad = np.flatnonzero(state.c_padding[state.cdr_from_c]) + 4  # CDR padding, header skipped
    assert len(pad) > 0
    for i in pad:
        noisy[i] = 0xAA
    back = LowStateBuffer()
    assert back.load(bytes(noisy)) and back.crc_ok() and np.array_equal(back.c, buf.c)
    assert not LowStateBuffer().load(b"\x00\x00\x00\x00" + bytes(2088))  # big-endian: not taken in place
    assert not LowStateBuffer().load(b"\x00\x01\x00\x00" + bytes(100))  # short


IDL = """
module unitree_hg { module msg { module dds_ {
  @final struct MotorCmd_ { octet mode; float q; float dq; float tau; float kp; float kd; unsigned long reserve; };
  @final struct LowCmd_ {
    octet mode_pr; octet mode_machine; MotorCmd_ motor_cmd[35]; unsigned long reserve[4]; unsigned long crc; };
  @final struct MotorState_ { octet mode; float q; float dq; float ddq; float tau_est; short temperature[2];
    float vol; unsigned long sensor[2]; unsigned long motorstate; unsigned long reserve[4]; };
  @final struct IMUState_ {
    float quaternion[4]; float gyroscope[3]; float accelerometer[3]; float rpy[3]; short temperature; };
  @final struct LowState_ { unsigned long version[2]; octet mode_pr; octet mode_machine; unsigned long tick;
    IMUState_ imu_state; MotorState_ motor_state[35]; octet wireless_remote[40]; unsigned long reserve[4];
    unsigned long crc; };
}; }; };
"""


@pytest.mark.skipif(shutil.which("idlc") is None, reason="idlc (Debian cyclonedds-tools) not installed")
def test_type_information_equals_what_idlc_generates_for_c(tmp_path):
    """DDS matches types by their XTypes TypeInformation: ours must be what C code generated from the IDL (written
    from g1-wire.md's field list) advertises, byte for byte."""
    (tmp_path / "hg.idl").write_text(IDL)
    subprocess.run(["idlc", "-l", "c", "hg.idl"], cwd=str(tmp_path), check=True, capture_output=True)
    generated = (tmp_path / "hg.c").read_text()
    for cls in (LowCmd_, LowState_):
        m = re.search(r"#define TYPE_INFO_CDR_unitree_hg_msg_dds__%s \(unsigned char \[\]\)\{(.*?)\}\n" % cls.__name__,
                      generated, re.S)
        assert m, cls.__name__
        c_info = bytes(int(x, 16) for x in re.findall(r"0x[0-9a-fA-F]{2}", m.group(1)))
        ours = cls.__idl__.get_type_info().serialize(use_version_2=True)
        assert ours[4:] == c_info, cls.__name__  # ours carries the 4-byte encapsulation header


def test_hand_types_round_trip():
    cmd = HandCmd_(motor_cmd=[MotorCmd_(mode=1, q=0.25 * i) for i in range(7)])
    assert HandCmd_.deserialize(cmd.serialize()) == cmd
    state = HandState_(power_v=24.0)
    assert HandState_.deserialize(state.serialize()) == state


# -- wireless remote --------------------------------------------------------------------------------------------------


def test_remote_buttons_decode_from_raw_bytes():
    raw = bytearray(40)
    raw[2], raw[3] = 0b00110000, 0b00000001  # R2 (bit 4), L2 (bit 5), A (bit 8)
    bits = remote.decode_buttons(raw)
    assert bits == (1 << 4) | (1 << 5) | (1 << 8)
    assert remote.pressed(bits) == ["R2", "L2", "A"]
    assert remote.decode_buttons(np.frombuffer(bytes(raw), dtype=np.uint8)) == bits
    enc = remote.encode_remote(["select", "left"], lx=0.5, ly=-1.0)
    assert remote.decode_buttons(enc) == (1 << 3) | (1 << 15)
    assert struct.unpack_from("<f", enc, 4)[0] == 0.5 and struct.unpack_from("<f", enc, 20)[0] == -1.0
    assert remote.decode_sticks(enc)["ly"] == -1.0
    with pytest.raises(KeyError):
        remote.button_mask(["Z"])


def test_config_xml_names_interface_or_loopback():
    lo = transport.dds_config_xml(None, loopback=True)
    assert "<AllowMulticast>false</AllowMulticast>" in lo and '<Peer address="127.0.0.1"/>' in lo
    eth = transport.dds_config_xml("eth0", loopback=False)
    assert 'NetworkInterface name="eth0"' in eth and "AllowMulticast" not in eth


# -- real DDS on loopback, simulator in a thread ----------------------------------------------------------------------


@pytest.fixture
def rig():
    """rig(mode) -> (sim, driver) on a fresh domain; closed afterwards."""
    made = []

    def make(mode=LOWCMD, **sim_kw):
        domain = new_domain()
        sim = SimulatedG1Dds(domain_id=domain, interface="lo", **sim_kw).start()
        drv = DdsG1Driver(mode, domain_id=domain, interface="lo")
        made.append((sim, drv))
        assert drv.link.wait_for_state(10.0), "no LowState from the simulator"
        return sim, drv

    yield make
    for sim, drv in made:
        drv.close()
        sim.close()


def test_lowcmd_round_trip_and_state_fields(rig):
    sim, drv = rig(LOWCMD)
    sim.set_tilt(0.2, -0.1, 0.05)
    sim.set_gyro(0.0, 0.5, 0.0)
    sim.set_temperature(np.linspace(30, 60, 29))
    target = np.clip(g1.NOMINAL_POSE + 0.2, g1.POSITION_MIN, g1.POSITION_MAX)
    c = drv.command
    c.q[:] = target
    c.kp[:] = g1.DEFAULT_KP
    c.kd[:] = g1.DEFAULT_KD
    c.enable[:] = True
    drive(drv, 0.4)
    assert wait_until(lambda: np.allclose(drv.read(0).q, target, atol=1e-3), 3.0)
    r = drv.reading
    assert np.allclose(r.rpy, [0.2, -0.1, 0.05], atol=1e-6) and np.allclose(r.gyro, [0, 0.5, 0], atol=1e-6)
    assert np.allclose(r.temperature, np.linspace(30, 60, 29), atol=1)  # int16 on the wire
    tick, count, stamp = r.tick, r.count, r.stamp
    assert wait_until(lambda: drv.read(0).tick > tick and r.count > count and r.stamp > stamp)
    assert abs(time.monotonic() - r.stamp) < 0.5
    s = sim.summary()
    assert s["lowcmd"] > 50 and s["bad_crc"] == 0 and s["wrong_mode_machine"] == 0 and s["debug_mode"]
    assert s["non_finite"] == 0 and s["out_of_limits"] == 0
    last = sim.last(1)[0]
    assert np.allclose(last["q"], target, atol=1e-6) and np.allclose(last["kp"], g1.DEFAULT_KP)
    assert drv.link.crc_errors == 0 and drv.link.unparsed == 0


def test_a_robot_state_with_a_nan_is_never_taken(rig):
    """A NaN tilt compares false with every bound: it must never reach the controller's monitors; the reading
    keeps the last finite state (which then goes stale: the controller stops)."""
    sim, drv = rig(LOWCMD)
    sim.set_tilt(0.1, 0.0, 0.0)
    assert wait_until(lambda: abs(drv.read(0).rpy[0] - 0.1) < 1e-6, 3.0)
    sim.set_tilt(float("nan"), 0.0, 0.0)
    assert wait_until(lambda: (drv.read(0), drv.link.non_finite)[1] > 5, 3.0)
    stamp = drv.reading.stamp
    time.sleep(0.1)
    drv.read(0)
    assert np.isfinite(drv.reading.rpy).all() and abs(drv.reading.rpy[0] - 0.1) < 1e-6
    assert drv.reading.stamp == stamp  # nothing taken since: the state is going stale
    sim.set_tilt(0.0, 0.0, 0.0)
    assert wait_until(lambda: drv.read(0).stamp > stamp and drv.reading.rpy[0] == 0.0, 3.0)


def test_mode_machine_is_echoed_when_the_robot_changes_it(rig):
    sim, drv = rig(LOWCMD, mode_machine=5)
    drv.command.q[:] = g1.NOMINAL_POSE
    drv.command.kp[:] = g1.DEFAULT_KP
    drv.command.enable[:] = True
    drive(drv, 0.2)
    assert drv.link.mode_machine == 5 and sim.last(1)[0]["applied"]
    sim.set_mode_machine(9)
    assert wait_until(lambda: (drv.read(0), drv.link.mode_machine)[1] == 9)
    before = sim.log.n
    drive(drv, 0.2)
    assert wait_until(lambda: sim.log.n >= before + 20)
    last = sim.last(10)
    assert all(e["applied"] for e in last)  # the new value is echoed: the sim accepts the commands
    raw = LowCmdBuffer()
    assert raw.load(drv.link.command.cdr.tobytes()) and int(raw.mode_machine[0]) == 9 and raw.crc_ok()
    assert int(raw.mode_pr[0]) == 0
    assert sim.summary()["wrong_mode_machine"] <= 3  # at most the few in flight while it changed


def test_bad_crc_is_ignored_and_counted(rig):
    sim, drv = rig(LOWCMD)
    w = transport.writer(drv.link.participant, transport.LOWCMD_TOPIC, LowCmd_)
    msg = LowCmd_(mode_machine=sim.mode_machine, motor_cmd=[MotorCmd_(mode=1, q=0.3, kp=50.0) for _ in range(35)])
    msg.crc = crcmod.idl_lowcmd_crc(msg) ^ 1
    # cyclonedds' own DataWriter and IdlStruct serializer: also proves our types interoperate with the public API
    assert wait_until(lambda: (w.write(msg), sim.summary()["bad_crc"])[1] >= 1, 3.0)
    s = sim.summary()
    assert s["bad_crc"] >= 1 and s["lowcmd"] == s["bad_crc"] and not s["debug_mode"]
    assert np.allclose(sim.q, g1.NOMINAL_POSE)  # nothing applied
    raw = LowCmdBuffer()  # our own raw path with a corrupt crc: also ignored
    raw.mode_machine[0] = sim.mode_machine
    raw.rec["crc"] = 12345
    raw.seal_without_crc()
    before = sim.summary()["bad_crc"]
    assert wait_until(lambda: (transport.write_raw(w, raw.cdr), sim.summary()["bad_crc"])[1] > before, 3.0)
    assert not sim.debug_mode
    msg.crc = crcmod.idl_lowcmd_crc(msg)  # the same command with the right crc is taken
    assert wait_until(lambda: (w.write(msg), sim.debug_mode)[1], 3.0)
    assert wait_until(lambda: abs(sim.q[0] - 0.3) < 1e-3)
    transport.delete(w)


def test_arm_sdk_weight_blends_upper_body_and_leaves_legs(rig):
    sim, drv = rig(ARM_SDK)
    c = drv.command
    c.q[:] = 5.0  # legs: never sent in arm_sdk mode (would be out of limits)
    c.q[12:29] = np.clip(g1.NOMINAL_POSE[12:29] + 0.4, g1.POSITION_MIN[12:29], g1.POSITION_MAX[12:29])
    c.kp[12:29] = 60.0
    c.kd[12:29] = 1.5
    c.enable[12:29] = True
    hold = g1.NOMINAL_POSE
    upper = slice(12, 29)
    for weight, expect in ((0.0, hold[upper]), (0.5, 0.5 * (hold[upper] + c.q[upper])), (1.0, c.q[upper])):
        c.weight = weight
        drive(drv, 0.3)
        assert wait_until(lambda e=expect: np.allclose(drv.read(0).q[upper], e, atol=2e-3), 3.0), weight
        assert np.allclose(drv.reading.q[:12], hold[:12], atol=1e-6)  # legs stay Unitree's
    last = sim.last(1)[0]
    assert last["topic"] == "arm_sdk" and last["weight"] == 1.0 and last["q"][0] == 0.0  # legs zeroed
    s = sim.summary()
    assert s["arm_sdk"] > 0 and s["lowcmd"] == 0 and not s["debug_mode"] and s["out_of_limits"] == 0
    c.weight = 7.0  # clipped to 1 by the driver
    drv.write()
    assert wait_until(lambda: sim.last(1)[0]["weight"] == 1.0)


def test_damping_and_limp_joints_come_to_rest(rig):
    sim, drv = rig(LOWCMD)
    c = drv.command
    c.q[:] = g1.NOMINAL_POSE
    c.q[3] = 1.0  # knee swings toward 1.0
    c.kp[:] = g1.DEFAULT_KP
    c.enable[:] = True
    drive(drv, 0.02)
    c.kp[:] = 0.0
    c.kd[:] = 8.0  # Unitree's damping stop
    c.q[:] = 0.0
    drive(drv, 0.5)
    q_rest = drv.read(0).q.copy()
    assert 0.0 < q_rest[3] < 1.0  # stopped part way, did not go to the (ignored) target
    assert np.abs(drv.reading.dq).max() < 1e-2
    c.enable[:] = False
    c.kd[:] = 0.0
    drive(drv, 0.2)
    assert np.allclose(drv.read(0).q, q_rest, atol=1e-2)  # limp, no gravity: holds still


def test_buttons_freeze_and_link_waits_for_state(rig):
    sim, drv = rig(LOWCMD)
    sim.press(["L2", "R2"])
    assert wait_until(lambda: drv.read(0).buttons == (1 << 4) | (1 << 5))
    assert remote.pressed(drv.reading.buttons) == ["R2", "L2"]
    assert drv.link.wireless_remote[2] == 0b00110000
    sim.press([])
    assert wait_until(lambda: drv.read(0).buttons == 0)
    sim.freeze(True)
    time.sleep(0.05)
    drv.read(0)
    stamp, count = drv.reading.stamp, drv.reading.count
    time.sleep(0.2)
    assert drv.read(0).count == count and drv.reading.stamp == stamp  # stale: nothing new arrives
    sim.freeze(False)
    assert wait_until(lambda: drv.read(0).count > count)
    # a fresh link on a domain with no robot sends nothing
    lonely = G1Link(new_domain(), "lo")
    assert not lonely.wait_for_state(0.1) and not lonely.publish() and lonely.published == 0
    lonely.close()


def test_driver_refuses_non_finite_commands(rig):
    sim, drv = rig(LOWCMD)
    drv.command.kp[:] = 10.0
    drv.command.q[4] = np.nan
    with pytest.raises(ValueError):
        drv.write()
    drv.command.q[4] = 1e300  # overflows float32 to inf
    with pytest.raises(ValueError):
        drv.write()
    assert sim.summary()["commands"] == 0


def test_release_motion_control_without_sdk_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "unitree_sdk2py", None)
    with pytest.raises(RuntimeError, match="L2 and R2"):
        release_motion_control()


# -- real DDS on loopback, simulator in its own process ---------------------------------------------------------------


def test_simulator_process_both_modes_buttons_and_summary():
    zmq = pytest.importorskip("zmq")
    import msgpack

    domain = new_domain()
    tmp = tempfile.mkdtemp(prefix="g1sim-")
    control = "ipc://" + os.path.join(tmp, "control.ipc")
    summary_path = os.path.join(tmp, "summary.json")
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.robot.dds.sim", "--domain-id", str(domain), "--interface", "lo",
         "--control", control, "--seconds", "30", "--mode-machine", "3", "--summary-path", summary_path],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    arm = low = None
    try:
        assert json.loads(proc.stdout.readline())["sim"] == "ready"
        sock.connect(control)

        def request(**msg):
            sock.send(msgpack.packb(msg))
            reply = msgpack.unpackb(sock.recv(), raw=False)
            assert reply["ok"], reply
            return reply

        arm = DdsG1Driver(ARM_SDK, domain_id=domain, interface="lo")
        assert arm.link.wait_for_state(10.0)
        assert arm.link.mode_machine == 3
        request(press=["A", "start"], tilt=[0.5, 0.0, 0.0], temperature=95)
        assert wait_until(lambda: arm.read(0).buttons == (1 << 8) | (1 << 2))
        assert abs(arm.reading.rpy[0] - 0.5) < 1e-6 and arm.reading.temperature.min() == 95
        c = arm.command
        c.q[12:29] = g1.NOMINAL_POSE[12:29] + 0.1
        c.kp[12:29] = 60.0
        c.enable[12:29] = True
        c.weight = 1.0
        t_arm = time.monotonic()
        drive(arm, 0.3)
        assert wait_until(lambda: np.allclose(arm.read(0).q[12:29], c.q[12:29], atol=2e-3), 3.0)
        arm.close()
        arm = None

        low = DdsG1Driver(LOWCMD, domain_id=domain, interface="lo")
        assert low.link.wait_for_state(10.0)
        request(mode_machine=4)
        assert wait_until(lambda: (low.read(0), low.link.mode_machine)[1] == 4)
        target = np.clip(g1.NOMINAL_POSE - 0.1, g1.POSITION_MIN, g1.POSITION_MAX)
        low.command.q[:] = target
        low.command.kp[:] = g1.DEFAULT_KP
        low.command.kd[:] = g1.DEFAULT_KD
        low.command.enable[:] = True
        t_low = time.monotonic()
        drive(low, 0.3)
        assert wait_until(lambda: np.allclose(low.read(0).q, target, atol=2e-3), 3.0)
        summary = request(summary={"since": t_low})["summary"]
        assert summary["first_command_after"] >= t_low > t_arm >= 0
        assert summary["first_command_t"] >= t_arm
        assert summary["arm_sdk"] > 20 and summary["lowcmd"] > 20 and summary["debug_mode"]
        assert summary["bad_crc"] == 0 and summary["non_finite"] == 0 and summary["out_of_limits"] == 0
        assert summary["wrong_mode_machine"] == 0 and summary["mode_machine"] == 4
        request(stop=True)
        assert proc.wait(10) == 0
        with open(summary_path) as f:
            final = json.load(f)
        assert final["lowcmd"] >= summary["lowcmd"] and final["published"] > 100
    finally:
        for drv in (arm, low):
            if drv is not None:
                drv.close()
        sock.close(linger=0)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- the simulated G1's step judge: the step weighted by the command's authority (issue 10, item 11) -----------------

def _log_commands(log, topic, rows):
    """Record (q, kp, weight) rows as consecutive valid commands of ``topic`` (0 lowcmd, 1 arm_sdk)."""
    cmd = LowCmdBuffer()
    for i, (q, kp, weight) in enumerate(rows):
        cmd.q[:29] = q
        cmd.kp[:29] = kp
        cmd.q[g1.ARM_SDK_WEIGHT_SLOT] = weight
        log.record(float(i), topic, cmd, True, True, True)


def test_command_log_judges_the_effective_step_not_the_targets_alone():
    from runtime.robot.dds.sim import CommandLog

    step = 2.0 / 500.0
    here, there = g1.NOMINAL_POSE, g1.NOMINAL_POSE + 0.3
    log = CommandLog()
    # arm_sdk: a stop left the targets there at weight 0; re-armed, the targets jump to where the robot is, weight 0
    _log_commands(log, 1, [(there, g1.DEFAULT_KP, 0.0), (here, g1.DEFAULT_KP, 0.0), (here, g1.DEFAULT_KP, 0.004),
                           (here + step, g1.DEFAULT_KP, 1.0)])
    s = log.summary()
    assert max(s["max_q_step_arm_sdk"]) == pytest.approx(step, abs=1e-6)  # no step beyond the limit
    assert max(s["max_target_step_arm_sdk"]) == pytest.approx(0.3, abs=1e-6)  # on the wire, rightly
    _log_commands(log, 1, [(here, g1.DEFAULT_KP, 0.0), (there, g1.DEFAULT_KP, 1.0)])  # a jump at full weight
    assert max(log.summary()["max_q_step_arm_sdk"]) == pytest.approx(0.3, abs=1e-6)
    # lowcmd: kp 0 (damping, arming from where the robot is) makes no step; at the default gains a jump is one
    _log_commands(log, 0, [(there, np.zeros(29), 0.0), (here, np.zeros(29), 0.0), (here, 0.01 * g1.DEFAULT_KP, 0.0)])
    assert max(log.summary()["max_q_step_lowcmd"]) == 0.0
    _log_commands(log, 0, [(there, g1.DEFAULT_KP, 0.0)])
    s = log.summary()
    assert max(s["max_q_step_lowcmd"]) == pytest.approx(0.3, abs=1e-6) and max(s["max_q_step"]) >= 0.3 - 1e-6


def test_a_controller_re_arming_over_dds_jumps_only_at_weight_0_and_the_judge_passes_it(tmp_path):
    """The real controller on rt/arm_sdk, stopped where the robot was driven, re-armed once Unitree's controller
    took the arms back: its first targets jump to the measured pose at weight 0, on the wire; judged effective, no
    step beyond the velocity limit."""
    import zmq

    from runtime.config import load_config
    from runtime.controller.controller import Controller
    from runtime.controller.safety import RUNNING, STOPPED
    from runtime.protocol import ActionChunk, encode_chunk

    domain = new_domain()
    sim = SimulatedG1Dds(domain_id=domain, interface="lo").start()
    cfg = load_config(None, [f"transport.chunks=ipc://{tmp_path}/chunks", f"transport.state=ipc://{tmp_path}/state",
                             f"transport.control=ipc://{tmp_path}/control",
                             f"controller.latch_file={tmp_path}/estop.latched",
                             f"controller.command_record={tmp_path}/controller.record", "controller.mode=arm_sdk",
                             "controller.arm_ramp_s=0.1", "controller.stop_ramp_s=0.1",
                             "controller.chunk_timeout_s=5", "controller.heartbeat_timeout_s=5",
                             "controller.hold_s=5"])
    ctx = zmq.Context()
    drv = DdsG1Driver(ARM_SDK, domain_id=domain, interface="lo")
    c = Controller(cfg, drv, ctx)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(cfg["transport"]["chunks"])

    def run(seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            c.tick(time.monotonic())
            time.sleep(0.002)

    try:
        assert drv.link.wait_for_state(10.0)
        run(0.05)
        assert c._operator("arm", time.monotonic(), "test").ok
        run(0.2)
        assert c.sm.state == RUNNING
        arm = g1.indices(g1.UPPER_BODY)
        start = c.q_cmd[arm].copy()
        goal = np.clip(start + 0.25, g1.POSITION_MIN[arm] + 0.05, g1.POSITION_MAX[arm] - 0.05)
        actions = np.linspace(start, goal, 8).astype(np.float32)
        push.send(encode_chunk(ActionChunk("s", 0, 1, time.monotonic(), time.monotonic(), 0.05, g1.UPPER_BODY,
                                           actions)))
        run(0.6)
        assert np.abs(c.q_cmd[arm] - goal).max() < 1e-3 and c.chunks_applied == 1
        assert c._operator("stop", time.monotonic(), "test").ok
        run(0.5)  # released; Unitree's controller takes the arms back to its own pose
        assert c.sm.state == STOPPED and drv.command.weight == 0.0
        assert np.abs(drv.read(time.monotonic()).q[arm] - goal).max() > 0.1
        assert c._operator("arm", time.monotonic(), "test").ok
        run(0.2)
        assert c.sm.state == RUNNING
        time.sleep(0.05)
        s = sim.summary()
        assert max(s["max_q_step_arm_sdk"]) <= c.limiter.max_step + 1e-5
        assert max(s["max_target_step_arm_sdk"]) > 0.1  # the re-arm's targets jumped, at weight 0
        assert s["bad_crc"] == 0 and s["out_of_limits"] == 0 and s["non_finite"] == 0
    finally:
        push.close()
        c.close()  # closes the driver
        ctx.term()
        sim.close()
