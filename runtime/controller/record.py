"""The command record: what this controller last commanded, memory-mapped, so that a restarted controller can take
over from a predecessor that died (kill -9, crash) while driving the robot (docs/safety.md, "Command record").

The G1 keeps applying the last command it received (arm_sdk or lowcmd; there is no firmware watchdog): a controller
that dies leaves the robot on its last command. The record says what that command was, so the next controller starts
by sending exactly it and ramps the robot out from there instead of leaving it (or jerking it loose).

Layout (little-endian, 1600 bytes): a 64-byte header, then two 768-byte slots written alternately.

    header  0  magic       8 bytes  b"WAMCREC\\0"
            8  version     u32      1
           12  slot_bytes  u32      768
           16  joints      u32      29
    slot    0  begin       u64      write number n, stored first
            8  pid         i64      the writer
           16  stamp       f64      the writer's time.monotonic() at that tick
           24  state       u32      index in safety.STATES (approaching, added later, is appended: 7)
           28  mode        u32      0 arm_sdk, 1 lowcmd
           32  flags       u32      bit 0: the stop under way is immediate
           40  weight      f64      arm_sdk blend weight sent (0 in lowcmd)
           48  ticks       u64      the writer's tick count
           56  q           29 f64   commanded positions
          288  kp          29 f64   gains sent
          520  kd          29 f64
          752  end         u64      n again, stored last

A slot whose begin and end differ was torn (the writer died in the middle of that update); the other slot then holds
the update before, one tick older. ``write`` is memory stores into the mapping only: no allocation, no system call.
The record survives the death of the process (the pages belong to the file). It is never synced on the hot path,
so a crash or power cut of the computer may lose its last updates (the kernel writes them back within seconds); it
lives in the state directory, never on tmpfs by default (runtime/service/paths.py), and the e-stop latch beside it is
synced when written. One controller writes a record at a time (flock).
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
from typing import Optional

import numpy as np

from runtime.controller.safety import IDLE, SAFE_STATES, STATES
from runtime.robot import g1
from runtime.robot.driver import ARM_SDK, LOWCMD
from runtime.service.paths import check_private_file, ensure_private_dir

log = logging.getLogger("wam_edge.controller")

MAGIC = b"WAMCREC\0"
VERSION = 1
HEADER_BYTES = 64
SLOT_BYTES = 768
SIZE = HEADER_BYTES + 2 * SLOT_BYTES
MODES = (ARM_SDK, LOWCMD)
STATE_CODES = {s: i for i, s in enumerate(STATES)}
IMMEDIATE = 1

_N = g1.NUM_JOINTS
HEADER = np.dtype({"names": ["magic", "version", "slot_bytes", "joints"],
                   "formats": ["S8", "<u4", "<u4", "<u4"], "offsets": [0, 8, 12, 16], "itemsize": HEADER_BYTES})
SLOT = np.dtype({"names": ["begin", "pid", "stamp", "state", "mode", "flags", "weight", "ticks", "q", "kp", "kd",
                           "end"],
                 "formats": ["<u8", "<i8", "<f8", "<u4", "<u4", "<u4", "<f8", "<u8", ("<f8", _N), ("<f8", _N),
                             ("<f8", _N), "<u8"],
                 "offsets": [0, 8, 16, 24, 28, 32, 40, 48, 56, 56 + 8 * _N, 56 + 16 * _N, 56 + 24 * _N],
                 "itemsize": SLOT_BYTES})
assert SLOT.itemsize == SLOT_BYTES and 56 + 24 * _N + 8 <= SLOT_BYTES


class Snapshot:
    """One intact update of a record: what its writer commanded at its last tick."""

    __slots__ = ("n", "pid", "stamp", "state", "mode", "immediate", "weight", "ticks", "q", "kp", "kd")

    def __init__(self, slot: np.void) -> None:
        self.n = int(slot["begin"])
        self.pid = int(slot["pid"])
        self.stamp = float(slot["stamp"])
        code = int(slot["state"])
        self.state = STATES[code] if code < len(STATES) else f"unknown ({code})"
        code = int(slot["mode"])
        self.mode = MODES[code] if code < len(MODES) else f"unknown ({code})"
        self.immediate = bool(int(slot["flags"]) & IMMEDIATE)
        self.weight = float(slot["weight"])
        self.ticks = int(slot["ticks"])
        self.q = np.array(slot["q"], dtype=np.float64)
        self.kp = np.array(slot["kp"], dtype=np.float64)
        self.kd = np.array(slot["kd"], dtype=np.float64)

    def problem(self) -> Optional[str]:
        """Why these values cannot be a command this controller ever sent, or None."""
        if self.state not in STATES:
            return f"state {self.state}"
        if self.mode not in MODES:
            return f"mode {self.mode}"
        if not (np.isfinite(self.q).all() and np.isfinite(self.kp).all() and np.isfinite(self.kd).all()):
            return "non-finite values"
        if not 0.0 <= self.weight <= 1.0:
            return f"weight {self.weight}"
        if (self.kp < 0).any() or (self.kd < 0).any():
            return "negative gains"
        return None

    def still_driving(self) -> bool:
        """Whether the robot was still on this writer's command: a driving state, or an arm_sdk stop or e-stop whose
        weight ramp had not reached 0 (lowcmd's stopped and e-stop are damping, safe to be left on)."""
        if self.state not in SAFE_STATES:
            return True
        return self.mode == ARM_SDK and self.state != IDLE and self.weight > 0.0

    def describe(self) -> str:
        return (f"pid {self.pid}, state {self.state}{' (immediate)' if self.immediate else ''}, {self.mode}, "
                f"weight {self.weight:.3f}, tick {self.ticks}")


class CommandRecord:
    """Open (creating a private directory and the file as needed) and lock the record at ``path`` for a controller in
    ``mode``. Raises PathError when its directory or an existing file is not safe (someone else's, writable by
    others, a symlink), OSError (or ValueError) when it cannot be opened: the controller then refuses to start.

    ``read()`` first, before the first ``write``: it returns what the previous controller last commanded."""

    def __init__(self, path: str, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        self.path = path
        self.mode = mode
        self._mode_code = MODES.index(mode)
        ensure_private_dir(os.path.dirname(os.path.abspath(path)), "state directory", strict=False)
        check_private_file(path, "command record")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OSError(f"{path} is held by another running controller") from None
            size = os.fstat(fd).st_size
            self._fresh = size != SIZE  # nothing a controller of this layout wrote
            if self._fresh:
                if size:
                    log.warning("command record %s: %d bytes, not a record of this layout: replaced", path, size)
                os.ftruncate(fd, 0)
                os.ftruncate(fd, SIZE)
            self._mm = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self._fd: Optional[int] = fd
        self._header = np.ndarray((), HEADER, buffer=self._mm, offset=0)
        self._slots = np.ndarray((2,), SLOT, buffer=self._mm, offset=HEADER_BYTES)
        # views made once: a write is stores through them, nothing else
        self._begin = self._slots["begin"]
        self._end = self._slots["end"]
        self._pid = self._slots["pid"]
        self._stamp = self._slots["stamp"]
        self._state = self._slots["state"]
        self._modes = self._slots["mode"]
        self._flags = self._slots["flags"]
        self._weight = self._slots["weight"]
        self._ticks = self._slots["ticks"]
        self._q = (self._slots["q"][0], self._slots["q"][1])
        self._kp = (self._slots["kp"][0], self._slots["kp"][1])
        self._kd = (self._slots["kd"][0], self._slots["kd"][1])
        self._n = 0  # the last write number
        self._pid_value = 0
        self._claimed = False
        self._first: Optional[tuple] = None  # (what last() found before the first write,)

    # -- reading (at start) ------------------------------------------------------------------------------------------

    def _valid_header(self) -> bool:
        h = self._header
        return self._mm[0:8] == MAGIC and int(h["version"]) == VERSION \
            and int(h["slot_bytes"]) == SLOT_BYTES and int(h["joints"]) == _N

    def last(self) -> Optional[Snapshot]:
        """The newest intact update in the file, whatever its state; None when there is none. Judged once before
        this controller's first write (warnings are logged once), read again after it."""
        if not self._claimed:
            if self._first is None:
                self._first = (self._last(),)
            return self._first[0]
        return self._last()

    def _last(self) -> Optional[Snapshot]:
        if self._fresh:
            return None
        if not self._valid_header():
            log.warning("command record %s: not a version %d command record: ignored", self.path, VERSION)
            return None
        slots = np.array(self._slots)  # one copy, then judge it
        intact = [i for i in (0, 1) if slots["begin"][i] == slots["end"][i] and slots["begin"][i] != 0]
        torn = [i for i in (0, 1) if slots["begin"][i] != slots["end"][i]]
        if not intact:
            if torn:
                log.warning("command record %s: torn (its writer died in the middle of an update): ignored", self.path)
            return None
        best = max(intact, key=lambda i: int(slots["begin"][i]))
        if any(int(slots["begin"][i]) > int(slots["begin"][best]) for i in torn):
            log.warning("command record %s: the newest update was torn (its writer died in the middle of it): "
                        "using the one before", self.path)
        return Snapshot(slots[best])

    def read(self) -> Optional[Snapshot]:
        """What the previous controller last commanded, when it left the robot on it; None when there is no record,
        it is torn, from another layout or mode, or its writer had left the robot safe."""
        try:
            snap = self.last()
        except (ValueError, IndexError) as exc:  # a damaged file: never a reason not to start
            log.warning("command record %s: unreadable (%s): ignored", self.path, exc)
            return None
        if snap is None:
            return None
        problem = snap.problem()
        if problem:
            log.warning("command record %s: invalid (%s): ignored", self.path, problem)
            return None
        if snap.mode != self.mode:
            log.warning("command record %s: written by a controller in %s mode, this one runs %s: ignored",
                        self.path, snap.mode, self.mode)
            return None
        if not snap.still_driving():
            log.info("command record %s: the previous controller left the robot %s", self.path, snap.state)
            return None
        return snap

    # -- writing (every tick) ----------------------------------------------------------------------------------------

    def _claim(self) -> None:
        n = 0
        if not self._fresh and self._valid_header():
            n = int(max(self._begin.max(), self._end.max()))  # number on from the previous writer: newest wins
        h = self._header
        h["magic"] = MAGIC
        h["version"] = VERSION
        h["slot_bytes"] = SLOT_BYTES
        h["joints"] = _N
        self._pid_value = os.getpid()
        self._n = n
        self._claimed = True

    def write(self, state_code: int, immediate: bool, weight: float, q: np.ndarray, kp: np.ndarray,
              kd: np.ndarray, stamp: float, ticks: int) -> None:
        """Record one tick's command (``state_code``: STATE_CODES[state]). Stores into the mapping only."""
        if not self._claimed:
            self._claim()
        n = self._n + 1
        self._n = n
        i = n & 1
        self._begin[i] = n
        self._pid[i] = self._pid_value
        self._stamp[i] = stamp
        self._state[i] = state_code
        self._modes[i] = self._mode_code
        self._flags[i] = IMMEDIATE if immediate else 0
        self._weight[i] = weight
        self._ticks[i] = ticks
        np.copyto(self._q[i], q)
        np.copyto(self._kp[i], kp)
        np.copyto(self._kd[i], kd)
        self._end[i] = n

    def close(self) -> None:
        """Unlock and unmap; the file keeps what was written last."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)  # mmap holds a duplicate of the descriptor: unlock explicitly
        finally:
            os.close(fd)
        self._header = self._slots = None  # type: ignore[assignment]
        self._begin = self._end = self._pid = self._stamp = self._state = None  # type: ignore[assignment]
        self._modes = self._flags = self._weight = self._ticks = None  # type: ignore[assignment]
        self._q = self._kp = self._kd = ()  # type: ignore[assignment]
        try:
            self._mm.close()
        except BufferError:  # a view is still referenced somewhere: the mapping goes with it
            pass
