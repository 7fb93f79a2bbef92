"""The malformed messages, one named class per way a peer can be wrong; seeded, so a run can be repeated exactly.

Each class is a function (context, rng) -> Message. A link (what a socket expects: chunks and heartbeats, robot
state, raw frames, JPEGs, operator commands, fault requests, simulator requests) has the generic classes that make
sense on it and its own. Mutations of valid messages (a cut, a flipped bit, a field of the wrong type) are kept only
when runtime/fuzz/spec.py says the result is invalid: a valid message is never sent as a malformed one.

Markers: every chunk and heartbeat the fuzzer sends carries a session starting with "fuzz", operator commands say
who="fuzz", heartbeats detail "fuzz ...", and fuzz robot states a stamp of MARKER_STAMP + class index * 1000 + ...,
so whatever a process adopts can be traced back to the fuzzer and its class.
Canary classes send valid messages from the fuzzer; they must show up as applied (they prove the tool detects an
applied message) and are only sent when asked for (``--canary``).
"""

from __future__ import annotations

import math
import random
import struct
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import msgpack
import numpy as np

from runtime.fuzz import spec
from runtime.robot import g1

#: Fuzz robot states are stamped from here on (the controller's clock, time.monotonic(), is far below).
MARKER_STAMP = 5.0e8
SESSION_PREFIX = "fuzz"
#: msgpack's own packer stops at 511 levels; deep values are written by hand.
DEEP_LEVELS = (900, 1000)
#: At most this many oversized messages per socket (each a megabyte or more, and each may cost the link).
OVERSIZED_CAP = 40
#: A raw camera frame's limit is 32 MiB: fewer of those.
OVERSIZED_CAP_FRAMES = 4
SEND_TRIES = 50


class Message:
    """One malformed message: its class, its ZeroMQ frames (one, or several for a multipart message), and whether
    the receiving socket's own size limit must drop it before the process sees it (``oversized``)."""

    __slots__ = ("cls", "frames", "oversized", "note")

    def __init__(self, cls: str, frames: List[bytes], oversized: bool = False, note: str = "") -> None:
        self.cls = cls
        self.frames = frames
        self.oversized = oversized
        self.note = note

    @property
    def size(self) -> int:
        return sum(len(f) for f in self.frames)


class Context:
    """What the generators of one socket know: the link, its limits, and what the fuzzer has seen of the process
    (the controller's newest robot state, the runtime's own chunks) for messages that must look right."""

    def __init__(self, link: str, seed: int, max_bytes: int, app_max_bytes: Optional[int] = None,
                 cameras: Sequence[Tuple[str, int]] = (), height: int = 0, header: str = "auto",
                 max_chunk_age_s: float = 1.0, action_joints: Sequence[str] = g1.UPPER_BODY) -> None:
        self.link = link
        self.seed = seed
        self.max_bytes = max_bytes  # the receiving socket's ZMQ_MAXMSGSIZE
        self.app_max_bytes = app_max_bytes if app_max_bytes is not None else max_bytes
        self.cameras = tuple((str(n), int(w)) for n, w in cameras)
        self.height = int(height)
        self.header = header
        self.max_chunk_age_s = max_chunk_age_s
        self.action_joints = tuple(action_joints)
        self.action_index = g1.indices(self.action_joints)
        self.state_stamp: Optional[float] = None  # the controller's newest robot state (its clock)
        self.q = g1.NOMINAL_POSE.astype(np.float64)
        self.sniffed: List[Tuple[float, bytes]] = []  # the runtime's own chunks and when, newest last (replays)
        self.sniffed_max = 16
        self.seq = 0
        self.class_index = 0
        self.class_name = "base"
        self.marker_n = 0
        self.last_fuzz_chunk: Optional[bytes] = None
        self._jpeg: Optional[bytes] = None

    # -- what the fuzzer saw ----------------------------------------------------------------------------------------

    def saw_state(self, stamp: float, q: np.ndarray) -> None:
        self.state_stamp = stamp
        np.copyto(self.q, q)

    def saw_chunk(self, raw: bytes) -> None:
        self.sniffed.append((time.monotonic(), raw))
        if len(self.sniffed) > self.sniffed_max:
            del self.sniffed[0]

    # -- helpers ----------------------------------------------------------------------------------------------------

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def marker(self) -> float:
        """A stamp that says "a fuzz state of this class" (class index in the thousands)."""
        self.marker_n = (self.marker_n + 1) % 2000
        return MARKER_STAMP + self.class_index * 1000.0 + self.marker_n * 0.5

    def stamp_now(self) -> float:
        return self.state_stamp if self.state_stamp is not None else time.monotonic()

    def valid(self, raw: bytes) -> bool:
        """Whether a single-part message is valid on this link (see spec.py)."""
        link = self.link
        if link == "chunks":
            return spec.valid_message(raw, "chunk", self.app_max_bytes) or \
                spec.valid_message(raw, "heartbeat", self.app_max_bytes)
        if link == "state":
            return spec.valid_message(raw, "state", self.app_max_bytes)
        if link == "frames":
            return spec.valid_frame_for(raw, self.cameras, self.height)
        if link == "jpeg":
            width = sum(w for _, w in self.cameras)
            return spec.valid_jpeg(raw, self.height, width, self.header)
        if link == "commands":
            return spec.valid_message(raw, "command", 4096)
        if link == "faults":
            return spec.valid_fault_request(raw)
        if link == "sim":
            return spec.valid_sim_request(raw)
        raise ValueError(f"unknown link {link!r}")

    def jpeg(self, height: Optional[int] = None, width: Optional[int] = None) -> bytes:
        """A valid JPEG of the layout's side-by-side size (or another size)."""
        import simplejpeg

        total = sum(w for _, w in self.cameras)
        if height is None and self._jpeg is not None:
            return self._jpeg
        h, w = height or self.height, width or total
        img = np.zeros((h, w, 3), dtype=np.uint8)
        img[:, :, 0] = (np.arange(w) % 256).astype(np.uint8)
        img[:, :, 1] = (np.arange(h) % 256).astype(np.uint8)[:, None]
        out = simplejpeg.encode_jpeg(img, quality=80, colorspace="RGB")
        if height is None:
            self._jpeg = out
        return out


