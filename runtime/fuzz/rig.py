"""The processes under fuzz and the fuzzer's own peers around them: a rig, composed around the real processes.

Processes are the real `wam-edge controller`, `wam-edge run` and `wam-edge sim`, started as their units start them,
each incarnation with its sockets and files in its own private directory (tempfile.mkdtemp, mode 0700), on ipc or
the DDS loopback only. The peers are what the fuzzer plays: the person who arms (and re-arms after a stop), a proxy
that forwards the runtime's chunks to the controller (and keeps copies to replay), a stand-in for the controller's
robot-state publisher and a camera publisher (both interleave valid messages with the malformed ones), and a
requester for REP sockets. Every peer is non-blocking and pumped from one loop: no threads.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Set, Tuple

import msgpack
import numpy as np
import zmq

from runtime import demo
from runtime.config import Config, ConfigError, load_config
from runtime.hil.rig import stop_process
from runtime.protocol import (
    Command,
    DecodeError,
    Frame,
    RobotState,
    decode,
    encode_command,
    encode_frame,
    encode_state,
)
from runtime.robot import g1

_CLI = {"sim": "sim", "controller": "controller", "runtime": "run"}


class FuzzError(RuntimeError):
    """The rig cannot run as asked (an endpoint that is not loopback, a process that does not start)."""


def rss_kb(pid: int) -> Optional[int]:
    """VmRSS of a process in kB (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/status", "r", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class Proc:
    """One process of the rig, its log, report and ready file."""

    def __init__(self, role: str, popen: subprocess.Popen, log_path: str, report_path: str, ready_path: str) -> None:
        self.role = role
        self.popen = popen
        self.log_path = log_path
        self.report_path = report_path
        self.ready_path = ready_path
        self.rss_start: Optional[int] = None
        self.stopped_by_rig = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    def exit_code(self) -> Optional[int]:
        return self.popen.poll()

    def log_tail(self, lines: int = 12) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 16384))
                return b"\n".join(f.read().splitlines()[-lines:]).decode("utf-8", "replace")
        except OSError:
            return ""

    def report(self) -> Dict[str, Any]:
        import json

        try:
            with open(self.report_path, "r", encoding="utf-8") as f:
                out = json.load(f)
            return out if isinstance(out, dict) else {}
        except (OSError, ValueError):
            return {}


def check_loopback(cfg: Config, workdir: str, roles: Sequence[str]) -> None:
    """Refuse anything that is not this machine: every endpoint ipc:// inside the rig's own directory or a loopback
    tcp://, DDS only on lo, and a controller that drives the in-process simulated G1 or `wam-edge sim` on lo."""
    def ok(endpoint: str) -> bool:
        if endpoint.startswith("ipc://"):
            path = endpoint[len("ipc://"):]
            return not path.startswith("@") and os.path.realpath(path).startswith(os.path.realpath(workdir) + os.sep)
        if endpoint.startswith("tcp://"):
            host = endpoint[6:].rsplit(":", 1)[0].strip("[]")
            return host in ("127.0.0.1", "::1", "localhost")
        return False

    endpoints = {"transport.chunks": cfg["transport"]["chunks"], "transport.state": cfg["transport"]["state"],
                 "transport.control": cfg["transport"]["control"], "sim.control": cfg["sim"]["control"]}
    if cfg["faults"]["enabled"]:
        endpoints["faults.endpoint"] = cfg["faults"]["endpoint"]
    if cfg["camera"]["source"] in ("image_server", "raw_zmq"):
        endpoints["camera.endpoint"] = cfg["camera"]["endpoint"]
    bad = {k: v for k, v in endpoints.items() if not ok(v)}
    if bad:
        raise FuzzError(f"wam-edge fuzz runs on loopback only; refusing {bad}")
    uses_dds = "sim" in roles or ("controller" in roles and cfg["controller"]["driver"] == "dds")
    if uses_dds and cfg["dds"]["interface"] != "lo":
        raise FuzzError(f"wam-edge fuzz runs on loopback only; refusing dds.interface={cfg['dds']['interface']!r}")
    if cfg["controller"]["driver"] == "dds" and "controller" in roles and "sim" not in roles:
        raise FuzzError("wam-edge fuzz never drives a robot: a DDS controller needs the rig's own `wam-edge sim`")


