"""Whether a message is valid, read independently from docs/protocol.md (and the fault and simulator sockets' docs).

The fuzzer's oracle: a mutated message (a flipped bit, a cut) may still be a valid one, and a receiver that acts on
a valid message is right to. So every mutation is checked here and only messages this module calls invalid are
sent as malformed. Written apart from runtime/protocol/codec.py on purpose: a decoder bug that accepts garbage must
not make the oracle accept it too. Where in doubt it says valid (a message called valid is never counted against a
receiver).
"""

from __future__ import annotations

import math
import struct
from typing import Any, Dict, Optional, Tuple

import msgpack

#: docs/protocol.md
VERSION = 1
DTYPE_SIZES = {"<f4": 4, "<f8": 8, "|u1": 1, "<u2": 2, "<i4": 4}
HEALTH = ("starting", "ok", "degraded", "fault", "stopping")
COMMANDS = ("arm", "stop", "estop", "clear_estop", "status", "next_task", "prev_task")
G1_JOINTS = 29
#: runtime/faults.py
FAULTS = ("none", "nan", "outside_limits", "jump", "slow", "freeze_camera")
#: runtime/robot/dds/sim.py and runtime/robot/remote.py
SIM_KEYS = ("press", "sticks", "tilt", "gyro", "temperature", "freeze", "mode_machine", "pose", "summary", "stop")
BUTTONS = ("R1", "L1", "start", "select", "R2", "L2", "F1", "F2", "A", "B", "X", "Y", "up", "right", "down", "left")
STICKS = ("lx", "rx", "ry", "l2", "ly")

_FIELDS = {
    "chunk": ("session", "episode", "seq", "obs_stamp", "frame_stamp", "step_s", "joints", "actions"),
    "heartbeat": ("session", "seq", "stamp", "health", "detail"),
    "state": ("seq", "stamp", "safety", "task", "q", "dq"),
    "frame": ("seq", "stamp", "images"),
    "command": ("cmd", "who"),
    "reply": ("ok", "state", "detail"),
}


def _unpack(raw: bytes) -> Any:
    """The msgpack value, or a sentinel when the bytes are not exactly one msgpack value with UTF-8 strings."""
    try:
        return msgpack.unpackb(raw, raw=False, strict_map_key=False, max_ext_len=0)
    except Exception:  # noqa: BLE001 - any failure to unpack means not valid
        return _INVALID


_INVALID = object()


def _int(v: Any, lo: int = 0, hi: int = (1 << 63) - 1) -> bool:
    return type(v) is int and lo <= v <= hi


def _num(v: Any, lo: float = 0.0, hi: float = math.inf) -> bool:
    return type(v) in (int, float) and math.isfinite(v) and lo <= v <= hi


def _str(v: Any, max_len: int) -> bool:
    return type(v) is str and len(v) <= max_len


def _array(v: Any, dtypes: Tuple[str, ...], ndim: int, max_elements: int, finite: bool = True) -> Optional[tuple]:
    """The shape of a valid encoded array, else None."""
    if type(v) is not dict or set(v) != {"dtype", "shape", "data"}:
        return None
    dtype, shape, data = v["dtype"], v["shape"], v["data"]
    if type(dtype) is not str or dtype not in dtypes or type(data) is not bytes:
        return None
    if type(shape) is not list or len(shape) != ndim or not all(type(d) is int and d >= 0 for d in shape):
        return None
    count = 1
    for d in shape:
        count *= d
    if count > max_elements or len(data) != count * DTYPE_SIZES[dtype]:
        return None
    if finite and dtype in ("<f4", "<f8") and count:
        fmt = "<%d%s" % (count, "f" if dtype == "<f4" else "d")
        if not all(math.isfinite(x) for x in struct.unpack(fmt, data)):
            return None
    return tuple(shape)


def _names(v: Any) -> bool:
    return (type(v) is list and 0 < len(v) <= 64 and all(type(n) is str and 0 < len(n) <= 64 for n in v)
            and len(set(v)) == len(v))


def valid_message(raw: bytes, kind: str, max_bytes: int = 1 << 20) -> bool:
    """A valid protocol message of type ``kind`` (chunk, heartbeat, state, frame, command, reply)."""
    if len(raw) > max_bytes:
        return False
    m = _unpack(raw)
    if type(m) is not dict or not all(type(k) is str for k in m):
        return False
    if set(m) != {"v", "type"} | set(_FIELDS[kind]) or type(m["v"]) is not int or m["v"] != VERSION:
        return False
    if m["type"] != kind:
        return False
    return _CHECKS[kind](m)


def _chunk(m: Dict[str, Any]) -> bool:
    if not (_str(m["session"], 64) and _int(m["episode"]) and _int(m["seq"]) and _num(m["obs_stamp"])
            and _num(m["frame_stamp"]) and _num(m["step_s"], 1e-4, 1.0) and _names(m["joints"])):
        return False
    shape = _array(m["actions"], ("<f4",), 2, 1024 * 64)
    return shape is not None and 1 <= shape[0] <= 1024 and shape[1] == len(m["joints"])


