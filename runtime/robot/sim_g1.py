"""SimulatedG1: a stand-in for the robot we cannot have in CI (first-order joint dynamics, no contact, no gravity).

Each joint follows its position target with a first-order response (time constant ``time_constant_s``), the way a
stiff PD loop looks from outside. Good enough to see commands take effect and to measure what a controller sends;
not a physics model.
"""

from __future__ import annotations

import math
import time

import numpy as np

from runtime.robot import g1


class SimulatedG1:
    """The simulated G1 driver: read() advances the simulation to now; write() sets position targets."""

    joint_names = g1.JOINT_NAMES

    def __init__(self, time_constant_s: float = 0.03, initial_pose: str = "nominal") -> None:
        self._tau = time_constant_s
        self.q = (g1.NOMINAL_POSE if initial_pose == "nominal" else np.zeros(g1.NUM_JOINTS)).copy()
        self.dq = np.zeros(g1.NUM_JOINTS)
        self._target = self.q.copy()
        self._prev = self.q.copy()
        self._last = time.monotonic()
        self.writes = 0

    def read(self, now: float):
        """Advance to ``now`` (time.monotonic()) and return (q, dq): arrays owned by the driver, updated in place."""
        dt = now - self._last
        if dt > 0.0:
            self._last = now
            alpha = 1.0 - math.exp(-dt / self._tau)
            np.copyto(self._prev, self.q)
            self.q += alpha * (self._target - self.q)
            np.subtract(self.q, self._prev, out=self.dq)
            self.dq /= dt
        return self.q, self.dq

    def write(self, target: np.ndarray) -> None:
        """Position targets for all 29 joints (already limited by the controller)."""
        np.copyto(self._target, target)
        self.writes += 1

    def close(self) -> None:
        pass
