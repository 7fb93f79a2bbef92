"""Camera sources: real sockets, real JPEGs, real threads (runtime/cameras)."""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from typing import Callable, Iterator, List, Optional

import numpy as np
import pytest
import simplejpeg
import zmq

from runtime.cameras import (
    DEFAULT_LAYOUT,
    CameraFrame,
    FrameLayout,
    ImageServerCamera,
    ImageServerSim,
    RawZmqCamera,
    ReplayCamera,
    SyntheticCamera,
    SyntheticScene,
    open_camera,
    write_recording,
)
from runtime.cameras.image_server import HEADER
from runtime.protocol import ActionChunk, Frame, encode_chunk, encode_frame

SMALL = FrameLayout([("head", 96), ("left_wrist", 64), ("right_wrist", 64)], 48)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tcp() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


@pytest.fixture
def closing() -> Iterator[Callable]:
    """Register sources, sims and publishers; all are closed at teardown (in reverse order)."""
    things: List = []

    def add(thing):
        things.append(thing)
        return thing

    yield add
    for thing in reversed(things):
        thing.close()


class Publisher:
    """A plain PUB socket sending ``messages`` round robin every ``period`` seconds on its own thread."""

    def __init__(self, endpoint: str, messages: List[bytes], period: float = 0.003) -> None:
        self.sock = zmq.Context.instance().socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.messages = messages
        self.period = period
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sock.send(self.messages[self.sent % len(self.messages)])
            self.sent += 1
            self._stop.wait(self.period)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close(0)


def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def jpeg_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def check_frame_shapes(frame: CameraFrame, layout: FrameLayout) -> None:
    assert tuple(frame.images) == layout.names
    for (name, width), img in zip(layout.cameras, frame.images.values()):
        assert img.shape == (layout.height, width, 3), name
        assert img.dtype == np.uint8


# ----------------------------------------------------------------------------------------------------------------
# layout and synthetic


def test_layout_validation_and_views() -> None:
    assert DEFAULT_LAYOUT.names == ("head", "left_wrist", "right_wrist")
    assert DEFAULT_LAYOUT.shape == (480, 1920, 3)
    assert FrameLayout.from_config(DEFAULT_LAYOUT.to_config(), 480) == DEFAULT_LAYOUT
    canvas = np.arange(np.prod(SMALL.shape), dtype=np.int64).reshape(SMALL.shape).astype(np.uint8)
    views = SMALL.views(canvas)
    assert np.shares_memory(views["left_wrist"], canvas)
    assert np.array_equal(views["left_wrist"], canvas[:, 96:160])
    with pytest.raises(ValueError, match="repeat"):
        FrameLayout([("a", 4), ("a", 4)], 4)
    with pytest.raises(ValueError, match="width"):
        FrameLayout([("a", 0)], 4)
    with pytest.raises(ValueError, match="height"):
        FrameLayout([("a", 4)], 0)
    with pytest.raises(ValueError, match="empty"):
        FrameLayout([], 4)
    with pytest.raises(ValueError, match="name and width"):
        FrameLayout.from_config([{"name": "a"}], 4)


def test_synthetic_scene_is_deterministic_and_moves() -> None:
    a, b, c = SyntheticScene(SMALL, seed=3), SyntheticScene(SMALL, seed=3), SyntheticScene(SMALL, seed=4)
    for index in (0, 1, 17, 1000):
        assert np.array_equal(a.render(index), b.render(index))
    assert not np.array_equal(a.render(5), c.render(5))
    for index in range(10):  # consecutive frames differ in every camera
        f0, f1 = SMALL.views(a.render(index)), SMALL.views(a.render(index + 1))
        for name in SMALL.names:
            assert not np.array_equal(f0[name], f1[name]), (index, name)


