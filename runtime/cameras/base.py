"""The camera interface: every source captures on its own thread and hands out only the newest frame.

Triple buffering: a source owns three preallocated :class:`~runtime.cameras.frame_layout.ImageSet` (one side-by-side
canvas each, with per-camera views). The capture thread writes into the *back* set, then, under a lock, swaps it
with the *ready* set. ``latest()`` swaps *ready* with the *handed out* set when a newer frame is ready and returns a
:class:`CameraFrame` whose arrays the producer never writes until the consumer's next ``latest()`` or
``wait_newer()`` call. Nothing queues: a frame that was not taken before the next one was published is dropped
(overwritten) and the consumer gets the newest one. No image memory is allocated per frame.
"""

from __future__ import annotations

import abc
import logging
import threading
import time
from typing import Any, Dict, Optional, Tuple, TypeVar

import numpy as np

from runtime.cameras.frame_layout import FrameLayout, ImageSet
from runtime.protocol.codec import RejectCounter

log = logging.getLogger("wam_edge.cameras")

_S = TypeVar("_S", bound="CameraSource")


class CameraFrame:
    """One frame of every camera of a source.

    seq: increasing per source, starting at 1 (so ``wait_newer(0, t)`` waits for the first frame).
    stamp: ``time.monotonic()`` of this process when the frame was captured or received.
    sender_stamp: the sender's own timestamp (its clock, seconds) when the message carried one, else None.
    sender_id: the sender's frame id / sequence number when the message carried one, else None.
    images: camera name -> H x W x 3 uint8 RGB, in layout order. Views into ``canvas``; valid (never written by
      the source) until the next ``latest()`` / ``wait_newer()`` call on the same source.
    canvas: the side-by-side H x total W x 3 image the views live in.
    """

    __slots__ = ("canvas", "images", "sender_id", "sender_stamp", "seq", "stamp")

    def __init__(self, seq: int, stamp: float, images: Dict[str, np.ndarray], sender_stamp: Optional[float] = None,
                 sender_id: Optional[int] = None, canvas: Optional[np.ndarray] = None) -> None:
        self.seq = seq
        self.stamp = stamp
        self.sender_stamp = sender_stamp
        self.sender_id = sender_id
        self.images = images
        self.canvas = canvas

    def __repr__(self) -> str:
        shapes = ", ".join(f"{n}:{a.shape[1]}x{a.shape[0]}" for n, a in self.images.items())
        return f"CameraFrame(seq={self.seq}, stamp={self.stamp:.6f}, images=[{shapes}])"


