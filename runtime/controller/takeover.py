"""The take-over at start: a predecessor died (kill -9, crash) while driving the robot, and its command record
(record.py) says what the robot was left on. This controller starts from exactly that command and stops from there,
instead of leaving the robot on it or jerking it loose (docs/safety.md, "Command record").
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional

import numpy as np

from runtime.controller.limits import Limits
from runtime.controller.record import Snapshot
from runtime.controller.safety import ESTOP, SafetyStateMachine
from runtime.robot import g1
from runtime.robot.driver import ARM_SDK, JointCommand, RobotReading

log = logging.getLogger("wam_edge.controller")


class TakeOver:
    """What was taken over, and the stop from it: nothing is commanded until the robot's state says where it is."""

    def __init__(self, limits: Limits, started_at: float) -> None:
        self.limits = limits
        self.started_at = started_at
        self.snapshot: Optional[Snapshot] = None  # the predecessor's last command
        self.awaiting_state = False  # taken over: command nothing until the robot's state says where it is
        self._resume_since: Optional[float] = None  # the stop started from the recorded command (its sm.since)
        self._kp = np.zeros(g1.NUM_JOINTS)
        self._kd = np.zeros(g1.NUM_JOINTS)

    def start(self, previous: Snapshot, now: float, sm: SafetyStateMachine, cmd: JointCommand,
              q_cmd: np.ndarray) -> None:
        """Start from the command the robot was left on: the first command is exactly it (no step on the wire);
        arm_sdk ramps the weight out from the recorded one, lowcmd holds the recorded targets at the recorded gains
        for hold_before_damp_s and then damps. A latched e-stop wins (the e-stop ramp from the recorded weight)."""
        self.snapshot = previous
        self.awaiting_state = True
        np.copyto(q_cmd, previous.q)
        np.copyto(cmd.q, previous.q)
        np.copyto(cmd.kp, previous.kp)
        np.copyto(cmd.kd, previous.kd)
        np.copyto(self._kp, previous.kp)
        np.copyto(self._kd, previous.kd)
        if self.limits.mode == ARM_SDK:
            cmd.weight = previous.weight
        reason = f"controller restarted while driving the robot (previous pid {previous.pid}, state {previous.state})"
        if sm.resume_stop(now, reason, immediate=previous.immediate or previous.state == ESTOP):
            self._resume_since = sm.since
            log.warning("%s: stopping from its last command (%s); nothing moves again until a person arms",
                        reason, previous.describe())
        else:
            log.warning("%s, and an e-stop is latched: e-stop from its last command (%s)", reason,
                        previous.describe())

    def on_state(self, now: float, r: RobotReading, sm: SafetyStateMachine, cmd: JointCommand,
                 q_cmd: np.ndarray) -> None:
        """Each tick while awaiting state; the first robot state since start: the stop's timer starts now. A robot
        far from the recorded command is not on it (restarted, or handed back to Unitree's controller since):
        arm_sdk releases it at once (weight 0, no jump to the recorded pose), lowcmd damps at once."""
        if r.stamp < self.started_at:
            return
        lim = self.limits
        self.awaiting_state = False
        sm.restart_timer(now)
        if self._resume_since is not None:
            self._resume_since = sm.since
        joints = g1.UPPER_BODY_MASK if lim.mode == ARM_SDK else slice(None)
        far = float(np.abs(r.q[joints] - q_cmd[joints]).max())
        if far <= lim.max_first_step:
            return
        reason = (f"the robot is {far:.2f} rad from its recorded command (limit {lim.max_first_step}): it is "
                  "not on it")
        if lim.mode == ARM_SDK:
            cmd.weight = 0.0
            log.warning("%s; released at once (arm_sdk weight 0)", reason)
        else:
            sm.stop(now, reason, immediate=True)
            log.warning("%s; damping at once", reason)

    def holds(self, since: float) -> bool:
        """Whether the stop under way (begun at ``since``) is the one from the recorded command."""
        return since == self._resume_since

    def gains(self, cmd: JointCommand) -> None:
        """The recorded gains, which that stop holds at (lowcmd)."""
        np.copyto(cmd.kp, self._kp)
        np.copyto(cmd.kd, self._kd)

    def report(self) -> Optional[Dict[str, Any]]:
        s = self.snapshot
        return None if s is None else {"pid": s.pid, "state": s.state, "weight": round(s.weight, 4),
                                       "immediate": s.immediate}