def test_synthetic_camera_renders_the_scene(closing) -> None:
    cam = closing(SyntheticCamera(SMALL, fps=200, seed=7))
    assert cam.latest() is None  # not started
    cam.start()
    frame = cam.wait_newer(0, 2.0)
    assert frame is not None and frame.seq >= 1
    check_frame_shapes(frame, SMALL)
    assert frame.sender_id == frame.seq - 1
    assert np.array_equal(frame.canvas, SyntheticScene(SMALL, seed=7).render(frame.seq - 1))
    later = cam.wait_newer(frame.seq, 2.0)
    assert later is not None and later.seq > frame.seq and later.stamp >= frame.stamp


def test_latest_reuses_buffers_and_never_writes_a_held_frame(closing) -> None:
    cam = closing(SyntheticCamera(SMALL, fps=400))
    cam.start()
    ids = {name: set() for name in SMALL.names}
    canvases = set()
    last_seq = 0
    for _ in range(40):
        frame = cam.wait_newer(last_seq, 2.0)
        assert frame is not None and frame.seq > last_seq
        last_seq = frame.seq
        canvases.add(id(frame.canvas))
        for name, img in frame.images.items():
            ids[name].add(id(img))
            assert img.base is frame.canvas or np.shares_memory(img, frame.canvas)
    assert len(canvases) <= 3  # three preallocated sets, nothing else
    assert all(len(v) <= 3 for v in ids.values())

    held = cam.latest()
    assert held is not None
    copy = {n: img.copy() for n, img in held.images.items()}
    start_frames = cam.stats()["frames"]
    assert wait_until(lambda: cam.stats()["frames"] >= start_frames + 10, 3.0)  # producer kept going
    for name, img in held.images.items():
        assert np.array_equal(img, copy[name]), name  # ... but never wrote the held frame
    newer = cam.latest()
    assert newer is not None and newer.seq > held.seq
    assert newer.canvas is not held.canvas

    cam.close()
    last = cam.latest()
    assert last is not None and cam.latest() is last  # nothing newer: the same frame object
    assert cam.stats()["alive"] is False


def test_wait_newer_times_out(closing) -> None:
    cam = closing(SyntheticCamera(SMALL, fps=2))
    t0 = time.monotonic()
    assert cam.wait_newer(0, 0.05) is None  # not started
    assert 0.04 <= time.monotonic() - t0 < 1.0
    cam.start()
    first = cam.wait_newer(0, 2.0)
    assert first is not None
    t0 = time.monotonic()
    assert cam.wait_newer(first.seq + 100, 0.1) is None
    assert 0.09 <= time.monotonic() - t0 < 1.0


def test_close_is_idempotent_and_final(closing) -> None:
    with SyntheticCamera(SMALL, fps=100) as cam:
        assert cam.wait_newer(0, 2.0) is not None
        assert cam.stats()["alive"] is True
    cam.close()
    assert cam.stats()["alive"] is False
    with pytest.raises(RuntimeError, match="after close"):
        cam.start()
    # a waiter is released by close()
    cam2 = closing(SyntheticCamera(SMALL, fps=1))
    threading.Timer(0.1, cam2.close).start()
    t0 = time.monotonic()
    assert cam2.wait_newer(10, 5.0) is None
    assert time.monotonic() - t0 < 2.0


# ----------------------------------------------------------------------------------------------------------------
# image server


