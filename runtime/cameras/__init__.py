"""Camera sources behind one interface: each captures on its own thread and hands out only the newest frame.

``open_camera(section)`` builds the source named by the config's ``camera:`` section:

- synthetic: a deterministic moving scene rendered at ``fps`` (``seed``).
- replay: a recording directory of side-by-side JPEGs (``replay_path``, ``replay_loop``, ``fps`` or stamps.txt).
- image_server: Unitree's image server (ZeroMQ SUB to ``endpoint``; one side-by-side JPEG per message; ``header``).
- raw_zmq: the project's raw ``frame`` messages (runtime.protocol) on ``endpoint``.
- v4l2: local cameras through OpenCV (optional extra); ``v4l2_device`` lists one device per layout camera, left to
  right, comma-separated; one device delivers the first layout camera only.

Every source splits or fills the cameras of ``layout`` (left to right, widths) at ``height``. See base.py for the
triple-buffer contract of ``latest()``.
"""

from __future__ import annotations

from typing import Any, Dict

from runtime.cameras.base import CameraFrame, CameraSource, ThreadedCameraSource
from runtime.cameras.frame_layout import DEFAULT_LAYOUT, FrameLayout, ImageSet
from runtime.cameras.image_server import ImageServerCamera, decode_jpeg_into
from runtime.cameras.image_server_sim import ImageServerSim, serve
from runtime.cameras.raw_zmq import RawZmqCamera
from runtime.cameras.replay import ReplayCamera, write_recording
from runtime.cameras.synthetic import SyntheticCamera, SyntheticScene

SOURCES = ("synthetic", "replay", "image_server", "raw_zmq", "v4l2")

#: Values used for keys a section leaves out (the validated config always has them all).
DEFAULTS: Dict[str, Any] = {
    "fps": 30.0,
    "height": DEFAULT_LAYOUT.height,
    "layout": DEFAULT_LAYOUT.to_config(),
    "endpoint": "tcp://127.0.0.1:5555",
    "header": "auto",
    "replay_path": "",
    "replay_loop": True,
    "v4l2_device": "/dev/video0",
    "seed": 0,
}


def open_camera(section: Dict[str, Any]) -> CameraSource:
    """The camera source for a ``camera:`` config section (not started: call start() or use ``with``)."""
    source = section.get("source")
    if source not in SOURCES:
        raise ValueError(f"camera.source must be one of {list(SOURCES)}, got {source!r}")
    cfg = dict(DEFAULTS)
    cfg.update(section)
    layout = FrameLayout.from_config(cfg["layout"], cfg["height"])
    if source == "synthetic":
        return SyntheticCamera(layout, fps=cfg["fps"], seed=int(cfg["seed"]))
    if source == "replay":
        if not cfg["replay_path"]:
            raise ValueError("camera.replay_path is required for the replay camera")
        return ReplayCamera(cfg["replay_path"], layout, fps=cfg["fps"], loop=bool(cfg["replay_loop"]))
    if source == "image_server":
        return ImageServerCamera(cfg["endpoint"], layout, header=cfg["header"])
    if source == "raw_zmq":
        return RawZmqCamera(cfg["endpoint"], layout)
    from runtime.cameras.v4l2 import V4L2Camera  # OpenCV is optional: only this source needs it

    return V4L2Camera(cfg["v4l2_device"], layout, fps=cfg["fps"])


__all__ = [
    "DEFAULTS",
    "DEFAULT_LAYOUT",
    "SOURCES",
    "CameraFrame",
    "CameraSource",
    "ImageServerCamera",
    "ImageServerSim",
    "ImageSet",
    "FrameLayout",
    "RawZmqCamera",
    "ReplayCamera",
    "SyntheticCamera",
    "SyntheticScene",
    "ThreadedCameraSource",
    "decode_jpeg_into",
    "open_camera",
    "serve",
    "write_recording",
]
