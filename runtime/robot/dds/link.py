"""G1Link: one participant talking to a G1 (or SimulatedG1Dds) over DDS: LowCmd out, newest LowState in.

Commands go to rt/lowcmd (full body, robot in debug mode) or rt/arm_sdk (waist + arms, Unitree's controller keeps
the legs). Every LowCmd echoes mode_machine from the newest LowState (a wrong value makes the robot ignore us, and
it can change per boot), carries mode_pr 0, and gets its CRC last. State is taken newest-only (keep-last-1 reader,
one take per poll): a slow reader sees the latest state, never a backlog. A LowState whose CRC does not match is
refused, as Unitree's C++ SDK refuses it: it counts as missing state (the controller's state-age watchdog applies).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, Optional

import numpy as np

from runtime.robot import g1
from runtime.robot.dds import transport
from runtime.robot.dds.cdr_buffers import LowCmdBuffer, LowStateBuffer
from runtime.robot.dds.unitree_hg import LowCmd_, LowState_
from runtime.robot.driver import ARM_SDK, LOWCMD, RobotReading
from runtime.robot.remote import decode_buttons

log = logging.getLogger("wam_edge.dds")

_N = g1.NUM_JOINTS
#: dds.lowstate_crc: check (refuse a LowState whose CRC does not match) or ignore (simulators that leave it 0).
CRC_CHECK, CRC_IGNORE = "check", "ignore"


class G1Link:
    """The DDS link. Fill ``command`` (a LowCmdBuffer: 35-slot views mode/q/dq/tau/kp/kd), then ``publish()``.

    ``poll()`` takes the newest LowState into ``reading`` (a RobotReading), ``wireless_remote`` (raw 40 bytes) and
    ``mode_machine``. Never taken, only counted: a LowState whose CRC does not match (``crc_errors``; with
    ``lowstate_crc`` "ignore" the CRC is not checked), one with a non-finite joint value, rpy or gyro
    (``non_finite``: NaN compares false with every bound, a NaN tilt would pass the tilt check) and one we cannot
    parse (``unparsed``). The reading then goes stale and the controller stops on its age. The quaternion is copied
    as it is: the controller's tilt check judges it (runtime/robot/imu.py) and falls back to rpy.
    """

    def __init__(self, domain_id: int = 0, interface: Optional[str] = None, mode: str = LOWCMD,
                 loopback: Optional[bool] = None, require_state: bool = True, lowstate_crc: str = CRC_CHECK) -> None:
        if mode not in (LOWCMD, ARM_SDK):
            raise ValueError("mode must be {!r} or {!r}, not {!r}".format(LOWCMD, ARM_SDK, mode))
        if lowstate_crc not in (CRC_CHECK, CRC_IGNORE):
            raise ValueError("lowstate_crc must be {!r} or {!r}, not {!r}".format(CRC_CHECK, CRC_IGNORE,
                                                                                lowstate_crc))
        self.mode = mode
        self.domain_id = domain_id
        self.require_state = require_state
        self.lowstate_crc = lowstate_crc
        self._check_crc = lowstate_crc == CRC_CHECK
        if not self._check_crc:
            log.warning("dds.lowstate_crc is 'ignore': robot state (LowState) is used WITHOUT checking its CRC. Only "
                        "for a simulator that leaves the crc 0 (unitree_mujoco); never on a real robot")
        self.participant = transport.open_participant(domain_id, interface, loopback)
        topic = transport.ARM_SDK_TOPIC if mode == ARM_SDK else transport.LOWCMD_TOPIC
        self._writer = transport.writer(self.participant, topic, LowCmd_)
        self._reader = transport.reader(self.participant, transport.LOWSTATE_TOPIC, LowState_, depth=1)
        self.command = LowCmdBuffer()
        self.state = LowStateBuffer()
        self.reading = RobotReading()
        self.wireless_remote = np.zeros(40, dtype=np.uint8)
        self.mode_machine = 0
        self.published = 0  # LowCmds sent
        self.crc_errors = 0  # LowStates refused: their crc did not match
        self.unparsed = 0  # LowStates we could not take in place (big-endian or short)
        self.non_finite = 0  # LowStates refused for a NaN or infinite joint or IMU value
        st = self.state
        # views copied into the reading on every new state (float32 -> float64, no allocation)
        self._copies = ((self.reading.q, st.q[:_N]), (self.reading.dq, st.dq[:_N]),
                        (self.reading.tau, st.tau_est[:_N]), (self.reading.temperature, st.temperature[:_N, 1]),
                        (self.reading.rpy, st.rpy), (self.reading.gyro, st.gyroscope))
        # the float fields, each with a preallocated mask for the finiteness check (no allocation per state)
        self._finite = tuple((src, np.zeros(src.shape, dtype=bool)) for _, src in self._copies
                             if src.dtype.kind == "f")
        self._copies += ((self.reading.quat, st.quaternion),)  # judged by the tilt check, not refused here

    @property
    def topic(self) -> str:
        return self._writer.topic.name

    def poll(self) -> bool:
        """Take the newest LowState if one arrived since the last poll; True when ``reading`` changed."""
        samples = transport.take_raw(self._reader, 1)
        if not samples:
            return False
        stamp = time.monotonic()
        st = self.state
        if not st.load(samples[-1]):
            self.unparsed += 1
            return False
        if self._check_crc and not st.crc_ok():
            self.crc_errors += 1
            if self.crc_errors == 1:
                log.warning("robot state (LowState) with a bad CRC refused; every one is (counted in the report). "
                            "A simulator that leaves the crc 0 (unitree_mujoco) needs dds.lowstate_crc: ignore")
            return False
        for src, mask in self._finite:
            np.isfinite(src, out=mask)
            if not mask.all():
                self.non_finite += 1
                return False
        r = self.reading
        for dst, src in self._copies:
            np.copyto(dst, src)
        np.copyto(self.wireless_remote, st.wireless_remote)
        r.buttons = decode_buttons(self.wireless_remote)
        r.tick = int(st.tick[0])
        r.stamp = stamp
        r.count += 1
        self.mode_machine = int(st.mode_machine[0])
        return True

    def wait_for_state(self, timeout_s: float = 5.0, poll_s: float = 0.002) -> bool:
        """Poll until a LowState arrives (True) or ``timeout_s`` passes (False); for start-up, not the tick."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.poll():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)

    def publish(self) -> bool:
        """Send ``command``: mode_pr 0, mode_machine echoed from the newest LowState, crc set last.

        With ``require_state`` (default) nothing is sent before the first LowState (False returned): we would not
        know mode_machine, nor where the robot is.
        """
        if self.require_state and self.reading.count == 0:
            return False
        c = self.command
        c.mode_pr[0] = 0
        c.mode_machine[0] = self.mode_machine
        c.seal()
        transport.write_raw(self._writer, c.cdr)
        self.published += 1
        return True

    def refused(self) -> Dict[str, int]:
        """LowStates not taken, by reason."""
        return {"bad_crc": self.crc_errors, "non_finite": self.non_finite, "unparsed": self.unparsed}

    def report(self) -> Dict[str, Any]:
        """What the link took, refused and sent (the controller's report)."""
        return {"topic": self.topic, "lowstate_crc": self.lowstate_crc, "states_taken": self.reading.count,
                "states_refused": self.refused(), "commands_published": self.published}

    def close(self) -> None:
        """Delete the DDS entities now rather than at garbage collection (the domain and the process's shared
        participant stay: transport.open_participant)."""
        transport.delete(self._writer, self._reader, self.participant)
