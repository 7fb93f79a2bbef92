"""HilRig: the processes under test and the handles a fault-injection harness pulls.

The controller and the policy runtime run as real processes (`wam-edge controller`, `wam-edge run`), each with its
own sockets in a private directory, exactly as their systemd units start them; with ``hil.robot: sim`` a simulated
G1 (`wam-edge sim`) runs beside them on the DDS loopback. The rig plays the parts a test bench needs: the person who
arms and clears e-stops, systemd restarting a process, and the hand that pulls cables (signals, the simulator's and
the runtime's fault sockets).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any, Dict, Optional, Sequence

import msgpack
import zmq

from runtime import demo
from runtime.config import Config
from runtime.controller import operator
from runtime.protocol import Reply, sockets
from runtime.service import scheduling

ROLES = ("sim", "controller", "runtime")
_CLI = {"sim": "sim", "controller": "controller", "runtime": "run"}


class RigError(RuntimeError):
    """The rig could not be brought to the state a trial needs (a process would not start, a peer did not answer)."""


def stop_process(p: subprocess.Popen, timeout_s: float) -> int:
    """SIGCONT (a paused process cannot handle SIGTERM), SIGTERM, and SIGKILL after ``timeout_s``; the exit code."""
    if p.poll() is None:
        p.send_signal(signal.SIGCONT)
        p.terminate()
        try:
            p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return p.returncode


class HilRig:
    def __init__(self, cfg: Config, overrides: Sequence[str], workdir: str, with_sim: bool,
                 log_dir: Optional[str] = None) -> None:
        self.cfg = cfg
        self.workdir = workdir
        self.log_dir = log_dir or workdir
        if log_dir:  # --log-dir names where the logs go; a directory that is not there yet is made
            try:
                os.makedirs(log_dir, exist_ok=True)
            except OSError as exc:
                raise RigError(f"cannot create the log directory {log_dir!r}: {exc.strerror or exc}") from None
        self.with_sim = with_sim
        w = workdir
        # with_sim: never a real robot, the simulated G1 on loopback
        own = demo.loop_overrides(w, dds=with_sim) + [
            "controller.driver=dds", "faults.enabled=true", f"faults.endpoint=ipc://{w}/faults"]
        self.overrides = list(overrides) + own
        self.control = f"ipc://{w}/control"
        self.sim_control = f"ipc://{w}/sim"
        self.faults = f"ipc://{w}/faults"
        self.procs: Dict[str, Optional[subprocess.Popen]] = {r: None for r in ROLES}
        self.starts = {r: 0 for r in ROLES}
        self.ctx = zmq.Context.instance()
        self.startup_timeout = cfg["demo"]["startup_timeout_s"]
        # the scheduling each process's systemd unit gives it, where the OS permits (runtime/service/scheduling.py)
        self.placements = scheduling.Placements(cfg["demo"]["scheduling"])

    # -- processes ----------------------------------------------------------------------------------------------

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def log_path(self, role: str) -> str:
        return os.path.join(self.log_dir, f"{role}.log")

    def spawn(self, role: str, wait: bool = True) -> subprocess.Popen:
        """Start ``role`` (its log appended to <workdir>/<role>.log) and, with ``wait``, wait until it is ready."""
        cmd = [sys.executable, "-m", "runtime.cli", _CLI[role]]
        ready = self.path(f"{role}.ready")
        if os.path.exists(ready):
            os.remove(ready)
        if role == "sim":
            cmd += ["--summary", self.path("sim.json")]
        else:
            cmd += ["--report", self.path(f"{role}.json"), "--ready-file", ready]
        log = open(self.log_path(role), "ab")
        try:
            proc = self.placements[role].spawn(cmd + demo.config_args(self.cfg.path, self.overrides), stdout=log,
                                               stderr=subprocess.STDOUT)
        finally:
            log.close()
        self.procs[role] = proc
        self.starts[role] += 1
        if wait:
            self.wait_ready(role)
        return proc

    def wait_ready(self, role: str) -> None:
        proc = self.procs[role]
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if proc is None or proc.poll() is not None:
                raise RigError(f"{role} exited during start-up (code {proc.returncode if proc else None}); "
                               f"see {self.log_path(role)}:\n{self.log_tail(role)}")
            if role == "sim" and self.sim({}, timeout_s=0.2).get("ok") or \
                    role != "sim" and os.path.exists(self.path(f"{role}.ready")):
                self.placements[role].realtime()  # the unit's priority once up, never during start-up
                return
            time.sleep(0.05)
        raise RigError(f"{role} not ready within {self.startup_timeout} s; see {self.log_path(role)}")

    def alive(self, role: str) -> bool:
        p = self.procs[role]
        return p is not None and p.poll() is None

    def signal(self, role: str, sig: int) -> None:
        p = self.procs[role]
        if p is None or p.poll() is not None:
            raise RigError(f"{role} is not running")
        p.send_signal(sig)

    def kill(self, role: str) -> None:
        """kill -9 and reap."""
        self.signal(role, signal.SIGKILL)
        self.procs[role].wait()

    def terminate(self, role: str, timeout_s: float = 15.0) -> Optional[int]:
        p = self.procs[role]
        return None if p is None else stop_process(p, timeout_s)

    def log_tail(self, role: str, lines: int = 15) -> str:
        try:
            with open(self.log_path(role), "rb") as f:
                return b"\n".join(f.read().splitlines()[-lines:]).decode("utf-8", "replace")
        except OSError:
            return ""

    # -- control channels ---------------------------------------------------------------------------------------

    def operator(self, cmd: str, timeout_s: float = 2.0) -> Reply:
        return operator.send(self.control, cmd, "wam-edge hil", timeout_s=timeout_s, ctx=self.ctx)

    def state(self) -> Reply:
        return self.operator("status", timeout_s=1.0)

    def wait_state(self, states: Sequence[str], timeout_s: float) -> Optional[Reply]:
        """The controller's status once it is in one of ``states``; None if it was not within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            reply = self.state()
            if reply.state in states:
                return reply
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)

    def _request(self, endpoint: str, request: Dict[str, Any], timeout_s: float) -> Dict[str, Any]:
        raw = sockets.request(self.ctx, endpoint, msgpack.packb(request, use_bin_type=True), timeout_s)
        if raw is None:
            return {"ok": False, "error": f"no answer from {endpoint} within {timeout_s} s"}
        reply = msgpack.unpackb(raw, raw=False)
        return reply if isinstance(reply, dict) else {"ok": False, "error": "reply is not a map"}

    def sim(self, request: Dict[str, Any], timeout_s: float = 2.0) -> Dict[str, Any]:
        """A request to the simulated G1's fault socket (press, tilt, freeze, summary...)."""
        return self._request(self.sim_control, request, timeout_s)

    def fault(self, name: str, timeout_s: float = 2.0) -> Dict[str, Any]:
        """Inject a fault into the policy runtime (runtime/faults.py), or "none" to clear it."""
        return self._request(self.faults, {"inject": name}, timeout_s)

    def close(self) -> Dict[str, Optional[int]]:
        """The runtime first, then the controller (it brings the robot to a safe state), then the simulator."""
        codes = {}
        for role in ("runtime", "controller", "sim"):
            codes[role] = self.terminate(role)
        return codes