class Incarnation:
    """One start of a target's processes, in its own private directory."""

    def __init__(self, cfg: Config, overrides: Sequence[str], role_overrides: Dict[str, List[str]],
                 roles: Sequence[str], log_dir: Optional[str], name: str, startup_timeout: float) -> None:
        import tempfile

        self.dir = tempfile.mkdtemp(prefix="wam-edge-fuzz-")  # mode 0700, ours
        self.roles = list(roles)
        self.cfg = cfg
        self.base = list(overrides)
        self.role_overrides = role_overrides
        self.log_dir = log_dir or self.dir
        self.name = name  # target and incarnation number: names its logs
        self.startup_timeout = startup_timeout
        self.procs: Dict[str, Proc] = {}

    def endpoint(self, name: str) -> str:
        return f"ipc://{self.dir}/{name}"

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def overrides_for(self, role: str) -> List[str]:
        return self.base + self.role_overrides.get(role, [])

    def check(self) -> None:
        """Each role's effective configuration, checked for loopback before anything starts."""
        for role in self.roles:
            try:
                cfg = load_config(self.cfg.path, self.overrides_for(role))
            except ConfigError as exc:
                raise FuzzError(f"configuration for the {role}: {exc}") from None
            check_loopback(cfg, self.dir, self.roles)

    def spawn(self, role: str) -> Proc:
        cmd = [sys.executable, "-m", "runtime.cli", _CLI[role]]
        tag = f"{self.name}.{role}"
        report = self.path(f"{tag}.json")
        ready = self.path(f"{tag}.ready")
        if role == "sim":
            cmd += ["--summary", report]
        else:
            cmd += ["--report", report, "--ready-file", ready]
        log_path = os.path.join(self.log_dir, f"{tag}.log")
        log = open(log_path, "ab")
        try:
            popen = subprocess.Popen(cmd + demo.config_args(self.cfg.path, self.overrides_for(role)), stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            log.close()
        proc = Proc(role, popen, log_path, report, ready)
        self.procs[role] = proc
        return proc

    def wait_ready(self, role: str, is_ready: Optional[Callable[[], bool]] = None,
                   pump: Optional[Callable[[], None]] = None) -> None:
        proc = self.procs[role]
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            code = proc.exit_code()
            if code is not None:
                raise FuzzError(f"{role} {describe_exit(code)} during start-up; {proc.log_path}:\n{proc.log_tail()}")
            if (is_ready() if is_ready is not None else os.path.exists(proc.ready_path)):
                return
            if pump is not None:
                pump()
            time.sleep(0.02)
        raise FuzzError(f"{role} not ready within {self.startup_timeout} s; see {proc.log_path}")

    def dead(self) -> Optional[Proc]:
        for proc in self.procs.values():
            if not proc.stopped_by_rig and proc.exit_code() is not None:
                return proc
        return None

    def rss(self) -> Dict[str, Optional[int]]:
        return {role: rss_kb(p.pid) for role, p in self.procs.items() if p.exit_code() is None}

    def stop(self, timeout_s: float = 15.0) -> Dict[str, Optional[int]]:
        """The runtime first, then the controller (it brings the robot to a safe state), then the simulator."""
        codes: Dict[str, Optional[int]] = {}
        for role in ("runtime", "controller", "sim"):
            proc = self.procs.get(role)
            if proc is None:
                continue
            proc.stopped_by_rig = True
            codes[role] = stop_process(proc.popen, timeout_s)
        return codes

    def remove(self) -> None:
        """The private directory goes (its logs too, unless --log-dir put them elsewhere: crash logs' tails are in
        the report)."""
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# peers


def _socket(ctx: zmq.Context, kind: int, sndhwm: int = 1000, rcvhwm: int = 1000) -> zmq.Socket:
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, sndhwm)
    s.setsockopt(zmq.RCVHWM, rcvhwm)
    return s