class CameraSource(abc.ABC):
    """A camera (or several) delivering the newest frame; see the module docstring for the buffer contract."""

    @property
    @abc.abstractmethod
    def names(self) -> Tuple[str, ...]:
        """Camera names, left to right."""

    @abc.abstractmethod
    def start(self) -> None:
        """Open the device or socket and start the capture thread (idempotent)."""

    @abc.abstractmethod
    def latest(self) -> Optional[CameraFrame]:
        """The newest frame, without blocking; None before the first frame."""

    @abc.abstractmethod
    def wait_newer(self, after_seq: int, timeout: float) -> Optional[CameraFrame]:
        """Block until a frame with seq > ``after_seq`` is available (then as ``latest()``), or None on timeout."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop the thread, join it and release the device or socket (idempotent)."""

    @abc.abstractmethod
    def stats(self) -> Dict[str, Any]:
        """Counters: at least frames (delivered to the buffer), dropped and reasons (reason -> count)."""

    def __enter__(self: _S) -> _S:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ThreadedCameraSource(CameraSource):
    """Triple buffer, capture thread, stop flag and counters shared by every source.

    Subclasses implement ``_run()`` (the loop; return when ``self._stopping`` is set), and optionally ``_open()``
    (called by ``start()`` in the caller's thread, so that a bad device or endpoint raises there) and
    ``_release()`` (called by ``close()`` after the thread has been joined). In ``_run()`` they write into
    ``self._back`` (an ImageSet) and call ``self._publish(stamp, ...)``; bad input goes to ``self._drop(reason,
    detail)``.
    """

    #: How long the capture thread may take to notice the stop flag (seconds); the join waits a little longer.
    POLL_S = 0.05

    def __init__(self, layout: FrameLayout, kind: str) -> None:
        self._layout = layout
        self._kind = kind
        self._sets = [ImageSet(layout) for _ in range(3)]
        self._back = self._sets[0]
        self._ready = self._sets[1]
        self._out = self._sets[2]
        self._cond = threading.Condition(threading.Lock())
        # metadata of the ready and handed-out sets: (seq, stamp, sender_stamp, sender_id)
        self._ready_meta: Optional[Tuple[int, float, Optional[float], Optional[int]]] = None
        self._out_frame: Optional[CameraFrame] = None
        self._seq = 0
        self._received = 0
        self._errors = 0
        self._counter = RejectCounter(log.warning, f"camera {kind} input")
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._started = False
        self._closed = False
        self._life = threading.Lock()

    # ------------------------------------------------------------------------------------------------------------
    # public interface

    @property
    def names(self) -> Tuple[str, ...]:
        return self._layout.names

    @property
    def layout(self) -> FrameLayout:
        return self._layout

    def start(self) -> None:
        with self._life:
            if self._closed:
                raise RuntimeError(f"camera {self._kind}: start() after close()")
            if self._started:
                return
            self._open()
            self._started = True
            self._thread = threading.Thread(target=self._thread_main, name=f"wam-edge-camera-{self._kind}",
                                            daemon=True)
            self._thread.start()

    def latest(self) -> Optional[CameraFrame]:
        with self._cond:
            return self._take_locked()

    def wait_newer(self, after_seq: int, timeout: float) -> Optional[CameraFrame]:
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            while True:
                if self._newest_seq_locked() > after_seq:
                    return self._take_locked()
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    return None
                self._cond.wait(remaining)

    def close(self) -> None:
        with self._life:
            if self._closed:
                return
            self._closed = True
            self._stopping.set()
            thread = self._thread
            stuck = False
            if thread is not None:
                thread.join(timeout=max(2.0, 20 * self.POLL_S))
                stuck = thread.is_alive()
            try:
                if stuck:  # releasing a socket or device under a running thread can crash it: leak it instead
                    log.error("camera %s: capture thread did not stop in time; not releasing its resources",
                              self._kind)
                else:
                    self._release()
            finally:
                with self._cond:
                    self._cond.notify_all()

    def stats(self) -> Dict[str, Any]:
        dropped, reasons = self._counter.snapshot()
        with self._cond:
            frames = self._seq
        thread = self._thread
        return {
            "source": self._kind,
            "frames": frames,
            "received": self._received,
            "dropped": dropped,
            "reasons": reasons,
            "errors": self._errors,
            "alive": bool(thread is not None and thread.is_alive()),
        }

    # ------------------------------------------------------------------------------------------------------------
    # for subclasses

    def _open(self) -> None:
        """Open the device or socket (in the caller's thread, so errors raise from start())."""

    def _release(self) -> None:
        """Release what _open() opened (after the thread has been joined)."""

    @abc.abstractmethod
    def _run(self) -> None:
        """The capture loop; returns when self._stopping is set."""

    def _publish(self, stamp: float, sender_stamp: Optional[float] = None, sender_id: Optional[int] = None) -> int:
        """Make the back set the ready frame (the previous ready frame, if not taken, becomes the new back set)."""
        with self._cond:
            self._seq += 1
            self._back, self._ready = self._ready, self._back
            self._ready_meta = (self._seq, stamp, sender_stamp, sender_id)
            self._cond.notify_all()
            return self._seq

    def _drop(self, reason: str, detail: str = "") -> None:
        self._counter.count(reason, detail)

    # ------------------------------------------------------------------------------------------------------------
    # internals

    def _newest_seq_locked(self) -> int:
        if self._ready_meta is not None:
            return self._ready_meta[0]
        return self._out_frame.seq if self._out_frame is not None else 0

    def _take_locked(self) -> Optional[CameraFrame]:
        meta = self._ready_meta
        if meta is not None:
            self._ready, self._out = self._out, self._ready
            self._ready_meta = None  # the ready slot now holds the old handed-out set: stale, free for the producer
            seq, stamp, sender_stamp, sender_id = meta
            out = self._out
            self._out_frame = CameraFrame(seq, stamp, dict(out.images), sender_stamp, sender_id, out.canvas)
        return self._out_frame

    def _thread_main(self) -> None:
        while not self._stopping.is_set():
            try:
                self._run()
                return
            except Exception:  # a bug or an unexpected device error: log, back off, keep the source alive
                self._errors += 1
                log.exception("camera %s: capture loop failed; restarting it", self._kind)
                self._stopping.wait(0.5)
