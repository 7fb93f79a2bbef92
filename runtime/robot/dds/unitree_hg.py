"""Wire-compatible ``unitree_hg`` DDS types (G1 / H1-2 family), written from the field list in g1-wire.md.

Type names and field order must match Unitree's IDL exactly: DDS matches writers and readers by topic and type name,
and the payload is plain XCDR1 of final structs. cyclonedds resolves these (string) annotations with
typing.get_type_hints against this module's globals, so every referenced type must stay a module-level name.
No ``from __future__ import annotations`` here, on purpose: cyclonedds 0.10.2 cannot resolve a string annotation such
as "array[MotorCmd_, 35]" (it looks the whole string up as one name), so these annotations are evaluated at class
creation; they are all valid Python 3.8 expressions.
"""

from dataclasses import dataclass, field

from cyclonedds.idl import IdlStruct, annotations
from cyclonedds.idl.types import array, float32, int16, sequence, uint8, uint32

PREFIX = "unitree_hg.msg.dds_."


def _zeros(n: int):
    return field(default_factory=lambda: [0] * n)


def _floats(n: int):
    return field(default_factory=lambda: [0.0] * n)


@dataclass
@annotations.final
class MotorCmd_(IdlStruct, typename=PREFIX + "MotorCmd_"):
    mode: uint8 = 0
    q: float32 = 0.0
    dq: float32 = 0.0
    tau: float32 = 0.0
    kp: float32 = 0.0
    kd: float32 = 0.0
    reserve: uint32 = 0


@dataclass
@annotations.final
class LowCmd_(IdlStruct, typename=PREFIX + "LowCmd_"):
    mode_pr: uint8 = 0
    mode_machine: uint8 = 0
    motor_cmd: array[MotorCmd_, 35] = field(default_factory=lambda: [MotorCmd_() for _ in range(35)])
    reserve: array[uint32, 4] = _zeros(4)
    crc: uint32 = 0


@dataclass
@annotations.final
class MotorState_(IdlStruct, typename=PREFIX + "MotorState_"):
    mode: uint8 = 0
    q: float32 = 0.0
    dq: float32 = 0.0
    ddq: float32 = 0.0
    tau_est: float32 = 0.0
    temperature: array[int16, 2] = _zeros(2)  # casing, winding
    vol: float32 = 0.0
    sensor: array[uint32, 2] = _zeros(2)
    motorstate: uint32 = 0
    reserve: array[uint32, 4] = _zeros(4)


@dataclass
@annotations.final
class IMUState_(IdlStruct, typename=PREFIX + "IMUState_"):
    quaternion: array[float32, 4] = field(default_factory=lambda: [1.0, 0.0, 0.0, 0.0])  # w, x, y, z
    gyroscope: array[float32, 3] = _floats(3)
    accelerometer: array[float32, 3] = _floats(3)
    rpy: array[float32, 3] = _floats(3)
    temperature: int16 = 0


@dataclass
@annotations.final
class LowState_(IdlStruct, typename=PREFIX + "LowState_"):
    version: array[uint32, 2] = _zeros(2)
    mode_pr: uint8 = 0
    mode_machine: uint8 = 0
    tick: uint32 = 0
    imu_state: IMUState_ = field(default_factory=IMUState_)
    motor_state: array[MotorState_, 35] = field(default_factory=lambda: [MotorState_() for _ in range(35)])
    wireless_remote: array[uint8, 40] = _zeros(40)
    reserve: array[uint32, 4] = _zeros(4)
    crc: uint32 = 0


@dataclass
@annotations.final
class PressSensorState_(IdlStruct, typename=PREFIX + "PressSensorState_"):
    pressure: array[float32, 12] = _floats(12)
    temperature: array[float32, 12] = _floats(12)


@dataclass
@annotations.final
class HandCmd_(IdlStruct, typename=PREFIX + "HandCmd_"):
    """Dex3-1 hand command (rt/dex3/{left,right}/cmd): 7 motors, no CRC."""

    motor_cmd: sequence[MotorCmd_] = field(default_factory=lambda: [MotorCmd_() for _ in range(7)])
    reserve: array[uint32, 4] = _zeros(4)


@dataclass
@annotations.final
class HandState_(IdlStruct, typename=PREFIX + "HandState_"):
    """Dex3-1 hand state (rt/dex3/{left,right}/state)."""

    motor_state: sequence[MotorState_] = field(default_factory=lambda: [MotorState_() for _ in range(7)])
    press_sensor_state: sequence[PressSensorState_] = field(default_factory=list)
    imu_state: IMUState_ = field(default_factory=IMUState_)
    power_v: float32 = 0.0
    power_a: float32 = 0.0
    system_v: float32 = 0.0
    device_v: float32 = 0.0
    error: array[uint32, 2] = _zeros(2)
    reserve: array[uint32, 2] = _zeros(2)
