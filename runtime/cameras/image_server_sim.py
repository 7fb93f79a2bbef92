"""A SIMULATION of Unitree's image server, for running and testing without a robot.

Like the real server it binds a ZeroMQ PUB socket and sends one JPEG per message with every camera side by side
(head first, then wrists), optionally preceded by the 12-byte test-mode header (native-endian float64
``time.time()`` + uint32 frame id). The pictures are the synthetic scene (runtime.cameras.synthetic), frame id n
showing scene index n. It binds only where the config lets bound sockets go (loopback tcp or ipc: the config's own
endpoint check); it is not the robot's server and does not pretend to be.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, TypeVar, Union

import numpy as np
import simplejpeg
import zmq

from runtime.cameras.frame_layout import DEFAULT_LAYOUT, FrameLayout
from runtime.cameras.image_server import HEADER
from runtime.cameras.synthetic import Pacer, SyntheticScene, check_fps
from runtime.config import _loopback_endpoint

log = logging.getLogger("wam_edge.cameras")

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
SIM_HEADER_MODES = ("none", "timestamp_id")

_T = TypeVar("_T", bound="ImageServerSim")


def check_endpoint(endpoint: str) -> str:
    """The config's rule for a stand-in publisher: loopback tcp or ipc with a path, never a network interface;
    ValueError saying why otherwise."""
    return _loopback_endpoint(endpoint)


def sim_header(mode: str) -> str:
    """camera.header (what the camera expects) -> what the sim sends: "auto" accepts either, so the sim sends what
    Unitree's server sends outside its test mode, plain JPEG ("none"); "none" and "timestamp_id" as they are."""
    if mode == "auto":
        return "none"
    if mode not in SIM_HEADER_MODES:
        raise ValueError(f"image server sim: header must be auto or one of {list(SIM_HEADER_MODES)}, got {mode!r}")
    return mode


def _ensure_ipc_dir(endpoint: str) -> None:
    """An ipc endpoint's directory: made private (0700) or checked to be (runtime/service/paths.py)."""
    if endpoint.startswith("ipc://") and not endpoint.startswith("ipc://@"):
        from runtime.service.paths import ensure_private_dir

        ensure_private_dir(os.path.dirname(os.path.abspath(endpoint[len("ipc://"):])), "ipc socket directory")


class ImageServerSim:
    """Publishes the synthetic scene as side-by-side JPEGs at ``fps`` on a PUB socket, from its own thread.

    start() binds (errors raise there) and starts the thread; close() stops, joins and closes (idempotent).
    ``endpoint`` is the bound address after start() (a "tcp://127.0.0.1:*" request resolves to the real port).
    ``sent`` counts messages, ``last_id`` is the newest frame id sent.
    """

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, layout: FrameLayout = DEFAULT_LAYOUT, fps: float = 30.0,
                 header: str = "none", quality: int = 80, seed: int = 0,
                 context: Optional[zmq.Context] = None) -> None:
        if header not in SIM_HEADER_MODES:
            raise ValueError(f"image server sim: header must be one of {list(SIM_HEADER_MODES)}, got {header!r}")
        try:
            check_endpoint(endpoint)
        except ValueError as exc:
            raise ValueError(f"image server sim: endpoint {exc}") from None
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"image server sim: quality must be in [1, 100], got {quality}")
        self.endpoint = endpoint
        self.layout = layout
        self.fps = check_fps(fps, "image server sim")
        self.header = header
        self.quality = int(quality)
        self.scene = SyntheticScene(layout, seed)
        self.sent = 0
        self.last_id = -1
        self._context = context
        self._sock: Optional[zmq.Socket] = None
        self._canvas = np.empty(layout.shape, dtype=np.uint8)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._closed = False

    def start(self: _T) -> _T:
        if self._closed:
            raise RuntimeError("image server sim: start() after close()")
        if self._thread is not None:
            return self
        ctx = self._context if self._context is not None else zmq.Context.instance()
        sock = ctx.socket(zmq.PUB)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 2)  # a slow subscriber loses old frames, it does not queue them
            _ensure_ipc_dir(self.endpoint)
            sock.bind(self.endpoint)
            self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise RuntimeError(f"image server sim: cannot bind {self.endpoint!r}: {exc}") from None
        self._sock = sock
        self._thread = threading.Thread(target=self._loop, name="wam-edge-image-server-sim", daemon=True)
        self._thread.start()
        return self

    def message(self, frame_id: int) -> bytes:
        """The message for frame ``frame_id``: optional header + JPEG of scene index ``frame_id``."""
        self.scene.render_into(frame_id, self._canvas)
        jpeg = simplejpeg.encode_jpeg(self._canvas, quality=self.quality, colorspace="RGB")
        if self.header == "timestamp_id":
            return HEADER.pack(time.time(), frame_id & 0xFFFFFFFF) + jpeg
        return jpeg

    def _loop(self) -> None:
        sock = self._sock
        assert sock is not None
        pacer = Pacer(self.fps)
        frame_id = 0
        while not self._stop.is_set():
            try:
                sock.send(self.message(frame_id), copy=False)
                self.last_id = frame_id
                self.sent += 1
            except zmq.ContextTerminated:
                return
            except Exception:  # never let the publisher die of one bad frame
                log.exception("image server sim: sending frame %d failed", frame_id)
            frame_id += 1
            if not pacer.wait(self._stop):
                return

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None

    def __enter__(self: _T) -> _T:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


