"""Hostile input to the wire decoders: only DecodeError ever escapes, and its text is short and quotes no payload.

Arbitrary msgpack values, arbitrary bytes and mutations of valid messages of every type go through ``decode`` with
every ``expect`` the code base uses (issue 10, item 1: one 60-byte message used to kill the controller).
"""

import math

import deep_msgpack
import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.protocol import (
    MAX_ERROR_TEXT,
    MAX_FRAME_BYTES,
    ActionChunk,
    Command,
    DecodeError,
    Frame,
    Heartbeat,
    Reply,
    RobotState,
    decode,
    decode_array,
    encode_chunk,
    encode_command,
    encode_frame,
    encode_heartbeat,
    encode_reply,
    encode_state,
)

#: Every (expect, max_bytes) a receiver in wam-edge decodes with: controller inbox, runtime state, controller
#: control socket, operator client, raw-frame camera.
EXPECTS = [(("chunk", "heartbeat"), 1 << 20), (("state",), 1 << 20), (("command",), 4096), (("reply",), 4096),
           (("frame",), MAX_FRAME_BYTES)]
TYPES = ["chunk", "heartbeat", "state", "command", "reply", "frame"]
FIELDS = ["session", "episode", "seq", "obs_stamp", "frame_stamp", "step_s", "joints", "actions", "stamp", "health",
          "detail", "safety", "task", "q", "dq", "cmd", "who", "ok", "state", "images", "dtype", "shape", "data"]
#: A run of this many payload characters in an error message counts as echoing the payload.
ECHO_RUN = 32
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.data_too_large])


def _deep(value, depth):
    for _ in range(depth):
        value = [value]
    return value


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(), st.text(max_size=40),
    st.binary(max_size=40), st.sampled_from(["\x1b[2J\r\n\u202e" * 8, "<f4", "|u1", "chunk", "ok"]),
    st.integers(100, 4000).map(lambda n: "x" * n),
)
#: Any msgpack value: maps with keys of any type (the decoder refuses all but str and bytes before looking).
any_keys = st.one_of(st.text(max_size=12), st.binary(max_size=8), st.integers(-2**63, 2**64 - 1), st.none(),
                     st.booleans(), st.floats(allow_nan=False))
values = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=5),
                                                      st.dictionaries(any_keys, kids, max_size=5)), max_leaves=20)
#: Values that get past the unpacker (str and bytes keys only), so that they reach the field checks.
str_keys = st.one_of(st.text(max_size=12), st.sampled_from(FIELDS), st.binary(max_size=8))
unpackable = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=5),
                                                          st.dictionaries(str_keys, kids, max_size=5)), max_leaves=20)
hostile = st.one_of(
    unpackable,
    st.builds(_deep, unpackable, st.integers(100, 990)),
    st.sampled_from([[0, 2**63], [2**64 - 1, 0], [0, 2**62, 2**62], [65536, 65536], [1] * 70, [0] * 70,
                     [True, 2], [-1, 2], [3.0, 2], [[3], 2], [], [0, 0], 2**64 - 1, -2**63, 1e300, math.nan]),
)


@st.composite
def arrays(draw):
    """An array map that is often nearly right (a known dtype, a small shape, bytes of the right length), with any
    part of it hostile now and then."""
    dtype = draw(st.sampled_from(["<f4", "|u1", "<f8", ">f4", "|O"]))
    shape = draw(st.lists(st.integers(0, 6), min_size=1, max_size=3))
    size = int(np.prod(shape)) * (1 if dtype in ("|u1", "|O") else 8 if dtype == "<f8" else 4)
    data = draw(st.one_of(st.just(b"\0" * size), st.binary(max_size=256), st.just(b"\xff" * size)))
    arr = {"dtype": dtype, "shape": shape, "data": data}
    for key in draw(st.lists(st.sampled_from(["dtype", "shape", "data"]), max_size=2)):
        arr[key] = draw(hostile)
    return arr


texts = st.one_of(st.text(max_size=70), st.sampled_from(["ok", "fault", "status", "arm", "idle", "head"]))
numbers = st.one_of(st.floats(), st.integers(-2**63, 2**64 - 1))
PLAUSIBLE = {
    "session": texts, "health": texts, "detail": texts, "safety": texts, "task": texts, "cmd": texts, "who": texts,
    "state": texts, "episode": numbers, "seq": numbers, "obs_stamp": numbers, "frame_stamp": numbers,
    "step_s": numbers, "stamp": numbers, "ok": st.booleans(), "joints": st.lists(texts, max_size=4),
    "actions": arrays(), "q": arrays(), "dq": arrays(), "images": st.dictionaries(texts, arrays(), max_size=3),
}
KEYS = {"chunk": ["session", "episode", "seq", "obs_stamp", "frame_stamp", "step_s", "joints", "actions"],
        "heartbeat": ["session", "seq", "stamp", "health", "detail"],
        "state": ["seq", "stamp", "safety", "task", "q", "dq"],
        "command": ["cmd", "who"], "reply": ["ok", "state", "detail"], "frame": ["seq", "stamp", "images"]}


