"""A deterministic moving scene, for running everything without a robot.

Per camera: a smooth colour gradient that scrolls sideways and a coloured square moving along a Lissajous path.
Every pixel is a pure function of (seed, frame index, layout), so two renders of the same index with the same seed
are identical. Rendering writes in place into a preallocated canvas (no per-frame allocation: the backgrounds are
precomputed once, a frame is one slice copy plus one slice fill per camera).
"""

from __future__ import annotations

import math
import time
from typing import List, Tuple

import numpy as np

from runtime.cameras.base import ThreadedCameraSource
from runtime.cameras.frame_layout import FrameLayout


class _CameraScene:
    __slots__ = ("background", "color", "freq", "height", "phase", "scroll", "size", "width")

    def __init__(self, width: int, height: int, seed: int, index: int) -> None:
        rng = np.random.default_rng([seed & 0xFFFFFFFF, index])
        self.width = width
        self.height = height
        # Background twice as wide as the image, periodic in x with period `width`, so that any window
        # [s, s + width) is a seamless scroll of it.
        x = np.arange(2 * width, dtype=np.float64)[None, :]
        y = np.arange(height, dtype=np.float64)[:, None]
        bg = np.empty((height, 2 * width, 3), dtype=np.float64)
        base = rng.uniform(40, 200, size=3)
        amp = rng.uniform(20, 50, size=3)
        for c in range(3):
            ph = rng.uniform(0, 2 * math.pi)
            bg[:, :, c] = (base[c] + amp[c] * np.sin(2 * math.pi * x / width + ph)
                           + 0.1 * amp[c] * (y / height - 0.5) * 2)
        self.background = np.clip(bg, 0, 255).astype(np.uint8)
        self.scroll = int(rng.integers(1, 4))  # pixels per frame
        self.size = max(2, min(width, height) // 5)
        self.color = np.array([int(v) for v in rng.integers(0, 256, size=3)], dtype=np.uint8)
        # make the square stand out from the background
        self.color[int(rng.integers(0, 3))] = 255 if base.mean() < 128 else 0
        self.freq = (float(rng.uniform(0.02, 0.05)), float(rng.uniform(0.02, 0.05)))
        self.phase = (float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(0, 2 * math.pi)))

    def square(self, frame: int) -> Tuple[int, int]:
        """Top-left corner (x, y) of the square at ``frame``."""
        span_x = self.width - self.size
        span_y = self.height - self.size
        x = round(span_x * 0.5 * (1 + math.sin(self.freq[0] * frame + self.phase[0])))
        y = round(span_y * 0.5 * (1 + math.sin(self.freq[1] * frame + self.phase[1])))
        return x, y

    def render(self, frame: int, out: np.ndarray) -> None:
        s = (frame * self.scroll) % self.width
        np.copyto(out, self.background[:, s:s + self.width])
        x, y = self.square(frame)
        out[y:y + self.size, x:x + self.size] = self.color


class SyntheticScene:
    """Renders frame ``index`` of the scene for ``layout`` and ``seed`` into a canvas, in place."""

    def __init__(self, layout: FrameLayout, seed: int = 0) -> None:
        self.layout = layout
        self.seed = int(seed)
        self._cams: List[_CameraScene] = [
            _CameraScene(w, layout.height, self.seed, i) for i, w in enumerate(layout.widths)
        ]

    def render_into(self, index: int, canvas: np.ndarray) -> np.ndarray:
        """Draw frame ``index`` (>= 0) into ``canvas`` (H x total W x 3 uint8) and return it."""
        if canvas.shape != self.layout.shape or canvas.dtype != np.uint8:
            raise ValueError(f"canvas must be {self.layout.shape} uint8, got {canvas.shape} {canvas.dtype}")
        for cam, x0, w in zip(self._cams, self.layout.offsets, self.layout.widths):
            cam.render(index, canvas[:, x0:x0 + w])
        return canvas

    def render(self, index: int) -> np.ndarray:
        """A new canvas with frame ``index`` (allocates; for tests and one-off use)."""
        return self.render_into(index, np.empty(self.layout.shape, dtype=np.uint8))


class Pacer:
    """Sleeps until the next tick of a fixed rate, on a stop event; never bursts to catch up after a stall."""

    def __init__(self, fps: float) -> None:
        self.period = 1.0 / fps
        self._next = time.monotonic()

    def wait(self, stop) -> bool:  # stop: threading.Event; returns False when stopping
        self._next += self.period
        now = time.monotonic()
        if self._next < now - self.period:  # more than a period behind: drop the missed ticks
            self._next = now
        delay = self._next - now
        if delay > 0:
            return not stop.wait(delay)
        return not stop.is_set()


def check_fps(fps: float, what: str) -> float:
    fps = float(fps)
    if not math.isfinite(fps) or not 0 < fps <= 1000:
        raise ValueError(f"{what}: fps must be in (0, 1000], got {fps}")
    return fps


class SyntheticCamera(ThreadedCameraSource):
    """The synthetic scene rendered at ``fps`` on a capture thread.

    Frame seq ``n`` shows scene index ``n - 1`` (also its ``sender_id``): ``SyntheticScene(layout, seed).render(n -
    1)`` reproduces it exactly.
    """

    def __init__(self, layout: FrameLayout, fps: float = 30.0, seed: int = 0) -> None:
        super().__init__(layout, "synthetic")
        self.fps = check_fps(fps, "synthetic camera")
        self.scene = SyntheticScene(layout, seed)

    def _run(self) -> None:
        pacer = Pacer(self.fps)
        while not self._stopping.is_set():
            index = self._seq  # frames published so far: the next seq is index + 1
            self.scene.render_into(index, self._back.canvas)
            self._received += 1
            self._publish(time.monotonic(), sender_id=index)
            if not pacer.wait(self._stopping):
                return
