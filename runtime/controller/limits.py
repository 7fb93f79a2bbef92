"""Every bound the controller enforces, as data built once from config + the joint table (``Limits``), and the one
place positions are limited (``JointLimiter``): ros2_control's split, limits are data, enforcement is an interface.
chunk_guard.py admits chunks against the same Limits, monitors.py watches the robot against them.

Position: each joint stays ``margin`` inside its limits. Velocity: no joint moves more than ``max_velocity / rate``
per control tick relative to the previous command, so no seam, new chunk or stop ever produces a jump.
A non-finite target never passes: the joint keeps its previous command.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from runtime.robot import g1
from runtime.robot.driver import ARM_SDK, LOWCMD

#: The scalar bounds of the controller's config section that Limits carries (config.py documents each).
BOUNDS = ("max_first_step", "max_chunk_age_s", "max_rejections", "state_timeout_s", "max_tick_gap_s",
          "max_missed_ticks", "chunk_timeout_s", "heartbeat_timeout_s", "max_tilt", "max_joint_velocity",
          "max_temperature")


class Limits:
    """The bounds of one controller run. Unnamed scalar bounds are infinite (a bare Limits limits joints only)."""

    def __init__(self, rate_hz: float, max_velocity: float, margin: float, mode: str = LOWCMD,
                 **bounds: float) -> None:
        unknown = set(bounds) - set(BOUNDS)
        if unknown:
            raise TypeError(f"unknown bounds: {sorted(unknown)}")
        self.rate_hz = rate_hz
        self.period = 1.0 / rate_hz
        self.mode = mode
        self.lo = g1.POSITION_MIN + margin  # commanded positions stay within [lo, hi]
        self.hi = g1.POSITION_MAX - margin
        #: per joint: the smaller of the policy bound and the joint table's
        self.max_step_per_joint = np.minimum(max_velocity, g1.VELOCITY_LIMIT) / rate_hz
        self.max_step = float(self.max_step_per_joint.max())
        #: the joints this mode may command (arm_sdk leaves the legs to Unitree's controller)
        self.driven = g1.UPPER_BODY_MASK if mode == ARM_SDK else np.ones(g1.NUM_JOINTS, dtype=bool)
        for name in BOUNDS:
            setattr(self, name, bounds.get(name, math.inf))

    @classmethod
    def from_config(cls, c: Mapping[str, Any]) -> "Limits":
        """From the controller section of the config."""
        return cls(c["rate_hz"], c["max_velocity"], c["position_margin"], c["mode"], **{k: c[k] for k in BOUNDS})


class JointLimiter:
    """Clamps targets in place against one Limits; counts the ticks on which it had to act."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.lo, self.hi = limits.lo, limits.hi
        self.max_step_per_joint = limits.max_step_per_joint
        self.max_step = limits.max_step
        self._delta = np.zeros(g1.NUM_JOINTS)
        self._abs = np.zeros(g1.NUM_JOINTS)
        self._bad = np.zeros(g1.NUM_JOINTS, dtype=bool)
        self.clamped_ticks = 0
        self.non_finite_ticks = 0

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
