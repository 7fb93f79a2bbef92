"""msgpack bytes of values nested deeper than the packer allows (msgpack 1.1's packer stops at 511 levels; Python's
recursion at about 1,000): hostile peers are not bound by either, so the tests build such messages by hand."""

import struct

import msgpack


def _header(n, small, tag16, tag32):
    if n < 16:
        return bytes([small | n])
    if n < 1 << 16:
        return bytes([tag16]) + struct.pack(">H", n)
    return bytes([tag32]) + struct.pack(">I", n)


def packb(value):
    """Like msgpack.packb(value, use_bin_type=True), iteratively: maps, lists and tuples at any depth."""
    out = bytearray()
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            out += _header(len(v), 0x80, 0xDE, 0xDF)
            for k, x in reversed(list(v.items())):
                stack.append(x)
                stack.append(k)
        elif isinstance(v, (list, tuple)):
            out += _header(len(v), 0x90, 0xDC, 0xDD)
            stack.extend(reversed(v))
        else:
            out += msgpack.packb(v, use_bin_type=True)
    return bytes(out)
