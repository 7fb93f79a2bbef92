"""The wire format between the policy runtime and the controller: msgpack maps, arrays as raw bytes.

Why strict: the controller acts on what it decodes. Every message carries a protocol version; arrays travel as
(dtype, shape, bytes) with a dtype whitelist; decoding checks sizes, keys, types, shapes and finiteness and raises
DecodeError naming what was wrong. Nothing is ever unpickled. docs/protocol.md is the reference.

Why only DecodeError, and short: the receive loops catch DecodeError and go on, so anything else a peer's bytes
could raise would kill a process; and its text is logged and sent back to operators, so it never quotes more than a
few characters of what the peer sent (``_show``), never walks a nested value, and is bounded (``MAX_ERROR_TEXT``).
"""

from __future__ import annotations

import math
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

import msgpack
import numpy as np

PROTOCOL_VERSION = 1

#: Largest message accepted by default (a 1024 x 64 float32 chunk is 256 KiB; frames have their own limit).
MAX_MESSAGE_BYTES = 1 << 20
#: Largest raw-frame message (three 480 x 640 RGB images are 2.8 MB).
MAX_FRAME_BYTES = 32 << 20

#: The dtypes that may appear on the wire, by their numpy string, and nothing else (no object dtypes).
DTYPES = {
    "<f4": np.dtype("<f4"),
    "<f8": np.dtype("<f8"),
    "|u1": np.dtype("|u1"),
    "<u2": np.dtype("<u2"),
    "<i4": np.dtype("<i4"),
}

HEALTH = ("starting", "ok", "degraded", "fault", "stopping")

#: The longest ``str(DecodeError)``: its reason and detail together, in printable characters.
MAX_ERROR_TEXT = 200
#: The most characters of a peer's string an error message quotes.
SHOW_CHARS = 24
#: The most dimensions an array on the wire may have (numpy 1.x allows 32).
MAX_ARRAY_DIMS = 32
#: The longest ``detail`` of an operator reply, in characters: ``encode_reply`` cuts to it and ``decode`` accepts it.
MAX_REPLY_DETAIL = 512
#: The largest operator reply a client accepts; an encoded reply always fits (512 + 64 characters of UTF-8).
MAX_REPLY_BYTES = 4096


def _printable(text: str, limit: int) -> str:
    """``text`` with every non-printable character (controls, line breaks, bidi overrides) as a space or "?", cut to
    ``limit`` characters (the last three then "...")."""
    if len(text) > limit:
        text = text[:max(limit - 3, 0)] + "..."[:limit]
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else " " if c in "\t\n\r" else "?" for c in text)


def _show(value: Any) -> str:
    """A short, printable description of a peer's value for an error message: a few characters of a string, the
    digits of a 64-bit number, only the type and length of anything else (never a repr of a nested value: a deep one
    overflows the stack)."""
    if value is None or type(value) in (bool, float):
        return repr(value)
    if type(value) is int:
        return str(value) if -(1 << 64) < value < 1 << 64 else f"an int of {value.bit_length()} bits"
    if type(value) is str:
        return "'" + _printable(value, SHOW_CHARS) + "'"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"{len(value)} bytes"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return f"a map of {len(value)}"
    return f"a {type(value).__name__}"


def _show_shape(shape: Any) -> str:
    if not isinstance(shape, (list, tuple)):
        return _show(shape)
    return "[" + ", ".join(_show(d) for d in shape[:4]) + (", ...]" if len(shape) > 4 else "]")


class DecodeError(ValueError):
    """A message that must not be acted on; ``reason`` is a short, stable key for counting. The detail is made
    printable and cut so that the whole text stays within MAX_ERROR_TEXT characters."""

    def __init__(self, reason: str, detail: str = "") -> None:
        detail = _printable(str(detail), max(MAX_ERROR_TEXT - len(reason) - 2, 0)) if detail else ""
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# ----------------------------------------------------------------------------------------------------------------
# arrays


def encode_array(array: np.ndarray) -> Dict[str, Any]:
    """(dtype, shape, bytes) of a numeric array in a whitelisted little-endian dtype."""
    dt = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    key = dt.str
    if key not in DTYPES:
        raise TypeError(f"dtype {array.dtype} is not allowed on the wire (allowed: {', '.join(DTYPES)})")
    if not array.flags.c_contiguous or array.dtype.str != key:
        array = np.ascontiguousarray(array, dtype=dt)
    return {"dtype": key, "shape": list(array.shape), "data": array.tobytes()}