@pytest.mark.parametrize("sim_header,cam_header", [
    ("none", "none"), ("none", "auto"), ("timestamp_id", "timestamp_id"), ("timestamp_id", "auto"),
])
def test_image_server_over_tcp(closing, sim_header: str, cam_header: str) -> None:
    sim = closing(ImageServerSim(tcp(), DEFAULT_LAYOUT, fps=60, header=sim_header, quality=90, seed=2))
    sim.start()
    cam = closing(ImageServerCamera(sim.endpoint, DEFAULT_LAYOUT, header=cam_header))
    cam.start()
    frame = cam.wait_newer(0, 5.0)
    assert frame is not None
    check_frame_shapes(frame, DEFAULT_LAYOUT)
    scene = SyntheticScene(DEFAULT_LAYOUT, seed=2)
    if sim_header == "timestamp_id":
        assert frame.sender_id is not None and frame.sender_stamp is not None
        assert abs(frame.sender_stamp - time.time()) < 2.0
        reference = scene.render(frame.sender_id)
    else:
        assert frame.sender_id is None and frame.sender_stamp is None
        last = sim.last_id  # no frame id: find the scene index it shows among the recent ones
        reference = min((scene.render(k) for k in range(max(0, last - 10), last + 2)),
                        key=lambda r: jpeg_diff(r, frame.canvas))
    for name, img in frame.images.items():
        assert jpeg_diff(img, view_of(reference, name)) < 3.0, name
    assert abs(frame.stamp - time.monotonic()) < 2.0
    seqs = [frame.seq]
    for _ in range(3):
        f = cam.wait_newer(seqs[-1], 2.0)
        assert f is not None
        seqs.append(f.seq)
        if sim_header == "timestamp_id":
            assert f.sender_id > frame.sender_id
    assert seqs == sorted(set(seqs))
    s = cam.stats()
    assert s["dropped"] == 0 and s["reasons"] == {} and s["alive"]


def view_of(canvas: np.ndarray, name: str) -> np.ndarray:
    return DEFAULT_LAYOUT.views(canvas)[name]


def test_image_server_over_ipc(closing, tmp_path) -> None:
    endpoint = f"ipc://{tmp_path}/wam-edge/frames"
    if len(endpoint) > 100:  # the ipc path limit (sun_path)
        endpoint = f"ipc:///tmp/wam-edge-test-{os.getpid()}/frames"
    sim = closing(ImageServerSim(endpoint, SMALL, fps=100, header="timestamp_id", seed=1))
    sim.start()
    cam = closing(ImageServerCamera(endpoint, SMALL, header="auto"))
    cam.start()
    frame = cam.wait_newer(0, 5.0)
    assert frame is not None
    check_frame_shapes(frame, SMALL)
    assert jpeg_diff(frame.canvas, SyntheticScene(SMALL, seed=1).render(frame.sender_id)) < 4.0


def test_image_server_header_mismatch_is_dropped(closing) -> None:
    sim = closing(ImageServerSim(tcp(), SMALL, fps=200, header="timestamp_id"))
    sim.start()
    cam = closing(ImageServerCamera(sim.endpoint, SMALL, header="none"))
    cam.start()
    assert wait_until(lambda: cam.stats()["reasons"].get("not_jpeg", 0) >= 3)
    assert cam.latest() is None and cam.stats()["frames"] == 0

    sim2 = closing(ImageServerSim(tcp(), SMALL, fps=200, header="none"))
    sim2.start()
    cam2 = closing(ImageServerCamera(sim2.endpoint, SMALL, header="timestamp_id"))
    cam2.start()
    assert wait_until(lambda: cam2.stats()["dropped"] >= 3)
    assert set(cam2.stats()["reasons"]) <= {"not_jpeg", "bad_header"}
    assert cam2.latest() is None


def test_image_server_keeps_only_the_newest_frame(closing) -> None:
    sim = closing(ImageServerSim(tcp(), SMALL, fps=300, header="timestamp_id"))
    sim.start()
    cam = closing(ImageServerCamera(sim.endpoint, SMALL, header="auto"))
    cam.start()
    assert cam.wait_newer(0, 5.0) is not None
    lags = []
    for _ in range(8):  # a consumer much slower than the publisher
        time.sleep(0.06)
        frame = cam.latest()
        assert frame is not None
        lags.append(sim.last_id - frame.sender_id)
        assert time.monotonic() - frame.stamp < 0.5
    # a queue would make the lag grow by ~18 frames per read; the newest frame keeps it small and flat
    assert max(lags) <= 12, lags
    s = cam.stats()
    assert s["received"] <= sim.sent and s["frames"] == s["received"] - s["dropped"]
    assert s["frames"] >= 8


