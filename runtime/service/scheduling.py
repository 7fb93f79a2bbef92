"""The scheduling the systemd units give each wam-edge process, for the rigs that start those processes themselves
(`wam-edge hil`, `bench` and `demo`), and an account of what each process really got.

A rig measured with less than the robot's scheduling measures the rig: on a busy machine a normal-priority controller
or simulated robot is starved and the system is blamed. So the rigs order the processes as the units do: the
controller SCHED_FIFO 80 on a core of its own with its memory locked, the simulated G1 next (SCHED_FIFO 70), the
policy runtime at normal priority with the unit's nice. One FIFO priority for every process is worse than none: the
controller would wait behind the others. ``UNITS`` is that table; tests/test_systemd.py checks the units agree.

Applied where the OS permits (CAP_SYS_NICE, RLIMIT_RTPRIO, RLIMIT_MEMLOCK); what was refused is recorded, never
raised. Real-time priority is applied once a process is ready, never during its start-up: a CPU-bound import at a
real-time priority would starve everything else on its core.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from typing import Any, Dict, Iterator, List, Optional, Sequence

#: A 2 ms loop alone in its own process (runtime/bench/reference_loop.py), scheduled like the controller but on the
#: other cores, so a report can tell the machine's jitter from the controller's.
REFERENCE = "reference"
#: The HIL harness's wire monitor (runtime/hil/wire_monitor.py): threads of the harness's own process.
MONITOR = "monitor"


class UnitScheduling:
    """What a unit says: ``policy`` "fifo" (CPUSchedulingPolicy=fifo at ``priority``) or "other"; ``nice`` (Nice=);
    ``cores`` "own" (the controller's CPUAffinity) or "others" (the runtime's); ``memlock`` (LimitMEMLOCK=infinity,
    the process locks its memory itself)."""

    def __init__(self, policy: str, priority: int, nice: Optional[int], cores: str, memlock: bool) -> None:
        self.policy, self.priority, self.nice, self.cores, self.memlock = policy, priority, nice, cores, memlock


#: Per role (the rig's names): the scheduling of its systemd unit (systemd/*.service.in).
UNITS: Dict[str, UnitScheduling] = {
    "controller": UnitScheduling("fifo", 80, -10, "own", True),
    "sim": UnitScheduling("fifo", 70, None, "others", False),
    "runtime": UnitScheduling("other", 0, -5, "others", False),
    REFERENCE: UnitScheduling("fifo", 80, -10, "others", False),
    # not a unit: the HIL harness's wire monitor (the thread that stamps each command, and the DDS threads that
    # deliver them), the rig's own instrument: real-time so that it stamps on time, below everything the units run
    MONITOR: UnitScheduling("fifo", 60, None, "others", False),
}


def core_plan(available: Optional[Sequence[int]] = None) -> Dict[str, List[int]]:
    """The controller's own core (the last one, as the units' default) and the others; with one core, both share it."""
    cpus = sorted(available if available is not None else _affinity())
    if len(cpus) < 2:
        return {"own": cpus, "others": cpus}
    return {"own": cpus[-1:], "others": cpus[:-1]}


def _affinity() -> List[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return []


def _tasks(pid: int) -> List[int]:
    """Every thread of ``pid`` (a process's scheduling is per thread on Linux); just ``pid`` where /proc is absent."""
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return [pid]


def _cpus_text(cpus: Sequence[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


class Placement:
    """How one process of a rig is scheduled: ``spawn()`` starts it with the memory lock limit it inherits, its nice
    and its cores; ``realtime()``, once it is ready, gives every thread the FIFO priority. ``threads()`` does it all
    at once for threads of this process (the HIL wire monitor). ``record()`` is what it got, read back from the
    kernel, with what was refused and why."""

    def __init__(self, role: str, enabled: bool = True, plan: Optional[Dict[str, List[int]]] = None) -> None:
        self.role = role
        self.unit = UNITS[role]
        self.enabled = enabled
        self.cpus = (plan or core_plan())[self.unit.cores] if enabled else []
        self.refused: List[str] = []
        self.pid: Optional[int] = None
        self.got: Optional[Dict[str, Any]] = None  # record() once real-time was applied (the process may end later)

    @contextlib.contextmanager
    def _memlock(self) -> Iterator[None]:
        """RLIMIT_MEMLOCK unlimited for a child spawned inside (it inherits the limit and locks its memory itself, as
        under LimitMEMLOCK=infinity); this process's own limit is restored afterwards."""
        if not (self.enabled and self.unit.memlock):
            yield
            return
        try:
            import resource

            old = resource.getrlimit(resource.RLIMIT_MEMLOCK)
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        except (ImportError, OSError, ValueError) as exc:
            self.refused.append(f"memory lock limit: {_why(exc)}")
            yield
            return
        try:
            yield
        finally:
            try:
                resource.setrlimit(resource.RLIMIT_MEMLOCK, old)
            except (OSError, ValueError):
                pass

    def spawn(self, cmd: Sequence[str], **popen: Any) -> subprocess.Popen:
        """Popen(cmd) with the memory lock limit, then its nice and cores (real-time comes at ``realtime()``)."""
        self.refused, self.got = [], None
        with self._memlock():
            proc = subprocess.Popen(list(cmd), **popen)
        self.pid = proc.pid
        self._nice_and_cores()
        return proc

    def threads(self, tids: Sequence[int]) -> Dict[str, Any]:
        """The role's whole scheduling for these threads of this process, now (``undo()`` gives them back)."""
        self.refused, self.pid = [], os.getpid()
        if self.enabled:
            self._nice_and_cores(tids)
            for tid in tids:
                self._fifo(tid)
        self.got = self.record(tids[0] if tids else None)
        return self.got

    def undo(self, tids: Sequence[int]) -> None:
        """Normal scheduling on every core again for threads given real-time by ``threads()``."""
        if not self.enabled:
            return
        for tid in tids:
            self._try(lambda t=tid: os.sched_setscheduler(t, os.SCHED_OTHER, os.sched_param(0)), "SCHED_OTHER")
            self._try(lambda t=tid: os.sched_setaffinity(t, _affinity() or [0]), "cores")

    def _fifo(self, tid: int) -> None:
        if self.unit.policy == "fifo":
            self._try(lambda: os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(self.unit.priority)),
                      "SCHED_FIFO")

    def _nice_and_cores(self, tids: Optional[Sequence[int]] = None) -> None:
        if not self.enabled or self.pid is None:
            return
        for tid in _tasks(self.pid) if tids is None else tids:
            if self.cpus:
                self._try(lambda t=tid: os.sched_setaffinity(t, self.cpus), "cores")
            if self.unit.nice is not None:
                self._try(lambda t=tid: os.setpriority(os.PRIO_PROCESS, t, self.unit.nice), "nice")

    def realtime(self) -> Dict[str, Any]:
        """Once the process is ready: its unit's FIFO priority for every thread (and the nice and cores again, for
        the threads started since). Returns ``record()``."""
        if self.enabled and self.pid is not None:
            self._nice_and_cores()
            for tid in _tasks(self.pid):
                self._fifo(tid)
        self.got = self.record()
        return self.got

    def _try(self, action, what: str) -> None:
        try:
            action()
        except ProcessLookupError:  # a thread that ended meanwhile
            pass
        except (OSError, AttributeError, ValueError) as exc:
            reason = f"{what}: {_why(exc)}"
            if reason not in self.refused:
                self.refused.append(reason)

    def record(self, tid: Optional[int] = None) -> Dict[str, Any]:
        """What the process got (its main thread, or thread ``tid``, read back), what its unit asks for, and what was
        refused."""
        u = self.unit
        want = f"SCHED_FIFO {u.priority}" if u.policy == "fifo" else "SCHED_OTHER"
        want += ("" if u.nice is None else f", nice {u.nice}") + f", {u.cores} cores"
        want += ", memory locked" if u.memlock else ""
        out: Dict[str, Any] = {"unit": want, "enabled": self.enabled, "refused": list(self.refused)}
        if not self.enabled:
            out["got"] = "as started (demo.scheduling: none)"
            return out
        which = tid if tid is not None else self.pid
        got = read_scheduling(which) if which is not None else {}
        out.update(got)
        out["got"] = describe(got, u.memlock)
        return out


def read_scheduling(pid: int) -> Dict[str, Any]:
    """The policy, priority, nice, cores and locked memory of ``pid``'s main thread; {} when it is gone."""
    out: Dict[str, Any] = {}
    try:
        policy = os.sched_getscheduler(pid)
        out["policy"] = {os.SCHED_FIFO: "SCHED_FIFO", os.SCHED_RR: "SCHED_RR"}.get(policy, "SCHED_OTHER")
        out["priority"] = os.sched_getparam(pid).sched_priority
        out["nice"] = os.getpriority(os.PRIO_PROCESS, pid)
        out["cpus"] = _cpus_text(os.sched_getaffinity(pid))
    except (OSError, AttributeError):
        return {}
    out["locked_kib"] = _vm_locked_kib(pid)
    return out


def _vm_locked_kib(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status", "r", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmLck:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def describe(got: Dict[str, Any], memlock: bool) -> str:
    """One line: "SCHED_FIFO 80, nice -10, cpus 1, memory locked (180 MiB)"."""
    if not got:
        return "unknown (the process is gone)"
    policy = got["policy"] + (f" {got['priority']}" if got["policy"] != "SCHED_OTHER" else "")
    text = f"{policy}, nice {got['nice']}, cpus {got['cpus']}"
    if memlock:
        kib = got.get("locked_kib")
        text += f", memory locked ({kib / 1024:.0f} MiB)" if kib else ", memory not locked"
    return text


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


class Placements:
    """The placements of one rig's processes by role, from ``demo.scheduling`` ("units" or "none")."""

    def __init__(self, mode: str) -> None:
        self.enabled = mode == "units"
        self.plan = core_plan()
        self.by_role: Dict[str, Placement] = {}

    def __getitem__(self, role: str) -> Placement:
        if role not in self.by_role:
            self.by_role[role] = Placement(role, self.enabled, self.plan)
        return self.by_role[role]

    def records(self) -> Dict[str, Dict[str, Any]]:
        """Per role, what it got when it was made real-time (or now, if it never was)."""
        return {role: p.got or p.record() for role, p in self.by_role.items()}