class Requester:
    """Requests to a REP socket without blocking: a DEALER, so that any frames can be sent (a REQ would refuse a
    multipart request's shape and block after a lost reply), several in flight if asked (a REP answers them in
    order). ``poll()`` returns the oldest request's reply frames; ``tag`` is then what that request was sent with."""

    def __init__(self, zctx: zmq.Context, endpoint: str) -> None:
        self.endpoint = endpoint
        self.sock = _socket(zctx, zmq.DEALER, 16, 16)
        self.sock.connect(endpoint)
        self.outstanding: Deque[Tuple[float, Any]] = collections.deque()
        self.tag: Any = None

    @property
    def waiting(self) -> bool:
        return bool(self.outstanding)

    @property
    def sent_at(self) -> Optional[float]:
        """When the oldest request without a reply was sent."""
        return self.outstanding[0][0] if self.outstanding else None

    def send(self, frames: Sequence[bytes], tag: Any = None) -> bool:
        try:
            self.sock.send_multipart([b""] + list(frames), zmq.NOBLOCK)
        except zmq.Again:
            return False
        self.outstanding.append((time.monotonic(), tag))
        return True

    def poll(self) -> Optional[List[bytes]]:
        try:
            parts = self.sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return None
        self.tag = self.outstanding.popleft()[1] if self.outstanding else None
        return parts[1:] if parts and parts[0] == b"" else parts

    def close(self) -> None:
        self.sock.close(0)


def decode_operator_reply(frames: Sequence[bytes]) -> Tuple[Optional[bool], str, str, bool]:
    """(ok, state, detail, readable) of an operator reply; readable is False when the client could not decode it."""
    if len(frames) != 1:
        return None, "", f"{len(frames)}-part reply", False
    try:
        r = decode(frames[0], ("reply",), 4096)
    except DecodeError as err:
        try:
            raw = msgpack.unpackb(frames[0], raw=False)
            ok = raw.get("ok") if isinstance(raw, dict) else None
            state = raw.get("state", "") if isinstance(raw, dict) else ""
        except Exception:  # noqa: BLE001 - not msgpack at all
            ok, state = None, ""
        return (ok if isinstance(ok, bool) else None), str(state)[:64], f"unreadable reply ({err.reason})", False
    return r.ok, r.state, r.detail, True


def decode_map_reply(frames: Sequence[bytes]) -> Tuple[Optional[bool], Dict[str, Any]]:
    """(ok, reply map) of a fault-socket or simulator reply."""
    if len(frames) != 1:
        return None, {}
    try:
        reply = msgpack.unpackb(frames[0], raw=False)
    except Exception:  # noqa: BLE001 - not msgpack
        return None, {}
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        return None, {}
    return reply["ok"], reply


class ControllerWatch:
    """Subscribes to the controller's robot-state PUB: proof that its loop ticks, the newest stamp and pose (what a
    valid-looking chunk must answer), and how long it was driving."""

    def __init__(self, zctx: zmq.Context, endpoint: str, on_state: Callable[[float, np.ndarray], None]) -> None:
        self.sock = _socket(zctx, zmq.SUB, rcvhwm=100)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoint)
        self.on_state = on_state
        self.last_at: Optional[float] = None
        self.safety = "unknown"
        self.states = 0
        self.driving_s = 0.0

    def pump(self, now: float) -> None:
        for _ in range(200):
            try:
                raw = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                st = decode(raw, ("state",))
            except DecodeError:
                continue
            if self.last_at is not None and self.safety in ("running", "holding"):
                self.driving_s += min(now - self.last_at, 0.1)
            self.last_at = now
            self.safety = st.safety
            self.states += 1
            self.on_state(st.stamp, st.q)

    def close(self) -> None:
        self.sock.close(0)


