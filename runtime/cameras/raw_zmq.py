"""Raw (uncompressed) frames over ZeroMQ: the project's ``frame`` message (runtime.protocol), SUB side.

For cameras or simulators that publish uncompressed images. Each message must carry exactly the layout's camera
names, each H x W x 3 uint8 with the layout's height and that camera's width. The images are copied into the back
buffer's canvas (one copy per camera, no allocation besides what decoding the message needs).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import zmq

from runtime.cameras.frame_layout import FrameLayout
from runtime.cameras.image_server import ZmqSubCamera
from runtime.protocol import MAX_FRAME_BYTES, DecodeError, decode


class RawZmqCamera(ZmqSubCamera):
    """Frames from a PUB sending ``encode_frame`` messages.

    ``sender_stamp`` and ``sender_id`` are the message's ``stamp`` and ``seq``. Dropped (counted by reason): every
    runtime.protocol DecodeError reason ("malformed", "bad_version", "unexpected_type", "bad_shape", ...),
    "wrong_cameras" (names differ from the layout) and "wrong_size" (an image is not height x width x 3); and, from
    the socket (ZmqSubCamera), "multipart", "link_reset" (a message over MAX_FRAME_BYTES) and "handler_error".
    """

    def __init__(self, endpoint: str, layout: FrameLayout, context: Optional[zmq.Context] = None) -> None:
        super().__init__(layout, "raw_zmq", endpoint, MAX_FRAME_BYTES, context)

    def _handle(self, buf: memoryview, stamp: float) -> None:
        layout = self._layout
        try:
            frame = decode(buf, ("frame",), max_bytes=MAX_FRAME_BYTES)
        except DecodeError as exc:
            self._drop(exc.reason, exc.detail)
            return
        if set(frame.images) != set(layout.names):
            self._drop("wrong_cameras", f"expected cameras {list(layout.names)}, got {sorted(frame.images)}")
            return
        for name, width in layout.cameras:
            img = frame.images[name]
            if img.shape != (layout.height, width, 3):
                self._drop("wrong_size", f"camera {name}: expected {layout.height} x {width} x 3, "
                                         f"got {' x '.join(map(str, img.shape))}")
                return
        back = self._back.images
        for name in layout.names:
            np.copyto(back[name], frame.images[name])
        self._publish(stamp, float(frame.stamp), int(frame.seq))
