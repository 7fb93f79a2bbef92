"""Chunk admission: whether a decoded chunk may be executed, checked against the run's Limits (limits.py).

A refusal is a safety decision, not a decoding failure: ChunkRejected names the reason (the key the controller's
reject counts and reports use) and, where the robot must stop too, why. Sessions: from arming on, one runtime
session drives; a session's seq only grows (runtime/runner/), so a seq not after the last one accepted is a duplicate, a
replay or an older plan (stale_seq), also across re-arming with the same runtime.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from runtime.controller.limits import Limits
from runtime.controller.safety import ARMED_STATES, SAFE_STATES
from runtime.controller.schedule import start_index
from runtime.protocol import MAX_ERROR_TEXT, ActionChunk
from runtime.robot import g1


class ChunkRejected(Exception):
    """A chunk the controller refuses; ``reason`` is the counted key, ``stop`` a reason to stop the robot, or None."""

    def __init__(self, reason: str, detail: str = "", stop: Optional[str] = None) -> None:
        cut = MAX_ERROR_TEXT - len(reason) - 2  # as short as a DecodeError's: it is logged
        detail = detail if len(detail) <= cut else detail[:max(cut - 3, 0)] + "..."
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.stop = stop


class ChunkGuard:
    """Admits chunks; remembers the session armed with and the last seq accepted per the last session."""

    def __init__(self, limits: Limits, joint_indices) -> None:
        self.limits = limits
        self._joint_indices = joint_indices  # names -> motor indices (KeyError names an unknown joint)
        self.session: Optional[str] = None  # the runtime session driving since arming
        self._seq_session: Optional[str] = None  # the session of the last chunk accepted, and its seq
        self._last_seq = -1

    def arm(self) -> None:
        """Arming: the next session heard from drives (seqs stay remembered)."""
        self.session = None

    def check(self, chunk: ActionChunk, now: float, q_cmd: np.ndarray, first_step_free: bool) -> None:
        """Raises ChunkRejected naming what is wrong; a chunk that returns is accepted. ``first_step_free``: an
        approach to the chunk's current action goes first, so max_first_step does not apply yet."""
        lim = self.limits
        if chunk.session == self._seq_session and chunk.seq <= self._last_seq:
            raise ChunkRejected("stale_seq", f"seq {chunk.seq} is not after {self._last_seq}, the last chunk "
                                "accepted from its session")
        try:
            joints = self._joint_indices(chunk.joints)
        except KeyError as exc:
            raise ChunkRejected("unknown_joint", f"chunk.joints: {exc.args[0]}") from None
        if not lim.driven[joints].all():
            raise ChunkRejected("joint_not_driven", "chunk drives legs, which arm_sdk mode leaves to Unitree's "
                                "controller")
        age = now - chunk.obs_stamp
        if age > lim.max_chunk_age_s:
            raise ChunkRejected("stale_chunk", f"answers a robot state {age:.3f} s old (limit {lim.max_chunk_age_s})")
        if age < -lim.period:
            raise ChunkRejected("future_chunk", f"obs_stamp {chunk.obs_stamp:.3f} is after now {now:.3f}")
        a = chunk.actions
        if not ((a >= g1.POSITION_MIN[joints]).all() and (a <= g1.POSITION_MAX[joints]).all()):
            raise ChunkRejected("outside_limits", "an action lies outside the joint position limits")
        first = float(np.abs(a[start_index(chunk.obs_stamp, chunk.step_s, now, a.shape[0])] - q_cmd[joints]).max())
        if first > lim.max_first_step and not first_step_free:
            raise ChunkRejected("first_step_too_far", f"the current action is {first:.3f} rad from the commanded "
                                f"pose (limit {lim.max_first_step})")
        self._check_session(chunk)
        self._seq_session = chunk.session
        self._last_seq = chunk.seq

    def follows(self, session: str, state: str) -> bool:
        """Whether a heartbeat of ``session`` is taken in ``state``: from arming on, the first session heard from is
        followed and, until the run's stop is complete, no other; in a safe state any is taken (it moves nothing)."""
        if self.session is None:
            if state in ARMED_STATES:
                self.session = session
            return True
        return session == self.session or state in SAFE_STATES

    def _check_session(self, chunk: ActionChunk) -> None:
        if self.session is None:
            self.session = chunk.session
        elif chunk.session != self.session:
            raise ChunkRejected("new_session", "a chunk from another runtime session than the one armed with",
                                stop=f"policy runtime restarted (session {chunk.session!r}, armed with "
                                f"{self.session!r})")
