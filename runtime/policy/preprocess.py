"""Camera and state preprocessing into buffers allocated once.

Resizing is nearest neighbour through precomputed gather indices (byte offsets,
so strided camera views are read in place), so a frame costs one np.take, one
cast and two in-place ufuncs on same-shape arrays and allocates nothing (index
arrays are built once per source frame size and layout, normally at warmup).
Frames are RGB; a model trained on BGR (manifest channel_order) gets its
channels swapped by the same gather, at no cost.
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .errors import PolicyInputError
from .manifest import CHANNEL_ORDERS, CameraSpec, StateSpec


def nearest_indices(src: int, dst: int) -> np.ndarray:
    """Source index for each destination pixel, sampling at pixel centres:
    floor((d + 0.5) * src / dst), exact in integers (identity when src == dst)."""
    d = np.arange(dst, dtype=np.int64)
    return np.minimum(((2 * d + 1) * src) // (2 * dst), src - 1)


def _check_buffer(out: np.ndarray, shape: Tuple[int, ...], what: str) -> None:
    if out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous \
            or not out.flags.writeable:
        raise ValueError("%s: buffer must be writable C-contiguous float32 %s, got %s %s"
                         % (what, shape, out.dtype, out.shape))


class CameraPreprocessor:
    """HxWx3 uint8 RGB of any size -> normalised (1, 3, h, w) float32 in the
    model's channel order (spec.channel_order), in place."""

    def __init__(self, spec: CameraSpec, out: np.ndarray) -> None:
        _check_buffer(out, (1, 3, spec.height, spec.width), "camera %r" % spec.name)
        if spec.channel_order not in CHANNEL_ORDERS:
            raise ValueError("camera %r: channel order must be one of %s, got %r"
                             % (spec.name, ", ".join(CHANNEL_ORDERS), spec.channel_order))
        self.spec = spec
        # source (RGB) channel of each output channel
        self._channels = np.arange(3, dtype=np.int64) if spec.channel_order == "rgb" \
            else np.arange(2, -1, -1, dtype=np.int64)
        self.out = out
        self._chw = out[0]
        self._u8 = np.empty((3, spec.height, spec.width), dtype=np.uint8)
        mean = np.asarray(spec.mean, dtype=np.float64)
        std = np.asarray(spec.std, dtype=np.float64)
        # (x / 255 - mean) / std  ==  x * scale - offset. Full-size operands on
        # purpose: a broadcast operand makes numpy allocate an iteration buffer.
        shape = (3, spec.height, spec.width)
        self._scale = np.empty(shape, np.float32)
        self._scale[...] = (1.0 / (255.0 * std)).astype(np.float32)[:, None, None]
        self._offset = np.empty(shape, np.float32)
        self._offset[...] = (mean / std).astype(np.float32)[:, None, None]
        self._index: Dict[Tuple[int, int], np.ndarray] = {}

    def prepare(self, src_height: int, src_width: int,
                strides: Tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
        """Build (and cache) the gather index for frames of this size and memory layout.

        Indices are byte offsets from the frame's first pixel, so a strided view (one camera cut out of the image
        server's side-by-side canvas) is read in place; (0, 0, 0) means C-contiguous.
        """
        s0, s1, s2 = strides if strides != (0, 0, 0) else (src_width * 3, 3, 1)
        key = (int(src_height), int(src_width), int(s0), int(s1), int(s2))
        index = self._index.get(key)
        if index is None:
            ys = nearest_indices(key[0], self.spec.height)
            xs = nearest_indices(key[1], self.spec.width)
            pixel = ys[:, None] * s0 + xs[None, :] * s1                 # (h, w)
            channel = self._channels[:, None, None] * s2                # (3, 1, 1)
            index = (pixel[None, :, :] + channel).astype(np.intp)       # (3, h, w)
            self._index[key] = index
        return index

    def __call__(self, image: np.ndarray) -> None:
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 \
                or image.dtype != np.uint8 or image.shape[0] == 0 or image.shape[1] == 0:
            raise PolicyInputError(
                "camera %r: expected an HxWx3 uint8 RGB image, got %s" % (
                    self.spec.name, _describe(image)))
        h, w = image.shape[0], image.shape[1]
        s0, s1, s2 = image.strides
        index = self._index.get((h, w, s0, s1, s2))
        if index is None:
            if min(image.strides) <= 0:
                image = np.ascontiguousarray(image)  # negative strides: rare, so copying is fine
                s0, s1, s2 = image.strides
            index = self.prepare(h, w, (s0, s1, s2))
        # every byte from the first pixel to the last, as one flat view (no copy, whatever the strides)
        span = (h - 1) * s0 + (w - 1) * s1 + 2 * s2 + 1
        flat = as_strided(image, shape=(span,), strides=(1,), writeable=False)
        # mode="clip": with the default "raise", numpy buffers the output.
        np.take(flat, index, out=self._u8, mode="clip")
        np.copyto(self._chw, self._u8, casting="unsafe")  # an unbuffered cast
        np.multiply(self._chw, self._scale, out=self._chw)
        np.subtract(self._chw, self._offset, out=self._chw)


class StateNormaliser:
    """(n_joints,) joint positions -> (state - mean) / std in a (1, n) buffer."""

    def __init__(self, spec: StateSpec, out: np.ndarray) -> None:
        n = len(spec.joints)
        _check_buffer(out, (1, n), "state")
        self.spec = spec
        self.out = out
        self._row = out[0]
        self._mean = np.asarray(spec.mean, dtype=np.float32)
        self._inv_std = (1.0 / np.asarray(spec.std, dtype=np.float64)).astype(np.float32)

    def __call__(self, state: np.ndarray) -> None:
        if not isinstance(state, np.ndarray):
            state = np.asarray(state)
        if state.shape != self._row.shape or state.dtype.kind not in "fiu":
            raise PolicyInputError(
                "state: expected shape (%d,) real numbers (one position per joint of "
                "manifest state.joints, %s..%s), got %s" % (
                    self._row.shape[0], self.spec.joints[0], self.spec.joints[-1],
                    _describe(state)))
        np.copyto(self._row, state, casting="unsafe")  # ints/float64 -> float32, unbuffered
        np.subtract(self._row, self._mean, out=self._row)
        np.multiply(self._row, self._inv_std, out=self._row)


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return "shape %s dtype %s" % (tuple(value.shape), value.dtype)
    return "a %s" % type(value).__name__
