"""Where in the executing chunks the robot is now, on the controller's own clock, and how chunks take over.

Alignment. A chunk answers the robot state stamped ``obs_stamp`` (a stamp this controller published), and action i
is meant for time ``obs_stamp + i * step_s``. So the position in a chunk is a pure function of the controller's
clock, ``chunk_position`` = (now - obs_stamp) / step_s: no synchronisation between machines, no latency estimate.
A new chunk starts at ``start_index`` = floor of that position: the actions whose time has passed (those the
controller executed from the previous chunk since it published the state) are skipped. Between action steps the
target is interpolated linearly; before action 0 (a chunk stamped up to a tick ahead) it is action 0; after the
last action it is the last action, and the chunk has run out.

Seams (controller.seam), how a new chunk takes over from the ones executing:

- replace: the newest chunk alone, at once.
- crossfade: chunk k, loaded at L_k, fades in over crossfade_s:
  T_1 = a_1(now); T_k = (1 - w_k) T_(k-1) + w_k a_k(now), w_k = smoothstep((now - L_k) / crossfade_s), smoothstep
  x -> 3x^2 - 2x^3 on [0, 1] (w = 0 at the load, 1 after crossfade_s, zero slope at both ends). With two chunks
  this is (1 - w) old(now) + w new(now); an old chunk that has run out contributes its last action. Once the newest
  chunk's w reaches 1 the older ones are dropped; a chunk arriving mid-fade fades in from the current blend (no
  jump). At most ``CROSSFADE_CHAIN`` chunks are kept: a further one drops the oldest (the limiter bounds that step).
- ensemble (ACT's temporal ensembling): the live chunks (those whose last action is not yet past: they still cover
  now), at most ensemble_chunks of them, newest first kept; target = sum_k w_k a_k(now) / sum_k w_k with
  w_k = exp(-m i_k), i_k = 0 for the oldest live chunk. A chunk that no longer covers now drops out.

In every mode the newest chunk is the executing one: once it has run out, ``target_at`` returns False, writes its
last action (held) and drops the older chunks. Chunks are blended only when they drive the same joints (the same
joint list): a chunk with another joint list replaces the kept ones at once. Whatever the seam, every target then
passes the controller's one JointLimiter: no seam ever steps beyond max_velocity / rate_hz.

Buffers are allocated once; ``target_at`` allocates nothing per tick beyond what NumPy's fancy-index assignment does.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import numpy as np

from runtime.protocol import ActionChunk
from runtime.protocol.codec import MAX_HORIZON
from runtime.robot import g1

SEAMS = ("replace", "crossfade", "ensemble")
#: crossfade: chunks kept at most (a new chunk arriving while this many are still fading drops the oldest)
CROSSFADE_CHAIN = 4
#: a position this close (in action steps) below a whole step counts as that step (floating-point stamps): for the
#: start index and for running out
ALIGN_EPS = 1e-6


def chunk_position(obs_stamp: float, step_s: float, now: float) -> float:
    """The fractional action index meant for ``now``: (now - obs_stamp) / step_s (negative before action 0)."""
    return (now - obs_stamp) / step_s


def start_index(obs_stamp: float, step_s: float, now: float, horizon: int) -> int:
    """The action a chunk starts executing at when loaded at ``now``: the number of whole action steps whose time has
    passed since the observed state (what the controller executed meanwhile), clamped to [0, horizon - 1]."""
    i = int(math.floor(chunk_position(obs_stamp, step_s, now) + ALIGN_EPS))
    return min(max(i, 0), horizon - 1)


def smoothstep(x: float) -> float:
    """0 at x <= 0, 1 at x >= 1, 3x^2 - 2x^3 between (zero slope at both ends)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    return x * x * (3.0 - 2.0 * x)