def _heartbeat(m: Dict[str, Any]) -> bool:
    return (_str(m["session"], 64) and _int(m["seq"]) and _num(m["stamp"]) and m["health"] in HEALTH
            and _str(m["detail"], 256))


def _state(m: Dict[str, Any]) -> bool:
    if not (_int(m["seq"]) and _num(m["stamp"]) and _str(m["safety"], 64) and _str(m["task"], 256)):
        return False
    q = _array(m["q"], ("<f4",), 1, 64)
    dq = _array(m["dq"], ("<f4",), 1, 64)
    return q is not None and q == dq and q[0] == G1_JOINTS


def _frame(m: Dict[str, Any]) -> bool:
    images = m["images"]
    if not (_int(m["seq"]) and _num(m["stamp"]) and type(images) is dict and 0 < len(images) <= 8):
        return False
    for name, img in images.items():
        if type(name) is not str or not 0 < len(name) <= 64:
            return False
        shape = _array(img, ("|u1",), 3, 32 << 20)
        if shape is None or shape[2] != 3 or shape[0] == 0 or shape[1] == 0:
            return False
    return True


def _command(m: Dict[str, Any]) -> bool:
    return m["cmd"] in COMMANDS and _str(m["who"], 64)


def _reply(m: Dict[str, Any]) -> bool:
    return type(m["ok"]) is bool and _str(m["state"], 64) and _str(m["detail"], 512)


_CHECKS = {"chunk": _chunk, "heartbeat": _heartbeat, "state": _state, "frame": _frame, "command": _command,
           "reply": _reply}


def valid_frame_for(raw: bytes, cameras: Tuple[Tuple[str, int], ...], height: int) -> bool:
    """A valid raw frame that also carries exactly the layout's cameras at their sizes (what a camera adopts)."""
    if not valid_message(raw, "frame", 32 << 20):
        return False
    images = _unpack(raw)["images"]
    want = dict(cameras)
    return set(images) == set(want) and all(tuple(images[n]["shape"]) == (height, w, 3) for n, w in want.items())


def valid_fault_request(raw: bytes) -> bool:
    """runtime/faults.py: {"inject": NAME} or {"status": true}, at most 4096 bytes."""
    if len(raw) > 4096:
        return False
    m = _unpack(raw)
    if type(m) is not dict or len(m) != 1:
        return False
    (key, value), = m.items()
    return (key == "inject" and type(value) is str and value in FAULTS) or (key == "status" and value is True)


def _finite_list(v: Any, n: int) -> bool:
    return type(v) is list and len(v) == n and all(_num(x, -math.inf) for x in v)


def _pose(v: Any) -> bool:
    """{G1 joint name: rad within its limits, ...}, 1 to 29 entries (the joint table is a fact, not the simulator)."""
    from runtime.robot import g1

    return type(v) is dict and 0 < len(v) <= G1_JOINTS and all(
        type(k) is str and k in g1.JOINT_INDEX
        and _num(x, float(g1.POSITION_MIN[g1.JOINT_INDEX[k]]), float(g1.POSITION_MAX[g1.JOINT_INDEX[k]]))
        for k, x in v.items())


def valid_sim_request(raw: bytes) -> bool:
    """runtime/robot/dds/sim.py's control socket: a map of known keys, each with a value of its documented type."""
    if len(raw) > 4096:
        return False
    m = _unpack(raw)
    if type(m) is not dict or not all(type(k) is str and k in SIM_KEYS for k in m):
        return False
    checks = {
        "press": lambda v: type(v) is list and all(type(b) is str and b in BUTTONS for b in v),
        "sticks": lambda v: type(v) is dict and all(type(k) is str and k in STICKS and _num(x, -math.inf)
                                                    for k, x in v.items()),
        "tilt": lambda v: _finite_list(v, 3),
        "gyro": lambda v: _finite_list(v, 3),
        "temperature": lambda v: _num(v, -math.inf) or _finite_list(v, G1_JOINTS),
        "freeze": lambda v: type(v) is bool,
        "mode_machine": lambda v: _int(v, 0, 255),
        "pose": _pose,
        "summary": lambda v: type(v) is bool or (type(v) is dict and set(v) <= {"since"}
                                                 and all(_num(x, -math.inf) for x in v.values())),
        "stop": lambda v: type(v) is bool,
    }
    return all(checks[k](v) for k, v in m.items())


def valid_jpeg(raw: bytes, height: int, width: int, header: str) -> bool:
    """What Unitree's image server sends: an optional 12-byte header (stamp, id) and a JPEG of exactly this size that
    decodes without error (``header``: none, timestamp_id or auto, as camera.header)."""
    import simplejpeg

    data = raw
    if header == "timestamp_id" or (header == "auto" and raw[:2] != b"\xff\xd8"):
        if len(raw) < 12 or not math.isfinite(struct.unpack_from("=d", raw, 0)[0]):
            return False
        data = raw[12:]
    if data[:2] != b"\xff\xd8":
        return False
    try:
        h, w, _, _ = simplejpeg.decode_jpeg_header(data)
        if (h, w) != (height, width):
            return False
        simplejpeg.decode_jpeg(data, colorspace="RGB")
    except Exception:  # noqa: BLE001 - does not decode: not valid
        return False
    return True