# ----------------------------------------------------------------------------------------------------------------
# encoding, with hand-written containers where a value is nested deeper than msgpack's packer goes


class Raw:
    """Bytes to place as they are inside a packed container (a value msgpack's packer cannot write)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


def _has_raw(obj: Any) -> bool:
    if isinstance(obj, Raw):
        return True
    if isinstance(obj, dict):
        return any(_has_raw(k) or _has_raw(v) for k, v in obj.items())
    if isinstance(obj, list):
        return any(_has_raw(v) for v in obj)
    return False


def pack(obj: Any) -> bytes:
    """msgpack bytes of ``obj``; maps and lists that hold a Raw are written by hand around it."""
    if not _has_raw(obj):
        return msgpack.packb(obj, use_bin_type=True)
    if isinstance(obj, Raw):
        return obj.data
    if isinstance(obj, dict):
        n = len(obj)
        head = bytes([0x80 | n]) if n < 16 else b"\xde" + struct.pack(">H", n)
        return head + b"".join(pack(k) + pack(v) for k, v in obj.items())
    n = len(obj)
    head = bytes([0x90 | n]) if n < 16 else b"\xdc" + struct.pack(">H", n)
    return head + b"".join(pack(v) for v in obj)


def deep_value(levels: int, kind: str = "list") -> Raw:
    """A value nested ``levels`` deep: lists of one, or maps of one key."""
    if kind == "map":
        return Raw(b"\x81\xa1a" * levels + b"\x01")
    return Raw(b"\x91" * levels + b"\x01")


def random_bytes(rng: random.Random, n: int) -> bytes:
    return rng.getrandbits(8 * n).to_bytes(n, "little") if n > 0 else b""


_SCALARS: Tuple[Any, ...] = (None, True, False, 0, 1, -1, 2 ** 63, 2 ** 64 - 1, -(2 ** 63), 1.5, -0.0, math.nan,
                             math.inf, "", "x", "1", b"", b"\x00", [], {}, [1, 2], {"a": 1})


def random_value(rng: random.Random, depth: int) -> Any:
    """An arbitrary msgpack value (maps, lists, scalars), at most ``depth`` containers deep."""
    pick = rng.random()
    if depth <= 0 or pick < 0.5:
        kind = rng.randrange(7)
        if kind == 0:
            return rng.choice(_SCALARS)
        if kind == 1:
            return rng.randint(-(2 ** 63), 2 ** 64 - 1)
        if kind == 2:
            return struct.unpack("<d", random_bytes(rng, 8))[0]
        if kind == 3:
            return "".join(chr(rng.randint(1, 0x2FF)) for _ in range(rng.randint(0, 12)))
        if kind == 4:
            return random_bytes(rng, rng.randint(0, 32))
        if kind == 5:
            return rng.choice(("chunk", "heartbeat", "state", "frame", "command", "reply", "v", "type"))
        return rng.random() < 0.5
    if pick < 0.75:
        return [random_value(rng, depth - 1) for _ in range(rng.randint(0, 5))]
    keys: List[Any] = ["v", "type", "session", "seq", "cmd", "inject", "status", "q", "actions", "images"]
    out: Dict[Any, Any] = {}
    for _ in range(rng.randint(0, 6)):
        key = rng.choice(keys) if rng.random() < 0.7 else random_value(rng, 0)
        try:
            hash(key)
        except TypeError:
            key = str(key)
        out[key] = random_value(rng, depth - 1)
    return out


# ----------------------------------------------------------------------------------------------------------------
# valid messages of each link, built as dicts (the bases that the mutations start from)


def _array(a: np.ndarray) -> Dict[str, Any]:
    return {"dtype": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()}


def chunk_dict(ctx: Context, session: str, horizon: int = 8, stamp: Optional[float] = None,
               actions: Optional[np.ndarray] = None, joints: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """A chunk that holds the pose the controller last reported (valid in every way but its session)."""
    if actions is None:
        actions = np.tile(ctx.q[ctx.action_index].astype(np.float32), (horizon, 1))
    return {"v": spec.VERSION, "type": "chunk", "session": session, "episode": 0, "seq": ctx.next_seq(),
            "obs_stamp": ctx.stamp_now() if stamp is None else stamp, "frame_stamp": ctx.stamp_now(),
            "step_s": 0.02, "joints": list(ctx.action_joints if joints is None else joints),
            "actions": _array(np.ascontiguousarray(actions, dtype=np.float32))}


def heartbeat_dict(ctx: Context, session: str, health: str = "ok", detail: str = "fuzz") -> Dict[str, Any]:
    return {"v": spec.VERSION, "type": "heartbeat", "session": session, "seq": ctx.next_seq(),
            "stamp": ctx.seq * 0.1, "health": health, "detail": detail}


def state_dict(ctx: Context, joints: int = g1.NUM_JOINTS, stamp: Optional[float] = None) -> Dict[str, Any]:
    q = np.zeros(joints, dtype=np.float32)
    q[:min(joints, g1.NUM_JOINTS)] = g1.NOMINAL_POSE[:min(joints, g1.NUM_JOINTS)]
    return {"v": spec.VERSION, "type": "state", "seq": ctx.next_seq(),
            "stamp": ctx.marker() if stamp is None else stamp, "safety": "running", "task": "fuzz", "q": _array(q),
            "dq": _array(np.zeros(joints, dtype=np.float32))}


def frame_dict(ctx: Context, cameras: Optional[Sequence[Tuple[str, int]]] = None,
               height: Optional[int] = None) -> Dict[str, Any]:
    h = ctx.height if height is None else height
    images = {name: _array(np.full((h, w, 3), 7, dtype=np.uint8)) for name, w in (cameras or ctx.cameras)}
    seq = ctx.next_seq()
    return {"v": spec.VERSION, "type": "frame", "seq": seq, "stamp": seq / 30.0, "images": images}


def command_dict(cmd: str = "status", who: str = SESSION_PREFIX) -> Dict[str, Any]:
    return {"v": spec.VERSION, "type": "command", "cmd": cmd, "who": who}


def base_dict(ctx: Context, rng: random.Random) -> Dict[str, Any]:
    """A valid message of the link, as a dict (for the links whose messages are maps)."""
    link = ctx.link
    session = _session(ctx, ctx.class_name)
    if link == "chunks":
        return chunk_dict(ctx, session, rng.choice((1, 8, 32))) if rng.random() < 0.7 else \
            heartbeat_dict(ctx, session, rng.choice(spec.HEALTH), f"{SESSION_PREFIX} {ctx.class_name}")
    if link == "state":
        return state_dict(ctx)
    if link == "frames":
        return frame_dict(ctx)
    if link == "commands":
        return command_dict(rng.choice(spec.COMMANDS))
    if link == "faults":
        return {"inject": rng.choice(spec.FAULTS)} if rng.random() < 0.7 else {"status": True}
    if link == "sim":
        return rng.choice(({"tilt": [0.0, 0.0, 0.0]}, {"gyro": [0.0, 0.0, 0.0]}, {"press": []},
                           {"summary": True}, {"sticks": {"lx": 0.0}}, {"freeze": False}))
    raise ValueError(f"link {link!r} has no map messages")


# ----------------------------------------------------------------------------------------------------------------
# walking a message's fields


def _paths(obj: Any, prefix: Tuple[Any, ...] = ()) -> List[Tuple[Any, ...]]:
    """Paths (key/index tuples) of every field and sub-field."""
    out: List[Tuple[Any, ...]] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.append(prefix + (k,))
            out.extend(_paths(v, prefix + (k,)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.append(prefix + (i,))
            out.extend(_paths(v, prefix + (i,)))
    return out


def _get(obj: Any, path: Tuple[Any, ...]) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def _set(obj: Any, path: Tuple[Any, ...], value: Any) -> None:
    _get(obj, path[:-1])[path[-1]] = value


def _arrays(obj: Any) -> List[Tuple[Any, ...]]:
    """Paths of the encoded arrays ({dtype, shape, data}) in a message."""
    return [p for p in _paths(obj)
            if isinstance(_get(obj, p), dict) and set(_get(obj, p)) == {"dtype", "shape", "data"}]


def _copy(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_copy(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------------------------
# the classes


Generator = Callable[[Context, random.Random], Message]


def _invalid(ctx: Context, rng: random.Random, cls: str, make: Callable[[], bytes]) -> Message:
    """``make()`` until spec.py calls the result invalid (a valid message is never sent as a malformed one)."""
    for _ in range(SEND_TRIES):
        raw = make()
        if not ctx.valid(raw):
            return Message(cls, [raw])
    return Message(cls, [b"\xc1"], note="fell back to the never-used msgpack byte 0xc1")


def _mutated(ctx: Context, rng: random.Random, cls: str, mutate: Callable[[Dict[str, Any]], Any]) -> Message:
    def make() -> bytes:
        m = _copy(base_dict(ctx, rng))
        out = mutate(m)
        return pack(m if out is None else out)
    return _invalid(ctx, rng, cls, make)


def g_random_bytes(ctx: Context, rng: random.Random) -> Message:
    return _invalid(ctx, rng, "random_bytes", lambda: random_bytes(rng, rng.choice((0, 1, 2, 5, 16, 64, 300, 2000))))


def g_random_msgpack(ctx: Context, rng: random.Random) -> Message:
    return _invalid(ctx, rng, "random_msgpack", lambda: pack(random_value(rng, rng.randint(0, 4))))


def _valid_raw(ctx: Context, rng: random.Random) -> bytes:
    if ctx.link == "jpeg":
        return ctx.jpeg()
    return pack(base_dict(ctx, rng))


def g_truncated(ctx: Context, rng: random.Random) -> Message:
    def make() -> bytes:
        raw = _valid_raw(ctx, rng)
        return raw[:rng.randrange(0, len(raw))]
    return _invalid(ctx, rng, "truncated", make)


def g_bit_flip(ctx: Context, rng: random.Random) -> Message:
    def make() -> bytes:
        raw = bytearray(_valid_raw(ctx, rng))
        for _ in range(rng.randint(1, 8)):  # mostly in the first bytes: the keys and headers, not the array data
            i = rng.randrange(min(len(raw), 512) if rng.random() < 0.8 else len(raw))
            raw[i] ^= 1 << rng.randrange(8)
        return bytes(raw)
    return _invalid(ctx, rng, "bit_flip", make)


_OTHER_TYPES: Tuple[Any, ...] = (None, True, 0, -1, 1.5, "x", b"x", [], [1, 2], {}, {"a": 1}, 2 ** 64 - 1,
                                 -(2 ** 63), "", [[]], {"dtype": "<f4"})


def g_wrong_types(ctx: Context, rng: random.Random) -> Message:
    def mutate(m: Dict[str, Any]) -> None:
        paths = _paths(m)
        if paths:
            _set(m, rng.choice(paths), rng.choice(_OTHER_TYPES))
    return _mutated(ctx, rng, "wrong_types", mutate)


def g_dtype_unhashable(ctx: Context, rng: random.Random) -> Message:
    """Issue 10, 1: an array's dtype as a list or a map (unhashable: `dtype in DTYPES` raised TypeError)."""
    def mutate(m: Dict[str, Any]) -> None:
        arrays = _arrays(m)
        if arrays:
            a = _get(m, rng.choice(arrays))
            a["dtype"] = rng.choice((["<f4"], [], {"<f4": 1}, {}, [["<f4"]], {"a": ["b"]}))
    return _mutated(ctx, rng, "dtype_unhashable", mutate)


