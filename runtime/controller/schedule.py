"""Where in the active chunk the robot is now, on the controller's own clock.

A chunk answers the robot state stamped ``obs_stamp`` (a stamp this controller published), and action i is meant
for time ``obs_stamp + i * step_s``. So the position in the chunk is a pure function of the controller's clock:
no synchronisation between machines, and the actions whose time has passed are skipped. Between action steps the
target is interpolated linearly.
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

from runtime.protocol import ActionChunk
from runtime.protocol.wire import MAX_HORIZON
from runtime.robot import g1


class ChunkSchedule:
    """The executing chunk, copied into buffers allocated once."""

    def __init__(self) -> None:
        self._actions = np.zeros((MAX_HORIZON, g1.NUM_JOINTS))
        self._tmp = np.zeros(g1.NUM_JOINTS)
        self._index_cache: Dict[Tuple[str, ...], np.ndarray] = {}
        self.joints = np.zeros(0, dtype=np.intp)
        self.horizon = 0
        self.obs_stamp = 0.0
        self.step_s = 1.0
        self.active = False

    def joint_indices(self, names: Tuple[str, ...]) -> np.ndarray:
        """Motor indices of a chunk's joints (KeyError names an unknown joint); cached per joint list."""
        idx = self._index_cache.get(names)
        if idx is None:
            idx = g1.indices(names)
            if len(self._index_cache) < 16:
                self._index_cache[names] = idx
        return idx

    def load(self, chunk: ActionChunk, joints: np.ndarray) -> None:
        h, d = chunk.actions.shape
        self._actions[:h, :d] = chunk.actions
        self.joints = joints
        self.horizon = h
        self.obs_stamp = chunk.obs_stamp
        self.step_s = chunk.step_s
        self.active = True

    def target_at(self, now: float, out: np.ndarray) -> bool:
        """Write the interpolated targets of the chunk's joints into ``out`` (29,); False once the chunk is over."""
        f = (now - self.obs_stamp) / self.step_s
        last = self.horizon - 1
        if f >= last:
            out[self.joints] = self._actions[last, : self.joints.shape[0]]
            return False
        if f <= 0.0:
            out[self.joints] = self._actions[0, : self.joints.shape[0]]
            return True
        i = int(f)
        d = self.joints.shape[0]
        tmp = self._tmp[:d]
        np.subtract(self._actions[i + 1, :d], self._actions[i, :d], out=tmp)
        tmp *= f - i
        tmp += self._actions[i, :d]
        out[self.joints] = tmp
        return True
