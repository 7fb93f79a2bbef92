"""The wire format: round trips, and strict rejection of everything malformed (property-based)."""

import math

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from runtime.protocol import (
    MAX_ERROR_TEXT,
    MAX_REPLY_BYTES,
    MAX_REPLY_DETAIL,
    PROTOCOL_VERSION,
    ActionChunk,
    DecodeError,
    Frame,
    Heartbeat,
    Reply,
    RobotState,
    decode,
    encode_chunk,
    encode_frame,
    encode_heartbeat,
    encode_reply,
    encode_state,
)
from runtime.robot import g1

finite32 = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32)
names = st.lists(st.sampled_from(g1.JOINT_NAMES), min_size=1, max_size=29, unique=True)
stamps = st.floats(0, 1e9, allow_nan=False, allow_infinity=False)


@st.composite
def chunks(draw):
    joints = tuple(draw(names))
    h = draw(st.integers(1, 64))
    actions = draw(hnp.arrays(np.float32, (h, len(joints)), elements=finite32))
    return ActionChunk(draw(st.text(max_size=64)), draw(st.integers(0, 2**40)), draw(st.integers(0, 2**62)),
                       draw(stamps), draw(stamps), draw(st.floats(1e-3, 1.0)), joints, actions)


@given(chunks())
def test_chunk_round_trip(c):
    d = decode(encode_chunk(c), ("chunk",))
    assert (d.session, d.episode, d.seq, d.joints) == (c.session, c.episode, c.seq, c.joints)
    assert d.obs_stamp == c.obs_stamp and d.frame_stamp == c.frame_stamp and d.step_s == c.step_s
    assert d.actions.dtype == np.float32 and np.array_equal(d.actions, c.actions)


@given(st.sampled_from(["starting", "ok", "degraded", "fault", "stopping"]), st.text(max_size=256), stamps)
def test_heartbeat_round_trip(health, detail, stamp):
    d = decode(encode_heartbeat(Heartbeat("s", 3, stamp, health, detail)), ("heartbeat",))
    assert (d.health, d.stamp, d.seq) == (health, stamp, 3)
    assert d.detail == detail if detail.isprintable() else d.detail.isprintable() and len(d.detail) == len(detail)


@given(hnp.arrays(np.float32, 29, elements=finite32), hnp.arrays(np.float32, 29, elements=finite32))
def test_state_round_trip(q, dq):
    d = decode(encode_state(RobotState(7, 12.5, "running", q, dq)), ("state",))
    assert np.array_equal(d.q, q) and np.array_equal(d.dq, dq) and d.safety == "running" and d.joints_count == 29


def test_frame_round_trip():
    img = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    d = decode(encode_frame(Frame(1, 2.0, {"head": img})), ("frame",), max_bytes=1 << 20)
    assert np.array_equal(d.images["head"], img)


# -- rejection ----------------------------------------------------------------------------------------------------

def _chunk_map(**changes):
    m = {"v": PROTOCOL_VERSION, "type": "chunk", "session": "s", "episode": 0, "seq": 1, "obs_stamp": 1.0,
         "frame_stamp": 1.0, "step_s": 0.02, "joints": ["waist_yaw", "left_elbow"],
         "actions": {"dtype": "<f4", "shape": [3, 2], "data": np.zeros((3, 2), np.float32).tobytes()}}
    m.update(changes)
    return m


def _reason(m, expect=("chunk",), **kw):
    with pytest.raises(DecodeError) as info:
        decode(msgpack.packb(m, use_bin_type=True), expect, **kw)
    return info.value.reason


def test_valid_reference_message_decodes():
    assert decode(msgpack.packb(_chunk_map(), use_bin_type=True), ("chunk",)).actions.shape == (3, 2)


@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_escape_as_anything_but_decode_error(raw):
    try:
        decode(raw, ("chunk", "heartbeat", "state"))
    except DecodeError:
        pass


@given(st.dictionaries(st.text(max_size=10), st.one_of(st.integers(-2**63, 2**64 - 1), st.text(), st.binary(),
                                                        st.floats(), st.none(), st.booleans()), max_size=12))