def decode_array(
    obj: Any,
    field: str,
    *,
    dtypes: Tuple[str, ...] = ("<f4",),
    ndim: Optional[int] = None,
    max_elements: int = 1 << 22,
    finite: bool = True,
) -> np.ndarray:
    """A read-only array view of an encoded array, or DecodeError naming ``field`` (and nothing else)."""
    try:
        return _decode_array(obj, field, dtypes, ndim, max_elements, finite)
    except DecodeError:
        raise
    except Exception as exc:  # a check missed something: still a rejection, never a crash
        raise DecodeError("internal", f"{field}: {type(exc).__name__} while decoding the array") from exc


def _decode_array(obj: Any, field: str, dtypes: Tuple[str, ...], ndim: Optional[int], max_elements: int,
                  finite: bool) -> np.ndarray:
    if not isinstance(obj, dict) or set(obj) != {"dtype", "shape", "data"}:
        raise DecodeError("bad_array", f"{field}: expected a map with dtype, shape, data")
    dtype, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if type(dtype) is not str or dtype not in dtypes or dtype not in DTYPES:  # a list or map is not hashable
        raise DecodeError("bad_dtype", f"{field}: dtype {_show(dtype)} not in {list(dtypes)}")
    if not isinstance(shape, (list, tuple)) or not all(type(d) is int and 0 <= d for d in shape):  # no bools
        raise DecodeError("bad_shape", f"{field}: shape {_show_shape(shape)} is not a list of non-negative ints")
    if len(shape) > MAX_ARRAY_DIMS or ndim is not None and len(shape) != ndim:
        expected = f"at most {MAX_ARRAY_DIMS}" if ndim is None else ndim
        raise DecodeError("bad_shape", f"{field}: expected {expected} dimensions, got shape {_show_shape(shape)}")
    # Every dimension counts, zeros as one: [0, 2**63] holds no element, yet numpy cannot make that shape.
    span = 1
    for d in shape:
        span *= max(d, 1)
        if span > max_elements:
            raise DecodeError("too_large", f"{field}: shape {_show_shape(shape)} exceeds the limit of "
                                           f"{max_elements} elements")
    count = span if all(shape) else 0
    if not isinstance(data, bytes):
        raise DecodeError("bad_array", f"{field}: data is not bytes")
    dt = DTYPES[dtype]
    if len(data) != count * dt.itemsize:
        raise DecodeError("bad_shape", f"{field}: {len(data)} bytes do not hold shape {_show_shape(shape)} of {dtype}")
    array = np.frombuffer(data, dtype=dt).reshape(shape)
    if finite and dt.kind == "f" and not np.isfinite(array).all():
        raise DecodeError("non_finite", f"{field}: contains NaN or infinity")
    return array


# ----------------------------------------------------------------------------------------------------------------
# field checks


def _get(msg: Dict[str, Any], key: str, kinds: Tuple[type, ...], what: str) -> Any:
    if key not in msg:
        raise DecodeError("missing_field", f"{what}: missing {key!r}")
    value = msg[key]
    # bool is an int in Python; never accept it where a number is meant, and vice versa
    if type(value) is bool and bool not in kinds:
        raise DecodeError("bad_type", f"{what}.{key}: expected {'/'.join(k.__name__ for k in kinds)}, got bool")
    if not isinstance(value, kinds):
        raise DecodeError(
            "bad_type", f"{what}.{key}: expected {'/'.join(k.__name__ for k in kinds)}, got {type(value).__name__}"
        )
    return value


