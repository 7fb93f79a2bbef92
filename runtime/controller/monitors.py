"""The monitors each tick runs, against the run's Limits (limits.py): the robot's reading (stale state, tilt, joint
velocity, temperature), the loop's pace (a stall, late ticks) and the policy's liveness (chunks, heartbeats).

A monitor only trips the safety state machine (safety.py: stop, immediate stop or hold); it never shapes a command.
A bound is a deadline: a monitor acts at the last tick before it passes (age + one period), not the first after.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from runtime.controller.limits import Limits
from runtime.controller.safety import APPROACHING, RUNNING, SafetyStateMachine
from runtime.robot import g1, imu
from runtime.robot.driver import RobotReading


class Monitors:
    """Stateless checks but for one preallocated buffer (no allocation per tick)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._absdq = np.zeros(g1.NUM_JOINTS)

    def stall(self, sm: SafetyStateMachine, now: float, last_tick_at: Optional[float]) -> None:
        """A gap between two ticks (the process was paused or starved): stop at once."""
        gap = self.limits.max_tick_gap_s
        if last_tick_at is not None and now - last_tick_at > gap:
            sm.stop(now, f"control loop stalled for {(now - last_tick_at) * 1000:.0f} ms "
                    f"(limit {gap * 1000:.0f} ms)", immediate=True)

    def late(self, sm: SafetyStateMachine, now: float, late_in_a_row: int) -> None:
        """Ticks late in a row (run() counts them): stop."""
        if late_in_a_row >= self.limits.max_missed_ticks:
            sm.stop(now, f"{late_in_a_row} control ticks late in a row")

    def robot(self, sm: SafetyStateMachine, now: float, r: RobotReading, awaiting_state: bool) -> bool:
        """The robot's reading; False when it is stale (stopped at once: nothing else it says can be trusted).
        ``awaiting_state``: taken over, no state yet since start (record.py's take-over waits for it)."""
        lim = self.limits
        age = now - r.stamp
        if age + lim.period > lim.state_timeout_s and not awaiting_state:
            sm.stop(now, f"robot state is {age * 1000:.0f} ms old (limit {lim.state_timeout_s * 1000:.0f} ms)",
                    immediate=True)
            return False
        tilt = imu.tilt(r.quat, r.rpy)  # from the quaternion; rpy only where the quaternion is unusable
        if tilt > lim.max_tilt:
            sm.stop(now, f"tilt {tilt:.2f} rad (limit {lim.max_tilt})", immediate=True)
        np.abs(r.dq, out=self._absdq)
        j = int(self._absdq.argmax())
        if self._absdq[j] > lim.max_joint_velocity:
            sm.stop(now, f"{g1.JOINT_NAMES[j]} moves at {self._absdq[j]:.1f} rad/s (limit {lim.max_joint_velocity})")
        j = int(r.temperature.argmax())
        if r.temperature[j] > lim.max_temperature:
            sm.stop(now, f"{g1.JOINT_NAMES[j]} at {r.temperature[j]:.0f} C (limit {lim.max_temperature})")
        return True

    def policy(self, sm: SafetyStateMachine, now: float, last_chunk_at: float, last_heartbeat_at: float) -> None:
        """While the policy drives (running, approaching): no chunk or no heartbeat for too long holds."""
        if sm.state not in (RUNNING, APPROACHING):
            return
        lim = self.limits
        if now + lim.period - max(last_chunk_at, sm.since) > lim.chunk_timeout_s:
            sm.hold(now, f"no chunk for {lim.chunk_timeout_s} s")
        elif now + lim.period - max(last_heartbeat_at, sm.since) > lim.heartbeat_timeout_s:
            sm.hold(now, f"no policy heartbeat for {lim.heartbeat_timeout_s} s")
