"""What the controller reads from and writes to a robot, whatever carries it (simulation or DDS).

A driver owns two preallocated objects: the RobotReading it refreshes on read() and the JointCommand the controller
fills before write(). Nothing is allocated per tick. All arrays are in G1 motor order (29 joints).
"""

from __future__ import annotations

from typing import Any, Dict

import numpy as np

from runtime.robot import g1

#: Control modes (../shared/notes/g1-wire.md): arm_sdk = waist + arms while Unitree's controller balances the legs;
#: lowcmd = full body, robot in debug mode.
ARM_SDK, LOWCMD = "arm_sdk", "lowcmd"


class RobotReading:
    """The newest robot state. ``stamp`` is this process's time.monotonic() when that state arrived."""

    __slots__ = ("q", "dq", "tau", "temperature", "quat", "rpy", "gyro", "buttons", "tick", "stamp", "count")

    def __init__(self) -> None:
        n = g1.NUM_JOINTS
        self.q = np.zeros(n)
        self.dq = np.zeros(n)
        self.tau = np.zeros(n)  # estimated torque
        self.temperature = np.zeros(n)  # winding temperature, deg C
        self.quat = np.array([1.0, 0.0, 0.0, 0.0])  # IMU attitude quaternion w, x, y, z: the primary output
        self.rpy = np.zeros(3)  # IMU roll, pitch, yaw (rad): some sources leave it zero (runtime/robot/imu.py)
        self.gyro = np.zeros(3)  # rad/s
        self.buttons = 0  # wireless remote button bits (g1-wire.md)
        self.tick = 0  # the robot's own tick counter
        self.stamp = 0.0  # when the newest state arrived; 0.0 = never
        self.count = 0  # states received so far


class JointCommand:
    """One command for all 29 joints: position targets with PD gains, plus the arm_sdk blend weight."""

    __slots__ = ("q", "dq", "tau", "kp", "kd", "enable", "weight")

    def __init__(self) -> None:
        n = g1.NUM_JOINTS
        self.q = np.zeros(n)
        self.dq = np.zeros(n)
        self.tau = np.zeros(n)
        self.kp = np.zeros(n)
        self.kd = np.zeros(n)
        self.enable = np.zeros(n, dtype=bool)  # motor mode 1 (enabled) or 0
        self.weight = 0.0  # arm_sdk only: motor_cmd[29].q, 1 = we own the upper body, 0 = Unitree's controller does


class RobotDriver:
    """The interface: ``read(now)`` refreshes and returns ``reading``; ``write()`` sends ``command``."""

    mode = LOWCMD
    reading: RobotReading
    command: JointCommand

    def read(self, now: float) -> RobotReading:
        raise NotImplementedError

    def write(self) -> None:
        raise NotImplementedError

    def report(self) -> Dict[str, Any]:
        """What the transport took and refused (the controller's report); empty for a driver without a wire."""
        return {}

    def status_note(self) -> str:
        """A short line for `wam-edge status` when the transport refused robot state ("" when nothing to say)."""
        return ""

    def close(self) -> None:
        pass
