"""The G1 joint table, in one place: names, indices, position limits, velocity and gain defaults.

Numbers from ../shared/notes/g1-wire.md (Unitree's MuJoCo model for limits). Index = motor index on the wire.
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

#: (name, min rad, max rad, torque limit N m, default kp, default kd) in motor order 0..28 (29-dof G1).
#: Gains are conservative position-control defaults in the range of Unitree's examples (arms kp 60 / kd 1.5).
_TABLE = (
    ("left_hip_pitch", -2.5307, 2.8798, 88.0, 100.0, 2.0),
    ("left_hip_roll", -0.5236, 2.9671, 88.0, 100.0, 2.0),
    ("left_hip_yaw", -2.7576, 2.7576, 88.0, 100.0, 2.0),
    ("left_knee", -0.087267, 2.8798, 139.0, 150.0, 4.0),
    ("left_ankle_pitch", -0.87267, 0.5236, 50.0, 40.0, 2.0),
    ("left_ankle_roll", -0.2618, 0.2618, 50.0, 40.0, 2.0),
    ("right_hip_pitch", -2.5307, 2.8798, 88.0, 100.0, 2.0),
    ("right_hip_roll", -2.9671, 0.5236, 88.0, 100.0, 2.0),
    ("right_hip_yaw", -2.7576, 2.7576, 88.0, 100.0, 2.0),
    ("right_knee", -0.087267, 2.8798, 139.0, 150.0, 4.0),
    ("right_ankle_pitch", -0.87267, 0.5236, 50.0, 40.0, 2.0),
    ("right_ankle_roll", -0.2618, 0.2618, 50.0, 40.0, 2.0),
    ("waist_yaw", -2.618, 2.618, 88.0, 100.0, 2.0),
    ("waist_roll", -0.52, 0.52, 50.0, 60.0, 2.0),
    ("waist_pitch", -0.52, 0.52, 50.0, 60.0, 2.0),
    ("left_shoulder_pitch", -3.0892, 2.6704, 25.0, 60.0, 1.5),
    ("left_shoulder_roll", -1.5882, 2.2515, 25.0, 60.0, 1.5),
    ("left_shoulder_yaw", -2.618, 2.618, 25.0, 60.0, 1.5),
    ("left_elbow", -1.0472, 2.0944, 25.0, 60.0, 1.5),
    ("left_wrist_roll", -1.97222, 1.97222, 25.0, 40.0, 1.0),
    ("left_wrist_pitch", -1.61443, 1.61443, 5.0, 20.0, 0.5),
    ("left_wrist_yaw", -1.61443, 1.61443, 5.0, 20.0, 0.5),
    ("right_shoulder_pitch", -3.0892, 2.6704, 25.0, 60.0, 1.5),
    ("right_shoulder_roll", -2.2515, 1.5882, 25.0, 60.0, 1.5),
    ("right_shoulder_yaw", -2.618, 2.618, 25.0, 60.0, 1.5),
    ("right_elbow", -1.0472, 2.0944, 25.0, 60.0, 1.5),
    ("right_wrist_roll", -1.97222, 1.97222, 25.0, 40.0, 1.0),
    ("right_wrist_pitch", -1.61443, 1.61443, 5.0, 20.0, 0.5),
    ("right_wrist_yaw", -1.61443, 1.61443, 5.0, 20.0, 0.5),
)

NUM_JOINTS = len(_TABLE)
JOINT_NAMES: Tuple[str, ...] = tuple(row[0] for row in _TABLE)
JOINT_INDEX: Dict[str, int] = {name: i for i, name in enumerate(JOINT_NAMES)}
POSITION_MIN = np.array([row[1] for row in _TABLE], dtype=np.float64)
POSITION_MAX = np.array([row[2] for row in _TABLE], dtype=np.float64)
TORQUE_LIMIT = np.array([row[3] for row in _TABLE], dtype=np.float64)
DEFAULT_KP = np.array([row[4] for row in _TABLE], dtype=np.float64)
DEFAULT_KD = np.array([row[5] for row in _TABLE], dtype=np.float64)
#: rad/s. The hardware bound is Unitree's own stop rule (10 rad/s); a policy's bound is controller.max_velocity,
#: far lower. The limiter uses the smaller of the two per joint.
VELOCITY_LIMIT = np.full(len(_TABLE), 10.0)

#: Motor slots in LowCmd/LowState (29 used, 29..34 unused; arm_sdk puts its blend weight in motor_cmd[29].q).
NUM_MOTOR_SLOTS = 35
ARM_SDK_WEIGHT_SLOT = 29

#: Waist and arms: what rt/arm_sdk controls while Unitree's balance controller keeps the legs.
UPPER_BODY: Tuple[str, ...] = JOINT_NAMES[12:29]
UPPER_BODY_MASK = np.zeros(len(_TABLE), dtype=bool)
UPPER_BODY_MASK[12:29] = True

#: A safe standing pose: zero except arms slightly out and bent (the reference model's action mean).
NOMINAL_POSE = np.zeros(NUM_JOINTS, dtype=np.float64)
NOMINAL_POSE[JOINT_INDEX["left_shoulder_roll"]] = 0.2
NOMINAL_POSE[JOINT_INDEX["right_shoulder_roll"]] = -0.2
NOMINAL_POSE[JOINT_INDEX["left_elbow"]] = 0.3
NOMINAL_POSE[JOINT_INDEX["right_elbow"]] = 0.3


def indices(names) -> np.ndarray:
    """Motor indices of joint names; KeyError names the unknown joint."""
    out = []
    for name in names:
        if name not in JOINT_INDEX:
            raise KeyError(f"unknown G1 joint {name!r}")
        out.append(JOINT_INDEX[name])
    return np.array(out, dtype=np.intp)