_SHAPES: Tuple[List[Any], ...] = (
    [0, 2 ** 63], [2 ** 63, 0], [0, 2 ** 64 - 1], [2 ** 64 - 1, 0], [0, 0, 2 ** 63], [2 ** 32, 2 ** 32],
    [2 ** 62, 4], [-1, 17], [17, -1], [0, -(2 ** 63)], [1.5, 17], [True, 17], [], [0] * 64, ["a", 1], [None],
    [0, 17, 2 ** 63], [2 ** 63], [0, 2 ** 63, 3], [1, 0], [0, 0],
)


def g_huge_shape(ctx: Context, rng: random.Random) -> Message:
    """Issue 10, 1: shapes with a zero and a huge dimension (passed the element count, then reshape raised)."""
    def mutate(m: Dict[str, Any]) -> None:
        arrays = _arrays(m)
        if arrays:
            a = _get(m, rng.choice(arrays))
            a["shape"] = list(rng.choice(_SHAPES))
            a["data"] = rng.choice((b"", a["data"], b"\x00" * 4))
    return _mutated(ctx, rng, "huge_shape", mutate)


def g_deep_nesting(ctx: Context, rng: random.Random) -> Message:
    """Issue 10, 1: v, type, shape (or another field) nested about 1000 levels deep."""
    def mutate(m: Dict[str, Any]) -> None:
        deep = deep_value(rng.choice(DEEP_LEVELS), rng.choice(("list", "list", "map")))
        targets: List[Tuple[Any, ...]] = [(k,) for k in m]
        if "v" in m:
            targets += [("v",), ("type",)] * 3
        for p in _arrays(m):
            targets += [p + ("shape",)] * 3 + [p + ("dtype",)]
        _set(m, rng.choice(targets), deep)
    return _mutated(ctx, rng, "deep_nesting", mutate)


