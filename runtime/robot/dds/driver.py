"""DdsG1Driver: the RobotDriver the controller uses for a real G1 (or SimulatedG1Dds) over DDS.

read() takes the newest LowState; write() publishes ``command`` once. In lowcmd mode the robot wants a steady
stream (Unitree's deploy code re-sends at 500 Hz): that is the controller's 500 Hz tick calling write(), not a
thread here.
"""

from __future__ import annotations

import time
from typing import Any, Dict, Optional

import numpy as np

from runtime.robot import g1
from runtime.robot.dds import transport
from runtime.robot.dds.link import CRC_CHECK, G1Link
from runtime.robot.driver import ARM_SDK, LOWCMD, JointCommand, RobotDriver, RobotReading

_N = g1.NUM_JOINTS
_UPPER = slice(12, 29)  # waist + arms: what rt/arm_sdk carries (g1.UPPER_BODY_MASK)


class DdsG1Driver(RobotDriver):
    """Driver over G1Link. ``mode`` "lowcmd" (all 29 motors) or "arm_sdk" (12..28 + blend weight in slot 29)."""

    def __init__(self, mode: str = LOWCMD, domain_id: int = 0, interface: Optional[str] = None,
                 loopback: Optional[bool] = None, link: Optional[G1Link] = None, lowstate_crc: str = CRC_CHECK) -> None:
        self.link = link if link is not None else G1Link(domain_id, interface, mode, loopback,
                                                         lowstate_crc=lowstate_crc)
        if self.link.mode != mode:
            raise ValueError("link mode {!r} differs from driver mode {!r}".format(self.link.mode, mode))
        self.mode = mode
        self.reading: RobotReading = self.link.reading
        self.command = JointCommand()
        self.writes = 0
        c = self.link.command
        joints = slice(0, _N) if mode == LOWCMD else _UPPER
        # (destination view in the LowCmd record, source array of the JointCommand), for the commanded joints only
        self._copies = tuple((getattr(c, name)[joints], getattr(self.command, name)[joints])
                             for name in ("q", "dq", "tau", "kp", "kd"))
        self._mode_dst = c.mode[joints]
        self._enable_src = self.command.enable[joints]
        self._floats = c.rec["motor_cmd"][0].view(np.float32).reshape(-1, 7)[:, 1:6]  # q dq tau kp kd, 35 slots
        self._weight = c.q[g1.ARM_SDK_WEIGHT_SLOT:g1.ARM_SDK_WEIGHT_SLOT + 1]

    def read(self, now: float) -> RobotReading:
        """Take the newest LowState (if any arrived) into ``reading``; ``reading.stamp`` says when it arrived."""
        self.link.poll()
        return self.reading

    def write(self) -> None:
        """Publish ``command``. Raises ValueError on a non-finite value (never put NaN on the wire)."""
        with np.errstate(over="ignore", invalid="ignore"):  # a float32 overflow becomes inf, refused below
            for dst, src in self._copies:
                np.copyto(dst, src, casting="same_kind")
        np.copyto(self._mode_dst, self._enable_src, casting="unsafe")
        if self.mode == ARM_SDK:
            w = self.command.weight
            self._weight[0] = min(max(w, 0.0), 1.0) if w == w else 0.0
        if not np.isfinite(self._floats).all():
            raise ValueError("non-finite joint command; not published")
        self.link.publish()
        self.writes += 1

    def report(self) -> Dict[str, Any]:
        return self.link.report()

    def status_note(self) -> str:
        refused = ", ".join("{} {}".format(n, reason.replace("_", " ")) for reason, n in self.link.refused().items()
                            if n)
        return "robot state refused: " + refused if refused else ""

    def close(self) -> None:
        self.link.close()


#: Who creates the domain when the motion switcher is used (transport.adopt_domain).
SDK = "unitree_sdk2py's ChannelFactoryInitialize"


def release_motion_control(domain_id: int = 0, interface: Optional[str] = None, timeout_s: float = 5.0,
                           attempts: int = 5) -> str:
    """Release Unitree's built-in motion controller (needed before rt/lowcmd), via unitree_sdk2py's motion switcher.

    Returns the name of the mode that was active ("" if none was). unitree_sdk2py creates the DDS domain itself
    (ChannelFactoryInitialize: its own config, one participant) and cannot join one already open, so call this
    before any G1Link on ``domain_id`` in this process: the link then shares the SDK's domain and participant
    (transport.adopt_domain). Without unitree_sdk2py, raises RuntimeError telling the operator how to do it by hand;
    RuntimeError too when the domain is already open here or the SDK fails.
    """
    try:
        from unitree_sdk2py.comm.motion_switcher.motion_switcher_client import MotionSwitcherClient
        from unitree_sdk2py.core.channel import ChannelFactoryInitialize
    except ImportError as exc:
        raise RuntimeError(
            "unitree_sdk2py is not installed, so the motion controller cannot be released from here. Release it "
            "with the remote: put the robot in zero-torque mode, then press L2 and R2 together to enter debug "
            "mode; then start the controller in lowcmd mode.") from exc
    creator = transport.domain_creator(domain_id)
    if creator is None:
        try:
            ChannelFactoryInitialize(domain_id, interface or None)
        except Exception as exc:  # noqa: BLE001 - the SDK raises a bare Exception ("channel factory init error.")
            raise RuntimeError("unitree_sdk2py could not open DDS domain {} on {}: {}".format(
                domain_id, interface or "the interface it chooses", exc)) from exc
        transport.adopt_domain(domain_id, interface, SDK)
    elif creator != SDK:  # the SDK would fail to create it, and its motion switcher needs its own factory
        raise RuntimeError("DDS domain {} is already open in this process (created by {}), and unitree_sdk2py can "
                           "only use a domain it creates itself: release the motion controller before opening the "
                           "DDS link".format(domain_id, creator))
    client = MotionSwitcherClient()
    client.SetTimeout(timeout_s)
    client.Init()
    released = ""
    for _ in range(attempts):
        code, result = client.CheckMode()
        if code != 0:
            raise RuntimeError("motion_switcher CheckMode failed with code {}".format(code))
        name = (result or {}).get("name", "")
        if not name:
            return released
        released = released or name
        client.ReleaseMode()
        time.sleep(1.0)
    raise RuntimeError("the motion controller is still active after {} release attempts".format(attempts))
