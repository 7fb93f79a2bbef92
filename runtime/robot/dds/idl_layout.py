"""Byte layouts of LowCmd_ and LowState_: the packed C struct (what the CRC covers) and the XCDR1 payload (the wire).

Both layouts are derived from one field list (g1-wire.md, wire order) by a small walker rather than typed in by
hand:

- C layout: every primitive aligned to its size, structs aligned to their largest member and padded to it (LowCmd
  1004 bytes, LowState 2092). The CRC runs over this layout; it is also a uniform numpy structured dtype, so fields
  are filled and read with vectorised slices.
- XCDR1 payload (after the 4-byte encapsulation header): primitives aligned to their size relative to the payload
  start, no padding at struct ends. Arrays of structs are therefore not uniformly strided (the first motor's
  ``mode`` byte sits right after the preceding field), so no numpy dtype can describe them directly.

The two differ only by where a few bytes sit, so the conversion is one precomputed byte gather (``np.take``) in
each direction: C -> CDR to publish, CDR -> C to parse and check a CRC. Tests compare the result byte for byte with
cyclonedds' own serializer.
"""

from __future__ import annotations

from typing import List, Tuple

import numpy as np

#: (name, type, count): type is a numpy scalar code or a nested field list; count 0 = a scalar, n = an array of n.
MOTOR_CMD = (("mode", "u1", 0), ("q", "f4", 0), ("dq", "f4", 0), ("tau", "f4", 0), ("kp", "f4", 0),
             ("kd", "f4", 0), ("reserve", "u4", 0))
LOW_CMD = (("mode_pr", "u1", 0), ("mode_machine", "u1", 0), ("motor_cmd", MOTOR_CMD, 35), ("reserve", "u4", 4),
           ("crc", "u4", 0))
MOTOR_STATE = (("mode", "u1", 0), ("q", "f4", 0), ("dq", "f4", 0), ("ddq", "f4", 0), ("tau_est", "f4", 0),
               ("temperature", "i2", 2), ("vol", "f4", 0), ("sensor", "u4", 2), ("motorstate", "u4", 0),
               ("reserve", "u4", 4))
IMU_STATE = (("quaternion", "f4", 4), ("gyroscope", "f4", 3), ("accelerometer", "f4", 3), ("rpy", "f4", 3),
             ("temperature", "i2", 0))
LOW_STATE = (("version", "u4", 2), ("mode_pr", "u1", 0), ("mode_machine", "u1", 0), ("tick", "u4", 0),
             ("imu_state", IMU_STATE, 0), ("motor_state", MOTOR_STATE, 35), ("wireless_remote", "u1", 40),
             ("reserve", "u4", 4), ("crc", "u4", 0))

#: XCDR1 encapsulation header of a little-endian plain CDR payload (what cyclonedds writes for final types).
CDR_LE_HEADER = b"\x00\x01\x00\x00"
#: Little-endian encapsulation ids we can parse in place: CDR_LE (XCDR1) and PLAIN_CDR2_LE (XCDR2 final: for types
#: with no 8-byte members its layout is the same as XCDR1's).
CDR_LE_IDS = (b"\x00\x01", b"\x00\x07")


def _align(offset: int, alignment: int) -> int:
    return (offset + alignment - 1) // alignment * alignment


def _c_alignment(fields) -> int:
    return max(_c_alignment(t) if isinstance(t, tuple) else np.dtype(t).itemsize for _, t, _ in fields)


def _c_dtype(fields) -> np.dtype:
    """The packed C struct as a numpy structured dtype with explicit offsets (little-endian)."""
    names, formats, offsets = [], [], []
    offset = 0
    for name, typ, count in fields:
        if isinstance(typ, tuple):
            sub = _c_dtype(typ)
            alignment = _c_alignment(typ)
        else:
            sub = np.dtype("<" + typ)
            alignment = sub.itemsize
        offset = _align(offset, alignment)
        names.append(name)
        formats.append((sub, (count,)) if count else sub)
        offsets.append(offset)
        offset += sub.itemsize * max(count, 1)
    size = _align(offset, _c_alignment(fields))
    return np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": size})


def _walk(fields, c_base: int, cdr_offset: int, pairs: List[Tuple[int, int, int]]) -> int:
    """Append (c offset, cdr offset, size) of every primitive; return the CDR offset after ``fields``."""
    c_dtype = _c_dtype(fields)
    for name, typ, count in fields:
        c_offset = c_base + c_dtype.fields[name][1]
        for i in range(max(count, 1)):
            if isinstance(typ, tuple):
                cdr_offset = _walk(typ, c_offset + i * _c_dtype(typ).itemsize, cdr_offset, pairs)
            else:
                size = np.dtype(typ).itemsize
                cdr_offset = _align(cdr_offset, size)
                pairs.append((c_offset + i * size, cdr_offset, size))
                cdr_offset += size
    return cdr_offset


class StructLayout:
    """One message type's C dtype, CDR payload size, and the two byte-gather index maps between them."""

    def __init__(self, fields) -> None:
        self.dtype = _c_dtype(fields)
        self.c_size = self.dtype.itemsize
        pairs: List[Tuple[int, int, int]] = []
        self.cdr_size = _walk(fields, 0, 0, pairs)  # payload bytes, without the 4-byte header
        # Padding bytes of either layout gather from a C padding byte, always zero in what we build; on the parse
        # side a padding byte of the C image is taken from a CDR padding byte, zero as cyclonedds writes it.
        used_c = np.zeros(self.c_size, dtype=bool)
        used_cdr = np.zeros(self.cdr_size, dtype=bool)
        cdr_from_c = np.zeros(self.cdr_size, dtype=np.intp)
        c_from_cdr = np.zeros(self.c_size, dtype=np.intp)
        for c_off, cdr_off, size in pairs:
            cdr_from_c[cdr_off:cdr_off + size] = np.arange(c_off, c_off + size)
            c_from_cdr[c_off:c_off + size] = np.arange(cdr_off, cdr_off + size)
            used_c[c_off:c_off + size] = True
            used_cdr[cdr_off:cdr_off + size] = True
        c_pad = np.flatnonzero(~used_c)
        cdr_pad = np.flatnonzero(~used_cdr)
        cdr_from_c[~used_cdr] = c_pad[0] if len(c_pad) else 0
        c_from_cdr[~used_c] = cdr_pad[0] if len(cdr_pad) else 0
        self.cdr_from_c = cdr_from_c
        self.c_from_cdr = c_from_cdr
        self.c_padding = ~used_c  # bytes of the C struct that are padding (zero in a sender's struct)


LOWCMD_LAYOUT = StructLayout(LOW_CMD)
LOWSTATE_LAYOUT = StructLayout(LOW_STATE)
LOWCMD_DTYPE = LOWCMD_LAYOUT.dtype
LOWSTATE_DTYPE = LOWSTATE_LAYOUT.dtype