def g_unknown_keys(ctx: Context, rng: random.Random) -> Message:
    def mutate(m: Dict[str, Any]) -> None:
        for _ in range(rng.randint(1, 6)):
            key = rng.choice(("extra", "V", "session_id", "x" * rng.randint(1, 300), "", "\u00e9t\u00e9",
                              str(rng.random()), 7, -1, None, b"bin", 1.5))
            m[key] = random_value(rng, 1)
    return _mutated(ctx, rng, "unknown_keys", mutate)


def g_missing_keys(ctx: Context, rng: random.Random) -> Message:
    def mutate(m: Dict[str, Any]) -> None:
        for _ in range(rng.randint(1, max(1, len(m) - 1))):
            if m:
                del m[rng.choice(list(m))]
    return _mutated(ctx, rng, "missing_keys", mutate)


def g_wrong_version(ctx: Context, rng: random.Random) -> Message:
    def mutate(m: Dict[str, Any]) -> None:
        m["v"] = rng.choice((0, 2, -1, 2 ** 64 - 1, 1.0, True, "1", None, [1], b"\x01", {"v": 1}, 255))
    return _mutated(ctx, rng, "wrong_version", mutate)


def g_wrong_type_field(ctx: Context, rng: random.Random) -> Message:
    """The message type of another link, an unknown one, or not a string."""
    def mutate(m: Dict[str, Any]) -> None:
        m["type"] = rng.choice(("chunk", "heartbeat", "state", "frame", "command", "reply", "CHUNK", "chunk ", "",
                                None, 1, b"chunk", ["chunk"], {"chunk": 1}, "x" * 5000))
    return _mutated(ctx, rng, "wrong_type_field", mutate)


_BAD_UTF8 = Raw(b"\xa4\xff\xfe\xfd\xfc")


def g_long_strings(ctx: Context, rng: random.Random) -> Message:
    """Strings past their limits (65, 257, a few thousand characters) and strings that are not UTF-8."""
    def mutate(m: Dict[str, Any]) -> None:
        strings = [p for p in _paths(m) if isinstance(_get(m, p), str)] or [(k,) for k in m]
        value: Any = rng.choice(("s" * 65, "d" * 257, "w" * rng.randint(600, 3900), "\u00e9" * 1500, _BAD_UTF8))
        _set(m, rng.choice(strings), value)
    return _mutated(ctx, rng, "long_strings", mutate)


def g_out_of_range(ctx: Context, rng: random.Random) -> Message:
    def mutate(m: Dict[str, Any]) -> None:
        numbers = [p for p in _paths(m) if type(_get(m, p)) in (int, float)] or [(k,) for k in m]
        _set(m, rng.choice(numbers), rng.choice((-1, -(2 ** 63), 2 ** 63, 2 ** 64 - 1, -1.0, -1e308, 1e308, 0.0,
                                                 5.0, 1e-9, 256, -0.5)))
    return _mutated(ctx, rng, "out_of_range", mutate)


def g_non_finite(ctx: Context, rng: random.Random) -> Message:
    """NaN and infinities in float arrays and float fields."""
    bad = (math.nan, math.inf, -math.inf)

    def mutate(m: Dict[str, Any]) -> None:
        arrays = [p for p in _arrays(m) if _get(m, p)["dtype"] in ("<f4", "<f8")]
        floats = [p for p in _paths(m) if type(_get(m, p)) is float]
        if arrays and (not floats or rng.random() < 0.6):
            a = _get(m, rng.choice(arrays))
            values = np.frombuffer(a["data"], dtype=a["dtype"]).copy()
            if values.size:
                for _ in range(rng.randint(1, 3)):
                    values[rng.randrange(values.size)] = rng.choice(bad)
                a["data"] = values.tobytes()
        elif floats:
            _set(m, rng.choice(floats), rng.choice(bad))
        else:
            numbers = [p for p in _paths(m) if type(_get(m, p)) is list and _get(m, p)
                       and type(_get(m, p)[0]) in (int, float)]
            if numbers:
                _get(m, rng.choice(numbers))[0] = rng.choice(bad)
            else:
                m[rng.choice(list(m))] = rng.choice(bad)
    return _mutated(ctx, rng, "non_finite", mutate)