@st.composite
def messages(draw):
    """A message map with the right version and a known type, its fields mostly plausible, some hostile, missing or
    extra: this reaches every field check of every decoder."""
    kind = draw(st.sampled_from(TYPES))
    m = {"v": 1, "type": kind}
    for key in KEYS[kind]:
        choice = draw(st.integers(0, 9))
        if choice < 7:
            m[key] = draw(PLAUSIBLE[key])
        elif choice < 9:
            m[key] = draw(hostile)
    if draw(st.integers(0, 4)) == 0:
        m[draw(st.one_of(st.sampled_from(FIELDS), st.text(max_size=40)))] = draw(hostile)
    return m


def _strings(value):
    """Every str and bytes in ``value``, walked without recursion (values may be 1,000 lists deep)."""
    found, stack = [], [value]
    while stack:
        v = stack.pop()
        if isinstance(v, (str, bytes)):
            found.append(v if isinstance(v, str) else v.decode("latin-1"))
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
    return found


def _assert_only_decode_error(raw, expect, max_bytes, payload=None):
    """decode() returns or raises DecodeError (anything else propagates and fails the test); the error's text is
    bounded, printable and has no run of ECHO_RUN characters of any string in the payload."""
    try:
        decode(raw, expect, max_bytes)
    except DecodeError as err:
        text = str(err)
        assert len(text) <= MAX_ERROR_TEXT, text
        assert text.isprintable(), text
        for s in _strings(payload):
            for i in range(len(s) - ECHO_RUN + 1):
                assert s[i:i + ECHO_RUN] not in text, (text, s[:80])
        return err
    return None


def _pack(value):
    return deep_msgpack.packb(value)  # any depth, whatever this msgpack's packer allows


# -- arbitrary values and bytes --------------------------------------------------------------------------------------

@FUZZ
@given(values)
def test_arbitrary_msgpack_values_raise_only_decode_error(value):
    raw = _pack(value)
    for expect, max_bytes in EXPECTS:
        _assert_only_decode_error(raw, expect, max_bytes, value)


@FUZZ
@given(messages())
def test_arbitrary_messages_of_every_type_raise_only_decode_error(m):
    raw = _pack(m)
    for expect, max_bytes in EXPECTS:
        _assert_only_decode_error(raw, expect, max_bytes, m)


@FUZZ
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_raise_only_decode_error(raw):
    for expect, max_bytes in EXPECTS:
        _assert_only_decode_error(raw, expect, max_bytes, raw)


# -- mutations of valid messages ---------------------------------------------------------------------------------

def _valid_messages():
    """One valid message of each type, as the maps its sender packs, with the expect its receiver uses."""
    arr = np.linspace(-1, 1, 6, dtype=np.float32)
    img = np.zeros((2, 3, 3), np.uint8)
    encoded = [
        (encode_chunk(ActionChunk("s", 0, 1, 1.0, 1.0, 0.02, ("a", "b"), arr.reshape(3, 2))), ("chunk", "heartbeat")),
        (encode_heartbeat(Heartbeat("s", 1, 1.0, "ok", "fine")), ("chunk", "heartbeat")),
        (encode_state(RobotState(1, 1.0, "idle", arr, arr)), ("state",)),
        (encode_command(Command("status", "me")), ("command",)),
        (encode_reply(Reply(True, "idle", "pick up the cup")), ("reply",)),
        (encode_frame(Frame(1, 1.0, {"head": img, "wrist": img})), ("frame",)),
    ]
    return [(msgpack.unpackb(raw, raw=False), expect) for raw, expect in encoded]


VALID = _valid_messages()


def _paths(m):
    """Paths to every field of a message map, nested maps (arrays, images) included."""
    out, stack = [], [((), m)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, dict):
            for k, sub in v.items():
                out.append(path + (k,))
                stack.append((path + (k,), sub))
    return out


def _mutate(m, op, path, new, depth):
    m = msgpack.unpackb(_pack(m), raw=False)  # a deep copy
    parent = m
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    if op == "replace":
        parent[key] = new
    elif op == "delete":
        del parent[key]
    elif op == "insert":
        parent[new if isinstance(new, (str, bytes, int)) and not isinstance(new, bool) else "extra"] = new
    elif op == "retype":
        old = parent[key]
        parent[key] = [old] if not isinstance(old, list) else {"x": old}
    elif op == "nest":
        parent[key] = _deep(parent[key], depth)
    return m