def test_arbitrary_maps_are_rejected_cleanly(m):
    try:
        decode(msgpack.packb(m, use_bin_type=True), ("chunk", "heartbeat", "state"))
    except DecodeError:
        return
    pytest.fail("a random map decoded as a message")


@given(st.sampled_from(["<f8", "|u1", "<i4", "<u2", "|O", ">f4", "<f2", "float32", ""]))
def test_wrong_dtype_rejected(dtype):
    size = {"<f8": 8, "<i4": 4, ">f4": 4, "<u2": 2, "<f2": 2}.get(dtype, 1)
    arr = {"dtype": dtype, "shape": [3, 2], "data": b"\0" * (6 * size)}
    assert _reason(_chunk_map(actions=arr)) == "bad_dtype"


@given(st.lists(st.integers(0, 8), min_size=0, max_size=4), st.integers(0, 64))
def test_wrong_shape_rejected(shape, nbytes):
    arr = {"dtype": "<f4", "shape": shape, "data": b"\0" * nbytes}
    count = int(np.prod(shape)) if shape else 1
    if len(shape) == 2 and shape[1] == 2 and shape[0] >= 1 and nbytes == count * 4:
        return  # that one is valid
    assert _reason(_chunk_map(actions=arr)) in ("bad_shape", "bad_array")


@given(st.integers(0, 2), st.integers(0, 1), st.sampled_from([math.nan, math.inf, -math.inf]))
def test_non_finite_actions_rejected(i, j, bad):
    a = np.zeros((3, 2), np.float32)
    a[i, j] = bad
    arr = {"dtype": "<f4", "shape": [3, 2], "data": a.tobytes()}
    assert _reason(_chunk_map(actions=arr)) == "non_finite"


@pytest.mark.parametrize("key", ["obs_stamp", "step_s", "frame_stamp"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0e30, "1.0", True, None])
def test_bad_numbers_rejected(key, bad):
    assert _reason(_chunk_map(**{key: bad})) in ("out_of_range", "bad_type")


def test_oversized_rejected_before_unpacking():
    raw = msgpack.packb(_chunk_map(), use_bin_type=True)
    with pytest.raises(DecodeError) as info:
        decode(raw + b"\0" * 100, ("chunk",), max_bytes=len(raw) + 10)
    assert info.value.reason == "too_large"


def test_too_many_elements_and_horizon_rejected():
    big = {"dtype": "<f4", "shape": [5000, 2], "data": b"\0" * 40000}
    assert _reason(_chunk_map(actions=big)) in ("too_large", "bad_shape")


@pytest.mark.parametrize("change,reason", [
    ({"v": 2}, "bad_version"),
    ({"v": True}, "bad_version"),
    ({"type": "pickle"}, "unexpected_type"),
    ({"extra": 1}, "unknown_field"),
    ({"seq": -1}, "out_of_range"),
    ({"seq": 1.5}, "bad_type"),
    ({"joints": ["waist_yaw"]}, "bad_shape"),
    ({"joints": ["waist_yaw", "waist_yaw"]}, "bad_type"),
    ({"joints": []}, "bad_type"),
    ({"session": "x" * 65}, "too_large"),
])
def test_specific_rejections(change, reason):
    assert _reason(_chunk_map(**change)) == reason


def test_missing_field_named():
    m = _chunk_map()
    del m["obs_stamp"]
    with pytest.raises(DecodeError, match="obs_stamp") as info:
        decode(msgpack.packb(m, use_bin_type=True), ("chunk",))
    assert info.value.reason == "missing_field"


def test_heartbeat_health_whitelist():
    m = {"v": 1, "type": "heartbeat", "session": "s", "seq": 1, "stamp": 1.0, "health": "great", "detail": ""}
    assert _reason(m, ("heartbeat",)) == "out_of_range"


def test_state_shapes_must_agree():
    q = {"dtype": "<f4", "shape": [29], "data": b"\0" * 116}
    dq = {"dtype": "<f4", "shape": [28], "data": b"\0" * 112}
    m = {"v": 1, "type": "state", "seq": 1, "stamp": 1.0, "safety": "running", "q": q, "dq": dq}
    assert _reason(m, ("state",)) == "bad_shape"


