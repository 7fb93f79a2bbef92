"""SimulatedG1: a stand-in for the robot we cannot have in CI (first-order joint dynamics, no contact, no gravity).

``G1Physics`` is the joint model, shared by the in-process driver here and the DDS simulation (`wam-edge sim`):
an enabled joint with kp > 0 follows its position target with a first-order response (a stiff PD loop seen from
outside); kp 0 with kd > 0 damps (velocity decays, the joint comes to rest where it is); a disabled joint coasts to
rest (there is no gravity here). In arm_sdk mode the upper body blends Unitree's own hold pose with our target by the
weight, and the legs always stay Unitree's. Good enough to see commands take effect and to measure what a controller
sends; not a physics model. Faults (tilt, heat, buttons, lost state) are injected by tests and the HIL suite.
"""

from __future__ import annotations

import math
import time
from typing import Optional

import numpy as np

from runtime.robot import g1
from runtime.robot.driver import ARM_SDK, JointCommand, RobotDriver, RobotReading
from runtime.robot.imu import quaternion_from_rpy
from runtime.robot.remote import button_mask


class G1Physics:
    """Joint positions and velocities of a simulated G1. Say who drives it (``unitree_holds`` or ``commanded``),
    then ``advance(dt)``. Both simulations use this one model: the in-process driver and `wam-edge sim`."""

    def __init__(self, time_constant_s: float = 0.03, initial_pose: str = "nominal") -> None:
        n = g1.NUM_JOINTS
        self.time_constant_s = time_constant_s
        self.hold = g1.NOMINAL_POSE.copy() if initial_pose == "nominal" else np.zeros(n)  # Unitree's hold pose
        self.q = self.hold.copy()
        self.dq = np.zeros(n)
        self.tau_est = np.zeros(n)
        # the effective command: what the joints follow this step
        self.target = self.hold.copy()
        self.kp = g1.DEFAULT_KP.copy()
        self.kd = g1.DEFAULT_KD.copy()
        self.on = np.ones(n, dtype=bool)
        self._prev = np.zeros(n)
        self._stiff = np.zeros(n, dtype=bool)
        self._damped = np.zeros(n, dtype=bool)
        self._limp = np.zeros(n, dtype=bool)

    def unitree_holds(self, weight: float = 0.0, arm_target: Optional[np.ndarray] = None) -> None:
        """Unitree's controller drives: every joint stiff at its hold pose; arm_sdk blends the upper body toward
        ``arm_target`` by ``weight`` (motor_cmd[29].q)."""
        np.copyto(self.target, self.hold)
        np.copyto(self.kp, g1.DEFAULT_KP)
        np.copyto(self.kd, g1.DEFAULT_KD)
        self.on[:] = True
        w = min(max(weight, 0.0), 1.0)
        if arm_target is not None and w > 0.0:
            upper = g1.UPPER_BODY_MASK
            self.target[upper] = (1.0 - w) * self.hold[upper] + w * arm_target[upper]

    def commanded(self, q: np.ndarray, kp: np.ndarray, kd: np.ndarray, enabled: np.ndarray) -> None:
        """Our low-level commands drive every joint (lowcmd, debug mode)."""
        np.copyto(self.target, q)
        np.copyto(self.kp, kp)
        np.copyto(self.kd, kd)
        np.copyto(self.on, enabled)

    def place(self, q: np.ndarray) -> None:
        """Put the robot at rest at ``q`` (clipped to the joint limits), and make that Unitree's hold pose: arms
        hanging in zero torque, or posed by a person. Tests and `wam-edge sim`'s "pose" request start a run far
        from where a policy starts this way; not a command, so no step on the wire."""
        np.clip(q, g1.POSITION_MIN, g1.POSITION_MAX, out=self.q)
        np.copyto(self.hold, self.q)
        np.copyto(self.target, self.q)
        self.dq[:] = 0.0

    def advance(self, dt: float) -> None:
        """Stiff joints follow their target with a first-order response; kp 0 with kd > 0 damps (velocity decays at
        kd over an assumed 0.1 kg m^2, about an arm); disabled joints coast to rest (no gravity here)."""
        if dt <= 0.0:
            return
        stiff, damped, limp = self._stiff, self._damped, self._limp
        np.logical_and(self.on, self.kp > 0.0, out=stiff)
        np.logical_and(self.on, self.kp <= 0.0, out=damped)
        damped &= self.kd > 0.0
        np.logical_or(stiff, damped, out=limp)
        np.logical_not(limp, out=limp)
        np.copyto(self._prev, self.q)
        alpha = 1.0 - math.exp(-dt / self.time_constant_s)
        self.q[stiff] += alpha * (self.target[stiff] - self.q[stiff])
        self.dq[stiff] = (self.q[stiff] - self._prev[stiff]) / dt
        if damped.any():
            self.dq[damped] *= np.exp(-dt * self.kd[damped] / 0.1)
            self.q[damped] += self.dq[damped] * dt
        if limp.any():
            self.dq[limp] *= math.exp(-dt / 0.2)
            self.q[limp] += self.dq[limp] * dt
        np.clip(self.q, g1.POSITION_MIN, g1.POSITION_MAX, out=self.q)
        np.clip(self.kp * (self.target - self.q) - self.kd * self.dq, -g1.TORQUE_LIMIT, g1.TORQUE_LIMIT,
                out=self.tau_est)


class SimulatedG1(RobotDriver):
    """The in-process simulated G1 driver: read() advances the simulation to now; write() applies ``command``."""

    def __init__(self, mode: str = ARM_SDK, time_constant_s: float = 0.03, initial_pose: str = "nominal") -> None:
        self.mode = mode
        self.physics = G1Physics(time_constant_s, initial_pose)
        self.reading = RobotReading()
        self.command = JointCommand()
        self._last = time.monotonic()
        self.commanded = False  # nothing written yet: Unitree's controller holds the pose
        self.writes = 0
        self.frozen = False  # fault injection: robot state stops updating (a lost state stream)
        self.temperature = 25.0

    def read(self, now: float) -> RobotReading:
        dt = now - self._last
        if dt > 0.0:
            self._last = now
            c, p = self.command, self.physics
            if not self.commanded:
                p.unitree_holds()
            elif self.mode == ARM_SDK:
                p.unitree_holds(c.weight, c.q)
            else:
                p.commanded(c.q, c.kp, c.kd, c.enable)
            p.advance(dt)
        if not self.frozen:
            r = self.reading
            np.copyto(r.q, self.physics.q)
            np.copyto(r.dq, self.physics.dq)
            np.copyto(r.tau, self.physics.tau_est)
            r.temperature[:] = self.temperature
            r.tick += 1
            r.count += 1
            r.stamp = now
        return self.reading

    def write(self) -> None:
        self.commanded = True
        self.writes += 1

    # -- fault injection (tests, HIL) -----------------------------------------------------------------------------

    def press(self, *buttons: str) -> None:
        """Hold these remote buttons (names as in config: R1, L1, start, select, ..., none to release)."""
        self.reading.buttons = button_mask(buttons)

    def tilt(self, roll: float, pitch: float = 0.0, rpy: bool = True) -> None:
        """The IMU reports this attitude: in its quaternion and, unless ``rpy`` is False (a source that leaves rpy
        zero), in rpy too."""
        self.reading.quat[:] = quaternion_from_rpy(roll, pitch)
        self.reading.rpy[0], self.reading.rpy[1] = (roll, pitch) if rpy else (0.0, 0.0)