def _number(msg: Dict[str, Any], key: str, what: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    value = _get(msg, key, (int, float), what)
    try:
        value = float(value)
    except OverflowError:  # an int beyond a double
        value = math.inf if value > 0 else -math.inf
    if not math.isfinite(value) or not lo <= value <= hi:
        raise DecodeError("out_of_range", f"{what}.{key}: {value} not in [{lo}, {hi}]")
    return value


def _count(msg: Dict[str, Any], key: str, what: str) -> int:
    value = _get(msg, key, (int,), what)
    if not 0 <= value < 1 << 63:
        raise DecodeError("out_of_range", f"{what}.{key}: {_show(value)} is not a non-negative 64-bit count")
    return value


def _text(msg: Dict[str, Any], key: str, what: str, max_len: int = 64, printable: bool = False) -> str:
    value = _get(msg, key, (str,), what)
    if len(value) > max_len:
        raise DecodeError("too_large", f"{what}.{key}: longer than {max_len} characters")
    if printable and not value.isprintable():
        raise DecodeError("bad_type", f"{what}.{key}: contains control or other non-printable characters")
    return value


def _names(msg: Dict[str, Any], key: str, what: str, max_count: int = 64) -> Tuple[str, ...]:
    value = _get(msg, key, (list, tuple), what)
    if not 0 < len(value) <= max_count or not all(isinstance(n, str) and 0 < len(n) <= 64 for n in value):
        raise DecodeError("bad_type", f"{what}.{key}: expected 1..{max_count} names")
    if len(set(value)) != len(value):
        raise DecodeError("bad_type", f"{what}.{key}: names repeat")
    return tuple(value)


# ----------------------------------------------------------------------------------------------------------------
# messages


class ActionChunk:
    """H future actions for the named joints, answering the robot state stamped ``obs_stamp`` (controller clock)."""

    __slots__ = ("session", "episode", "seq", "obs_stamp", "frame_stamp", "step_s", "joints", "actions")

    def __init__(self, session: str, episode: int, seq: int, obs_stamp: float, frame_stamp: float, step_s: float,
                 joints: Tuple[str, ...], actions: np.ndarray) -> None:
        self.session = session
        self.episode = episode
        self.seq = seq
        self.obs_stamp = obs_stamp
        self.frame_stamp = frame_stamp
        self.step_s = step_s
        self.joints = joints
        self.actions = actions


class Heartbeat:
    """The sender's health; a heartbeat that says fault or stopping is a reason to stop."""

    __slots__ = ("session", "seq", "stamp", "health", "detail")

    def __init__(self, session: str, seq: int, stamp: float, health: str, detail: str = "") -> None:
        self.session = session
        self.seq = seq
        self.stamp = stamp
        self.health = health
        self.detail = detail


class RobotState:
    """Joint positions and velocities the controller publishes back, stamped on the controller's clock, with its
    safety state and the task instruction the operator selected."""

    __slots__ = ("seq", "stamp", "safety", "task", "joints_count", "q", "dq")

    def __init__(self, seq: int, stamp: float, safety: str, q: np.ndarray, dq: np.ndarray, task: str = "") -> None:
        self.seq = seq
        self.stamp = stamp
        self.safety = safety
        self.task = task
        self.joints_count = int(q.shape[0])
        self.q = q
        self.dq = dq


#: What an operator (a person, or the demo standing in for one) may ask of the controller.
COMMANDS = ("arm", "stop", "estop", "clear_estop", "status", "next_task", "prev_task")


class Command:
    """An operator command to the controller's control socket."""

    __slots__ = ("cmd", "who")

    def __init__(self, cmd: str, who: str) -> None:
        self.cmd = cmd
        self.who = who


class Reply:
    """The controller's answer to a Command: whether it was done, the state after it, and why not."""

    __slots__ = ("ok", "state", "detail")

    def __init__(self, ok: bool, state: str, detail: str = "") -> None:
        self.ok = ok
        self.state = state
        self.detail = detail


class Frame:
    """Raw camera images (name -> H x W x 3 uint8), for cameras that publish uncompressed frames over ZeroMQ."""

    __slots__ = ("seq", "stamp", "images")

    def __init__(self, seq: int, stamp: float, images: Dict[str, np.ndarray]) -> None:
        self.seq = seq
        self.stamp = stamp
        self.images = images


MAX_HORIZON = 1024
MAX_JOINTS = 64


def encode_chunk(c: ActionChunk) -> bytes:
    return _pack({
        "v": PROTOCOL_VERSION, "type": "chunk", "session": c.session, "episode": c.episode, "seq": c.seq,
        "obs_stamp": c.obs_stamp, "frame_stamp": c.frame_stamp, "step_s": c.step_s, "joints": list(c.joints),
        "actions": encode_array(np.asarray(c.actions, dtype=np.float32)),
    })


def encode_heartbeat(h: Heartbeat) -> bytes:
    return _pack({
        "v": PROTOCOL_VERSION, "type": "heartbeat", "session": h.session, "seq": h.seq, "stamp": h.stamp,
        "health": h.health, "detail": h.detail,
    })


def encode_command(c: Command) -> bytes:
    return _pack({"v": PROTOCOL_VERSION, "type": "command", "cmd": c.cmd, "who": c.who})


def encode_reply(r: Reply) -> bytes:
    """The reply as a client decodes it: state and detail made printable and cut to what ``decode`` accepts (a
    detail can carry text from a request, an error message or a heartbeat), so that the answer is never lost."""
    return _pack({"v": PROTOCOL_VERSION, "type": "reply", "ok": bool(r.ok), "state": _printable(str(r.state), 64),
                  "detail": _printable(str(r.detail), MAX_REPLY_DETAIL)})


def encode_state(s: RobotState) -> bytes:
    return _pack({
        "v": PROTOCOL_VERSION, "type": "state", "seq": s.seq, "stamp": s.stamp, "safety": s.safety, "task": s.task,
        "q": encode_array(np.asarray(s.q, dtype=np.float32)), "dq": encode_array(np.asarray(s.dq, dtype=np.float32)),
    })


def encode_frame(f: Frame) -> bytes:
    return _pack({
        "v": PROTOCOL_VERSION, "type": "frame", "seq": f.seq, "stamp": f.stamp,
        "images": {name: encode_array(np.asarray(img, dtype=np.uint8)) for name, img in f.images.items()},
    })


def _pack(obj: Dict[str, Any]) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _decode_chunk(m: Dict[str, Any]) -> ActionChunk:
    w = "chunk"
    _keys(m, w, {"session", "episode", "seq", "obs_stamp", "frame_stamp", "step_s", "joints", "actions"})
    joints = _names(m, "joints", w, MAX_JOINTS)
    actions = decode_array(_get(m, "actions", (dict,), w), "chunk.actions", ndim=2,
                           max_elements=MAX_HORIZON * MAX_JOINTS)
    if not 1 <= actions.shape[0] <= MAX_HORIZON:
        raise DecodeError("bad_shape", f"chunk.actions: horizon {actions.shape[0]} not in [1, {MAX_HORIZON}]")
    if actions.shape[1] != len(joints):
        raise DecodeError("bad_shape", f"chunk.actions: {actions.shape[1]} columns for {len(joints)} joints")
    return ActionChunk(
        session=_text(m, "session", w), episode=_count(m, "episode", w), seq=_count(m, "seq", w),
        obs_stamp=_number(m, "obs_stamp", w, 0.0), frame_stamp=_number(m, "frame_stamp", w, 0.0),
        step_s=_number(m, "step_s", w, 1e-4, 1.0), joints=joints, actions=actions,
    )


def _decode_heartbeat(m: Dict[str, Any]) -> Heartbeat:
    w = "heartbeat"
    _keys(m, w, {"session", "seq", "stamp", "health", "detail"})
    health = _text(m, "health", w)
    if health not in HEALTH:
        raise DecodeError("out_of_range", f"heartbeat.health: {_show(health)} not in {list(HEALTH)}")
    return Heartbeat(session=_text(m, "session", w), seq=_count(m, "seq", w), stamp=_number(m, "stamp", w, 0.0),
                     health=health, detail=_printable(_text(m, "detail", w, 256), 256))  # it reaches logs


def _decode_state(m: Dict[str, Any]) -> RobotState:
    w = "state"
    _keys(m, w, {"seq", "stamp", "safety", "task", "q", "dq"})
    q = decode_array(_get(m, "q", (dict,), w), "state.q", ndim=1, max_elements=MAX_JOINTS)
    dq = decode_array(_get(m, "dq", (dict,), w), "state.dq", ndim=1, max_elements=MAX_JOINTS)
    if q.shape != dq.shape:
        raise DecodeError("bad_shape", f"state.dq: shape {dq.shape} differs from state.q {q.shape}")
    return RobotState(seq=_count(m, "seq", w), stamp=_number(m, "stamp", w, 0.0), safety=_text(m, "safety", w),
                      q=q, dq=dq, task=_text(m, "task", w, 256))


def _decode_command(m: Dict[str, Any]) -> Command:
    w = "command"
    _keys(m, w, {"cmd", "who"})
    cmd = _text(m, "cmd", w)
    if cmd not in COMMANDS:
        raise DecodeError("out_of_range", f"command.cmd: {_show(cmd)} not in {list(COMMANDS)}")
    return Command(cmd, _text(m, "who", w, printable=True))  # the controller logs it


def _decode_reply(m: Dict[str, Any]) -> Reply:
    w = "reply"
    _keys(m, w, {"ok", "state", "detail"})
    return Reply(_get(m, "ok", (bool,), w), _text(m, "state", w), _text(m, "detail", w, MAX_REPLY_DETAIL))


def _decode_frame(m: Dict[str, Any]) -> Frame:
    w = "frame"
    _keys(m, w, {"seq", "stamp", "images"})
    images_in = _get(m, "images", (dict,), w)
    if not 0 < len(images_in) <= 8:
        raise DecodeError("bad_type", "frame.images: expected 1..8 cameras")
    images = {}
    for name, obj in images_in.items():
        if not isinstance(name, str) or not 0 < len(name) <= 64 or not name.isprintable():
            raise DecodeError("bad_type", "frame.images: camera names must be short printable strings")
        field = f"frame.images.{_printable(name, SHOW_CHARS)}"
        img = decode_array(obj, field, dtypes=("|u1",), ndim=3, max_elements=MAX_FRAME_BYTES)
        if img.shape[2] != 3 or img.shape[0] == 0 or img.shape[1] == 0:
            raise DecodeError("bad_shape", f"{field}: expected H x W x 3, got {list(img.shape)}")
        images[name] = img
    return Frame(seq=_count(m, "seq", w), stamp=_number(m, "stamp", w, 0.0), images=images)


def _keys(m: Dict[str, Any], what: str, expected: set) -> None:
    extra = set(m) - expected - {"v", "type"}  # keys are str or bytes (strict_map_key), so hashable
    if extra:
        shown = sorted(_show(k) for k in extra)
        raise DecodeError("unknown_field", f"{what}: {len(shown)} unknown key(s): {', '.join(shown[:3])}"
                                           + (", ..." if len(shown) > 3 else ""))


_DECODERS: Dict[str, Callable[[Dict[str, Any]], Any]] = {
    "chunk": _decode_chunk,
    "heartbeat": _decode_heartbeat,
    "state": _decode_state,
    "frame": _decode_frame,
    "command": _decode_command,
    "reply": _decode_reply,
}


def decode(raw: bytes, expect: Tuple[str, ...], max_bytes: int = MAX_MESSAGE_BYTES) -> Any:
    """Decode one message whose type is in ``expect``; DecodeError on anything else, and only DecodeError: what the
    checks below miss still becomes one (reason ``internal``), so a receive loop that catches it survives."""
    try:
        return _decode(raw, expect, max_bytes)
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError("internal", f"{type(exc).__name__} while decoding a message") from exc


def _decode(raw: bytes, expect: Tuple[str, ...], max_bytes: int) -> Any:
    if len(raw) > max_bytes:
        raise DecodeError("too_large", f"{len(raw)} bytes exceed the limit of {max_bytes}")
    try:
        m = msgpack.unpackb(
            raw, raw=False, use_list=True, strict_map_key=True,
            max_str_len=4096, max_bin_len=max_bytes, max_array_len=4096, max_map_len=64, max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several types (ValueError, ExtraData, FormatError, ...)
        raise DecodeError("malformed", f"not a msgpack message ({type(exc).__name__})") from None
    if not isinstance(m, dict):
        raise DecodeError("malformed", "message is not a map")
    version = m.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise DecodeError("bad_version", f"protocol version {_show(version)}, this side speaks {PROTOCOL_VERSION}")
    kind = m.get("type")
    if type(kind) is not str or kind not in expect or kind not in _DECODERS:
        raise DecodeError("unexpected_type", f"message type {_show(kind)}, expected one of {list(expect)}")
    return _DECODERS[kind](m)


class RejectCounter:
    """Counts dropped inputs by reason and logs the first of each reason, then every 100th (never floods).
    Thread-safe: a camera's receive thread counts while the loop reads the totals."""

    def __init__(self, log: Callable[[str], None], what: str) -> None:
        self._log = log
        self._what = what
        self._lock = threading.Lock()
        self.counts: Dict[str, int] = {}
        self.total = 0

    def count(self, reason: str, detail: str = "") -> None:
        with self._lock:
            n = self.counts.get(reason, 0) + 1
            self.counts[reason] = n
            self.total += 1
        if n == 1 or n % 100 == 0:
            self._log(f"dropped {self._what} #{n} for {reason}" + (f": {detail}" if detail else ""))

    def reject(self, err: DecodeError) -> None:
        self.count(err.reason, err.detail)

    def snapshot(self) -> Tuple[int, Dict[str, int]]:
        with self._lock:
            return self.total, dict(self.counts)


__all__: List[str] = [
    "PROTOCOL_VERSION", "DTYPES", "HEALTH", "DecodeError", "ActionChunk", "Heartbeat", "RobotState", "Frame",
    "encode_array", "decode_array", "encode_chunk", "encode_heartbeat", "encode_state", "encode_frame", "decode",
    "RejectCounter", "MAX_MESSAGE_BYTES", "MAX_FRAME_BYTES", "COMMANDS", "Command", "Reply", "encode_command",
    "encode_reply", "MAX_ERROR_TEXT", "MAX_REPLY_DETAIL", "MAX_REPLY_BYTES",
]