def g_multipart(ctx: Context, rng: random.Random) -> Message:
    """Issue 10, 2 and 3: 2..8 frames (valid messages or garbage); every link here is single-part."""
    frames = []
    big = rng.random() < 0.3  # frames that take a while to arrive: a reader may meet a message half there
    for _ in range(rng.randint(2, 8)):
        if big:
            frames.append(random_bytes(rng, 16) * rng.randint(1000, 4000))
        elif rng.random() < 0.6:
            if ctx.link == "commands":
                frames.append(pack(command_dict(rng.choice(("estop", "arm", "stop", "status", "next_task")))))
            else:
                frames.append(_valid_raw(ctx, rng))
        else:
            frames.append(random_bytes(rng, rng.randint(0, 64)))
    return Message("multipart", frames)


def g_oversized(ctx: Context, rng: random.Random) -> Message:
    """Issue 10, 4: over the socket's size limit (and, where the process reads more than it accepts, just over the
    process's own limit: it must answer or count that itself)."""
    if ctx.app_max_bytes < ctx.max_bytes and rng.random() < 0.5:
        size = rng.randint(ctx.app_max_bytes + 1, ctx.max_bytes)
        return Message("oversized", [_padded(ctx, rng, size)])
    size = ctx.max_bytes + rng.choice((1, 2, 100, 4096, 65536))
    return Message("oversized", [_padded(ctx, rng, size)], oversized=True)


def _padded(ctx: Context, rng: random.Random, size: int) -> bytes:
    """A message of exactly ``size`` bytes that starts like a valid one of the link."""
    if ctx.link == "jpeg":
        head = ctx.jpeg()
    else:
        head = pack(base_dict(ctx, rng))
    return (head + b"\x00" * max(0, size - len(head)))[:size]


# -- chunks and heartbeats (the controller's PULL) ------------------------------------------------------------------


def _session(ctx: Context, cls: str) -> str:
    return f"{SESSION_PREFIX}-{cls}-{ctx.seed}"[:64]


def g_stale_chunk(ctx: Context, rng: random.Random) -> Message:
    stamp = max(0.0, ctx.stamp_now() - ctx.max_chunk_age_s - rng.choice((0.05, 1.0, 100.0, 1e6)))
    return Message("stale_chunk", [pack(chunk_dict(ctx, _session(ctx, "stale_chunk"), stamp=stamp))])


def g_future_chunk(ctx: Context, rng: random.Random) -> Message:
    stamp = ctx.stamp_now() + rng.choice((0.1, 1.0, 1e3, 1e9))
    return Message("future_chunk", [pack(chunk_dict(ctx, _session(ctx, "future_chunk"), stamp=stamp))])


def g_outside_limits(ctx: Context, rng: random.Random) -> Message:
    h = rng.choice((2, 8, 32))
    actions = np.tile(ctx.q[ctx.action_index].astype(np.float32), (h, 1))
    j = rng.randrange(len(ctx.action_index))
    motor = int(ctx.action_index[j])
    beyond = rng.choice((0.01, 0.5, 3.0, 1e6))
    value = g1.POSITION_MAX[motor] + beyond if rng.random() < 0.5 else g1.POSITION_MIN[motor] - beyond
    rows = slice(rng.randrange(h), None) if rng.random() < 0.5 else slice(None)
    actions[rows, j] = value
    return Message("outside_limits", [pack(chunk_dict(ctx, _session(ctx, "outside_limits"), actions=actions))])


_LEGS = tuple(g1.JOINT_NAMES[:12])


def g_wrong_joints(ctx: Context, rng: random.Random) -> Message:
    """Valid-looking chunks for joints the robot does not have, legs that arm_sdk leaves alone, repeated names,
    or a column count that does not match."""
    joints = list(ctx.action_joints)
    kind = rng.randrange(5)
    if kind == 0:
        joints[rng.randrange(len(joints))] = rng.choice(("fuzz_joint", "Left_Elbow", "left_elbow ", "tail"))
    elif kind == 1:
        joints[rng.randrange(len(joints))] = rng.choice(_LEGS)
    elif kind == 2:
        joints[1] = joints[0]
    elif kind == 3:
        joints = joints[:-1]
    else:
        joints = list(_LEGS)
    h = 8
    n = len(ctx.action_joints)
    if kind == 4:
        n = len(joints)
    actions = np.zeros((h, n), dtype=np.float32)
    actions[:, :min(n, len(ctx.action_index))] = ctx.q[ctx.action_index][:n]
    m = chunk_dict(ctx, _session(ctx, "wrong_joints"), actions=actions, joints=joints)
    return Message("wrong_joints", [pack(m)])


def g_first_step_too_far(ctx: Context, rng: random.Random) -> Message:
    """Inside the limits, but the current action jumps from the commanded pose."""
    q = ctx.q[ctx.action_index]
    lo = g1.POSITION_MIN[ctx.action_index] + 0.06
    hi = g1.POSITION_MAX[ctx.action_index] - 0.06
    room_up, room_down = hi - q, q - lo
    j = int(np.argmax(np.maximum(room_up, room_down)))
    step = max(0.5, min(max(room_up[j], room_down[j]), rng.choice((0.5, 0.8, 2.0))))  # limit 0.3 by default
    target = q.copy()
    target[j] += step if room_up[j] >= room_down[j] else -step
    actions = np.tile(target.astype(np.float32), (8, 1))
    return Message("first_step_too_far", [pack(chunk_dict(ctx, _session(ctx, "first_step_too_far"),
                                                          actions=actions))])


