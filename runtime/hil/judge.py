"""Judging the commands on the wire: was each one safe, when did the robot start being commanded safely, and did
anything unsafe ever go out?

Only the bytes count, not what the controller says about itself. A command is *safe* when it cannot drive the robot
anywhere new:
  rt/arm_sdk  the blend weight is falling (a stop ramp), or is 0 (Unitree's controller owns the upper body), or the
              targets equal the previous command's with the weight not rising (a hold);
  rt/lowcmd   every kp is 0 (damping), or the targets equal the previous command's with no kp rising (a hold).
The *reaction* to a fault is the receipt time of the first command of the final run of safe commands after the
fault (everything from there to the end of the observation is safe: nothing moved again), minus the fault time.
*Unsafe* commands are those non-finite, outside the joint limits, or stepping a joint farther than the velocity limit
allows in one control period. A step is judged by what it commands: |q - previous q| weighted by the ``authority``
the command making it has over the joint (kp over the default kp, at most 1, times the arm_sdk blend weight). The
blended target is w q + (1 - w) q_unitree (lowcmd: the torque kp (q - q_measured) + ...), so a step of the targets
moves it by w times the step; the weight's or the gains' own change is their ramp's business. So targets that jump
while nothing drives the joint make no step: arming from weight 0 (the first targets start where the robot is,
wherever the last stop left them), lowcmd damping that tracks the robot with kp 0. A jump onto a command that drives
the joint is one, in proportion to how much it drives it: a jump at weight 1 right after weight 0 is a full step.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np

from runtime.robot import g1

LOWCMD_TOPIC_ID, ARM_SDK_TOPIC_ID = 0, 1  # CommandLog topic codes (runtime.robot.dds.sim)
_HOLD_EPS = 1e-6  # rad: float32 targets that did not change
_STEP_EPS = 1e-5  # rad: float32 rounding on top of the allowed step


def authority(kp: np.ndarray, weight: Any, arm_sdk: bool, out: Optional[np.ndarray] = None) -> np.ndarray:
    """How much a command drives each joint, 0..1: kp (per joint, last axis) over the default kp, at most 1 (the
    default gains are full authority), times the blend weight clipped to 0..1 (as the robot does) on rt/arm_sdk.
    ``weight``: one per command (the leading axes of ``kp``); a step is weighted by the authority of the command
    that makes it."""
    a = np.maximum(kp, 0.0, out=out)
    a /= g1.DEFAULT_KP
    np.minimum(a, 1.0, out=a)
    if arm_sdk:
        a *= np.clip(weight, 0.0, 1.0)[..., None]
    return a


def judge(w: Dict[str, np.ndarray], mode: str, t_fault: Optional[float], max_step: float) -> Dict[str, Any]:
    """``w``: CommandLog.window() (oldest first, the newest earlier command per topic flagged ``before``)."""
    topic = ARM_SDK_TOPIC_ID if mode == "arm_sdk" else LOWCMD_TOPIC_ID
    joints = g1.UPPER_BODY_MASK if topic == ARM_SDK_TOPIC_ID else np.ones(g1.NUM_JOINTS, dtype=bool)
    out: Dict[str, Any] = {"commands": 0, "bad_crc": 0, "other_topic": 0, "non_finite": 0, "out_of_limits": 0,
                           "steps_over_limit": 0, "max_step_rad": 0.0, "reaction_s": None, "first_safe_t": None,
                           "released_at_end": False, "safe_at_end": False}
    inside = ~w["before"]
    out["bad_crc"] = int(np.count_nonzero(inside & ~w["crc_ok"]))
    out["other_topic"] = int(np.count_nonzero(inside & w["crc_ok"] & (w["topic"] != topic)))
    mine = w["crc_ok"] & (w["topic"] == topic)
    q, kp, weight, t = w["q"][mine], w["kp"][mine], w["weight"][mine], w["t"][mine]
    new = inside[mine]
    finite = np.isfinite(q).all(axis=1) & np.isfinite(kp).all(axis=1) & np.isfinite(w["kd"][mine]).all(axis=1)
    if topic == ARM_SDK_TOPIC_ID:
        finite &= np.isfinite(weight)
    out["commands"] = int(np.count_nonzero(new))
    out["non_finite"] = int(np.count_nonzero(new & ~finite))
    if not len(t):
        return out
    qf = np.where(finite[:, None], q, 0.0)
    outside = ((qf < g1.POSITION_MIN) | (qf > g1.POSITION_MAX))[:, joints].any(axis=1)
    out["out_of_limits"] = int(np.count_nonzero(new & finite & outside))

    # steps between consecutive commands, weighted by the authority of the one making it (the module's docstring)
    auth = authority(np.where(finite[:, None], kp, 0.0), np.where(finite, weight, 0.0), topic == ARM_SDK_TOPIC_ID)
    step = np.where(joints, np.abs(np.diff(qf, axis=0)) * auth[1:], 0.0)
    per_cmd = step.max(axis=1) if step.size else np.zeros(0)
    counted = new[1:] & finite[1:] & finite[:-1]
    if per_cmd.size:
        out["max_step_rad"] = round(float(per_cmd[counted].max(initial=0.0)), 7)
        out["steps_over_limit"] = int(np.count_nonzero(counted & (per_cmd > max_step + _STEP_EPS)))

    # safe commands (the first one has no predecessor: judged on weight / kp alone)
    held = np.zeros(len(t), dtype=bool)
    held[1:] = (np.abs(np.diff(qf, axis=0))[:, joints].max(axis=1) <= _HOLD_EPS)
    if topic == ARM_SDK_TOPIC_ID:
        falling = np.zeros(len(t), dtype=bool)
        falling[1:] = weight[1:] < weight[:-1]
        not_rising = np.ones(len(t), dtype=bool)
        not_rising[1:] = weight[1:] <= weight[:-1]
        released = weight <= 0.0
        safe = released | falling | (held & not_rising)
    else:
        released = (kp[:, joints] == 0).all(axis=1)
        not_rising = np.ones(len(t), dtype=bool)
        not_rising[1:] = (kp[1:] <= kp[:-1]).all(axis=1)
        safe = released | (held & not_rising)
    safe &= finite
    out["released_at_end"] = bool(released[-1])
    out["safe_at_end"] = bool(safe[-1])
    if t_fault is not None:
        after = np.flatnonzero(t >= t_fault)
        if len(after):
            unsafe_after = after[~safe[after]]
            start = (unsafe_after[-1] + 1) if len(unsafe_after) else after[0]
            if start < len(t):
                out["first_safe_t"] = float(t[start])
                out["reaction_s"] = round(float(t[start] - t_fault), 4)
    return out