class SlowImageServerCamera(ImageServerCamera):
    """A receive thread that needs 30 ms per message: far slower than a 300 fps publisher."""

    def _handle(self, buf, stamp):
        time.sleep(0.03)
        super()._handle(buf, stamp)


def test_slow_receiver_skips_to_the_newest_message(closing) -> None:
    sim = closing(ImageServerSim(tcp(), SMALL, fps=300, header="timestamp_id"))
    sim.start()
    cam = closing(SlowImageServerCamera(sim.endpoint, SMALL, header="auto"))
    cam.start()
    assert cam.wait_newer(0, 5.0) is not None
    lags = []
    last = 0
    for _ in range(15):
        frame = cam.wait_newer(last, 2.0)
        assert frame is not None
        last = frame.seq
        lags.append(sim.last_id - frame.sender_id)
    # A queue would fall behind by ~8 messages per 30 ms message (lag > 100 by the end); draining keeps it flat.
    assert max(lags[5:]) <= 25, lags
    s = cam.stats()
    assert s["received"] < sim.sent / 3  # most messages were never received: replaced in the socket by newer ones


def test_image_server_bad_input_is_counted_never_delivered(closing, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="wam_edge.cameras")
    good = SyntheticScene(SMALL, seed=5).render(3)
    good_jpeg = simplejpeg.encode_jpeg(good, quality=95)
    wrong_size = simplejpeg.encode_jpeg(np.zeros((SMALL.height, SMALL.total_width - 16, 3), np.uint8), quality=80)
    messages = [
        b"definitely not a jpeg",
        b"\xff\xd8" + b"\x00" * 200,  # SOI, then garbage
        wrong_size,
        good_jpeg[: len(good_jpeg) // 2],  # truncated
        b"",
        HEADER.pack(float("nan"), 1) + good_jpeg,  # header with a non-finite stamp
        HEADER.pack(time.time(), 9) + good_jpeg,  # a good frame with a header
        good_jpeg,
    ]
    endpoint = tcp()
    cam = closing(ImageServerCamera(endpoint, SMALL, header="auto"))
    cam.start()
    closing(Publisher(endpoint, messages))
    expected = {"not_jpeg", "bad_jpeg", "wrong_size", "bad_header"}

    def seen_all() -> bool:
        s = cam.stats()
        return expected <= set(s["reasons"]) and s["frames"] >= 4

    assert wait_until(seen_all, 8.0), cam.stats()
    s = cam.stats()
    assert set(s["reasons"]) <= expected
    assert s["alive"] and s["errors"] == 0
    last = 0
    for _ in range(5):
        frame = cam.wait_newer(last, 2.0)
        assert frame is not None
        last = frame.seq
        check_frame_shapes(frame, SMALL)
        assert jpeg_diff(frame.canvas, good) < 2.0  # only good frames ever arrive
        assert frame.sender_id in (None, 9)
    # rate-limited logging: the first drop of each reason, then every 100th
    records = [r for r in caplog.records if r.name == "wam_edge.cameras"]
    for reason, count in cam.stats()["reasons"].items():
        logged = [r for r in records if f" for {reason}" in r.getMessage()]
        assert 1 <= len(logged) <= 1 + count // 100, (reason, count, len(logged))
    assert any("wrong_size" in r.getMessage() and f"expected {SMALL.total_width}x{SMALL.height}" in r.getMessage()
               for r in records)


def header_starting_with(prefix: bytes, frame_id: int) -> bytes:
    """A test-mode header of now whose first bytes (the timestamp's lowest mantissa bytes, little-endian) are
    ``prefix``: FF D8 about once in 65,536 frames, FF D8 FF once in 16.7 million."""
    header = bytearray(HEADER.pack(time.time(), frame_id))
    header[:len(prefix)] = prefix
    return bytes(header)


@pytest.mark.skipif(sys.byteorder != "little", reason="the timestamp's first bytes are its low bytes on little-endian")
@pytest.mark.parametrize("prefix", [b"\xff\xd8", b"\xff\xd8\xff", b"\xff\xd8\xff\xe0"])
def test_auto_header_whose_timestamp_starts_like_a_jpeg_is_still_a_header(closing, prefix: bytes) -> None:
    good = SyntheticScene(SMALL, seed=5).render(3)
    jpeg = simplejpeg.encode_jpeg(good, quality=95)
    header = header_starting_with(prefix, 7)
    stamp, _ = HEADER.unpack(header)
    assert abs(stamp - time.time()) < 3600.0  # a real timestamp (4 bytes changed move it by minutes)
    endpoint = tcp()
    cam = closing(ImageServerCamera(endpoint, SMALL, header="auto"))
    cam.start()
    closing(Publisher(endpoint, [header + jpeg]))
    frame = cam.wait_newer(0, 5.0)
    assert frame is not None, cam.stats()
    assert (frame.sender_id, frame.sender_stamp) == (7, stamp)
    assert jpeg_diff(frame.canvas, good) < 2.0
    assert cam.stats()["dropped"] == 0


def test_auto_header_needs_a_jpeg_at_offset_12() -> None:
    """Plain JPEGs (simplejpeg's, OpenCV's: JFIF) never hold FF D8 FF at offset 12; where a message could be read
    both ways, the 12-byte reading wins only when its JPEG is this layout's size."""
    cam = ImageServerCamera("tcp://127.0.0.1:5555", SMALL, header="auto")
    good = simplejpeg.encode_jpeg(SyntheticScene(SMALL, seed=5).render(3), quality=95)
    other = simplejpeg.encode_jpeg(np.zeros((16, 16, 3), np.uint8), quality=95)
    header = header_starting_with(b"\xff\xd8\xff", 1)
    assert good[12:15] != b"\xff\xd8\xff"
    for message, expected in ((good, False), (HEADER.pack(1.0, 1) + good, True), (header + good, True),
                              (header + other, False), (b"not a jpeg at all", False), (b"", False)):
        assert cam.has_header(memoryview(message)) is expected, message[:16]
    assert ImageServerCamera("tcp://127.0.0.1:5555", SMALL, header="timestamp_id").has_header(memoryview(good))
    assert not ImageServerCamera("tcp://127.0.0.1:5555", SMALL, header="none").has_header(memoryview(header + good))


def test_image_server_wrong_layout_drops_everything(closing) -> None:
    sim = closing(ImageServerSim(tcp(), SMALL, fps=100))
    sim.start()
    other = FrameLayout([("head", 96), ("left_wrist", 64)], 48)
    cam = closing(ImageServerCamera(sim.endpoint, other, header="auto"))
    cam.start()
    assert wait_until(lambda: cam.stats()["reasons"].get("wrong_size", 0) >= 3)
    assert cam.latest() is None


def test_decode_jpeg_into_with_and_without_buffer_support(monkeypatch) -> None:
    from runtime.cameras import image_server

    image = SyntheticScene(SMALL, seed=1).render(0)
    data = simplejpeg.encode_jpeg(image, quality=95)
    direct = np.zeros(SMALL.shape, np.uint8)
    image_server.decode_jpeg_into(data, direct)
    assert jpeg_diff(direct, image) < 2.0
    monkeypatch.setattr(image_server, "_BUFFER_DECODE", False)  # as with simplejpeg < 1.6: decode, then copy
    copied = np.zeros(SMALL.shape, np.uint8)
    image_server.decode_jpeg_into(memoryview(data), copied)
    assert np.array_equal(direct, copied)
    for bad, reason in ((b"xx", "not_jpeg"), (b"\xff\xd8\x00\x00", "bad_jpeg"), (data[:200], "bad_jpeg")):
        with pytest.raises(image_server.JpegError) as err:
            image_server.decode_jpeg_into(bad, copied)
        assert err.value.reason == reason
    with pytest.raises(image_server.JpegError, match="wrong_size"):
        image_server.decode_jpeg_into(data, np.zeros((SMALL.height, 10, 3), np.uint8))


def test_serve_runs_the_sim_for_a_while(closing) -> None:
    from runtime.cameras import serve

    endpoint = tcp()
    result: List[int] = []
    thread = threading.Thread(target=lambda: result.append(serve(
        endpoint, SMALL.to_config(), SMALL.height, fps=100, header="timestamp_id", seconds=1.0)))
    thread.start()
    cam = closing(ImageServerCamera(endpoint, SMALL, header="auto"))
    cam.start()
    frame = cam.wait_newer(0, 5.0)
    assert frame is not None and frame.sender_id is not None
    thread.join(5.0)
    assert result == [0]


def test_image_server_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="header"):
        ImageServerCamera("tcp://127.0.0.1:5555", SMALL, header="sometimes")
    with pytest.raises(ValueError, match="endpoint"):
        ImageServerCamera("127.0.0.1:5555", SMALL)
    with pytest.raises(ValueError, match="header"):
        ImageServerSim(tcp(), SMALL, header="auto")
    with pytest.raises(ValueError, match="cannot connect"):
        ImageServerCamera("tcp://", SMALL).start()