class Arming:
    """The person: arms the controller, re-arms it whenever a stop left it safe (so the fuzz runs while driving),
    clears an e-stop that the fuzz caused (counted: that is a finding), and asks for status in between."""

    POLL_S = 0.2
    REARM_S = 0.5

    def __init__(self, zctx: zmq.Context, endpoint: str, stall_s: float) -> None:
        self.zctx = zctx
        self.endpoint = endpoint
        self.req = Requester(zctx, endpoint)  # a fresh one per request (see targets.RepClient)
        self.stall_s = stall_s
        self.want_driving = False
        self.state = "unknown"
        self.detail = ""
        self.replied_at: Optional[float] = None
        self.next_at = 0.0
        self.last_arm = -1e9
        self.pending = ""
        self.arms = 0
        self.estops_cleared = 0
        self.refused: Dict[str, int] = {}
        self.reasons: List[Tuple[str, str]] = []  # (state, reason) as the status replies said, when they changed
        self._seen: Optional[Tuple[str, str]] = None

    def pump(self, now: float) -> None:
        if self.req.waiting:
            frames = self.req.poll()
            if frames is None:
                return
            ok, state, detail, _ = decode_operator_reply(frames)
            self.replied_at = now
            if self.pending in ("arm", "clear_estop") and not ok:
                self.refused[detail[:80]] = self.refused.get(detail[:80], 0) + 1
            if self.pending == "arm" and ok:
                self.arms += 1
            if self.pending == "clear_estop" and ok:
                self.estops_cleared += 1
            self.state, self.detail = state, detail
            if (state, detail) != self._seen:
                self._seen = (state, detail)
                if len(self.reasons) < 10000:
                    self.reasons.append((state, detail))
            return
        if now < self.next_at:
            return
        cmd = "status"
        if self.want_driving and now - self.last_arm >= self.REARM_S:
            if self.state == "estop":
                cmd = "clear_estop"
                self.last_arm = now
            elif self.state in ("idle", "stopped"):
                cmd = "arm"
                self.last_arm = now
        self.req.close()
        self.req = Requester(self.zctx, self.endpoint)
        if self.req.send([encode_command(Command(cmd, "wam-edge fuzz rig"))]):
            self.pending = cmd
            self.next_at = now + (0.02 if cmd != "status" else self.POLL_S)

    def stalled(self, now: float) -> Optional[str]:
        if self.req.sent_at is not None and now - self.req.sent_at > self.stall_s:
            return f"operator socket: no answer for {now - self.req.sent_at:.1f} s"
        return None

    def close(self) -> None:
        self.req.close()


class ChunkProxy:
    """Between the runtime and the controller: forwards the runtime's chunks and heartbeats, counts them, and keeps
    copies of its chunks for byte-exact replays."""

    def __init__(self, zctx: zmq.Context, listen: str, forward: str, on_chunk: Callable[[bytes], None]) -> None:
        self.pull = _socket(zctx, zmq.PULL, rcvhwm=100)
        self.pull.bind(listen)
        self.push = _socket(zctx, zmq.PUSH, sndhwm=100)
        self.push.connect(forward)
        self.on_chunk = on_chunk
        self.chunks = 0
        self.last_chunk_at: Optional[float] = None
        self.heartbeats = 0
        self.sessions: Set[str] = set()
        self.lost = 0
        self._pending: List[bytes] = []

    def pump(self, now: float) -> None:
        while self._pending:
            try:
                self.push.send(self._pending[0], zmq.NOBLOCK)
            except zmq.Again:
                break
            del self._pending[0]
        for _ in range(50):
            try:
                raw = self.pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = decode(raw, ("chunk", "heartbeat"))
            except DecodeError:
                msg = None
            if msg is not None and hasattr(msg, "actions"):
                self.chunks += 1
                self.last_chunk_at = now
                self.sessions.add(msg.session)
                self.on_chunk(raw)
            elif msg is not None:
                self.heartbeats += 1
                self.sessions.add(msg.session)
            if len(self._pending) < 100:
                self._pending.append(raw)
            else:
                self.lost += 1
        return

    def close(self) -> None:
        self.pull.close(0)
        self.push.close(0)


