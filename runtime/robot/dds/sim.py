"""SimulatedG1Dds: a simulation, not the robot. A stand-in G1 on the real DDS topics, in its own process or thread.

It subscribes rt/lowcmd and rt/arm_sdk, drops commands with a bad CRC (counted, as the robot does), and in
rt/lowcmd also those whose mode_machine is not its own (reports say the robot ignores them; Unitree's arm_sdk
example sends 0, so rt/arm_sdk is not checked). It publishes rt/lowstate at ``rate_hz`` with an increasing tick,
its mode_machine, IMU, motor temperatures and a wireless-remote field whose buttons a test can press.

Dynamics (no contact, no gravity, not physics): a joint with kp > 0 follows its target with a first-order lag;
kp = 0 and kd > 0 damps its velocity to rest; a disabled joint (mode 0, or kp = kd = 0) is limp and, with no gravity,
coasts to a stop. Before any command, and for the legs while rt/arm_sdk is in use, "Unitree's controller" holds the
nominal pose; rt/arm_sdk's targets blend with that hold by the weight in motor_cmd[29].q. The first valid rt/lowcmd
puts it in debug mode for good: rt/lowcmd then owns every joint, and its last command persists (no firmware watchdog
is documented, so none is simulated).

Every received command is recorded (counts, a ring of the last ``log_size`` commands, running worst cases) so a
fault-injection harness can check afterwards that nothing unsafe was ever published: see ``summary()``. Position
steps are judged by what they command, not by the targets alone (runtime/hil/judge.py, ``authority``).

Control socket (optional, ``control`` = a ZeroMQ endpoint such as ``ipc:///tmp/g1sim.ipc``): REP, one msgpack map
per request, answered with a msgpack map ({"ok": true, ...} or {"ok": false, "error": ...}). Keys, all optional,
applied in this order:
  "press": [button names]        buttons held from now on (replaces; [] releases all; names in remote.BUTTONS)
  "sticks": {"lx": f, ...}       stick values (lx, rx, ry, l2, ly)
  "tilt": [roll, pitch, yaw]     IMU attitude, rad
  "gyro": [x, y, z]              IMU angular velocity, rad/s
  "temperature": t or [29 t]     winding temperature, deg C (casing follows 10 degrees lower)
  "freeze": bool                 stop / resume publishing rt/lowstate (lost robot state)
  "mode_machine": n              the mode_machine it publishes and expects
  "pose": {joint: rad, ...}      put these joints at rest there (G1 joint names, within the joint limits; the
                                 others stay), and make it Unitree's hold pose: a robot far from where a policy
                                 starts (arms hanging in zero torque). Not a command: nothing on the wire steps
  "summary": true or {"since": t}  answer includes "summary" (see summary(); with "since", the publishing gaps over
                                 GAP_FLOOR_S since then: how long the simulator itself was starved)
  "stop": true                   end the run
Every reply carries "t", the time.monotonic() at which the request took effect (a harness's fault time).
A request is checked whole before any of it is applied (``parse_control``): a malformed one (not msgpack, not a map,
an unknown key, a value of the wrong type or range) and a multipart one are answered {"ok": false, "error": ...},
change nothing, and are counted in the summary's "control_rejected" (by reason).
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import msgpack
import numpy as np

from runtime.hil.judge import ARM_SDK_TOPIC_ID, LOWCMD_TOPIC_ID, authority
from runtime.metrics import GapLog
from runtime.protocol.codec import RejectCounter
from runtime.robot import g1
from runtime.robot.dds import transport
from runtime.robot.dds.cdr_buffers import LowCmdBuffer, LowStateBuffer
from runtime.robot.dds.unitree_hg import LowCmd_, LowState_
from runtime.robot.imu import quaternion_from_rpy
from runtime.robot.remote import BUTTONS, REMOTE_BYTES, STICKS, encode_remote
from runtime.robot.sim_g1 import G1Physics

log = logging.getLogger("wam_edge.sim")

_N = g1.NUM_JOINTS
_UPPER = g1.UPPER_BODY_MASK
_TOPIC_NAMES = ("lowcmd", "arm_sdk")

#: publishing gaps longer than this are recorded (GapLog): a rig asks whether its simulated robot starved (docs/hil.md)
GAP_FLOOR_S = 0.005

CONTROL_KEYS = ("press", "sticks", "tilt", "gyro", "temperature", "freeze", "mode_machine", "pose", "summary",
                "stop")


class ControlError(ValueError):
    """A control request refused whole: nothing of it is applied. The message is short and echoes no payload."""


def _short(value: Any) -> str:
    """A value named in an error: a short string shown (cut), anything else by its type only."""
    if isinstance(value, str):
        return repr(value[:32]) + ("..." if len(value) > 32 else "")
    return type(value).__name__


def _finite(value: Any, what: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):
        raise ControlError(f"{what}: expected a finite number, got {_short(value)}")
    return float(value)


def _vector(value: Any, n: int, what: str) -> List[float]:
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise ControlError(f"{what}: expected {n} numbers, got {_short(value)}")
    return [_finite(v, what) for v in value]


def _flag(value: Any, what: str) -> bool:
    if type(value) is not bool:
        raise ControlError(f"{what}: expected true or false, got {_short(value)}")
    return value


def _pose(value: Any) -> Dict[str, float]:
    if not isinstance(value, dict) or not value or len(value) > _N:
        raise ControlError(f"pose: expected a map of 1 to {_N} G1 joint names to rad, got {_short(value)}")
    out: Dict[str, float] = {}
    for name, rad in value.items():
        if not isinstance(name, str) or name not in g1.JOINT_INDEX:
            raise ControlError(f"pose: {_short(name)} is not a G1 joint name")
        i = g1.JOINT_INDEX[name]
        out[name] = _finite(rad, f"pose.{name}")
        if not g1.POSITION_MIN[i] <= out[name] <= g1.POSITION_MAX[i]:
            raise ControlError(f"pose.{name}: {out[name]:g} rad lies outside the joint's limits "
                               f"[{g1.POSITION_MIN[i]:g}, {g1.POSITION_MAX[i]:g}]")
    return out


def check_control(request: Any) -> Dict[str, Any]:
    """A control request as a map of checked, normalised values, or ControlError naming the first thing wrong."""
    if not isinstance(request, dict):
        raise ControlError(f"a control request is a map, got {_short(request)}")
    unknown = [k for k in request if k not in CONTROL_KEYS]
    if unknown:
        raise ControlError("unknown control keys: " + ", ".join(sorted(_short(k) for k in unknown[:8])))
    out: Dict[str, Any] = {}
    if "press" in request:
        press = request["press"]
        if not isinstance(press, list) or not all(isinstance(b, str) and b in BUTTONS for b in press):
            raise ControlError(f"press: expected a list of button names ({', '.join(BUTTONS)})")
        out["press"] = list(press)
    if "sticks" in request:
        sticks = request["sticks"]
        if not isinstance(sticks, dict) or not all(isinstance(k, str) and k in STICKS for k in sticks):
            raise ControlError(f"sticks: expected a map of stick names ({', '.join(STICKS)}) to numbers")
        out["sticks"] = {k: _finite(v, f"sticks.{k}") for k, v in sticks.items()}
    for key in ("tilt", "gyro"):
        if key in request:
            out[key] = _vector(request[key], 3, key)
    if "temperature" in request:
        t = request["temperature"]
        out["temperature"] = _vector(t, _N, "temperature") if isinstance(t, (list, tuple)) else \
            _finite(t, "temperature")
    for key in ("freeze", "stop"):
        if key in request:
            out[key] = _flag(request[key], key)
    if "mode_machine" in request:
        m = request["mode_machine"]
        if type(m) is not int or not 0 <= m <= 255:
            raise ControlError(f"mode_machine: expected an integer in [0, 255], got {_short(m)}")
        out["mode_machine"] = m
    if "pose" in request:
        out["pose"] = _pose(request["pose"])
    if "summary" in request:
        summary = request["summary"]
        if isinstance(summary, dict):
            if set(summary) - {"since"}:
                raise ControlError("summary: a map takes only 'since'")
            out["summary"] = {"since": _finite(summary["since"], "summary.since") if "since" in summary else None}
        elif type(summary) is bool:
            out["summary"] = summary
        else:
            raise ControlError(f"summary: expected true or {{'since': t}}, got {_short(summary)}")
    return out


def parse_control(raw: bytes) -> Dict[str, Any]:
    """One control request (msgpack bytes) -> the checked map, or ControlError."""
    try:
        request = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # noqa: BLE001 - msgpack raises several types (ValueError, ExtraData, ...)
        raise ControlError(f"not a msgpack request ({type(exc).__name__})") from None
    return check_control(request)


def _packed_refusal(reason: str) -> bytes:
    return msgpack.packb({"ok": False, "error": reason}, use_bin_type=True)


class CommandLog:
    """What the simulator received: counts, running worst cases, and a ring of the last ``size`` commands.
    Steps between consecutive valid commands per topic: ``max_step`` effective (|q - previous q| weighted by the
    ``authority`` of the command making it: what the velocity limit bounds), ``max_target_step`` of the targets alone
    (a re-arm at weight 0 jumps there, rightly: with no authority the targets start where the robot is)."""

    def __init__(self, size: int = 10000) -> None:
        self.size = size
        self.t = np.zeros(size)
        self.topic = np.zeros(size, dtype=np.int8)
        self.crc_ok = np.zeros(size, dtype=bool)
        self.applied = np.zeros(size, dtype=bool)
        self.q = np.zeros((size, _N), dtype=np.float32)
        self.kp = np.zeros((size, _N), dtype=np.float32)
        self.kd = np.zeros((size, _N), dtype=np.float32)
        self.weight = np.zeros(size, dtype=np.float32)
        self.n = 0  # commands received in total (ring index = n % size)
        self.counts = [0, 0]  # per topic
        self.bad_crc = 0
        self.wrong_mode_machine = 0
        self.non_finite = 0
        self.out_of_limits = 0
        self.max_step = np.zeros((2, _N))  # per topic: max effective step over consecutive valid commands
        self.max_target_step = np.zeros((2, _N))  # per topic: max |q - previous q|, whatever the authority
        self._prev_q = np.zeros((2, _N))
        self._have_prev = [False, False]
        self._step = np.zeros(_N)
        self._auth = np.zeros(_N)

    def record(self, t: float, topic: int, cmd: LowCmdBuffer, crc_ok: bool, applied: bool, finite: bool) -> None:
        i = self.n % self.size
        self.n += 1
        self.counts[topic] += 1
        self.t[i] = t
        self.topic[i] = topic
        self.crc_ok[i] = crc_ok
        self.applied[i] = applied
        self.q[i] = cmd.q[:_N]
        self.kp[i] = cmd.kp[:_N]
        self.kd[i] = cmd.kd[:_N]
        self.weight[i] = cmd.q[g1.ARM_SDK_WEIGHT_SLOT]
        if not crc_ok:
            self.bad_crc += 1
            return
        if not finite:
            self.non_finite += 1
            return
        joints = _UPPER if topic == ARM_SDK_TOPIC_ID else slice(None)
        q = cmd.q[:_N]
        if np.any((q < g1.POSITION_MIN)[joints] | (q > g1.POSITION_MAX)[joints]):
            self.out_of_limits += 1
        if self._have_prev[topic]:
            step = self._step
            np.subtract(q, self._prev_q[topic], out=step)
            np.abs(step, out=step)
            if topic == ARM_SDK_TOPIC_ID:
                step[~_UPPER] = 0.0
            np.maximum(self.max_target_step[topic], step, out=self.max_target_step[topic])
            step *= authority(cmd.kp[:_N], cmd.q[g1.ARM_SDK_WEIGHT_SLOT], topic == ARM_SDK_TOPIC_ID, self._auth)
            np.maximum(self.max_step[topic], step, out=self.max_step[topic])
        self._prev_q[topic] = q
        self._have_prev[topic] = True

    def first_after(self, since: float) -> Optional[float]:
        """Receipt time of the first command at or after ``since`` (time.monotonic(), any process on this host)."""
        t = self._ring_times()
        later = t[t >= since]
        return float(later.min()) if len(later) else None

    def _ring_times(self) -> np.ndarray:
        return self.t[:min(self.n, self.size)]

    def summary(self, since: Optional[float] = None) -> Dict[str, Any]:
        """JSON-safe account of every command received (worst cases over all, times over the ring)."""
        t = self._ring_times()
        out: Dict[str, Any] = {
            "commands": self.n,
            "lowcmd": self.counts[LOWCMD_TOPIC_ID],
            "arm_sdk": self.counts[ARM_SDK_TOPIC_ID],
            "bad_crc": self.bad_crc,
            "wrong_mode_machine": self.wrong_mode_machine,
            "non_finite": self.non_finite,
            "out_of_limits": self.out_of_limits,
            # effective steps: weighted by the authority the blend weight or the gains give (hil/judge.py)
            "max_q_step": [float(x) for x in self.max_step.max(axis=0)],
            "max_q_step_lowcmd": [float(x) for x in self.max_step[LOWCMD_TOPIC_ID]],
            "max_q_step_arm_sdk": [float(x) for x in self.max_step[ARM_SDK_TOPIC_ID]],
            # the targets alone, whatever the authority (a re-arm at weight 0 jumps to where the robot is)
            "max_target_step_lowcmd": [float(x) for x in self.max_target_step[LOWCMD_TOPIC_ID]],
            "max_target_step_arm_sdk": [float(x) for x in self.max_target_step[ARM_SDK_TOPIC_ID]],
            "first_command_t": float(t.min()) if len(t) else None,
            "last_command_t": float(t.max()) if len(t) else None,
            "logged": int(len(t)),
        }
        if since is not None:
            out["since"] = since
            out["first_command_after"] = self.first_after(since)
            out["commands_after"] = int(np.count_nonzero(t >= since))
        return out

    def window(self, since: float, until: Optional[float] = None) -> Dict[str, np.ndarray]:
        """Copies of the logged commands received in [since, until], oldest first, plus the newest one before
        ``since`` on each topic (flag ``before``): what a harness needs to judge each command against the previous.
        Keys: t, topic, crc_ok, applied, q, kp, kd, weight, before."""
        m = min(self.n, self.size)
        order = (np.arange(self.n - m, self.n) % self.size)  # ring slots, oldest first
        t = self.t[order]
        keep = t >= since
        if until is not None:
            keep &= t <= until
        for topic in (LOWCMD_TOPIC_ID, ARM_SDK_TOPIC_ID):  # the newest valid command before the window, per topic
            earlier = np.flatnonzero((t < since) & (self.topic[order] == topic) & self.crc_ok[order])
            if len(earlier):
                keep[earlier[-1]] = True
        sel = order[keep]
        return {"t": self.t[sel], "topic": self.topic[sel], "crc_ok": self.crc_ok[sel], "applied": self.applied[sel],
                "q": self.q[sel], "kp": self.kp[sel], "kd": self.kd[sel], "weight": self.weight[sel],
                "before": self.t[sel] < since}

    def last(self, k: int = 1) -> List[Dict[str, Any]]:
        """The last ``k`` commands, oldest first (for tests)."""
        out = []
        for n in range(max(self.n - min(k, self.size), 0), self.n):
            i = n % self.size
            out.append({"t": float(self.t[i]), "topic": _TOPIC_NAMES[self.topic[i]], "crc_ok": bool(self.crc_ok[i]),
                        "applied": bool(self.applied[i]), "q": self.q[i].tolist(), "kp": self.kp[i].tolist(),
                        "kd": self.kd[i].tolist(), "weight": float(self.weight[i])})
        return out


class SimulatedG1Dds:
    """A simulation, not the robot: a G1 stand-in on rt/lowcmd, rt/arm_sdk and rt/lowstate.

    ``start()`` runs it in a thread of this process; ``run(seconds)`` in the calling thread (``main`` does that in
    its own process). The setters (press, set_tilt, ...) are safe to call from another thread.
    """

    def __init__(self, domain_id: int = 1, interface: Optional[str] = "lo", rate_hz: float = 500.0,
                 mode_machine: int = 5, loopback: Optional[bool] = None, time_constant_s: float = 0.03,
                 log_size: int = 10000, control: Optional[str] = None) -> None:
        self.rate_hz = rate_hz
        self.participant = transport.open_participant(domain_id, interface, loopback)
        self._readers = (transport.reader(self.participant, transport.LOWCMD_TOPIC, LowCmd_, depth=64),
                         transport.reader(self.participant, transport.ARM_SDK_TOPIC, LowCmd_, depth=64))
        self._writer = transport.writer(self.participant, transport.LOWSTATE_TOPIC, LowState_)
        self.log = CommandLog(log_size)
        self.state = LowStateBuffer()
        self._cmd = LowCmdBuffer()
        self._floats = self._cmd.rec["motor_cmd"][0].view(np.float32).reshape(-1, 7)[:, 1:6]
        # joint state: the one simulated-G1 joint model, shared with the in-process driver
        self.physics = G1Physics(time_constant_s)
        self.q = self.physics.q  # views the model updates in place
        self.dq = self.physics.dq
        # latest applied commands, per topic
        self._target = np.zeros((2, _N))
        self._kp = np.zeros((2, _N))
        self._kd = np.zeros((2, _N))
        self._enabled = np.zeros((2, _N), dtype=bool)
        self._weight = 0.0
        self._have = [False, False]
        self.debug_mode = False  # True once a valid rt/lowcmd arrived
        # things a test sets
        self.mode_machine = mode_machine
        self.frozen = False
        self._remote = np.zeros(REMOTE_BYTES, dtype=np.uint8)
        self._tilt = np.zeros(3)
        self._gyro = np.zeros(3)
        self._temperature = np.full(_N, 40.0)
        self._place: Optional[Dict[str, float]] = None  # a pose to put the robot at, at the next step
        self.tick = 0
        self.published = 0
        self.gaps = GapLog(GAP_FLOOR_S)  # its own loop's gaps: when it could not publish, however it was scheduled
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._control = None
        self.control_rejects = RejectCounter(log.warning, "control request")
        if control:
            import zmq

            from runtime.protocol import sockets

            self._control = sockets.rep_bound(zmq.Context.instance(), control)
            self._control_server = sockets.RequestServer(self._control, self._control_reply, _packed_refusal,
                                                         self.control_rejects, _packed_refusal("internal error"))

    # ---- what a test sets -------------------------------------------------------------------------------------

    def press(self, buttons: Iterable[str] = (), **sticks: float) -> None:
        """Hold ``buttons`` (replacing those held) and set stick values, from the next published state on."""
        self._remote = np.frombuffer(encode_remote(buttons, **sticks), dtype=np.uint8)

    def set_tilt(self, roll: float = 0.0, pitch: float = 0.0, yaw: float = 0.0) -> None:
        self._tilt = np.array([roll, pitch, yaw], dtype=np.float64)

    def set_gyro(self, x: float = 0.0, y: float = 0.0, z: float = 0.0) -> None:
        self._gyro = np.array([x, y, z], dtype=np.float64)

    def set_temperature(self, value: Union[float, Sequence[float]]) -> None:
        """Winding temperature of every joint (a number) or per joint (29 numbers), deg C."""
        t = np.broadcast_to(np.asarray(value, dtype=np.float64), (_N,))
        self._temperature = t.copy()

    def freeze(self, frozen: bool = True) -> None:
        """Stop (or resume) publishing rt/lowstate: the controller sees its robot state go stale."""
        self.frozen = bool(frozen)

    def place(self, pose: Dict[str, float]) -> None:
        """Put these joints at rest at ``pose`` (joint name -> rad), the others where they are (see "pose"); taken
        at the next step, in the simulation's own thread."""
        with self._lock:
            self._place = dict(pose)

    def set_mode_machine(self, value: int) -> None:
        self.mode_machine = int(value) & 0xFF

    def summary(self, since: Optional[float] = None) -> Dict[str, Any]:
        with self._lock:
            out = self.log.summary(since)
        out.update(published=self.published, tick=self.tick, debug_mode=self.debug_mode,
                   mode_machine=self.mode_machine, q=[float(x) for x in self.q],
                   control_rejected=self.control_rejects.snapshot()[1], max_gap_ms=round(self.gaps.max_s * 1e3, 3))
        if since is not None:
            out["gaps"] = self.gaps.since(since)  # [[t, gap_s], ...] over GAP_FLOOR_S: when it was late
        return out

    def last(self, k: int = 1) -> List[Dict[str, Any]]:
        """The last ``k`` commands received, oldest first: t, topic, crc_ok, applied, q, kp, kd, weight."""
        with self._lock:
            return self.log.last(k)

    # ---- running ------------------------------------------------------------------------------------------------

    def start(self) -> "SimulatedG1Dds":
        """Run in a daemon thread of this process until stop()."""
        self._thread = threading.Thread(target=self.run, name="SimulatedG1Dds", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)

    def close(self) -> None:
        self.stop()
        if self._control is not None:
            self._control.close(linger=0)
            self._control = None
        transport.delete(self._writer, *self._readers, self.participant)

    def run(self, seconds: Optional[float] = None) -> None:
        """Step, publish and serve commands at ``rate_hz`` until stop() or ``seconds`` pass."""
        period = 1.0 / self.rate_hz
        start = last = time.monotonic()
        next_t = start
        while not self._stop.is_set():
            now = time.monotonic()
            if seconds is not None and now - start >= seconds:
                break
            self.gaps.turn(now)
            self.step(now, now - last)
            last = now
            if self._control is not None:
                self._serve_control()
            next_t += period
            delay = next_t - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif delay < -period:
                next_t = time.monotonic()  # fell behind: do not try to catch up with a burst

    def step(self, now: float, dt: float) -> None:
        """One tick: take commands, advance the joints by ``dt``, publish rt/lowstate (unless frozen)."""
        if self._place is not None:
            with self._lock:
                place, self._place = self._place, None
            q = self.physics.q.copy()
            for name, rad in place.items():
                q[g1.JOINT_INDEX[name]] = rad
            self.physics.place(q)
        for topic, rd in enumerate(self._readers):
            for data in transport.take_raw(rd, 64):
                self._receive(now, topic, data)
        if dt > 0.0:
            self._advance(dt)
        if not self.frozen:
            self._publish()

    def _receive(self, now: float, topic: int, data: bytes) -> None:
        cmd = self._cmd
        if not cmd.load(data):
            return
        crc_ok = cmd.crc_ok()
        finite = bool(np.isfinite(self._floats).all())
        mode_ok = topic == ARM_SDK_TOPIC_ID or int(cmd.mode_machine[0]) == self.mode_machine
        applied = crc_ok and finite and mode_ok
        with self._lock:
            if crc_ok and finite and not mode_ok:
                self.log.wrong_mode_machine += 1
            self.log.record(now, topic, cmd, crc_ok, applied, finite)
        if not applied:
            return
        self._target[topic] = cmd.q[:_N]
        self._kp[topic] = cmd.kp[:_N]
        self._kd[topic] = cmd.kd[:_N]
        self._enabled[topic] = cmd.mode[:_N] == 1
        if topic == ARM_SDK_TOPIC_ID:
            w = float(cmd.q[g1.ARM_SDK_WEIGHT_SLOT])
            self._weight = min(max(w, 0.0), 1.0)
        else:
            self.debug_mode = True
        self._have[topic] = True

    def _advance(self, dt: float) -> None:
        p = self.physics
        if self.debug_mode:
            low = LOWCMD_TOPIC_ID
            p.commanded(self._target[low], self._kp[low], self._kd[low], self._enabled[low])
        else:  # Unitree's controller holds everything; arm_sdk blends the upper body by its weight
            p.unitree_holds(self._weight if self._have[ARM_SDK_TOPIC_ID] else 0.0, self._target[ARM_SDK_TOPIC_ID])
        p.advance(dt)

    def _publish(self) -> None:
        st = self.state
        self.tick += 1
        st.tick[0] = self.tick & 0xFFFFFFFF
        st.mode_machine[0] = self.mode_machine
        st.mode[:_N] = 1
        st.q[:_N] = self.q
        st.dq[:_N] = self.dq
        st.tau_est[:_N] = self.physics.tau_est
        st.temperature[:_N, 1] = self._temperature
        st.temperature[:_N, 0] = self._temperature - 10.0
        roll, pitch, yaw = self._tilt
        st.rpy[:] = self._tilt
        st.quaternion[:] = quaternion_from_rpy(roll, pitch, yaw)  # the IMU's primary output, consistent with rpy
        st.gyroscope[:] = self._gyro
        st.accelerometer[:] = (0.0, 0.0, 9.81)
        st.wireless_remote[:] = self._remote
        st.seal()  # crc last: a controller refuses a LowState whose crc does not match (dds.lowstate_crc)
        transport.write_raw(self._writer, st.cdr)
        self.published += 1

    def _serve_control(self) -> None:
        """At most one control request per tick, received whole and answered once (sockets.RequestServer). Guarded:
        nothing a requester sends ends the simulator."""
        try:
            self._control_server.serve(time.monotonic())
        except Exception as exc:  # noqa: BLE001
            self.control_rejects.count("handler_error", f"{type(exc).__name__}: {str(exc)[:160]}")

    def _control_reply(self, raw: bytes, now: float) -> bytes:
        try:
            request = parse_control(raw)
        except ControlError as exc:
            self.control_rejects.count("bad_request", str(exc))
            return _packed_refusal(str(exc))
        return msgpack.packb(self.apply(request), use_bin_type=True)

    def apply(self, request: Dict[str, Any]) -> Dict[str, Any]:
        """Apply one control request (the map the control socket takes); returns the reply map. The request is
        checked whole first (check_control): a bad one raises ControlError and changes nothing."""
        request = check_control(request)
        if "press" in request or "sticks" in request:
            self.press(request.get("press") or (), **(request.get("sticks") or {}))
        if "tilt" in request:
            self.set_tilt(*request["tilt"])
        if "gyro" in request:
            self.set_gyro(*request["gyro"])
        if "temperature" in request:
            self.set_temperature(request["temperature"])
        if "freeze" in request:
            self.freeze(request["freeze"])
        if "mode_machine" in request:
            self.set_mode_machine(request["mode_machine"])
        if "pose" in request:
            self.place(request["pose"])
        reply: Dict[str, Any] = {"ok": True, "tick": self.tick, "t": time.monotonic()}
        summary = request.get("summary")
        if summary:
            reply["summary"] = self.summary(summary.get("since") if isinstance(summary, dict) else None)
        if request.get("stop"):
            self._stop.set()
        return reply