# ----------------------------------------------------------------------------------------------------------------
# raw zmq


def raw_images(layout: FrameLayout, value: int) -> dict:
    rng = np.random.default_rng(value)
    return {n: rng.integers(0, 256, size=(layout.height, w, 3), dtype=np.uint8) for n, w in layout.cameras}


def test_raw_zmq_delivers_frame_messages(closing) -> None:
    images = raw_images(SMALL, 1)
    msg = encode_frame(Frame(seq=42, stamp=123.5, images=images))
    endpoint = tcp()
    cam = closing(RawZmqCamera(endpoint, SMALL))
    cam.start()
    closing(Publisher(endpoint, [msg]))
    frame = cam.wait_newer(0, 5.0)
    assert frame is not None
    check_frame_shapes(frame, SMALL)
    for name in SMALL.names:
        assert np.array_equal(frame.images[name], images[name])
    assert frame.sender_id == 42 and frame.sender_stamp == 123.5
    assert cam.stats()["dropped"] == 0


def test_raw_zmq_drops_bad_messages(closing) -> None:
    good_images = raw_images(SMALL, 2)
    wrong_names = dict(good_images)
    wrong_names["tail"] = wrong_names.pop("head")
    wrong_size = dict(good_images)
    wrong_size["left_wrist"] = np.zeros((SMALL.height, 63, 3), np.uint8)
    chunk = ActionChunk(session="s", episode=0, seq=1, obs_stamp=0.0, frame_stamp=0.0, step_s=0.02,
                        joints=("j0",), actions=np.zeros((2, 1), np.float32))
    messages = [
        b"\x00\x01 not msgpack at all",
        encode_frame(Frame(seq=1, stamp=1.0, images=wrong_names)),
        encode_frame(Frame(seq=2, stamp=2.0, images=wrong_size)),
        encode_chunk(chunk),
        encode_frame(Frame(seq=3, stamp=3.0, images=good_images)),
    ]
    endpoint = tcp()
    cam = closing(RawZmqCamera(endpoint, SMALL))
    cam.start()
    closing(Publisher(endpoint, messages))
    expected = {"malformed", "wrong_cameras", "wrong_size", "unexpected_type"}
    assert wait_until(lambda: expected <= set(cam.stats()["reasons"]) and cam.stats()["frames"] >= 2, 8.0), \
        cam.stats()
    assert set(cam.stats()["reasons"]) == expected
    frame = cam.latest()
    assert frame is not None and frame.sender_id == 3
    for name in SMALL.names:
        assert np.array_equal(frame.images[name], good_images[name])
    assert cam.stats()["alive"]


