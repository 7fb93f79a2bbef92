"""Replay of recorded frames: a directory of side-by-side JPEGs, laid out like the image server sends them.

A recording directory holds one JPEG per frame (``*.jpg`` / ``*.jpeg``, played in file-name order), each holding
every camera side by side like one image server message, and optionally ``stamps.txt``: one capture time in
seconds per line, one line per JPEG, non-decreasing. With stamps the replay keeps the recorded timing; without, it
plays at ``fps``. :func:`write_recording` writes such a directory.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np
import simplejpeg

from runtime.cameras.base import CameraFrame, ThreadedCameraSource
from runtime.cameras.frame_layout import FrameLayout
from runtime.cameras.image_server import JpegError, decode_jpeg_into
from runtime.cameras.synthetic import check_fps

STAMPS_FILE = "stamps.txt"
JPEG_SUFFIXES = (".jpg", ".jpeg")

FrameLike = Union[CameraFrame, Mapping[str, np.ndarray], np.ndarray]


def list_recording(path: str) -> List[str]:
    """The JPEG files of a recording directory, sorted by name; ValueError naming the path if none."""
    if not os.path.isdir(path):
        raise ValueError(f"replay camera: recording directory {path!r} does not exist")
    files = sorted(f for f in os.listdir(path) if f.lower().endswith(JPEG_SUFFIXES))
    if not files:
        raise ValueError(f"replay camera: recording directory {path!r} holds no .jpg/.jpeg files")
    return [os.path.join(path, f) for f in files]


def read_stamps(path: str, count: int) -> Optional[List[float]]:
    """The recording's stamps.txt as floats, or None when there is none; ValueError when it does not fit."""
    file = os.path.join(path, STAMPS_FILE)
    if not os.path.exists(file):
        return None
    stamps: List[float] = []
    with open(file, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                value = float(line)
            except ValueError:
                raise ValueError(f"replay camera: {file}:{lineno}: {line!r} is not a number") from None
            if not math.isfinite(value) or (stamps and value < stamps[-1]):
                raise ValueError(f"replay camera: {file}:{lineno}: stamps must be finite and non-decreasing")
            stamps.append(value)
    if len(stamps) != count:
        raise ValueError(f"replay camera: {file} has {len(stamps)} stamps for {count} JPEG files")
    return stamps


class ReplayCamera(ThreadedCameraSource):
    """Plays a recording directory at ``fps`` (or its stamps.txt timing), looping when ``loop``.

    Frame ``sender_id`` is the file's index in the recording and ``sender_stamp`` its recorded stamp (None without
    stamps.txt). Without ``loop`` the source stops after the last file: ``latest()`` keeps returning the last frame
    and stats()["finished"] becomes True. A file that does not decode to the layout's size is dropped by reason.
    """

    #: When the replay falls behind its schedule by more than this (seconds), it restarts the schedule from now
    #: rather than bursting frames to catch up.
    MAX_LAG_S = 0.25

    def __init__(self, path: str, layout: FrameLayout, fps: float = 30.0, loop: bool = True) -> None:
        super().__init__(layout, "replay")
        self.path = str(path)
        self.fps = check_fps(fps, "replay camera")
        self.loop = bool(loop)
        self.files = list_recording(self.path)
        self.stamps = read_stamps(self.path, len(self.files))
        self.finished = False
        self.loops = 0

    def _offsets(self) -> List[float]:
        if self.stamps is None:
            return [i / self.fps for i in range(len(self.files))]
        return [s - self.stamps[0] for s in self.stamps]

    def _run(self) -> None:
        offsets = self._offsets()
        period = 1.0 / self.fps
        if self.stamps is not None and len(self.stamps) > 1:
            period = max(offsets[-1] / (len(offsets) - 1), 1e-3)  # the gap between the last and first frame
        duration = offsets[-1] + period
        start = time.monotonic()
        i = 0
        while not self._stopping.is_set():
            due = start + offsets[i]
            now = time.monotonic()
            if due > now:
                if self._stopping.wait(due - now):
                    return
            elif now - due > self.MAX_LAG_S:
                start += now - due  # fell behind (slow disk or decode): continue from here, no burst
            try:
                with open(self.files[i], "rb") as fh:
                    data = fh.read()
                decode_jpeg_into(data, self._back.canvas)
            except OSError as exc:
                self._drop("read_error", f"{self.files[i]}: {exc}")
            except JpegError as exc:
                self._drop(exc.reason, f"{self.files[i]}: {exc.detail}")
            else:
                self._received += 1
                self._publish(time.monotonic(), None if self.stamps is None else self.stamps[i], i)
            i += 1
            if i == len(self.files):
                if not self.loop:
                    self.finished = True
                    return
                i = 0
                self.loops += 1
                start += duration

    def stats(self) -> Dict[str, Any]:
        s = super().stats()
        s.update(path=self.path, files=len(self.files), loops=self.loops, finished=self.finished)
        return s


def _side_by_side(item: FrameLike, layout: Optional[FrameLayout]) -> np.ndarray:
    if isinstance(item, CameraFrame):
        if item.canvas is not None and (layout is None or item.canvas.shape == layout.shape):
            return item.canvas
        item = item.images
    if isinstance(item, np.ndarray):
        canvas = item
    else:
        names: Sequence[str] = layout.names if layout is not None else tuple(item)
        missing = [n for n in names if n not in item]
        if missing:
            raise ValueError(f"write_recording: frame lacks cameras {missing}")
        canvas = np.concatenate([np.asarray(item[n]) for n in names], axis=1)
    if layout is not None and canvas.shape != layout.shape:
        raise ValueError(f"write_recording: side-by-side frame is {canvas.shape}, layout wants {layout.shape}")
    if canvas.ndim != 3 or canvas.shape[2] != 3 or canvas.dtype != np.uint8:
        raise ValueError(f"write_recording: frames must be H x W x 3 uint8, got {canvas.shape} {canvas.dtype}")
    return np.ascontiguousarray(canvas)


def write_recording(path: str, frames: Iterable[FrameLike], quality: int = 90, layout: Optional[FrameLayout] = None,
                    stamps: Optional[Sequence[float]] = None) -> int:
    """Write frames as a recording directory that ReplayCamera plays; returns the number of frames written.

    frames: CameraFrame objects (their side-by-side canvas is written), camera name -> image maps (concatenated
    left to right in ``layout`` order, else in the map's order), or side-by-side H x W x 3 uint8 arrays.
    Files are named frame_000000.jpg, frame_000001.jpg, ... ``stamps.txt`` is written from ``stamps`` when given,
    else from the frames' ``stamp`` when every frame is a CameraFrame. The directory is created if needed and must
    not already hold JPEGs (recordings are never mixed).
    """
    path = str(path)
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"write_recording: quality must be in [1, 100], got {quality}")
    os.makedirs(path, exist_ok=True)
    if any(f.lower().endswith(JPEG_SUFFIXES) for f in os.listdir(path)):
        raise FileExistsError(f"write_recording: {path!r} already holds JPEG files")
    seen: List[float] = []
    all_frames = True
    count = 0
    for item in frames:
        canvas = _side_by_side(item, layout)
        if isinstance(item, CameraFrame):
            seen.append(float(item.stamp))
        else:
            all_frames = False
        data = simplejpeg.encode_jpeg(canvas, quality=int(quality), colorspace="RGB")
        with open(os.path.join(path, f"frame_{count:06d}.jpg"), "wb") as fh:
            fh.write(data)
        count += 1
    if stamps is not None:
        out: Optional[List[float]] = [float(s) for s in stamps]
        if len(out) != count:
            raise ValueError(f"write_recording: {len(out)} stamps for {count} frames")
    else:
        out = seen if all_frames and count else None
    if out is not None:
        with open(os.path.join(path, STAMPS_FILE), "w", encoding="utf-8") as fh:
            fh.writelines(f"{s:.6f}\n" for s in out)
    return count
