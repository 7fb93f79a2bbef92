"""SimulatedG1: a stand-in for the robot we cannot have in CI (first-order joint dynamics, no contact, no gravity).

``G1Physics`` is the joint model, shared by the in-process driver here and the DDS simulation (`wam-edge sim`):
an enabled joint with kp > 0 follows its position target with a first-order response (a stiff PD loop seen from
outside); kp 0 with kd > 0 damps (velocity decays, the joint comes to rest where it is); a disabled joint stays where it
is (there is no gravity here). In arm_sdk mode the upper body blends Unitree's own hold pose with our target by the
weight, and the legs always stay Unitree's. Good enough to see commands take effect and to measure what a controller
sends; not a physics model. Faults (tilt, heat, buttons, lost state) are injected by tests and the HIL suite.
"""

from __future__ import annotations

import math
import time

import numpy as np

from runtime.robot import g1
from runtime.robot.driver import ARM_SDK, JointCommand, RobotDriver, RobotReading
from runtime.robot.remote import button_mask


class G1Physics:
    """Joint positions and velocities of a simulated G1, advanced by ``step(dt, command, mode)``."""

    def __init__(self, time_constant_s: float = 0.03, initial_pose: str = "nominal") -> None:
        self.tau = time_constant_s
        self.q = (g1.NOMINAL_POSE if initial_pose == "nominal" else np.zeros(g1.NUM_JOINTS)).copy()
        self.dq = np.zeros(g1.NUM_JOINTS)
        self.hold_pose = self.q.copy()  # what Unitree's own controller holds (arm_sdk weight 0, legs)
        self._target = self.q.copy()
        self._prev = self.q.copy()
        self._follow = np.zeros(g1.NUM_JOINTS, dtype=bool)
        self._damp = np.zeros(g1.NUM_JOINTS, dtype=bool)
        self.commanded = False  # no command yet: Unitree's controller (or nothing) holds the pose

    def step(self, dt: float, command: JointCommand, mode: str) -> None:
        if dt <= 0.0:
            return
        np.copyto(self._prev, self.q)
        if self.commanded:
            if mode == ARM_SDK:
                w = min(1.0, max(0.0, command.weight))
                np.copyto(self._target, self.hold_pose)
                upper = g1.UPPER_BODY_MASK
                self._target[upper] = (1.0 - w) * self.hold_pose[upper] + w * command.q[upper]
                self._follow[:] = True  # Unitree's controller keeps every joint stiff
                self._damp[:] = False
            else:
                np.copyto(self._target, command.q)
                np.logical_and(command.enable, command.kp > 0.0, out=self._follow)
                np.logical_and(command.enable, command.kp <= 0.0, out=self._damp)
                self._damp &= command.kd > 0.0
            alpha = 1.0 - math.exp(-dt / self.tau)
            follow = self._follow
            self.q[follow] += alpha * (self._target[follow] - self.q[follow])
            # damping: the joint keeps a decaying share of its velocity
            decay = math.exp(-dt / self.tau)
            self.q[self._damp] += self.dq[self._damp] * dt * decay
        np.subtract(self.q, self._prev, out=self.dq)
        self.dq /= dt


class SimulatedG1(RobotDriver):
    """The in-process simulated G1 driver: read() advances the simulation to now; write() applies ``command``."""

    def __init__(self, mode: str = ARM_SDK, time_constant_s: float = 0.03, initial_pose: str = "nominal") -> None:
        self.mode = mode
        self.physics = G1Physics(time_constant_s, initial_pose)
        self.reading = RobotReading()
        self.command = JointCommand()
        self._last = time.monotonic()
        self.writes = 0
        self.frozen = False  # fault injection: robot state stops updating (a lost state stream)
        self.temperature = 25.0

    def read(self, now: float) -> RobotReading:
        dt = now - self._last
        if dt > 0.0:
            self._last = now
            self.physics.step(dt, self.command, self.mode)
        if not self.frozen:
            r = self.reading
            np.copyto(r.q, self.physics.q)
            np.copyto(r.dq, self.physics.dq)
            r.temperature[:] = self.temperature
            r.tick += 1
            r.count += 1
            r.stamp = now
        return self.reading

    def write(self) -> None:
        self.physics.commanded = True
        self.writes += 1

    # -- fault injection (tests, HIL) -----------------------------------------------------------------------------

    def press(self, *buttons: str) -> None:
        """Hold these remote buttons (names as in config: R1, L1, start, select, ..., none to release)."""
        self.reading.buttons = button_mask(buttons)

    def tilt(self, roll: float, pitch: float = 0.0) -> None:
        self.reading.rpy[0], self.reading.rpy[1] = roll, pitch