# ----------------------------------------------------------------------------------------------------------------
# replay


def make_recording(path, count: int, seed: int = 0, stamps: Optional[List[float]] = None) -> List[np.ndarray]:
    scene = SyntheticScene(SMALL, seed=seed)
    frames = [scene.render(i * 7) for i in range(count)]
    assert write_recording(str(path), frames, quality=95, layout=SMALL, stamps=stamps) == count
    return frames


def collect(cam: ReplayCamera, count: int, timeout: float = 5.0) -> List[CameraFrame]:
    out: List[CameraFrame] = []
    last = 0
    deadline = time.monotonic() + timeout
    while len(out) < count and time.monotonic() < deadline:
        frame = cam.wait_newer(last, 0.5)
        if frame is None:
            continue
        last = frame.seq
        out.append(CameraFrame(frame.seq, frame.stamp, {}, frame.sender_stamp, frame.sender_id, frame.canvas.copy()))
    return out


def test_replay_plays_in_order_then_stops(closing, tmp_path) -> None:
    rec = tmp_path / "rec"
    frames = make_recording(rec, 5)
    assert sorted(os.listdir(rec)) == [f"frame_{i:06d}.jpg" for i in range(5)]
    cam = closing(ReplayCamera(str(rec), SMALL, fps=20, loop=False))
    cam.start()
    got = collect(cam, 5)
    assert [f.sender_id for f in got] == [0, 1, 2, 3, 4]
    for f in got:
        assert jpeg_diff(f.canvas, frames[f.sender_id]) < 2.0
        assert f.sender_stamp is None
    assert wait_until(lambda: cam.stats()["finished"], 2.0)
    assert cam.wait_newer(got[-1].seq, 0.2) is None
    assert cam.latest().seq == got[-1].seq  # the last frame stays available