def test_ext_types_and_non_map_rejected():
    assert _reason([1, 2, 3]) == "malformed"
    with pytest.raises(DecodeError) as info:
        decode(msgpack.packb(msgpack.ExtType(1, b"x")), ("chunk",))
    assert info.value.reason == "malformed"


@settings(max_examples=50)
@given(chunks(), st.integers(0, 400), st.integers(0, 255))
def test_corrupted_chunk_bytes_are_rejected_or_still_valid(c, pos, byte):
    raw = bytearray(encode_chunk(c))
    raw[pos % len(raw)] = byte
    try:
        d = decode(bytes(raw), ("chunk",))
    except DecodeError:
        return
    # if a flipped byte still decodes, it decoded to a fully valid message
    assert np.isfinite(d.actions).all() and d.actions.shape[1] == len(d.joints)


# -- error text: bounded, printable, no echo of the payload (issue 10) ----------------------------------------------

def _long_run_of(text, payload, run=32):
    return any(payload[i:i + run] in text for i in range(len(payload) - run + 1))


@pytest.mark.parametrize("change", [
    {"k" * 3000: 1},  # was: every unknown key quoted in full
    {"v": "x" * 3000},  # was: the version's repr
    {"type": "t" * 3000},  # was: the type's repr
    {"actions": {"dtype": "d" * 3000, "shape": [3, 2], "data": b""}},
    {"actions": {"dtype": "<f4", "shape": [3] * 40, "data": b""}},
])
def test_an_error_quotes_only_a_few_characters_of_the_payload(change):
    m = _chunk_map(**change)
    with pytest.raises(DecodeError) as info:
        decode(msgpack.packb(m, use_bin_type=True), ("chunk",))
    text = str(info.value)
    assert len(text) <= MAX_ERROR_TEXT and text.isprintable()
    for value in [*change, *change.values(), *(change.get("actions") or {}).values()]:
        if isinstance(value, str):
            assert not _long_run_of(text, value), text


def test_an_error_text_is_cut_and_made_printable():
    err = DecodeError("bad_type", "\x1b[2J" + "y" * 1000)
    assert len(str(err)) <= MAX_ERROR_TEXT and str(err).isprintable() and err.reason == "bad_type"


def test_an_operator_name_with_control_characters_is_refused():
    m = {"v": 1, "type": "command", "cmd": "stop", "who": "me\n2024-01-01 INFO armed by root"}
    assert _reason(m, ("command",)) == "bad_type"  # the controller logs who: no forged log lines


@pytest.mark.parametrize("name", ["\x1b[2J", "head\n", "a\u202eb"])
def test_a_camera_name_with_control_characters_is_refused(name):
    img = {"dtype": "|u1", "shape": [1, 1, 3], "data": b"\0\0\0"}
    m = {"v": 1, "type": "frame", "seq": 1, "stamp": 1.0, "images": {name: img}}
    assert _reason(m, ("frame",)) == "bad_type"


@pytest.mark.parametrize("detail", ["\x1b[2J" + "y" * 5000, "\U0001f600" * 2000, "line one\nline two"])
def test_a_reply_is_cut_and_made_printable_so_that_the_client_always_decodes_it(detail):
    r = decode(encode_reply(Reply(False, "idle\x07", detail)), ("reply",), MAX_REPLY_BYTES)
    assert r.ok is False and r.state == "idle?"
    assert len(r.detail) <= MAX_REPLY_DETAIL and r.detail.isprintable()
    assert r.detail[:4] == detail[:4].replace("\x1b", "?").replace("\n", " ")


def test_a_heartbeats_detail_is_made_printable_before_it_reaches_a_log():
    raw = encode_heartbeat(Heartbeat("s", 1, 1.0, "fault", "camera\n2026-12-02 ERROR forged line\x1b[2J"))
    hb = decode(raw, ("heartbeat",))
    assert hb.detail.isprintable() and "forged line" in hb.detail