def g_foreign_session(ctx: Context, rng: random.Random) -> Message:
    """A chunk valid in every way (fresh stamp, the reported pose) from a session that is not the armed one."""
    raw = pack(chunk_dict(ctx, _session(ctx, "foreign_session"), rng.choice((1, 8, 32))))
    ctx.last_fuzz_chunk = raw
    return Message("foreign_session", [raw])


def g_replayed(ctx: Context, rng: random.Random) -> Message:
    """Issue 10, 8: byte-exact replays of the runtime's own chunks (same session, an old seq), else of a fuzz
    chunk already sent."""
    if ctx.sniffed:  # one young enough to pass the age check: only the seq can tell it is a replay
        young = [raw for t, raw in ctx.sniffed if time.monotonic() - t < 0.5 * ctx.max_chunk_age_s]
        raw = rng.choice(young) if young else ctx.sniffed[-1][1]
        return Message("replayed", [raw], note="the runtime's own chunk")
    if ctx.last_fuzz_chunk is None:
        ctx.last_fuzz_chunk = pack(chunk_dict(ctx, _session(ctx, "replayed")))
    return Message("replayed", [ctx.last_fuzz_chunk], note="a fuzz chunk again")


def g_foreign_heartbeat(ctx: Context, rng: random.Random) -> Message:
    """Issue 10, 14: heartbeats from another session (a fault or stopping one would hold the robot)."""
    health = rng.choice(("fault", "stopping", "fault", "ok", "degraded"))
    return Message("foreign_heartbeat", [pack(heartbeat_dict(ctx, _session(ctx, "foreign_heartbeat"), health,
                                                             "fuzz foreign_heartbeat"))])


def g_canary_chunk(ctx: Context, rng: random.Random) -> Message:
    return Message("canary_chunk", [pack(chunk_dict(ctx, _session(ctx, "canary_chunk"), 32))])


# -- robot state (the runtime's SUB) ---------------------------------------------------------------------------------


def g_wrong_joint_count(ctx: Context, rng: random.Random) -> Message:
    n = rng.choice((0, 1, 12, 17, 28, 30, 64))
    return Message("wrong_joint_count", [pack(state_dict(ctx, joints=n))])


def g_canary_state(ctx: Context, rng: random.Random) -> Message:
    return Message("canary_state", [pack(state_dict(ctx))])


# -- raw frames (raw_zmq camera) -------------------------------------------------------------------------------------


def g_wrong_cameras(ctx: Context, rng: random.Random) -> Message:
    cams = list(ctx.cameras)
    kind = rng.randrange(3)
    if kind == 0:
        cams = cams[:-1] or [("other", 8)]
    elif kind == 1:
        cams = cams + [("extra", cams[0][1])]
    else:
        cams[0] = ("Head", cams[0][1])
    return _invalid(ctx, rng, "wrong_cameras", lambda: pack(frame_dict(ctx, cams)))


def g_wrong_size(ctx: Context, rng: random.Random) -> Message:
    def make() -> bytes:
        cams = [(n, w + rng.choice((-1, 1, 7))) for n, w in ctx.cameras]
        return pack(frame_dict(ctx, cams if rng.random() < 0.5 else None,
                               ctx.height + rng.choice((-1, 1, 16)) if rng.random() < 0.7 else None))
    return _invalid(ctx, rng, "wrong_size", make)


def g_canary_frame(ctx: Context, rng: random.Random) -> Message:
    return Message("canary_frame", [pack(frame_dict(ctx))])


# -- JPEG (Unitree's image server) -----------------------------------------------------------------------------------


def g_not_jpeg(ctx: Context, rng: random.Random) -> Message:
    def make() -> bytes:
        return rng.choice((pack(state_dict(ctx)), b"\xff\xd8", b"\xff\xd8\xff", b"GIF89a" + random_bytes(rng, 40),
                           b"\x00" * 12 + ctx.jpeg()[2:], random_bytes(rng, 11)))
    return _invalid(ctx, rng, "not_jpeg", make)


def g_corrupt_jpeg(ctx: Context, rng: random.Random) -> Message:
    """A JPEG with bytes overwritten in its headers or data (kept only when it no longer decodes)."""
    def make() -> bytes:
        raw = bytearray(ctx.jpeg())
        for _ in range(rng.randint(1, 12)):
            i = rng.randrange(2, min(len(raw), 700) if rng.random() < 0.7 else len(raw))
            raw[i] = rng.randrange(256)
        return bytes(raw)
    return _invalid(ctx, rng, "corrupt_jpeg", make)


def g_wrong_size_jpeg(ctx: Context, rng: random.Random) -> Message:
    total = sum(w for _, w in ctx.cameras)
    h, w = rng.choice(((1, 1), (ctx.height, total - 8), (ctx.height + 8, total), (8, 8), (ctx.height, total * 2)))
    return _invalid(ctx, rng, "wrong_size_jpeg", lambda: ctx.jpeg(h, w))


def g_jpeg_size_bomb(ctx: Context, rng: random.Random) -> Message:
    """A JPEG whose frame header claims 65500 x 65500 pixels (must be refused before any decoding)."""
    raw = bytearray(ctx.jpeg())
    i = raw.find(b"\xff\xc0")
    if i < 0:
        i = raw.find(b"\xff\xc2")
    if i >= 0:
        struct.pack_into(">HH", raw, i + 5, rng.choice((65500, 0, 1)), rng.choice((65500, 0, 65535)))
    return _invalid(ctx, rng, "jpeg_size_bomb", lambda: bytes(raw))


