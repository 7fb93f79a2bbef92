"""WireMonitor: what was actually published to the robot, seen from outside the controller.

A DDS reader on rt/lowcmd and rt/arm_sdk in the harness's own process, on the robot's domain and interface: it sees
the same bytes the robot (or `wam-edge sim`) sees, from the same commands, with or without a simulator. A thread
blocks in a DDS WaitSet and stamps each command with time.monotonic() on receipt (the clock every process on this
host shares), checks its CRC and records it in a CommandLog (the simulator's own record of what it received).

A starved harness stamps late, and every reaction it measures grows by as much. So the monitor also measures its own
lateness (``late``): per command, its receipt against the DDS source timestamp the writer's library set when it was
written (both the host's wall clock), and per loop turn, the time beyond the wait it asked for.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Dict, List, Optional

import numpy as np
from cyclonedds._clayer import ddspy_take
from cyclonedds.core import DDSException, InstanceState, ReadCondition, SampleState, ViewState, WaitSet
from cyclonedds.util import duration

from runtime.metrics import GapLog
from runtime.robot.dds import transport
from runtime.robot.dds.cdr_buffers import LowCmdBuffer
from runtime.robot.dds.sim import CommandLog
from runtime.robot.dds.unitree_hg import LowCmd_

_TOPICS = (transport.LOWCMD_TOPIC, transport.ARM_SDK_TOPIC)  # CommandLog topic 0 = lowcmd, 1 = arm_sdk
#: the longest the monitor's loop waits for a command; a turn longer than this, it was starved
WAIT_S = 0.05
#: the threads cyclonedds delivers received samples with (by name, /proc/self/task/*/comm)
_DDS_DELIVERY_THREADS = ("recv", "recvUC", "recvMC", "dq.user", "dq.builtins", "tev")
#: lateness over this is recorded (``WireMonitor.late``); a harness judges it against the bound it threatens
LATE_FLOOR_S = 0.002


class WireMonitor:
    """Records every command on rt/lowcmd and rt/arm_sdk; ``window()`` hands a harness what it needs to judge."""

    def __init__(self, domain_id: int, interface: Optional[str], log_size: int = 30000) -> None:
        self.participant = transport.open_participant(domain_id, interface)
        self._readers = tuple(transport.reader(self.participant, name, LowCmd_, depth=256) for name in _TOPICS)
        self._waitset = WaitSet(self.participant)
        mask = SampleState.Any | ViewState.Any | InstanceState.Any
        self._conditions = tuple(ReadCondition(rd, mask) for rd in self._readers)
        for cond in self._conditions:
            self._waitset.attach(cond)
        self.log = CommandLog(log_size)
        self._cmd = LowCmdBuffer()
        self._floats = self._cmd.rec["motor_cmd"][0].view(np.float32).reshape(-1, 7)[:, 1:6]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="WireMonitor", daemon=True)
        # writers on the same topics for the bad-CRC scenario, created now so that discovery has matched them with
        # the robot's readers long before the first injected sample (a sample written before matching is lost)
        self._writers: Dict[int, Any] = {i: transport.writer(self.participant, name, LowCmd_)
                                         for i, name in enumerate(_TOPICS)}
        self._last_valid = [None, None]  # raw bytes of the newest valid command per topic
        self.late = GapLog(LATE_FLOOR_S)  # how late it stamped commands (or woke): its own starvation

    def start(self) -> "WireMonitor":
        self._thread.start()
        return self

    def threads(self) -> List[int]:
        """The threads that stamp commands: the monitor's own and the DDS threads that deliver to it (the rig gives
        them real-time priority: runtime/service/scheduling.py, MONITOR)."""
        tids = [self._thread.native_id] if self._thread.native_id else []
        try:
            for tid in os.listdir("/proc/self/task"):
                with open(f"/proc/self/task/{tid}/comm", "r", encoding="utf-8") as f:
                    if f.read().strip() in _DDS_DELIVERY_THREADS:
                        tids.append(int(tid))
        except OSError:  # not Linux
            pass
        return tids

    def _run(self) -> None:
        timeout = duration(seconds=WAIT_S)
        last = time.monotonic()
        while not self._stop.is_set():
            self._waitset.wait(timeout)
            now, wall_ns = time.monotonic(), time.time_ns()
            late = max(now - last - WAIT_S, 0.0)  # a turn past its wait: starved, commands or not
            last = now
            for topic, rd in enumerate(self._readers):
                got = ddspy_take(rd._ref, 256)  # transport.take_raw, with the sample infos
                if isinstance(got, int):
                    raise DDSException(got, f"taking raw samples on {_TOPICS[topic]}")
                for data, info in got:
                    if info.valid_data:
                        late = max(late, (wall_ns - info.source_timestamp) * 1e-9)
                        self._record(now, topic, data)
            with self._lock:
                self.late.note(now, late)

    def _record(self, now: float, topic: int, data: bytes) -> None:
        cmd = self._cmd
        if not cmd.load(data):
            return
        crc_ok = cmd.crc_ok()
        finite = bool(np.isfinite(self._floats).all())
        with self._lock:
            self.log.record(now, topic, cmd, crc_ok, crc_ok and finite, finite)
            if crc_ok:
                self._last_valid[topic] = data

    def window(self, since: float, until: Optional[float] = None) -> Dict[str, np.ndarray]:
        with self._lock:
            return self.log.window(since, until)

    def summary(self, since: Optional[float] = None) -> Dict[str, Any]:
        with self._lock:
            out = self.log.summary(since)
            out["max_late_ms"] = round(self.late.max_s * 1e3, 3)
            return out

    def lateness(self, since: float):
        """[[t, late_s], ...]: when the monitor stamped commands (or woke) late by more than LATE_FLOOR_S."""
        with self._lock:
            return self.late.since(since)

    def wait_for_commands(self, since: float, count: int, timeout_s: float) -> bool:
        """True once ``count`` commands arrived at or after ``since``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                t = self.log.t[:min(self.log.n, self.log.size)]
                if int(np.count_nonzero(t >= since)) >= count:
                    return True
            time.sleep(0.01)
        return False

    def publish_bad_crc(self, topic: int, count: int, interval_s: float = 0.004) -> int:
        """Publish ``count`` copies of the newest valid command seen on ``topic`` with a corrupted CRC: harmless
        even to a robot that did not check (the same targets). Returns how many were sent (0: none seen yet)."""
        with self._lock:
            data = self._last_valid[topic]
        if data is None:
            return 0
        buf = LowCmdBuffer()
        buf.load(data)
        buf.rec["crc"][0] = buf.computed_crc() ^ 0xFFFFFFFF
        buf.seal_without_crc()
        for _ in range(count):
            transport.write_raw(self._writers[topic], buf.cdr)
            time.sleep(interval_s)
        return count

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)
        transport.delete(*self._writers.values(), *self._conditions, self._waitset, *self._readers)
        # the participant stays: cyclonedds keeps one Domain per process (transport.open_participant)