def test_replay_loops(closing, tmp_path) -> None:
    make_recording(tmp_path / "rec", 3)
    cam = closing(ReplayCamera(str(tmp_path / "rec"), SMALL, fps=60, loop=True))
    cam.start()
    ids = [f.sender_id for f in collect(cam, 8)]
    assert len(ids) == 8
    assert ids[:3] == [0, 1, 2] and ids[3:6] == [0, 1, 2]
    assert cam.stats()["loops"] >= 2


def test_replay_uses_recorded_stamps(closing, tmp_path) -> None:
    make_recording(tmp_path / "rec", 3, stamps=[10.0, 10.1, 10.3])
    cam = closing(ReplayCamera(str(tmp_path / "rec"), SMALL, fps=1000, loop=False))
    cam.start()
    got = collect(cam, 3)
    assert [f.sender_stamp for f in got] == [10.0, 10.1, 10.3]
    assert 0.07 < got[1].stamp - got[0].stamp < 0.3
    assert 0.15 < got[2].stamp - got[1].stamp < 0.4


def test_replay_errors_name_the_path(tmp_path) -> None:
    missing = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="nowhere"):
        ReplayCamera(missing, SMALL)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty"):
        ReplayCamera(str(empty), SMALL)
    make_recording(tmp_path / "rec", 2)
    (tmp_path / "rec" / "stamps.txt").write_text("1.0\n")
    with pytest.raises(ValueError, match="1 stamps for 2"):
        ReplayCamera(str(tmp_path / "rec"), SMALL)
    with pytest.raises(FileExistsError):
        make_recording(tmp_path / "rec", 1)


