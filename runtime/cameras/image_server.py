"""Client of Unitree's image server: ZeroMQ SUB, one JPEG per message holding every camera side by side.

Unitree's image server (xr_teleoperate, unitree_IL_lerobot) binds a PUB socket (tcp port 5555 on the robot) and
sends each capture as one JPEG: head camera(s) first, then the wrist cameras to the right. In its test mode it
prepends 12 bytes: a native-endian float64 timestamp (its ``time.time()``) and a uint32 frame id (struct "dI"). The
client must know each camera's width to split the image: that is the :class:`~runtime.cameras.frame_layout.FrameLayout`.
``header: auto`` tells the two apart by where a JPEG starts (offset 0 or 12), not by the first bytes alone: a
timestamp's low bytes are FF D8, the JPEG SOI marker, about once in 65,536 frames.

The socket keeps a queue of at most two messages and each cycle takes only the newest (no ZMQ_CONFLATE: libzmq
aborts on a multipart message there), so a slow consumer never builds a queue; see runtime/protocol/subscriber.py.
The JPEG is decoded straight into the back buffer's side-by-side canvas (simplejpeg's ``buffer=``); the per-camera
images are views into it, so there is no copy and no per-frame allocation of image memory.
"""

from __future__ import annotations

import math
import struct
import time
from typing import Any, Dict, Optional, Tuple

import numpy as np
import simplejpeg
import zmq

from runtime.cameras.base import ThreadedCameraSource
from runtime.cameras.frame_layout import FrameLayout
from runtime.protocol.sockets import describe_error
from runtime.protocol.subscriber import NewestSubscriber

SOI = b"\xff\xd8"
#: How every JPEG starts: the SOI marker, then the first byte of the marker after it (FF D8 FF).
JPEG_START = SOI + b"\xff"
#: Unitree's test-mode header: native-endian float64 timestamp + uint32 frame id (struct "dI", 12 bytes).
HEADER = struct.Struct("=dI")
HEADER_MODES = ("auto", "none", "timestamp_id")

_BUFFER_DECODE: Optional[bool] = None


def _decode_supports_buffer() -> bool:
    """Whether this simplejpeg's decode_jpeg accepts ``buffer=`` (1.6 and later); probed once."""
    global _BUFFER_DECODE
    if _BUFFER_DECODE is None:
        probe = simplejpeg.encode_jpeg(np.zeros((8, 8, 3), dtype=np.uint8), quality=50)
        out = np.empty((8, 8, 3), dtype=np.uint8)
        try:
            simplejpeg.decode_jpeg(probe, colorspace="RGB", buffer=out)
            _BUFFER_DECODE = True
        except TypeError:
            _BUFFER_DECODE = False
    return _BUFFER_DECODE


class JpegError(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def decode_jpeg_into(data: Any, canvas: np.ndarray) -> None:
    """Decode a JPEG (bytes-like) into ``canvas`` (H x W x 3 uint8, C-contiguous) as RGB, or raise JpegError.

    The JPEG must start with the SOI marker and have exactly the canvas's height and width (checked from the
    header, before decoding). With simplejpeg >= 1.6 the decoder writes straight into ``canvas``; older versions
    have no ``buffer=`` argument, so there the image is decoded into a new array and copied.
    """
    if len(data) < 4 or bytes(data[:2]) != SOI:
        raise JpegError("not_jpeg", f"{len(data)} bytes that do not start with the JPEG SOI marker")
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError as exc:
        raise JpegError("bad_jpeg", f"unreadable JPEG header ({exc})") from None
    want_h, want_w = canvas.shape[0], canvas.shape[1]
    if (height, width) != (want_h, want_w):
        raise JpegError("wrong_size", f"expected {want_w}x{want_h} (width x height), got {width}x{height}")
    try:
        if _decode_supports_buffer():
            simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=canvas)
        else:  # old simplejpeg: decode then copy
            np.copyto(canvas, simplejpeg.decode_jpeg(data, colorspace="RGB"))
    except ValueError as exc:
        raise JpegError("bad_jpeg", f"JPEG does not decode ({exc})") from None


def check_header_mode(header: str) -> str:
    if header not in HEADER_MODES:
        raise ValueError(f"camera header must be one of {list(HEADER_MODES)}, got {header!r}")
    return header