class StandInController:
    """Plays the controller for a runtime started on its own: binds the robot-state PUB (valid states at 100 Hz,
    each stamp remembered) and the chunk PULL (the runtime's chunks and heartbeats). A chunk whose obs_stamp is not
    one of the valid stamps answers a state the fuzzer sent as malformed: applied."""

    STATE_PERIOD = 0.01

    def __init__(self, zctx: zmq.Context, state_endpoint: str, chunks_endpoint: str,
                 classify: Callable[[float], str]) -> None:
        self.pub = _socket(zctx, zmq.PUB, sndhwm=10000)
        self.pub.bind(state_endpoint)
        self.pull = _socket(zctx, zmq.PULL, rcvhwm=1000)
        self.pull.bind(chunks_endpoint)
        self.classify = classify
        self.q = g1.NOMINAL_POSE.astype(np.float32)
        self.dq = np.zeros(g1.NUM_JOINTS, dtype=np.float32)
        self.valid_stamps: Set[float] = set()
        self.next_state = 0.0
        self.seq = 0
        self.chunks = 0
        self.heartbeats = 0
        self.last_chunk_at: Optional[float] = None
        self.last_answered = 0.0  # the newest valid state stamp a chunk answered (time.monotonic() of its sending)
        self.last_frame = 0.0  # the newest frame a chunk used (the runtime's receipt time: the same clock here)
        self.last_heartbeat_at: Optional[float] = None
        self.health = "unknown"
        self.health_detail = ""
        self.applied: Dict[str, int] = {}
        self.bad_output = 0

    def publish(self, frames: Sequence[bytes]) -> None:
        """A malformed message, on the same PUB (a PUB drops what its subscriber's queue cannot take)."""
        self.pub.send_multipart(list(frames), zmq.NOBLOCK)

    def pump(self, now: float) -> None:
        if now >= self.next_state:
            self.next_state = max(self.next_state + self.STATE_PERIOD, now)
            self.seq += 1
            stamp = time.monotonic()
            self.valid_stamps.add(stamp)
            self.pub.send(encode_state(RobotState(self.seq, stamp, "running", self.q, self.dq, "fuzz rig")),
                          zmq.NOBLOCK)
        for _ in range(100):
            try:
                raw = self.pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = decode(raw, ("chunk", "heartbeat"))
            except DecodeError:
                self.bad_output += 1
                continue
            if hasattr(msg, "actions"):
                self.chunks += 1
                self.last_chunk_at = now
                if msg.obs_stamp not in self.valid_stamps:
                    cls = self.classify(msg.obs_stamp)
                    self.applied[cls] = self.applied.get(cls, 0) + 1
                elif msg.obs_stamp > self.last_answered:
                    self.last_answered = msg.obs_stamp
                if msg.frame_stamp > self.last_frame:
                    self.last_frame = msg.frame_stamp
            else:
                self.heartbeats += 1
                self.last_heartbeat_at = now
                self.health, self.health_detail = msg.health, msg.detail

    def stalled(self, now: float, since: float, stall_s: float) -> Optional[str]:
        hb = self.last_heartbeat_at if self.last_heartbeat_at is not None else since
        if now - max(hb, since) > stall_s:
            return f"runtime: no heartbeat for {now - max(hb, since):.1f} s"
        ch = self.last_chunk_at if self.last_chunk_at is not None else since
        if now - max(ch, since) > stall_s:
            return (f"runtime: no chunk for {now - max(ch, since):.1f} s although valid robot state and frames "
                    f"arrive (health {self.health}: {self.health_detail[:120]})")
        return None

    def close(self) -> None:
        self.pub.close(0)
        self.pull.close(0)


class CameraPublisher:
    """Plays a camera for a runtime whose camera.source is image_server (JPEG) or raw_zmq (frame messages): valid
    frames at ``fps``, counted, on the PUB the malformed ones go out on too."""

    def __init__(self, zctx: zmq.Context, endpoint: str, kind: str, cameras: Sequence[Tuple[str, int]],
                 height: int, fps: float = 30.0) -> None:
        self.pub = _socket(zctx, zmq.PUB, sndhwm=10000)
        self.pub.bind(endpoint)
        self.kind = kind
        self.period = 1.0 / fps
        self.next_at = 0.0
        self.valid_sent = 0
        self.seq = 0
        width = sum(w for _, w in cameras)
        canvas = np.zeros((height, width, 3), dtype=np.uint8)
        canvas[:, :, 2] = 90
        if kind == "jpeg":
            import simplejpeg

            self._payload = simplejpeg.encode_jpeg(canvas, quality=80, colorspace="RGB")
        else:
            x = 0
            images = {}
            for name, w in cameras:
                images[name] = np.ascontiguousarray(canvas[:, x:x + w])
                x += w
            self._images = images
            self._payload = b""

    def publish(self, frames: Sequence[bytes]) -> None:
        """A malformed message, on the same PUB (a PUB drops what its subscriber's queue cannot take)."""
        self.pub.send_multipart(list(frames), zmq.NOBLOCK)

    def pump(self, now: float) -> None:
        if now < self.next_at:
            return
        self.next_at = max(self.next_at + self.period, now)
        self.seq += 1
        payload = self._payload if self.kind == "jpeg" else encode_frame(Frame(self.seq, now, self._images))
        self.pub.send(payload, zmq.NOBLOCK)
        self.valid_sent += 1

    def close(self) -> None:
        self.pub.close(0)
