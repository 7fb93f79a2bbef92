"""The CRC Unitree's firmware expects in LowCmd (and sets in LowState), fast enough for 500 Hz from Python.

The CRC (g1-wire.md): the packed C struct minus its final crc word, read as little-endian u32 words, each word fed
MSB first into CRC-32 with polynomial 0x04C11DB7, init 0xFFFFFFFF, no reflection, no final xor. Feeding a word MSB
first is CRC-32/MPEG-2 over its big-endian bytes. zlib's CRC-32 is the reflected form of the same polynomial, so

    mpeg2(data) = bitrev32(zlib.crc32(bitrev8_each(data)) ^ 0xFFFFFFFF)

which runs in C: a numpy byte-swapping copy (MSB first within each word), bytes.translate through a 256-entry
bit-reversal table, and one zlib call (3-5 us for a LowCmd). ``crc32_reference`` is the bit-at-a-time
definition, used by the tests to pin the fast form down.
"""

from __future__ import annotations

import zlib
from typing import Optional

import numpy as np

from runtime.robot.dds.idl_layout import LOWCMD_LAYOUT

POLY = 0x04C11DB7
#: crc of an all-zero LowCmd (g1-wire.md).
ZERO_LOWCMD_CRC = 0xFE172F9F

_REV8_LIST = [int("{:08b}".format(i)[::-1], 2) for i in range(256)]
_REV8_TABLE = bytes(_REV8_LIST)


def _bitrev32(x: int) -> int:
    r = _REV8_LIST
    return (r[x & 0xFF] << 24) | (r[(x >> 8) & 0xFF] << 16) | (r[(x >> 16) & 0xFF] << 8) | r[x >> 24]


class WordCrc:
    """The CRC over ``nbytes`` (a multiple of 4) bytes, with a preallocated scratch buffer.

    Not thread-safe: each user (link, simulator thread) owns its own instance.
    """

    def __init__(self, nbytes: int) -> None:
        if nbytes % 4:
            raise ValueError("the CRC runs over whole 32-bit words")
        self.nbytes = nbytes
        self._words = nbytes // 4
        self._swapped = np.empty(self._words, dtype="<u4")

    def __call__(self, data) -> int:
        """CRC of the first ``nbytes`` bytes of ``data`` (a uint8 numpy array, or anything bytes-like)."""
        if isinstance(data, np.ndarray):
            words = data[:self.nbytes].view(">u4")
        else:
            words = np.frombuffer(data, dtype=">u4", count=self._words)
        # reading each little-endian word big-endian and storing it little-endian reverses its bytes: MSB first
        np.copyto(self._swapped, words)
        reflected = self._swapped.tobytes().translate(_REV8_TABLE)  # bit-reverse every byte for zlib's CRC
        return _bitrev32(zlib.crc32(reflected) ^ 0xFFFFFFFF)


def crc32_words(data) -> int:
    """CRC over all of ``data`` (bytes-like, length a multiple of 4). Allocates; fine outside the hot path."""
    raw = bytes(data)
    return WordCrc(len(raw))(raw)


def crc32_reference(data) -> int:
    """The definition, one bit at a time (slow; tests only): little-endian u32 words, each MSB first."""
    raw = bytes(data)
    if len(raw) % 4:
        raise ValueError("the CRC runs over whole 32-bit words")
    crc = 0xFFFFFFFF
    for i in range(0, len(raw), 4):
        word = int.from_bytes(raw[i:i + 4], "little")
        for bit in range(31, -1, -1):
            top = ((crc >> 31) ^ (word >> bit)) & 1
            crc = (crc << 1) & 0xFFFFFFFF
            if top:
                crc ^= POLY
    return crc


_LOWCMD_CRC = WordCrc(LOWCMD_LAYOUT.c_size - 4)


def lowcmd_crc(packed) -> int:
    """CRC of a packed (C layout, 1004 bytes) LowCmd; its own crc field is not covered."""
    return _LOWCMD_CRC(packed)


def pack_lowcmd(mode_pr: int = 0, mode_machine: int = 0, mode=0, q=0.0, dq=0.0, tau=0.0, kp=0.0, kd=0.0,
                reserve: Optional[np.ndarray] = None, motor_reserve=0, crc: Optional[int] = None) -> bytes:
    """A LowCmd in the packed C layout (1004 bytes) that the CRC covers; per-motor values broadcast over 35 slots.

    ``crc`` None = compute it (what a sender does); an int = put that value (to build a corrupt message).
    """
    rec = np.zeros(1, dtype=LOWCMD_LAYOUT.dtype)
    rec["mode_pr"] = mode_pr
    rec["mode_machine"] = mode_machine
    motors = rec["motor_cmd"][0]
    motors["mode"] = mode
    motors["q"] = q
    motors["dq"] = dq
    motors["tau"] = tau
    motors["kp"] = kp
    motors["kd"] = kd
    motors["reserve"] = motor_reserve
    if reserve is not None:
        rec["reserve"][0] = reserve
    raw = rec.view(np.uint8)
    rec["crc"] = lowcmd_crc(raw) if crc is None else crc
    return raw.tobytes()


def lowcmd_to_packed(msg) -> np.ndarray:
    """A LowCmd_ IdlStruct as a packed C-layout record (shape (1,)); for interop and tests, not the hot path."""
    rec = np.zeros(1, dtype=LOWCMD_LAYOUT.dtype)
    rec["mode_pr"] = msg.mode_pr
    rec["mode_machine"] = msg.mode_machine
    motors = rec["motor_cmd"][0]
    for i, m in enumerate(msg.motor_cmd):
        motors[i] = (m.mode, m.q, m.dq, m.tau, m.kp, m.kd, m.reserve)
    rec["reserve"][0] = msg.reserve
    rec["crc"] = msg.crc
    return rec


def idl_lowcmd_crc(msg) -> int:
    """The CRC a LowCmd_ IdlStruct instance should carry (set ``msg.crc`` to it last)."""
    return lowcmd_crc(lowcmd_to_packed(msg).view(np.uint8))