class ZmqSubCamera(ThreadedCameraSource):
    """A SUB socket (empty subscription, newest message wins, bounded) read on the capture thread; ``_handle`` per
    message taken. Whatever the publisher sends never ends the thread: multipart messages, oversized ones (the link is
    re-established) and a ``_handle`` that raises are counted by reason ("multipart", "link_reset", "handler_error")."""

    POLL_MS = 50
    #: Messages queued on the socket at most (frames are large): the newest is taken, the rest skipped.
    QUEUE = 2

    def __init__(self, layout: FrameLayout, kind: str, endpoint: str, max_bytes: int,
                 context: Optional[zmq.Context] = None) -> None:
        super().__init__(layout, kind)
        if not isinstance(endpoint, str) or "://" not in endpoint:
            raise ValueError(f"camera {kind}: endpoint must look like tcp://host:port or ipc:///path, got {endpoint!r}")
        self.endpoint = endpoint
        self._max_bytes = int(max_bytes)
        self._context = context
        self._sub: Optional[NewestSubscriber] = None

    def _open(self) -> None:
        ctx = self._context if self._context is not None else zmq.Context.instance()
        try:
            self._sub = NewestSubscriber(ctx, self.endpoint, self._max_bytes, self._counter, hwm=self.QUEUE)
        except zmq.ZMQError as exc:
            raise ValueError(f"camera {self._kind}: cannot connect to {self.endpoint!r}: {exc}") from None

    def _release(self) -> None:
        if self._sub is not None:
            self._sub.close()  # kept: stats() still reads its counters

    def _run(self) -> None:
        sub = self._sub
        assert sub is not None
        sock = sub.sock
        while not self._stopping.is_set():
            try:
                sock.poll(self.POLL_MS, zmq.POLLIN)
                stamp = time.monotonic()
                msg = sub.newest(stamp)  # also when the poll timed out: it watches the link
            except zmq.ContextTerminated:
                return
            if msg is None:
                continue
            self._received += 1
            try:
                self._handle(msg.buffer, stamp)
            except Exception as exc:  # noqa: BLE001 - a bug in handling one message must not end the capture
                self._drop("handler_error", describe_error(exc))

    def _handle(self, buf: memoryview, stamp: float) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def stats(self) -> Dict[str, Any]:
        s = super().stats()
        sub = self._sub
        s["superseded"] = sub.superseded if sub is not None else 0
        return s


class ImageServerCamera(ZmqSubCamera):
    """Frames from Unitree's image server (or :class:`~runtime.cameras.image_server_sim.ImageServerSim`).

    header: "none" (plain JPEG), "timestamp_id" (12-byte test-mode header first), or "auto" (a header is present
    iff a JPEG starts at offset 12: see ``has_header``). With a header, the frame's ``sender_stamp`` is the server's
    timestamp (its wall clock) and ``sender_id`` its frame id; ``stamp`` is always this process's monotonic clock at
    receipt.

    Dropped (counted in stats()["reasons"], never delivered): "bad_header" (header mode expects 12 bytes that are
    not there or hold a non-finite timestamp), "not_jpeg", "bad_jpeg", "wrong_size" (not height x sum of widths).
    """

    def __init__(self, endpoint: str, layout: FrameLayout, header: str = "auto",
                 context: Optional[zmq.Context] = None) -> None:
        # a JPEG larger than twice the raw image is not a camera frame
        super().__init__(layout, "image_server", endpoint, 2 * int(np.prod(layout.shape)) + (1 << 20), context)
        self.header = check_header_mode(header)
        _decode_supports_buffer()

    def has_header(self, buf: memoryview) -> bool:
        """Whether ``buf`` starts with the 12-byte header. "auto": iff a JPEG starts at offset 12 (FF D8 FF), which a
        plain JPEG never has there (JFIF's version byte; an APPn or DQT segment's length and table), and where a
        JPEG could start at offset 0 as well (a header whose timestamp's low bytes are FF D8 FF), iff the JPEG at
        offset 12 reads as this layout's size: only a real frame does."""
        if self.header != "auto":
            return self.header == "timestamp_id"
        size = HEADER.size
        if buf[size:size + 3] != JPEG_START:
            return False
        if buf[:3] != JPEG_START:
            return True
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(buf[size:])
        except ValueError:
            return False
        return (height, width) == self._layout.shape[:2]

    def _split_header(self, buf: memoryview) -> Tuple[memoryview, Optional[float], Optional[int]]:
        if not self.has_header(buf):
            return buf, None, None
        if len(buf) < HEADER.size:
            raise JpegError("bad_header", f"{len(buf)} bytes, shorter than the {HEADER.size}-byte header")
        sender_stamp, sender_id = HEADER.unpack_from(buf, 0)
        if not math.isfinite(sender_stamp):
            raise JpegError("bad_header", f"header timestamp {sender_stamp} is not finite")
        return buf[HEADER.size:], sender_stamp, sender_id

    def _handle(self, buf: memoryview, stamp: float) -> None:
        try:
            jpeg, sender_stamp, sender_id = self._split_header(buf)
            decode_jpeg_into(jpeg, self._back.canvas)
        except JpegError as exc:
            self._drop(exc.reason, exc.detail)
            return
        self._publish(stamp, sender_stamp, sender_id)

    def stats(self) -> Dict[str, Any]:
        s = super().stats()
        s["endpoint"] = self.endpoint
        s["header"] = self.header
        return s
