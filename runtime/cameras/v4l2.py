"""Local cameras through Video4Linux2 with OpenCV (optional: ``pip install wam-edge[camera]``).

``v4l2_device`` is one device or a comma-separated list ("/dev/video0" or "/dev/video0,/dev/video2"; a bare number
is an index). Device k feeds layout camera k, so one device delivers the first layout camera only, two devices the
first two, and so on; more devices than layout cameras is an error. Each device is asked for the camera's width,
the layout height and ``fps``; a device that delivers another size is resized to it. OpenCV captures BGR; the
conversion to RGB writes straight into the back buffer (cv2.cvtColor with dst=).
"""

from __future__ import annotations

import os
import time
from typing import Any, List, Optional, Sequence, Union

import numpy as np

from runtime.cameras.base import ThreadedCameraSource
from runtime.cameras.frame_layout import FrameLayout
from runtime.cameras.synthetic import check_fps

MISSING_OPENCV = "the v4l2 camera needs OpenCV: pip install wam-edge[camera]"


def import_cv2() -> Any:
    try:
        import cv2  # optional dependency, imported only here
    except ImportError:
        raise RuntimeError(MISSING_OPENCV) from None
    return cv2


def parse_devices(spec: Union[str, Sequence[str]]) -> List[str]:
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    devices = [str(d).strip() for d in items if str(d).strip()]
    if not devices:
        raise ValueError("v4l2 camera: no device given (v4l2_device, e.g. /dev/video0)")
    return devices


class V4L2Camera(ThreadedCameraSource):
    """One or more V4L2 devices read together on the capture thread (grab all, then retrieve all)."""

    def __init__(self, devices: Union[str, Sequence[str]], layout: FrameLayout, fps: float = 30.0) -> None:
        devs = parse_devices(devices)
        if len(devs) > len(layout.names):
            raise ValueError(f"v4l2 camera: {len(devs)} devices for {len(layout.names)} layout cameras")
        super().__init__(layout.prefix(len(devs)), "v4l2")
        self.devices = devs
        self.fps = check_fps(fps, "v4l2 camera")
        self._cv2 = import_cv2()
        for d in devs:
            if not d.isdigit() and not os.path.exists(d):
                raise RuntimeError(f"v4l2 camera: device {d} does not exist")
        self._caps: List[Any] = []
        self._scratch: List[Optional[np.ndarray]] = [None] * len(devs)

    def _open(self) -> None:
        cv2 = self._cv2
        try:
            for dev, width in zip(self.devices, self._layout.widths):
                cap = cv2.VideoCapture(int(dev) if dev.isdigit() else dev, cv2.CAP_V4L2)
                self._caps.append(cap)
                if not cap.isOpened():
                    raise RuntimeError(f"v4l2 camera: cannot open device {dev}")
                cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
                cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self._layout.height)
                cap.set(cv2.CAP_PROP_FPS, self.fps)
                cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # newest frame, not a driver queue
        except Exception:
            self._release()
            raise

    def _release(self) -> None:
        for cap in self._caps:
            cap.release()
        self._caps = []

    def _run(self) -> None:
        cv2 = self._cv2
        height = self._layout.height
        while not self._stopping.is_set():
            ok = all(cap.grab() for cap in self._caps)
            stamp = time.monotonic()
            if not ok:
                self._drop("grab_failed", f"devices {self.devices}")
                self._stopping.wait(0.1)
                continue
            self._received += 1
            good = True
            for k, (cap, name, width) in enumerate(zip(self._caps, self._layout.names, self._layout.widths)):
                ok, bgr = cap.retrieve()
                if not ok or bgr is None or bgr.ndim != 3 or bgr.shape[2] != 3:
                    self._drop("retrieve_failed", f"device {self.devices[k]}")
                    good = False
                    break
                if bgr.shape[:2] != (height, width):
                    scratch = self._scratch[k]
                    if scratch is None:
                        scratch = self._scratch[k] = np.empty((height, width, 3), dtype=np.uint8)
                    bgr = cv2.resize(bgr, (width, height), dst=scratch, interpolation=cv2.INTER_AREA)
                cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=self._back.images[name])
            if good:
                self._publish(stamp)