class ChunkSchedule:
    """The executing chunks, copied into buffers allocated once; ``target_at(now, out)`` is the seam's target."""

    def __init__(self, seam: str = "replace", crossfade_s: float = 0.1, ensemble_m: float = 0.01,
                 ensemble_chunks: int = 4) -> None:
        if seam not in SEAMS:
            raise ValueError(f"seam must be one of {SEAMS}, not {seam!r}")
        self.seam = seam
        self.crossfade_s = float(crossfade_s)
        self.ensemble_m = float(ensemble_m)
        self.capacity = {"replace": 1, "crossfade": CROSSFADE_CHAIN, "ensemble": max(1, int(ensemble_chunks))}[seam]
        k = self.capacity
        self._ensemble_w = tuple(math.exp(-self.ensemble_m * i) for i in range(k))  # i = 0 the oldest chunk
        self._actions = np.zeros((k, MAX_HORIZON, g1.NUM_JOINTS))
        self._horizon = [0] * k
        self._obs_stamp = [0.0] * k
        self._step_s = [1.0] * k
        self._loaded_at = [0.0] * k
        self._order = list(range(k))  # slot numbers, oldest chunk first; the first ``count`` are in use
        self.count = 0
        self._acc = np.zeros(g1.NUM_JOINTS)
        self._one = np.zeros(g1.NUM_JOINTS)
        self._tmp = np.zeros(g1.NUM_JOINTS)
        self._index_cache: Dict[Tuple[str, ...], np.ndarray] = {}
        self._names: Tuple[str, ...] = ()
        self.joints = np.zeros(0, dtype=np.intp)
        self.active = False
        self.evicted = 0  # chunks dropped from a full chain/ensemble while they still covered now

    # -- the newest chunk, as before (the executing one) --------------------------------------------------------------

    @property
    def horizon(self) -> int:
        return self._horizon[self._order[self.count - 1]] if self.count else 0

    @property
    def obs_stamp(self) -> float:
        return self._obs_stamp[self._order[self.count - 1]] if self.count else 0.0

    @property
    def step_s(self) -> float:
        return self._step_s[self._order[self.count - 1]] if self.count else 1.0

    def joint_indices(self, names: Tuple[str, ...]) -> np.ndarray:
        """Motor indices of a chunk's joints (KeyError names an unknown joint); cached per joint list."""
        idx = self._index_cache.get(names)
        if idx is None:
            idx = g1.indices(names)
            if len(self._index_cache) < 16:
                self._index_cache[names] = idx
        return idx

    def reset(self) -> None:
        """Forget every chunk (arming starts from none)."""
        self.count = 0
        self.active = False

    def _drop_oldest(self, n: int) -> None:
        if n <= 0:
            return
        self._order = self._order[n:] + self._order[:n]
        self.count -= n

    def load(self, chunk: ActionChunk, joints: np.ndarray, now: Optional[float] = None) -> None:
        """Take ``chunk`` (for motor indices ``joints``) in at ``now`` (default: its obs_stamp), as the newest."""
        h, d = chunk.actions.shape
        if not self.active or chunk.joints != self._names or self.seam == "replace":
            self.count = 0  # replace, or another joint list: no blending
        elif self.seam == "crossfade" and now is not None:
            self._prune_crossfade(now)
        elif self.seam == "ensemble" and now is not None:
            self._prune_ensemble(now)
        if self.count == self.capacity:
            self.evicted += 1
            self._drop_oldest(1)
        slot = self._order[self.count]
        self._actions[slot, :h, :d] = chunk.actions
        self._horizon[slot] = h
        self._obs_stamp[slot] = chunk.obs_stamp
        self._step_s[slot] = chunk.step_s
        self._loaded_at[slot] = chunk.obs_stamp if now is None else now
        self.count += 1
        self._names = chunk.joints
        self.joints = joints
        self.active = True

    # -- targets ------------------------------------------------------------------------------------------------------

    def _covers(self, slot: int, now: float) -> bool:
        return chunk_position(self._obs_stamp[slot], self._step_s[slot], now) + ALIGN_EPS < self._horizon[slot] - 1

    def _action_at(self, slot: int, now: float, dst: np.ndarray) -> bool:
        """Chunk ``slot``'s interpolated action for ``now`` into ``dst`` (d,); False once past its last action."""
        a = self._actions[slot]
        f = chunk_position(self._obs_stamp[slot], self._step_s[slot], now)
        last = self._horizon[slot] - 1
        d = dst.shape[0]
        if f + ALIGN_EPS >= last:  # as in start_index: within ALIGN_EPS of the last action is the last action
            np.copyto(dst, a[last, :d])
            return False
        if f <= 0.0:
            np.copyto(dst, a[0, :d])
            return True
        i = int(f)
        np.subtract(a[i + 1, :d], a[i, :d], out=dst)
        dst *= f - i
        dst += a[i, :d]
        return True

    def _prune_crossfade(self, now: float) -> None:
        """Drop the chunks older than the newest one whose fade is complete."""
        for k in range(self.count - 1, 0, -1):
            if self._weight(self._order[k], now) >= 1.0:
                self._drop_oldest(k)
                return

    def _prune_ensemble(self, now: float) -> None:
        """Drop the chunks that no longer cover now; the newest is kept in any case (it decides running out)."""
        n = self.count
        for k in range(n - 1):
            if not self._covers(self._order[k], now):
                break
        else:
            return
        keep = [s for k, s in enumerate(self._order[:n]) if k == n - 1 or self._covers(s, now)]
        gone = [s for s in self._order if s not in keep]
        self._order = keep + gone
        self.count = len(keep)

    def _weight(self, slot: int, now: float) -> float:
        if self.crossfade_s <= 0.0:
            return 1.0
        return smoothstep((now - self._loaded_at[slot]) / self.crossfade_s)

    def target_at(self, now: float, out: np.ndarray) -> bool:
        """Write the seam's targets for the chunks' joints into ``out`` (29,); False once the newest chunk is over
        (then its last action is written and the older chunks are dropped)."""
        if not self.active or self.count == 0:
            return False
        d = self.joints.shape[0]
        acc, one = self._acc[:d], self._one[:d]
        newest = self._order[self.count - 1]
        if not self._covers(newest, now):
            self._action_at(newest, now, acc)
            self._drop_oldest(self.count - 1)
            out[self.joints] = acc
            return False
        if self.count == 1 or self.seam == "replace":
            self._action_at(newest, now, acc)
        elif self.seam == "crossfade":
            self._prune_crossfade(now)
            self._action_at(self._order[0], now, acc)
            for k in range(1, self.count):
                slot = self._order[k]
                w = self._weight(slot, now)
                self._action_at(slot, now, one)
                acc *= 1.0 - w
                one *= w
                acc += one
        else:
            self._prune_ensemble(now)
            total = 0.0
            acc[:] = 0.0
            for k in range(self.count):
                w = self._ensemble_w[k]
                self._action_at(self._order[k], now, one)
                one *= w
                acc += one
                total += w
            acc /= total
        out[self.joints] = acc
        return True

    def weights(self, now: float) -> Tuple[float, ...]:
        """The normalised weight of each kept chunk (oldest first) in the target for ``now`` (tests, reports)."""
        n = self.count
        if n == 0:
            return ()
        if self.seam == "replace" or n == 1 or not self._covers(self._order[n - 1], now):
            return (0.0,) * (n - 1) + (1.0,)
        if self.seam == "ensemble":
            live = [k == n - 1 or self._covers(self._order[k], now) for k in range(n)]
            raw, i = [], 0
            for alive in live:
                raw.append(self._ensemble_w[i] if alive else 0.0)
                i += alive
            total = sum(raw)
            return tuple(r / total for r in raw)
        ws = [1.0] + [self._weight(self._order[k], now) for k in range(1, n)]
        out = []
        for k in range(n):
            p = ws[k]
            for j in range(k + 1, n):
                p *= 1.0 - ws[j]
            out.append(p)
        return tuple(out)
