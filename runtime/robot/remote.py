"""The G1 wireless remote as it arrives in LowState.wireless_remote (40 bytes): button bits and sticks.

Layout from g1-wire.md: bytes 2-3 a little-endian u16 of button bits; f32 sticks lx at 4, rx at 8, ry at 12, the L2
trigger's analog value at 16, ly at 20. Operators stop the robot with these buttons, so the decoding is tested on
its own and end to end through the simulator.
"""

from __future__ import annotations

import struct
from typing import Dict, Iterable, List

#: Button name -> bit in the u16 at bytes 2-3.
BUTTONS: Dict[str, int] = {
    "R1": 0, "L1": 1, "start": 2, "select": 3, "R2": 4, "L2": 5, "F1": 6, "F2": 7,
    "A": 8, "B": 9, "X": 10, "Y": 11, "up": 12, "right": 13, "down": 14, "left": 15,
}
REMOTE_BYTES = 40
#: Stick name -> byte offset of its little-endian f32.
STICKS: Dict[str, int] = {"lx": 4, "rx": 8, "ry": 12, "l2": 16, "ly": 20}


def decode_buttons(raw) -> int:
    """The button bits from the raw 40 bytes (bytes, bytearray, or a uint8 array)."""
    if len(raw) < 4:
        raise ValueError(f"wireless_remote holds {len(raw)} bytes, expected {REMOTE_BYTES}")
    return int(raw[2]) | (int(raw[3]) << 8)


def button_mask(names: Iterable[str]) -> int:
    """Bits of named buttons; KeyError names an unknown one."""
    mask = 0
    for name in names:
        if name not in BUTTONS:
            raise KeyError(f"unknown remote button {name!r}; known: {', '.join(BUTTONS)}")
        mask |= 1 << BUTTONS[name]
    return mask


def pressed(bits: int) -> List[str]:
    """Names of the buttons set in ``bits``, in bit order."""
    return [name for name, bit in BUTTONS.items() if bits >> bit & 1]


def decode_sticks(raw) -> Dict[str, float]:
    """The stick axes (and the L2 analog value) from the raw 40 bytes."""
    data = bytes(raw)
    return {name: struct.unpack_from("<f", data, offset)[0] for name, offset in STICKS.items()}


def encode_remote(buttons: Iterable[str] = (), **sticks: float) -> bytes:
    """40 raw bytes with ``buttons`` pressed and stick values (lx, rx, ry, l2, ly) set; the simulator's side."""
    out = bytearray(REMOTE_BYTES)
    struct.pack_into("<H", out, 2, button_mask(buttons))
    for name, value in sticks.items():
        if name not in STICKS:
            raise KeyError(f"unknown stick {name!r}; known: {', '.join(STICKS)}")
        struct.pack_into("<f", out, STICKS[name], value)
    return bytes(out)
