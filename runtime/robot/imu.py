"""Roll and pitch from a G1's IMU, for the tilt stop: the quaternion first, rpy only where the quaternion is unusable.

Unitree's IMUState carries the attitude twice: ``quaternion`` (w, x, y, z; the primary output, which every source
fills) and ``rpy``, which some sources leave zero. A quaternion is unusable when it is absent (all zero), not finite,
or its norm is far from 1 (outside [1 - NORM_TOLERANCE, 1 + NORM_TOLERANCE]). Angles are the ZYX (yaw, pitch, roll)
Euler angles Unitree's rpy holds. Scalar math on floats: nothing is allocated beyond Python's own float objects.
"""

from __future__ import annotations

import math
from typing import Tuple

#: How far from 1 a quaternion's norm may be before rpy is used instead (float32 unit quaternions are within 1e-6).
NORM_TOLERANCE = 0.1
_N2_LO = (1.0 - NORM_TOLERANCE) ** 2
_N2_HI = (1.0 + NORM_TOLERANCE) ** 2


def roll_pitch(quat, rpy) -> Tuple[float, float, bool]:
    """(roll, pitch, from_quaternion) in rad, from ``quat`` (w, x, y, z) or, where it is unusable, ``rpy``."""
    w, x, y, z = float(quat[0]), float(quat[1]), float(quat[2]), float(quat[3])
    n2 = w * w + x * x + y * y + z * z
    if _N2_LO <= n2 <= _N2_HI:  # false for NaN and infinity too
        # the unit-quaternion formulas written homogeneously, so a slightly off norm does not bias the angles
        roll = math.atan2(2.0 * (w * x + y * z), w * w - x * x - y * y + z * z)
        pitch = math.asin(min(1.0, max(-1.0, 2.0 * (w * y - z * x) / n2)))
        return roll, pitch, True
    return float(rpy[0]), float(rpy[1]), False


def tilt(quat, rpy) -> float:
    """The larger of |roll| and |pitch| (rad): what controller.max_tilt bounds."""
    roll, pitch, _ = roll_pitch(quat, rpy)
    return max(abs(roll), abs(pitch))


def quaternion_from_rpy(roll: float, pitch: float, yaw: float = 0.0) -> Tuple[float, float, float, float]:
    """(w, x, y, z) of ZYX Euler angles: what an IMU at this attitude reports (the simulated G1s publish it)."""
    cr, sr = math.cos(roll / 2), math.sin(roll / 2)
    cp, sp = math.cos(pitch / 2), math.sin(pitch / 2)
    cy, sy = math.cos(yaw / 2), math.sin(yaw / 2)
    return (cr * cp * cy + sr * sp * sy, sr * cp * cy - cr * sp * sy,
            cr * sp * cy + sr * cp * sy, cr * cp * sy - sr * sp * cy)