def test_replay_drops_frames_of_the_wrong_size(closing, tmp_path) -> None:
    rec = tmp_path / "rec"
    make_recording(rec, 2)
    (rec / "frame_000001.jpg").write_bytes(simplejpeg.encode_jpeg(np.zeros((8, 8, 3), np.uint8)))
    cam = closing(ReplayCamera(str(rec), SMALL, fps=50, loop=False))
    cam.start()
    assert wait_until(lambda: cam.stats()["finished"], 3.0)
    s = cam.stats()
    assert s["frames"] == 1 and s["reasons"] == {"wrong_size": 1}


def test_write_recording_from_a_camera(closing, tmp_path) -> None:
    cam = closing(SyntheticCamera(SMALL, fps=100))
    cam.start()

    def frames() -> Iterator[CameraFrame]:
        last = 0
        for _ in range(4):
            f = cam.wait_newer(last, 2.0)
            assert f is not None
            last = f.seq
            yield f

    assert write_recording(str(tmp_path / "rec"), frames(), quality=90) == 4
    stamps = [float(x) for x in (tmp_path / "rec" / "stamps.txt").read_text().split()]
    assert len(stamps) == 4 and stamps == sorted(stamps)
    replay = closing(ReplayCamera(str(tmp_path / "rec"), SMALL, loop=False))
    assert len(replay.files) == 4 and replay.stamps is not None


# ----------------------------------------------------------------------------------------------------------------
# open_camera


def section(**kw) -> dict:
    base = {
        "source": "synthetic", "fps": 100.0, "height": SMALL.height, "layout": SMALL.to_config(),
        "endpoint": "tcp://127.0.0.1:5555", "header": "auto", "replay_path": "", "replay_loop": True,
        "v4l2_device": "/dev/video0", "seed": 0,
    }
    base.update(kw)
    return base


def test_open_camera_dispatch(closing, tmp_path) -> None:
    cam = closing(open_camera(section(seed=9)))
    assert isinstance(cam, SyntheticCamera) and cam.names == SMALL.names
    with cam:
        frame = cam.wait_newer(0, 2.0)
        assert frame is not None
        assert np.array_equal(frame.canvas, SyntheticScene(SMALL, seed=9).render(frame.seq - 1))

    make_recording(tmp_path / "rec", 2)
    replay = closing(open_camera(section(source="replay", replay_path=str(tmp_path / "rec"), replay_loop=False)))
    assert isinstance(replay, ReplayCamera) and replay.loop is False
    with pytest.raises(ValueError, match="replay_path"):
        open_camera(section(source="replay"))

    endpoint = tcp()
    server = closing(open_camera(section(source="image_server", endpoint=endpoint, header="timestamp_id")))
    assert isinstance(server, ImageServerCamera) and server.header == "timestamp_id"
    sim = closing(ImageServerSim(endpoint, SMALL, fps=100, header="timestamp_id"))
    sim.start()
    with server:
        assert server.wait_newer(0, 5.0) is not None

    raw = closing(open_camera(section(source="raw_zmq", endpoint=tcp())))
    assert isinstance(raw, RawZmqCamera) and raw.names == SMALL.names

    with pytest.raises(ValueError, match="source"):
        open_camera(section(source="webcam"))
    with pytest.raises(ValueError, match="repeat"):
        open_camera(section(layout=[{"name": "a", "width": 8}, {"name": "a", "width": 8}]))
    with pytest.raises(ValueError, match="fps"):
        open_camera(section(fps=0.0))


def test_v4l2_without_opencv_says_how_to_get_it(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 -> ImportError
    with pytest.raises(RuntimeError, match=r"needs OpenCV: pip install wam-edge\[camera\]"):
        open_camera(section(source="v4l2"))


def test_v4l2_missing_device_is_named() -> None:
    pytest.importorskip("cv2")
    with pytest.raises(RuntimeError, match="/dev/video-does-not-exist"):
        open_camera(section(source="v4l2", v4l2_device="/dev/video-does-not-exist"))
    with pytest.raises(ValueError, match="4 devices for 3"):
        open_camera(section(source="v4l2", v4l2_device="/dev/a,/dev/b,/dev/c,/dev/d"))