@FUZZ
@given(st.sampled_from(range(len(VALID))), st.sampled_from(["replace", "delete", "insert", "retype", "nest"]),
       st.integers(0, 1000), hostile, st.integers(1, 1015))
def test_mutated_valid_messages_raise_only_decode_error(which, op, pick, new, depth):
    m, _ = VALID[which]
    paths = _paths(m)
    m = _mutate(m, op, paths[pick % len(paths)], new, depth)
    for expect, max_bytes in EXPECTS:
        _assert_only_decode_error(_pack(m), expect, max_bytes, m)


@FUZZ
@given(st.sampled_from(range(len(VALID))), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                                  min_size=1, max_size=4), st.integers(0, 10**6))
def test_corrupted_and_truncated_bytes_raise_only_decode_error(which, flips, cut):
    m, _ = VALID[which]
    raw = bytearray(_pack(m))
    for pos, byte in flips:
        raw[pos % len(raw)] = byte
    for data in (bytes(raw), bytes(raw[:cut % len(raw)])):
        for expect, max_bytes in EXPECTS:
            _assert_only_decode_error(data, expect, max_bytes, m)


# -- the three crashes, and what each now says ------------------------------------------------------------

def _chunk_map(**changes):
    m, _ = VALID[0]
    m = dict(m, **changes)
    return m


def _reason(m, expect=("chunk", "heartbeat")):
    err = _assert_only_decode_error(_pack(m), expect, 1 << 20, m)
    assert err is not None, "decoded"
    return err.reason


@pytest.mark.parametrize("dtype", [["<f4"], {"<f4": 1}, [], {}])
def test_an_unhashable_dtype_is_bad_dtype(dtype):
    # was TypeError: unhashable type, from `dtype not in DTYPES`
    arr = {"dtype": dtype, "shape": [3, 2], "data": b"\0" * 24}
    assert _reason(_chunk_map(actions=arr)) == "bad_dtype"


@pytest.mark.parametrize("shape", [[0, 2**63], [2**64 - 1, 0], [0, 70000]])
def test_a_zero_and_a_huge_dimension_is_too_large(shape):
    # was ValueError from reshape: the element count (0) passed, numpy cannot make the shape
    arr = {"dtype": "<f4", "shape": shape, "data": b""}
    assert _reason(_chunk_map(actions=arr)) == "too_large"


@pytest.mark.parametrize("field,reason", [("v", "bad_version"), ("type", "unexpected_type"), ("shape", "bad_shape"),
                                          ("dtype", "bad_dtype")])
def test_a_field_nested_a_thousand_lists_deep_is_named(field, reason):
    # was RecursionError while the message was built (repr of the value)
    if field in ("shape", "dtype"):
        arr = {"dtype": "<f4", "shape": [3, 2], "data": b"\0" * 24}
        arr[field] = _deep(0, 1000)
        m = _chunk_map(actions=arr)
    else:
        m = _chunk_map(**{field: _deep(0, 1000)})
    assert _reason(m) == reason


@pytest.mark.parametrize("shape,nbytes,reason", [
    ([1] * 70, 4, "bad_shape"),  # was ValueError from reshape: numpy makes at most 32 (1.x) or 64 (2.x) dimensions
    ([True, 3], 12, "bad_shape"), ([3, False], 0, "bad_shape"),  # a bool is no dimension
    ([2**63], 0, "too_large"), ([0, 2**40, 2**40], 0, "too_large"),
])
def test_decode_array_rejects_shapes_numpy_cannot_make(shape, nbytes, reason):
    with pytest.raises(DecodeError) as info:
        decode_array({"dtype": "<f4", "shape": shape, "data": b"\0" * nbytes}, "x", ndim=None)
    assert info.value.reason == reason


def test_any_other_failure_in_a_decoder_is_an_internal_rejection(monkeypatch):
    """Belt and braces: a check that is missing one day still ends as a DecodeError, not a dead process."""
    from runtime.protocol import codec

    def broken(m):
        raise KeyError("a bug")

    monkeypatch.setitem(codec._DECODERS, "chunk", broken)
    with pytest.raises(DecodeError) as info:
        decode(_pack(VALID[0][0]), ("chunk",))
    assert info.value.reason == "internal" and "KeyError" in str(info.value)


def test_any_other_failure_in_decode_array_is_an_internal_rejection(monkeypatch):
    from runtime.protocol import codec

    def broken(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(codec.np, "frombuffer", broken)
    with pytest.raises(DecodeError) as info:
        decode_array({"dtype": "<f4", "shape": [3], "data": b"\0" * 12}, "x")
    assert info.value.reason == "internal"


def test_a_number_beyond_a_double_is_out_of_range():
    from runtime.protocol import codec

    with pytest.raises(DecodeError) as info:  # was OverflowError from float()
        codec._number({"x": 10**400}, "x", "t")
    assert info.value.reason == "out_of_range"
