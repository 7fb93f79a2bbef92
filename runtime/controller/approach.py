"""Approaching the start pose: after arming, move the robot to where the policy starts, slowly, before a chunk runs.

A policy starts near its own nominal pose; a robot that hangs in zero torque, or that Unitree's controller holds
elsewhere, is far from it, and every chunk would be rejected as ``first_step_too_far``. Unitree's deploy code moves
to a default pose first (a fixed-time interpolation at full gains). Here the target is the manifest's ``start_pose``
(moved to right after arming), or, when it declares none, the current action of the first chunk after arming that
lies farther than ``max_first_step`` from the commanded pose (later chunks during the approach move the target to
their current action). Each joint moves at most ``approach_velocity`` per second, and every tick's target still passes
the controller's one JointLimiter. The approach is done once the commanded pose is at the target and every measured
joint it moves is within ``approach_tolerance`` of it. docs/safety.md, "Approaching the start pose", says how the
states, watchdogs and chunks behave meanwhile.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Tuple

import numpy as np

from runtime.robot import g1

log = logging.getLogger("wam_edge.controller")

#: rad: the commanded pose counts as at the target (float rounding of the per-tick steps)
AT_TARGET = 1e-9


def load_start_pose(model_dir: str, arm_sdk: bool) -> Optional[Tuple[np.ndarray, np.ndarray, str]]:
    """The manifest's start pose as (motor indices, rad, where from), or None when the model declares none. A
    manifest that cannot be read, or a start pose the mode cannot drive, is logged and ignored: the approach then
    goes to the first chunk's current action, which the controller checks like any chunk."""
    from runtime.policy.manifest import ManifestError, read_manifest

    if not os.path.isfile(os.path.join(model_dir, "manifest.json")):
        log.info("no manifest.json in %s: the approach after arming goes to the first chunk's current action",
                 model_dir)
        return None
    try:
        manifest = read_manifest(model_dir)
    except ManifestError as exc:
        log.error("start pose: %s; the approach after arming goes to the first chunk's current action", exc)
        return None
    if manifest.start_pose is None:
        return None
    names = tuple(name for name, _ in manifest.start_pose)
    idx = g1.indices(names)
    if arm_sdk and not g1.UPPER_BODY_MASK[idx].all():
        log.error("start pose of %s names legs, which arm_sdk mode leaves to Unitree's controller: ignored",
                  manifest.path)
        return None
    return idx, np.array([rad for _, rad in manifest.start_pose]), f"the start_pose of {manifest.path}"


class Approach:
    """The approach's target and progress. Preallocated: ``target`` and ``done`` run every tick and allocate
    nothing; ``begin`` and ``retarget`` run on events (arming, a chunk)."""

    def __init__(self, rate_hz: float, velocity: float, max_velocity: float, tolerance: float, lo: np.ndarray,
                 hi: np.ndarray, start_pose: Optional[Tuple[np.ndarray, np.ndarray, str]] = None) -> None:
        self.velocity = min(velocity, max_velocity)
        self.step = self.velocity / rate_hz  # rad per tick, every joint
        self.tolerance = tolerance
        self.lo, self.hi = lo, hi
        self.start_pose = start_pose
        n = g1.NUM_JOINTS
        self.goal = np.zeros(n)  # every joint: those the approach does not move keep the commanded pose
        self._moves = np.zeros(n)  # 1.0 on the joints the approach moves
        self._d = np.zeros(n)
        self.open = False  # from arming until the first chunk is applied or an approach ends
        self.active = False  # an approach is under way (approaching, or holding during one)
        self.from_chunks = False  # the target follows the chunks (no start pose declared)
        self.source = ""
        self.started_at: Optional[float] = None  # its first approaching tick
        self.distance = 0.0
        self.chunks = 0
        self.approaches = 0
        self.reached = 0
        self.last: Optional[Dict[str, Any]] = None

    def arm(self, q_cmd: np.ndarray) -> None:
        """Arming: an approach may follow; with a start pose it is the one that follows."""
        self.open, self.active = True, False
        if self.start_pose is not None:
            idx, rad, where = self.start_pose
            self.begin(idx, rad, q_cmd, where, from_chunks=False)

    def begin(self, joints: np.ndarray, rad: np.ndarray, q_cmd: np.ndarray, source: str, from_chunks: bool) -> None:
        self.active, self.from_chunks, self.source = True, from_chunks, source
        self.started_at = None
        self.chunks = 0
        self.approaches += 1
        self.retarget(joints, rad, q_cmd)
        self.distance = self.remaining(q_cmd)

    def retarget(self, joints: np.ndarray, rad: np.ndarray, q_cmd: np.ndarray) -> None:
        """Move to ``rad`` on motor indices ``joints`` (inside the limiter's margin); the other joints stay."""
        np.copyto(self.goal, q_cmd)
        self.goal[joints] = np.clip(rad, self.lo[joints], self.hi[joints])
        self._moves[:] = 0.0
        self._moves[joints] = 1.0

    def remaining(self, q: np.ndarray) -> float:
        """The largest distance of a moved joint from the target."""
        np.subtract(self.goal, q, out=self._d)
        np.abs(self._d, out=self._d)
        self._d *= self._moves
        return float(self._d.max())

    def target(self, now: float, q_cmd: np.ndarray, out: np.ndarray) -> None:
        """This tick's target: ``q_cmd`` moved toward the goal by at most one tick's step per joint."""
        if self.started_at is None:
            self.started_at = now
        np.subtract(self.goal, q_cmd, out=self._d)
        np.clip(self._d, -self.step, self.step, out=self._d)
        self._d *= self._moves
        np.add(q_cmd, self._d, out=out)

    def done(self, q_cmd: np.ndarray, measured: np.ndarray) -> bool:
        """The commanded pose is at the target and the robot followed: every moved joint within the tolerance."""
        return self.remaining(q_cmd) <= AT_TARGET and self.remaining(measured) <= self.tolerance

    def finish(self, now: float, result: str) -> None:
        """The approach ended (reached, or the robot stopped); from here max_first_step guards every chunk."""
        if not self.active:
            return
        self.active = self.open = False
        if result == "reached":
            self.reached += 1
        self.last = {"source": self.source, "distance_rad": round(self.distance, 4),
                     "seconds": None if self.started_at is None else round(now - self.started_at, 3),
                     "chunks": self.chunks, "result": result}

    def progress(self, now: float, q_cmd: np.ndarray, timeout_s: float) -> str:
        """For `wam-edge status`: what is approached, how far is left, how long it took so far."""
        took = 0.0 if self.started_at is None else now - self.started_at
        return (f"{self.source}: {self.remaining(q_cmd):.2f} rad to go at {self.velocity:g} rad/s, {took:.1f} s of "
                f"{timeout_s:g} s")

    def report(self) -> Dict[str, Any]:
        return {"velocity_rad_s": self.velocity, "tolerance_rad": self.tolerance,
                "start_pose": None if self.start_pose is None else self.start_pose[2],
                "approaches": self.approaches, "reached": self.reached, "last": self.last}