LayoutSpec = Union[FrameLayout, Sequence[Dict[str, Any]], Sequence[Tuple[str, int]]]


def _as_layout(layout: Optional[LayoutSpec], height: Optional[int]) -> FrameLayout:
    if layout is None:
        return DEFAULT_LAYOUT if height is None else FrameLayout(DEFAULT_LAYOUT.cameras, int(height))
    if isinstance(layout, FrameLayout):
        if height is not None and int(height) != layout.height:
            return FrameLayout(layout.cameras, int(height))
        return layout
    items: Iterable[Any] = list(layout)
    h = DEFAULT_LAYOUT.height if height is None else int(height)
    if all(isinstance(e, dict) for e in items):
        return FrameLayout.from_config(items, h)
    return FrameLayout([tuple(e) for e in items], h)


def serve(endpoint: str = DEFAULT_ENDPOINT, layout: Optional[LayoutSpec] = None, height: Optional[int] = None,
          fps: float = 30.0, header: str = "none", seconds: Optional[float] = None, quality: int = 80,
          seed: int = 0) -> int:
    """Run the simulated image server in the foreground (``wam-edge image-server-sim``); returns an exit code.

    layout: a FrameLayout, the config's [{name, width}, ...] list or (name, width) pairs (default: head, left_wrist,
    right_wrist at 640 each); height defaults to the layout's (480); header: camera.header's modes (see
    sim_header). Runs for ``seconds`` (None or <= 0: until interrupted with Ctrl-C, or SIGTERM). A bad setting
    (endpoint, header) raises ValueError before anything is bound.
    """
    lay = _as_layout(layout, height)
    header = sim_header(header)
    sim = ImageServerSim(endpoint, lay, fps=fps, header=header, quality=quality, seed=seed)
    sim.start()
    log.info("simulated Unitree image server on %s: %s at %.1f fps, header %s", sim.endpoint, lay, sim.fps, header)
    stopping: List[int] = []
    previous = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM (systemd, Popen.terminate): a clean stop
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    deadline = time.monotonic() + float(seconds) if seconds is not None and seconds > 0 else None
    try:
        while not stopping and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.1 if deadline is None else min(0.1, max(0.0, deadline - time.monotonic())))
    except KeyboardInterrupt:
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        sim.close()
        log.info("simulated image server stopped after %d frames", sim.sent)
    return 0