def g_bad_header(ctx: Context, rng: random.Random) -> Message:
    """The image server's 12-byte test header with a NaN or infinite stamp, or shorter than 12 bytes."""
    def make() -> bytes:
        if rng.random() < 0.7:
            return struct.pack("=dI", rng.choice((math.nan, math.inf, -math.inf)), rng.getrandbits(32)) + ctx.jpeg()
        return random_bytes(rng, rng.randint(1, 11)).replace(b"\xff", b"\x00")
    return _invalid(ctx, rng, "bad_header", make)


def g_canary_jpeg(ctx: Context, rng: random.Random) -> Message:
    return Message("canary_jpeg", [ctx.jpeg()])


# -- operator commands (the controller's REP) ------------------------------------------------------------------------


def g_unknown_command(ctx: Context, rng: random.Random) -> Message:
    cmd = rng.choice(("ARM", "arm ", " estop", "shutdown", "", "estop\x00", "clear-estop", "reboot", "Status"))
    return _invalid(ctx, rng, "unknown_command", lambda: pack(command_dict(cmd)))


def g_long_command(ctx: Context, rng: random.Random) -> Message:
    """Issue 10, 13: about 4 KB of client text (in who, cmd, or as key names a reply might echo), under 4096 bytes."""
    def make() -> bytes:
        m = command_dict(rng.choice(spec.COMMANDS))
        kind = rng.randrange(3)
        if kind == 0:
            m["who"] = "w" * rng.randint(3800, 4000)
        elif kind == 1:
            m["cmd"] = "c" * rng.randint(3800, 4000)
        else:
            for i in range(rng.randint(10, 15)):
                m[f"k{i}" + "x" * 250] = 1
        raw = pack(m)
        return raw[:4096] if len(raw) > 4096 else raw
    return _invalid(ctx, rng, "long_command", make)


def g_canary_command(ctx: Context, rng: random.Random) -> Message:
    return Message("canary_command", [pack(command_dict("next_task"))])


# -- the runtime's fault-injection REP -------------------------------------------------------------------------------


def g_unknown_fault(ctx: Context, rng: random.Random) -> Message:
    name = rng.choice(("NaN", "nan ", "crash", "", "none\x00", "outside-limits", "kill", "x" * 300))
    return _invalid(ctx, rng, "unknown_fault", lambda: pack({"inject": name}))


def g_canary_fault(ctx: Context, rng: random.Random) -> Message:
    return Message("canary_fault", [pack({"inject": "none"})])


# -- `wam-edge sim`'s control REP ------------------------------------------------------------------------------------


def g_partial(ctx: Context, rng: random.Random) -> Message:
    """A key that would act (the e-stop button, a tilt past the limit) beside a key that is wrong: nothing of a
    request that is refused may act."""
    first = rng.choice(({"press": ["select"]}, {"press": ["B"]}, {"tilt": [1.2, 0.0, 0.0]},
                        {"temperature": 140.0}))
    bad = rng.choice(({"gyro": "x"}, {"freeze": "yes"}, {"mode_machine": "five"}, {"bogus": 1},
                      {"sticks": {"zz": 1}}, {"summary": "x"}, {"tilt": [0, 0]}))
    m = dict(first)
    m.update(bad)
    return _invalid(ctx, rng, "partial", lambda: pack(m))


def g_truthy_values(ctx: Context, rng: random.Random) -> Message:
    """Values of the wrong type that Python would still take as true or as a number ("no" is true)."""
    m = rng.choice(({"freeze": "no"}, {"freeze": 1}, {"freeze": [0]}, {"mode_machine": "7"}, {"mode_machine": 1.5},
                    {"mode_machine": -1}, {"temperature": "300"}, {"temperature": [150.0] * 3},
                    {"press": "select"}, {"press": ["select", 7]}, {"tilt": ["1", 0, 0]}, {"summary": 1},
                    {"stop": "no"}, {"stop": 1}))
    return _invalid(ctx, rng, "truthy_values", lambda: pack(m))


def g_canary_sim(ctx: Context, rng: random.Random) -> Message:
    return Message("canary_sim", [pack({"gyro": [0.0, 0.0, 0.0]})])


# ----------------------------------------------------------------------------------------------------------------
# classes per link


class FuzzClass:
    __slots__ = ("name", "make", "doc", "canary")

    def __init__(self, name: str, make: Generator, doc: str, canary: bool = False) -> None:
        self.name = name
        self.make = make
        self.doc = doc
        self.canary = canary


_GENERIC = (
    FuzzClass("random_bytes", g_random_bytes, "random bytes, 0 to 2000 of them"),
    FuzzClass("random_msgpack", g_random_msgpack, "arbitrary msgpack values (maps, lists, scalars, bins)"),
    FuzzClass("truncated", g_truncated, "a valid message cut short"),
    FuzzClass("bit_flip", g_bit_flip, "a valid message with 1 to 8 bits flipped"),
    FuzzClass("wrong_types", g_wrong_types, "one field or sub-field of another type"),
    FuzzClass("unknown_keys", g_unknown_keys, "extra keys, some not strings"),
    FuzzClass("missing_keys", g_missing_keys, "keys left out"),
    FuzzClass("deep_nesting", g_deep_nesting, "v, type, shape or a field nested ~1000 levels deep"),
    FuzzClass("long_strings", g_long_strings, "strings past their limits, up to ~4 KB, and invalid UTF-8"),
    FuzzClass("out_of_range", g_out_of_range, "numbers outside their ranges (negative, 2**63, 2**64-1, ...)"),
    FuzzClass("non_finite", g_non_finite, "NaN and infinities in arrays and number fields"),
    FuzzClass("multipart", g_multipart, "2 to 8 frames in one message"),
    FuzzClass("oversized", g_oversized, "over the socket's size limit"),
)
_PROTOCOL = (
    FuzzClass("wrong_version", g_wrong_version, "v other than 1, or not an int"),
    FuzzClass("wrong_type_field", g_wrong_type_field, "type of another link, unknown, or not a string"),
)
_ARRAYS = (
    FuzzClass("dtype_unhashable", g_dtype_unhashable, "an array's dtype as a list or a map"),
    FuzzClass("huge_shape", g_huge_shape, "shapes such as [0, 2**63], negative or non-int dimensions"),
)

