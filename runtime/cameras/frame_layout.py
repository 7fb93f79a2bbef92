"""Where each camera sits in a side-by-side image, and the preallocated image sets that sources write into.

Unitree's image server sends one JPEG per message holding every camera side by side at one height: the head
camera(s) first, then the wrist cameras to the right. A :class:`FrameLayout` is that list of (name, width) left to
right plus the height; every source in this package uses it, so all of them deliver the same camera names and
sizes for the same config.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Sequence, Tuple

import numpy as np


class FrameLayout:
    """Cameras left to right as (name, width) pairs, all ``height`` pixels tall."""

    __slots__ = ("cameras", "height", "names", "offsets", "total_width", "widths")

    def __init__(self, cameras: Sequence[Tuple[str, int]], height: int) -> None:
        cams: List[Tuple[str, int]] = []
        for item in cameras:
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise ValueError(f"camera layout entries are (name, width) pairs, got {item!r}")
            name, width = item
            if not isinstance(name, str) or not name or len(name) > 64:
                raise ValueError(f"camera name must be a non-empty string of at most 64 characters, got {name!r}")
            if type(width) is not int or width <= 0:
                raise ValueError(f"camera {name!r}: width must be a positive int, got {width!r}")
            cams.append((name, width))
        if not cams:
            raise ValueError("camera layout is empty: name at least one camera")
        names = tuple(n for n, _ in cams)
        if len(set(names)) != len(names):
            raise ValueError(f"camera names repeat in the layout: {list(names)}")
        if type(height) is not int or height <= 0:
            raise ValueError(f"camera height must be a positive int, got {height!r}")
        self.height = height
        self.cameras: Tuple[Tuple[str, int], ...] = tuple(cams)
        self.names: Tuple[str, ...] = names
        self.widths: Tuple[int, ...] = tuple(w for _, w in cams)
        offsets = []
        x = 0
        for w in self.widths:
            offsets.append(x)
            x += w
        self.offsets: Tuple[int, ...] = tuple(offsets)
        self.total_width = x

    @classmethod
    def from_config(cls, layout: Iterable[Dict[str, Any]], height: int) -> FrameLayout:
        """From the config's ``layout: [{name, width}, ...]`` list and ``height``."""
        cams = []
        for entry in layout:
            if not isinstance(entry, dict) or set(entry) != {"name", "width"}:
                raise ValueError(f"camera layout entries are maps with name and width, got {entry!r}")
            cams.append((entry["name"], entry["width"]))
        return cls(cams, height)

    def to_config(self) -> List[Dict[str, Any]]:
        return [{"name": n, "width": w} for n, w in self.cameras]

    def prefix(self, count: int) -> FrameLayout:
        """The first ``count`` cameras only."""
        return FrameLayout(self.cameras[:count], self.height)

    @property
    def shape(self) -> Tuple[int, int, int]:
        """Shape of the side-by-side image: height x total width x 3."""
        return (self.height, self.total_width, 3)

    def views(self, canvas: np.ndarray) -> Dict[str, np.ndarray]:
        """Per-camera views (name -> H x W x 3) into a side-by-side ``canvas``; no copy."""
        if canvas.shape != self.shape:
            raise ValueError(f"canvas shape {canvas.shape} is not {self.shape}")
        return {n: canvas[:, x:x + w] for (n, w), x in zip(self.cameras, self.offsets)}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FrameLayout) and other.cameras == self.cameras and other.height == self.height

    def __hash__(self) -> int:
        return hash((self.cameras, self.height))

    def __repr__(self) -> str:
        cams = ", ".join(f"{n}:{w}" for n, w in self.cameras)
        return f"FrameLayout([{cams}] x {self.height})"


#: The project's default: head 640 + left wrist 640 + right wrist 640, 480 tall.
DEFAULT_LAYOUT = FrameLayout([("head", 640), ("left_wrist", 640), ("right_wrist", 640)], 480)


class ImageSet:
    """One preallocated side-by-side canvas (H x total W x 3 uint8) and its per-camera views.

    The per-camera arrays are views into the canvas: H x W x 3 uint8, rows contiguous, but not C-contiguous when
    there is more than one camera (use ``np.ascontiguousarray`` where a packed array is needed).
    """

    __slots__ = ("canvas", "images")

    def __init__(self, layout: FrameLayout) -> None:
        self.canvas = np.zeros(layout.shape, dtype=np.uint8)
        self.images = layout.views(self.canvas)
