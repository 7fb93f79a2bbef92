"""Joint limits, enforced in one place: every command the controller writes goes through JointLimiter.apply.

Position: each joint stays ``margin`` inside its limits. Velocity: no joint moves more than ``max_velocity / rate``
per control tick relative to the previous command, so no seam, new chunk or stop ever produces a jump.
A non-finite target never passes: the joint keeps its previous command.
"""

from __future__ import annotations

import numpy as np

from runtime.robot import g1


class JointLimiter:
    """Clamps targets in place; counts the ticks on which it had to act."""

    def __init__(self, rate_hz: float, max_velocity: float, margin: float) -> None:
        self.lo = g1.POSITION_MIN + margin
        self.hi = g1.POSITION_MAX - margin
        #: per joint: the smaller of the policy bound and the joint table's
        self.max_step_per_joint = np.minimum(max_velocity, g1.VELOCITY_LIMIT) / rate_hz
        self.max_step = float(self.max_step_per_joint.max())
        self._delta = np.zeros(g1.NUM_JOINTS)
        self._abs = np.zeros(g1.NUM_JOINTS)
        self._bad = np.zeros(g1.NUM_JOINTS, dtype=bool)
        self.clamped_ticks = 0
        self.non_finite_ticks = 0

    def within_limits(self, actions: np.ndarray, joints: np.ndarray) -> bool:
        """Whether every action of a chunk (H x D, for motor indices ``joints``) lies within the hard limits."""
        return bool((actions >= g1.POSITION_MIN[joints]).all() and (actions <= g1.POSITION_MAX[joints]).all())

    def apply(self, target: np.ndarray, previous: np.ndarray) -> np.ndarray:
        """Limit ``target`` (29,) in place against ``previous`` (the last command written) and return it."""
        np.isfinite(target, out=self._bad)
        np.logical_not(self._bad, out=self._bad)
        if self._bad.any():
            self.non_finite_ticks += 1
            np.copyto(target, previous, where=self._bad)
        np.subtract(target, previous, out=self._delta)
        np.abs(self._delta, out=self._abs)
        np.greater(self._abs, self.max_step_per_joint, out=self._bad)
        clamped = bool(self._bad.any())
        np.clip(self._delta, -self.max_step_per_joint, self.max_step_per_joint, out=self._delta)
        np.add(previous, self._delta, out=target)
        if (target < self.lo).any() or (target > self.hi).any():
            clamped = True
            np.clip(target, self.lo, self.hi, out=target)
        if clamped:
            self.clamped_ticks += 1
        return target