LINKS: Dict[str, Tuple[FuzzClass, ...]] = {
    "chunks": _GENERIC + _PROTOCOL + _ARRAYS + (
        FuzzClass("stale_chunk", g_stale_chunk, "valid-looking chunk answering an old robot state"),
        FuzzClass("future_chunk", g_future_chunk, "valid-looking chunk stamped in the controller's future"),
        FuzzClass("outside_limits", g_outside_limits, "actions outside the joint position limits"),
        FuzzClass("wrong_joints", g_wrong_joints, "unknown, leg, repeated or missing joint names"),
        FuzzClass("first_step_too_far", g_first_step_too_far, "the current action jumps from the commanded pose"),
        FuzzClass("foreign_session", g_foreign_session, "a chunk valid in every way from another session"),
        FuzzClass("replayed", g_replayed, "byte-exact replays of the runtime's own chunks (old seq)"),
        FuzzClass("foreign_heartbeat", g_foreign_heartbeat, "heartbeats (fault, stopping, ok) from another session"),
        FuzzClass("canary_chunk", g_canary_chunk, "canary: a valid chunk from a fuzz session", canary=True),
    ),
    "state": _GENERIC + _PROTOCOL + _ARRAYS + (
        FuzzClass("wrong_joint_count", g_wrong_joint_count, "a state for 0..64 joints, not the G1's 29"),
        FuzzClass("canary_state", g_canary_state, "canary: a valid state stamped by the fuzzer", canary=True),
    ),
    "frames": _GENERIC + _PROTOCOL + _ARRAYS + (
        FuzzClass("wrong_cameras", g_wrong_cameras, "cameras missing, extra or renamed"),
        FuzzClass("wrong_size", g_wrong_size, "images of another height or width"),
        FuzzClass("canary_frame", g_canary_frame, "canary: a valid frame from the fuzzer", canary=True),
    ),
    "jpeg": (
        FuzzClass("random_bytes", g_random_bytes, "random bytes, 0 to 2000 of them"),
        FuzzClass("truncated", g_truncated, "a valid JPEG cut short"),
        FuzzClass("not_jpeg", g_not_jpeg, "msgpack, GIF, a bare SOI marker, zeros"),
        FuzzClass("corrupt_jpeg", g_corrupt_jpeg, "a JPEG with bytes overwritten (that no longer decodes)"),
        FuzzClass("wrong_size_jpeg", g_wrong_size_jpeg, "a valid JPEG of another size"),
        FuzzClass("jpeg_size_bomb", g_jpeg_size_bomb, "a frame header claiming 65500 x 65500 pixels"),
        FuzzClass("bad_header", g_bad_header, "the 12-byte header with a NaN stamp, or short"),
        FuzzClass("multipart", g_multipart, "2 to 8 frames in one message"),
        FuzzClass("oversized", g_oversized, "over the socket's size limit"),
        FuzzClass("canary_jpeg", g_canary_jpeg, "canary: a valid JPEG from the fuzzer", canary=True),
    ),
    "commands": _GENERIC + _PROTOCOL + (
        FuzzClass("unknown_command", g_unknown_command, "commands that do not exist (ARM, 'arm ', shutdown)"),
        FuzzClass("long_command", g_long_command, "about 4 KB of client text in one request"),
        FuzzClass("canary_command", g_canary_command, "canary: a valid next_task from the fuzzer", canary=True),
    ),
    "faults": _GENERIC + (
        FuzzClass("unknown_fault", g_unknown_fault, "fault names that do not exist"),
        FuzzClass("canary_fault", g_canary_fault, "canary: a valid {inject: none}", canary=True),
    ),
    "sim": tuple(c for c in _GENERIC if c.name != "missing_keys") + (  # {} is a valid request
        FuzzClass("partial", g_partial, "a key that would act beside a key that is wrong"),
        FuzzClass("truthy_values", g_truthy_values, "wrong types Python would take as true or a number"),
        FuzzClass("canary_sim", g_canary_sim, "canary: a valid {gyro: [0, 0, 0]}", canary=True),
    ),
}


def classes_for(link: str, only: Optional[Sequence[str]] = None, canary: bool = False) -> List[FuzzClass]:
    """The classes sent on ``link``: all malformed ones (or those named in ``only``), plus canaries when asked."""
    out = []
    for c in LINKS[link]:
        if only:
            if c.name in only:
                out.append(c)
        elif canary or not c.canary:
            out.append(c)
    return out


def plan(link: str, classes: Sequence[FuzzClass], total: int) -> List[Tuple[FuzzClass, int]]:
    """How many messages of each class make ``total`` for one socket: an equal share each, but oversized capped
    (each costs a megabyte or more, and may cost the link); what the cap leaves goes to the other classes."""
    if not classes:
        return []
    cap = OVERSIZED_CAP_FRAMES if link == "frames" else OVERSIZED_CAP
    share, extra = divmod(total, len(classes))
    counts = {c.name: share + (1 if i < extra else 0) for i, c in enumerate(classes)}
    others = [c.name for c in classes if c.name != "oversized"]
    if counts.get("oversized", 0) > cap and others:
        spill = counts["oversized"] - cap
        counts["oversized"] = cap
        for i in range(spill):
            counts[others[i % len(others)]] += 1
    return [(c, counts[c.name]) for c in classes if counts[c.name] > 0]


def rng_for(seed: int, target: str, cls: str) -> random.Random:
    """The class's own generator, so that one class's messages do not depend on which others ran."""
    return random.Random(f"{seed}:{target}:{cls}")