def main(domain_id: int = 1, interface: Optional[str] = "lo", rate_hz: float = 500.0,
         seconds: Optional[float] = None, mode_machine: int = 5, control: Optional[str] = None,
         loopback: Optional[bool] = None, summary_path: Optional[str] = None) -> Dict[str, Any]:
    """Run a simulated G1 in this process until ``seconds`` pass (None: until a "stop" request, SIGTERM or Ctrl-C).

    Prints one JSON line on start ({"sim": "ready", ...}) and the summary as JSON at the end (also written to
    ``summary_path`` when given); returns the summary.
    """
    sim = SimulatedG1Dds(domain_id, interface, rate_hz, mode_machine, loopback, control=control)
    if threading.current_thread() is threading.main_thread():  # SIGTERM (systemd, Popen.terminate) ends it cleanly
        signal.signal(signal.SIGTERM, lambda signum, frame: sim._stop.set())
    print(json.dumps({"sim": "ready", "note": "a simulation, not the robot", "domain_id": domain_id,
                      "interface": interface, "rate_hz": rate_hz, "control": control}), flush=True)
    from runtime.service.notify import Notifier

    notifier = Notifier.from_env(unset_environment=True)
    notifier.ready("a simulated G1 (not the robot)")
    try:
        sim.run(seconds)
    except KeyboardInterrupt:
        pass
    finally:
        summary = sim.summary()
        sim.close()
    text = json.dumps(summary)
    if summary_path:
        with open(summary_path, "w") as f:
            f.write(text)
    print(text, flush=True)
    return summary


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="A simulated G1 on DDS (a simulation, not the robot).")
    parser.add_argument("--domain-id", type=int, default=1)
    parser.add_argument("--interface", default="lo")
    parser.add_argument("--rate-hz", type=float, default=500.0)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--mode-machine", type=int, default=5)
    parser.add_argument("--control", default=None)
    parser.add_argument("--summary-path", default=None)
    a = parser.parse_args()
    main(a.domain_id, a.interface, a.rate_hz, a.seconds, a.mode_machine, a.control, None, a.summary_path)
