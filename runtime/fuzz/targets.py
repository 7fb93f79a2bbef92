"""The sockets under fuzz: each a socket of a running process, with the processes it needs, how the fuzzer reaches
it, how it tells that the process is alive and answering, and how it counts what was applied and rejected.

    chunks       the controller's chunk PULL (transport.chunks), armed and driving with a real runtime
    control      the controller's operator REP (transport.control), armed and driving
    sim          `wam-edge sim`'s control REP (sim.control), under a controller driving over DDS on loopback
    state        the runtime's robot-state SUB (transport.state); the fuzzer plays the controller
    camera-jpeg  the runtime's camera SUB, camera.source image_server (Unitree's JPEG server)
    camera-raw   the runtime's camera SUB, camera.source raw_zmq (frame messages)
    faults       the runtime's fault-injection REP (faults.enabled; test rigs only)
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import zmq

from runtime import demo
from runtime.config import Config
from runtime.fuzz import messages
from runtime.fuzz.messages import MARKER_STAMP, SESSION_PREFIX, Context, Message
from runtime.fuzz.rig import (
    Arming,
    CameraPublisher,
    ChunkProxy,
    ControllerWatch,
    FuzzError,
    Incarnation,
    Requester,
    StandInController,
    decode_map_reply,
    decode_operator_reply,
)
from runtime.robot import g1

#: Reasons of controller transitions that only the robot's side causes (what a simulator request could do). Not
#: "robot state is ... old": a loaded machine starves the simulator too (a frozen state stream answers ok anyway).
ROBOT_SIDE = ("by remote", "tilt ", " C (limit", " moves at ")
#: Set before the user's --set (which may set them back): a flood of rejected chunks stops the robot after
#: controller.max_rejections in a row, and the rig would then fuzz a stopped controller most of the time. The fuzz
#: runs while driving instead (the stop itself is the controller's tests' business).
FUZZ_DEFAULTS = ["controller.max_rejections=1000"]
#: The camera layout every fuzzed runtime uses: the configured camera names, 64 x 64 each (small frames, fast).
SMALL = 64


class Options:
    """What a run asks for (the CLI's flags)."""

    def __init__(self, messages_per_socket: int = 2000, seed: int = 0, stall_s: float = 3.0, rate: float = 2000.0,
                 canary: bool = False, classes: Optional[Sequence[str]] = None, driving: bool = True,
                 dds: bool = False, domain_id: int = 0, seconds: Optional[float] = None,
                 log_dir: Optional[str] = None) -> None:
        self.messages = messages_per_socket
        self.seed = seed
        self.stall_s = stall_s
        self.rate = rate
        self.canary = canary
        self.classes = list(classes) if classes else None
        self.driving = driving
        self.dds = dds
        self.domain_id = domain_id
        self.seconds = seconds
        self.log_dir = log_dir


class RepClient:
    """A target's requests to a REP socket, each answer handed to ``on_reply(class, frames)``.

    Each request goes on a connection of its own, as the project's own clients send them (sockets.request): the
    REP sockets keep 4 messages queued each way (protocol/sockets.py rep_bound), and libzmq updates a queue's count
    lazily, so a REP silently drops a reply once a client has sent a few quick requests on one connection (seen
    within 10 requests). An oversized request gets no answer: ZeroMQ drops the peer that sends it."""

    def __init__(self, target: "Target", endpoint: str, on_reply: Callable[[str, List[bytes]], None]) -> None:
        self.target = target
        self.endpoint = endpoint
        self.on_reply = on_reply

    def send(self, msg: Message) -> Optional[str]:
        t = self.target
        req = Requester(t.zctx, self.endpoint)
        try:
            frames, problem = t._request(req, msg, expect_reply=not msg.oversized)
        finally:
            req.close()
        if frames is not None:
            self.on_reply(msg.cls, frames)
        elif msg.oversized:
            t.transport_dropped += 1
        else:
            return problem
        return None


def action_joints(cfg: Config) -> Tuple[str, ...]:
    """The model's action joints (what a valid chunk drives), from its manifest; the G1's upper body otherwise."""
    try:
        with open(os.path.join(cfg.resolve(cfg["model"]["path"]), "manifest.json"), "r", encoding="utf-8") as f:
            joints = tuple(json.load(f)["action"]["joints"])
        g1.indices(joints)
        return joints
    except (OSError, ValueError, KeyError, TypeError):
        return tuple(g1.UPPER_BODY)


def small_layout(cfg: Config) -> List[str]:
    names = [c["name"] for c in cfg["camera"]["layout"]]
    layout = ", ".join(f"{{name: {n}, width: {SMALL}}}" for n in names)
    return [f"camera.layout=[{layout}]", f"camera.height={SMALL}"]


class Target:
    """One socket of a running process. Subclasses say which processes, which link, and how to reach it."""

    name = ""
    link = ""
    socket = ""
    roles: Tuple[str, ...] = ()

    def __init__(self, cfg: Config, opts: Options) -> None:
        self.cfg = cfg
        self.opts = opts
        self.zctx = zmq.Context.instance()
        self.ctx = self.make_context()
        self.inc: Optional[Incarnation] = None
        self.started_at = 0.0
        # counted by the fuzzer from what it saw (summed over incarnations)
        self.replies_refused = 0
        self.replies_ok: Dict[str, int] = {}
        self.bad_replies = 0
        self.bad_reply_example = ""
        self.transport_dropped = 0
        self.windows: List[Tuple[float, str]] = []  # (time.monotonic() a class began, its name), in order
        self.failed_classes: Set[str] = set()  # classes with a crash or a stall (already failures)
        self.rep: Optional[RepClient] = None  # a REP target's requests

    def class_at(self, t: float) -> str:
        """The class being sent at ``t`` (time.monotonic(), the clock every process here shares), or the class
        before it while the rig waited between classes."""
        name = "before_the_first_class"
        for start, cls in self.windows:
            if start > t:
                break
            name = cls
        return name

    # -- set-up ------------------------------------------------------------------------------------------------------

    def make_context(self) -> Context:
        raise NotImplementedError

    def active_roles(self) -> Tuple[str, ...]:
        return self.roles

    def role_overrides(self, inc: Incarnation) -> Dict[str, List[str]]:
        """Per role, the --set that put its sockets and files in the incarnation's directory."""
        own = demo.loop_overrides(inc.dir, self.opts.dds) + small_layout(self.cfg) + [
            f"faults.endpoint={inc.endpoint('faults')}", "camera.source=synthetic"]  # never a real camera
        if self.opts.dds:
            own += [f"dds.domain_id={self.opts.domain_id}", "dds.interface=lo"]
        return {role: list(own) for role in self.active_roles()}

    def before_spawn(self, inc: Incarnation) -> None:
        """Bind what the processes connect to (stand-ins)."""

    def after_ready(self, inc: Incarnation) -> None:
        """Connect the fuzzer's sockets; arm and wait until it drives (controller targets)."""

    def startup_pump(self, now: float) -> None:
        """While the processes start: keep what they wait for coming (robot state, camera frames)."""

    def close(self) -> None:
        """Close the fuzzer's sockets of this incarnation."""

    # -- the loop ----------------------------------------------------------------------------------------------------

    def pump(self, now: float) -> None:
        raise NotImplementedError

    def send(self, msg: Message) -> Optional[str]:
        """Send one malformed message (and, for a REP, take its answer); a failure description, or None."""
        raise NotImplementedError

    def stalled(self, now: float) -> Optional[str]:
        return None

    def after_class(self) -> Optional[str]:
        """Between classes: put back what a class may have changed; a failure description, or None."""
        return None

    def send_request(self, msg: Message) -> Optional[str]:
        assert self.rep is not None
        return self.rep.send(msg)

    def count_map_reply(self, cls: str, frames: List[bytes]) -> None:
        """The fault socket's and the simulator's answer: a map with ok."""
        ok, _ = decode_map_reply(frames)
        if ok is None:
            self.bad_replies += 1
        elif ok:
            self.replies_ok[cls] = self.replies_ok.get(cls, 0) + 1
        else:
            self.replies_refused += 1

    def before_class(self) -> bool:
        """Before a class: bring the processes where the class should meet them; False when they did not get there
        (the class is sent anyway)."""
        return True

    def answered_since(self, since: float) -> bool:
        """Whether the processes showed they are alive after ``since`` (a state, a chunk, a reply)."""
        raise NotImplementedError

    # -- results -----------------------------------------------------------------------------------------------------

    def account(self, reports: List[Dict[str, Dict[str, Any]]]) -> Dict[str, Any]:
        """applied / rejected / ... from the processes' reports of every incarnation (role -> report)."""
        raise NotImplementedError

    # -- helpers -----------------------------------------------------------------------------------------------------

    def _request(self, req: Requester, msg: Message, expect_reply: bool) -> Tuple[Optional[List[bytes]], str]:
        """Send on a REP socket and wait for its answer, pumping the peers meanwhile."""
        deadline = time.monotonic() + self.opts.stall_s
        while not req.send(msg.frames):
            now = time.monotonic()
            self.pump(now)
            if now > deadline:
                return None, f"{self.socket}: takes no request for {self.opts.stall_s:.1f} s"
            time.sleep(0.0005)
        wait = self.opts.stall_s if expect_reply else min(0.3, self.opts.stall_s)
        deadline = time.monotonic() + wait
        while True:
            frames = req.poll()
            if frames is not None:
                return frames, ""
            now = time.monotonic()
            self.pump(now)
            if now > deadline:
                return None, (f"{self.socket}: no answer for {wait:.1f} s to a {msg.cls} request" if expect_reply
                              else "")
            time.sleep(0.0002)


# ----------------------------------------------------------------------------------------------------------------
# the controller's sockets


class ControllerTarget(Target):
    """The controller (and, driving, a real runtime; with DDS, `wam-edge sim`), armed by the rig."""

    roles = ("sim", "controller", "runtime")

    def __init__(self, cfg: Config, opts: Options) -> None:
        super().__init__(cfg, opts)
        self._arms = 0
        self._estops = 0
        self._driving_s = 0.0
        self._refused: Dict[str, int] = {}

    def active_roles(self) -> Tuple[str, ...]:
        roles = ("controller", "runtime") if self.opts.driving else ("controller",)
        return (("sim",) + roles) if self.opts.dds else roles

    def make_context(self) -> Context:
        c = self.cfg["controller"]
        return Context(self.link, self.opts.seed, self.cfg["transport"]["max_message_bytes"],
                       max_chunk_age_s=c["max_chunk_age_s"], action_joints=action_joints(self.cfg))

    def role_overrides(self, inc: Incarnation) -> Dict[str, List[str]]:
        out = super().role_overrides(inc)
        if "controller" in out:
            out["controller"].append(f"controller.driver={'dds' if self.opts.dds else 'sim'}")
        return out

    def after_ready(self, inc: Incarnation) -> None:
        self.watch = ControllerWatch(self.zctx, inc.endpoint("state"), self.ctx.saw_state)
        self.arming = Arming(self.zctx, inc.endpoint("control"), self.opts.stall_s)
        self.arming.want_driving = True  # the first arming; before_class arms again between classes
        deadline = time.monotonic() + max(10.0, 4 * self.opts.stall_s)
        while self.watch.safety != "running":
            now = time.monotonic()
            self.pump(now)
            if inc.dead() is not None:
                return  # the campaign reports it
            if now > deadline:
                raise FuzzError(f"the controller did not reach running within {deadline - self.started_at:.0f} s "
                                f"(state {self.arming.state}: {self.arming.detail})")
            time.sleep(0.002)

    def pump(self, now: float) -> None:
        self.watch.pump(now)
        self.arming.pump(now)

    def before_class(self) -> bool:
        """Each class meets a controller that drives with the runtime: the rig re-arms it between classes (never
        during one: a person arms, then the fuzz meets what they armed), and waits until it runs and has the
        runtime's chunks (``driven``)."""
        deadline = time.monotonic() + 10.0
        self.arming.want_driving = True
        try:
            running_since: Optional[float] = None
            while True:
                now = time.monotonic()
                self.pump(now)
                if self.watch.safety != "running":
                    running_since = None
                elif running_since is None:
                    running_since = now
                elif self.driven(running_since):
                    return True
                if now > deadline or self.inc is None or self.inc.dead() is not None:
                    return False
                time.sleep(0.002)
        finally:
            self.arming.want_driving = False

    def driven(self, running_since: float) -> bool:
        """Running, and the runtime's session has had time to be the one armed with."""
        return not self.opts.driving or time.monotonic() - running_since > 0.2

    def stalled(self, now: float) -> Optional[str]:
        last = self.watch.last_at if self.watch.last_at is not None else self.started_at
        if now - last > self.opts.stall_s:
            return f"controller: no robot state published for {now - last:.1f} s"
        return self.arming.stalled(now)

    def answered_since(self, since: float) -> bool:
        w, a = self.watch.last_at, self.arming.replied_at
        return w is not None and w > since and a is not None and a > since

    def close(self) -> None:
        self.keep_counts()
        self.watch.close()
        self.arming.close()

    def _controller_account(self, reports: List[Dict[str, Dict[str, Any]]]) -> Dict[str, Any]:
        """What every controller target counts: rejected, stops, the fuzz-caused transitions and the DDS wire."""
        rejected: Dict[str, int] = {}
        stops: Dict[str, int] = {}
        fuzz_transitions: List[Dict[str, Any]] = []
        robot_side: List[Dict[str, Any]] = []
        ignored = 0
        log_full = False
        wire = {"commands": 0, "bad_crc": 0, "non_finite": 0, "out_of_limits": 0}
        for rep in reports:
            ct = rep.get("controller", {})
            for reason, n in ct.get("rejected", {}).items():
                rejected[reason] = rejected.get(reason, 0) + n
            ignored += ct.get("chunks_ignored", 0)
            transitions = ct.get("transitions", [])
            log_full = log_full or len(transitions) >= 1000
            for t in transitions:
                reason = str(t.get("reason", ""))
                if t.get("to") in ("holding", "stopping", "stopped", "estop") and "wam-edge fuzz rig" not in reason:
                    key = _reason_key(reason)
                    stops[key] = stops.get(key, 0) + 1
                entry = {"class": self.class_at(float(t.get("t", 0.0))), "reason": reason[:160],
                         "transition": f"{t.get('from')} -> {t.get('to')}"}
                if SESSION_PREFIX in reason and "wam-edge fuzz rig" not in reason:
                    fuzz_transitions.append(entry)
                if any(s in reason for s in ROBOT_SIDE):
                    robot_side.append(entry)
            sim = rep.get("sim", {})
            if sim:
                wire["commands"] += int(sim.get("received", sim.get("commands", 0)) or 0)
                for k in ("bad_crc", "non_finite", "out_of_limits"):
                    wire[k] += int(sim.get(k, 0) or 0)
        out = {"rejected_by_reason": rejected, "ignored": ignored, "stops": stops,
               "fuzz_transitions": fuzz_transitions, "fuzz_transition_count": len(fuzz_transitions),
               "robot_side_transitions": robot_side, "robot_side_count": len(robot_side),
               "transition_log_full": log_full, "rearms": self._arms, "estops_cleared": self._estops,
               "arming_refused": self._refused, "driving_s": round(self._driving_s, 2)}
        if self.opts.dds:
            out["dds_wire"] = wire
        return out

    def keep_counts(self) -> None:
        """Before an incarnation's peers go: what they counted."""
        self._arms += self.arming.arms
        self._estops += self.arming.estops_cleared
        self._driving_s += self.watch.driving_s
        for k, v in self.arming.refused.items():
            self._refused[k] = self._refused.get(k, 0) + v


def _merge(ok_replies: Dict[str, int], transitions: List[Dict[str, Any]]) -> Dict[str, int]:
    """Per class, the larger of the requests answered ok and the transitions they caused (one request may do
    both, or act although refused)."""
    by_class: Dict[str, int] = {}
    for t in transitions:
        by_class[t["class"]] = by_class.get(t["class"], 0) + 1
    return {c: max(ok_replies.get(c, 0), by_class.get(c, 0)) for c in set(ok_replies) | set(by_class)}


def _reason_key(reason: str) -> str:
    """A stop reason without its numbers and sessions, for counting."""
    out = []
    for word in reason.split():
        if any(ch.isdigit() for ch in word):
            word = "#"
        out.append(word)
    return " ".join(out)[:120]


class ChunksTarget(ControllerTarget):
    name = "chunks"
    link = "chunks"
    socket = "controller chunk PULL (transport.chunks)"

    def role_overrides(self, inc: Incarnation) -> Dict[str, List[str]]:
        out = super().role_overrides(inc)
        if "runtime" in out:  # the runtime sends through the fuzzer's proxy, which keeps copies to replay
            out["runtime"].append(f"transport.chunks={inc.endpoint('runtime-chunks')}")
        return out

    def before_spawn(self, inc: Incarnation) -> None:
        self.proxy: Optional[ChunkProxy] = None
        if self.opts.driving:
            self.proxy = ChunkProxy(self.zctx, inc.endpoint("runtime-chunks"), inc.endpoint("chunks"),
                                    self.ctx.saw_chunk)

    def after_ready(self, inc: Incarnation) -> None:
        self.push = self.zctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.setsockopt(zmq.SNDHWM, 8)  # few in flight: a crash is blamed on the class that was sent
        self.push.connect(inc.endpoint("chunks"))
        self.chunks_endpoint = inc.endpoint("chunks")
        super().after_ready(inc)

    def pump(self, now: float) -> None:
        super().pump(now)
        if self.proxy is not None:
            self.proxy.pump(now)

    def driven(self, running_since: float) -> bool:
        """The runtime's chunk went to the running controller: its session is the one armed with (the first chunk
        after arming sets it; see docs/fuzz.md)."""
        if self.proxy is None:
            return super().driven(running_since)
        return self.proxy.last_chunk_at is not None and self.proxy.last_chunk_at > running_since + 0.02

    def send(self, msg: Message) -> Optional[str]:
        if msg.oversized:  # its own connection: the controller's ZeroMQ drops the peer that sends it
            sock = self.zctx.socket(zmq.PUSH)
            sock.connect(self.chunks_endpoint)
            sock.send_multipart(msg.frames)
            sock.close(linger=2000)
            self.transport_dropped += 1
            return None
        deadline = time.monotonic() + self.opts.stall_s
        while True:
            try:
                self.push.send_multipart(msg.frames, zmq.NOBLOCK)
                return None
            except zmq.Again:
                pass
            now = time.monotonic()
            self.pump(now)
            if now > deadline:
                return f"{self.socket}: takes no message for {self.opts.stall_s:.1f} s"
            time.sleep(0.0002)

    def close(self) -> None:
        self.originals = getattr(self, "originals", 0) + (self.proxy.chunks if self.proxy else 0)
        self.runtime_sessions = getattr(self, "runtime_sessions", set()) | (self.proxy.sessions if self.proxy
                                                                             else set())
        self.push.close(0)
        if self.proxy is not None:
            self.proxy.close()
        super().close()

    def account(self, reports: List[Dict[str, Dict[str, Any]]]) -> Dict[str, Any]:
        out = self._controller_account(reports)
        runtime_sessions = set(getattr(self, "runtime_sessions", set()))
        for rep in reports:
            if rep.get("runtime", {}).get("session"):
                runtime_sessions.add(rep["runtime"]["session"])
        fuzz: Dict[str, int] = {}
        other: Dict[str, int] = {}
        runtime_applied = 0
        for rep in reports:
            by_session = rep.get("controller", {}).get("chunks_applied_by_session")
            if by_session is None:
                out["observable_missing"] = "the controller's report has no chunks_applied_by_session"
                continue
            for session, n in by_session.items():
                if session.startswith(SESSION_PREFIX):
                    cls = session.split("-")[1] if session.count("-") >= 2 else session
                    fuzz[cls] = fuzz.get(cls, 0) + n
                elif session in runtime_sessions:
                    runtime_applied += n
                else:
                    other[session] = other.get(session, 0) + n
        originals = getattr(self, "originals", 0)
        replays = sum(rep.get("controller", {}).get("chunks_applied_not_newer", 0) for rep in reports)
        applied_by_class = dict(fuzz)
        if replays:
            applied_by_class["replayed"] = applied_by_class.get("replayed", 0) + replays
        for t in out["fuzz_transitions"]:  # a fuzz heartbeat's health was taken: it held the robot
            if t["reason"].startswith("policy heartbeat says"):
                applied_by_class[t["class"]] = applied_by_class.get(t["class"], 0) + 1
        if other:  # a session neither the runtime's nor ours: a mutated fuzz session
            applied_by_class["unknown_session"] = sum(other.values())
        out.update(applied=sum(applied_by_class.values()), applied_by_class=applied_by_class,
                   rejected=sum(out["rejected_by_reason"].values()),
                   runtime_chunks_forwarded=originals, runtime_chunks_applied=runtime_applied)
        return out


class ControlTarget(ControllerTarget):
    name = "control"
    link = "commands"
    socket = "controller operator REP (transport.control)"

    def make_context(self) -> Context:
        return Context(self.link, self.opts.seed, 4096)

    def after_ready(self, inc: Incarnation) -> None:
        self.rep = RepClient(self, inc.endpoint("control"), self.on_reply)
        super().after_ready(inc)

    def send(self, msg: Message) -> Optional[str]:
        return self.send_request(msg)

    def on_reply(self, cls: str, frames: List[bytes]) -> None:
        ok, state, detail, readable = decode_operator_reply(frames)
        if not readable:
            self.bad_replies += 1
            self.bad_reply_example = self.bad_reply_example or f"{cls}: {detail} ({sum(map(len, frames))} bytes)"
        if ok:
            self.replies_ok[cls] = self.replies_ok.get(cls, 0) + 1
        else:
            self.replies_refused += 1

    def account(self, reports: List[Dict[str, Dict[str, Any]]]) -> Dict[str, Any]:
        out = self._controller_account(reports)
        applied = _merge(self.replies_ok, out["fuzz_transitions"])  # obeyed: said ok, or logged `by fuzz`
        out.update(applied=sum(applied.values()), applied_by_class=applied,
                   rejected=sum(out["rejected_by_reason"].values()), refused_replies=self.replies_refused,
                   bad_replies=self.bad_replies, bad_reply_example=self.bad_reply_example)
        return out


class SimTarget(ControllerTarget):
    name = "sim"
    link = "sim"
    socket = "`wam-edge sim` control REP (sim.control)"

    def active_roles(self) -> Tuple[str, ...]:
        return ("sim", "controller", "runtime") if self.opts.driving else ("sim", "controller")

    def make_context(self) -> Context:
        return Context(self.link, self.opts.seed, 4096)

    def after_ready(self, inc: Incarnation) -> None:
        self.rep = RepClient(self, inc.endpoint("sim"), self.count_map_reply)
        super().after_ready(inc)

    def after_class(self) -> Optional[str]:
        """The simulated robot back to normal (buttons released, level, cool, not frozen)."""
        request = {"press": [], "tilt": [0.0, 0.0, 0.0], "gyro": [0.0, 0.0, 0.0], "freeze": False,
                   "temperature": 40.0, "mode_machine": self.cfg["sim"]["mode_machine"]}
        import msgpack

        req = Requester(self.zctx, self.inc.endpoint("sim") if self.inc is not None else "")
        try:
            frames, problem = self._request(req, Message("reset", [msgpack.packb(request)]), True)
        finally:
            req.close()
        return problem or None

    def send(self, msg: Message) -> Optional[str]:
        return self.send_request(msg)

    def account(self, reports: List[Dict[str, Dict[str, Any]]]) -> Dict[str, Any]:
        out = self._controller_account(reports)
        # said ok, or acted on the robot's side (not where the simulator crashed: the robot's state went stale then)
        acted = [t for t in out["robot_side_transitions"] if t["class"] not in self.failed_classes]
        applied = _merge(self.replies_ok, acted)
        out.update(applied=sum(applied.values()), applied_by_class=applied, rejected=self.replies_refused,
                   rejected_source="refusing replies (the simulator keeps no count)",
                   refused_replies=self.replies_refused, bad_replies=self.bad_replies)
        return out


# ----------------------------------------------------------------------------------------------------------------
# the runtime's sockets (the fuzzer plays the controller)


class RuntimeTarget(Target):
    roles = ("runtime",)

    def make_context(self) -> Context:
        return Context(self.link, self.opts.seed, self.cfg["transport"]["max_message_bytes"])

    def role_overrides(self, inc: Incarnation) -> Dict[str, List[str]]:
        out = super().role_overrides(inc)
        out["runtime"] += ["policy.trigger=fixed", "policy.rate_hz=20"]  # a chunk every 50 ms: quick proof of life
        return out

    def classify(self, stamp: float) -> str:
        if stamp >= MARKER_STAMP:
            index = int((stamp - MARKER_STAMP) // 1000.0)
            links = messages.LINKS[self.link]
            if 0 <= index < len(links):
                return links[index].name
        return "unknown_stamp"

    def before_spawn(self, inc: Incarnation) -> None:
        self.standin = StandInController(self.zctx, inc.endpoint("state"), inc.endpoint("chunks"), self.classify)

    def after_ready(self, inc: Incarnation) -> None:
        deadline = time.monotonic() + max(10.0, 4 * self.opts.stall_s)
        while self.standin.chunks == 0:  # it answers the stand-in's states
            now = time.monotonic()
            self.pump(now)
            if inc.dead() is not None:
                return
            if now > deadline:
                raise FuzzError(f"the runtime sent no chunk within {deadline - self.started_at:.0f} s "
                                f"(health {self.standin.health}: {self.standin.health_detail})")
            time.sleep(0.002)

    def pump(self, now: float) -> None:
        self.standin.pump(now)

    def startup_pump(self, now: float) -> None:
        self.pump(now)

    def stalled(self, now: float) -> Optional[str]:
        return self.standin.stalled(now, self.started_at, self.opts.stall_s)

    def answered_since(self, since: float) -> bool:
        s = self.standin  # a chunk that answers a state sent after ``since``: the state link works
        return s.last_answered > since and s.last_heartbeat_at is not None and s.last_heartbeat_at > since

    def close(self) -> None:
        applied = getattr(self, "_applied", {})
        for k, v in self.standin.applied.items():
            applied[k] = applied.get(k, 0) + v
        self._applied = applied
        self._chunks = getattr(self, "_chunks", 0) + self.standin.chunks
        self.standin.close()

    def _pace(self) -> None:
        """At most opts.rate messages a second on a PUB (it drops what the subscriber cannot take)."""
        now = time.monotonic()
        nxt = getattr(self, "_next_send", 0.0)
        while now < nxt:
            self.pump(now)
            time.sleep(0.0002)
            now = time.monotonic()
        self._next_send = max(nxt + 1.0 / self.opts.rate, now - 0.01)
        self.pump(now)


class StateTarget(RuntimeTarget):
    name = "state"
    link = "state"
    socket = "runtime robot-state SUB (transport.state)"

    def send(self, msg: Message) -> Optional[str]:
        if msg.cls != "multipart":  # multipart back to back: a reader must meet one half arrived
            self._pace()
        self.standin.publish(msg.frames)
        if msg.oversized:
            self.transport_dropped += 1
        return None

    def account(self, reports: List[Dict[str, Dict[str, Any]]]) -> Dict[str, Any]:
        rejected: Dict[str, int] = {}
        for rep in reports:
            for reason, n in rep.get("runtime", {}).get("state_rejected", {}).items():
                rejected[reason] = rejected.get(reason, 0) + n
        applied = dict(getattr(self, "_applied", {}))
        return {"applied": sum(applied.values()), "applied_by_class": applied, "rejected": sum(rejected.values()),
                "rejected_by_reason": rejected, "runtime_chunks": getattr(self, "_chunks", 0),
                "accounting": "at most: newest wins, a state superseded before the runtime reads it is not decoded"}


class CameraTarget(RuntimeTarget):
    kind = ""  # jpeg | frames

    def make_context(self) -> Context:
        names = [c["name"] for c in self.cfg["camera"]["layout"]]
        cams = tuple((n, SMALL) for n in names)
        if self.link == "jpeg":
            limit = 2 * SMALL * SMALL * len(cams) * 3 + (1 << 20)  # runtime/cameras/image_server.py
        else:
            limit = 32 << 20  # runtime.protocol.MAX_FRAME_BYTES
        return Context(self.link, self.opts.seed, limit, cameras=cams, height=SMALL, header="auto")

    def role_overrides(self, inc: Incarnation) -> Dict[str, List[str]]:
        out = super().role_overrides(inc)
        source = "image_server" if self.link == "jpeg" else "raw_zmq"
        out["runtime"] += [f"camera.source={source}", f"camera.endpoint={inc.endpoint('camera')}",
                           "camera.header=auto"]
        return out

    def before_spawn(self, inc: Incarnation) -> None:
        super().before_spawn(inc)
        self.camera = CameraPublisher(self.zctx, inc.endpoint("camera"), self.link, self.ctx.cameras,
                                      self.ctx.height)

    def pump(self, now: float) -> None:
        self.standin.pump(now)
        self.camera.pump(now)

    def answered_since(self, since: float) -> bool:
        return super().answered_since(since) and self.standin.last_frame > since  # a frame taken since: link works

    def send(self, msg: Message) -> Optional[str]:
        if msg.cls != "multipart":
            self._pace()
        self.camera.publish(msg.frames)
        if msg.oversized:
            self.transport_dropped += 1
        if msg.cls.startswith("canary"):
            self._canaries = getattr(self, "_canaries", 0) + 1
        return None

    def close(self) -> None:
        self._valid_frames = getattr(self, "_valid_frames", []) + [self.camera.valid_sent]
        self.camera.close()
        super().close()

    def account(self, reports: List[Dict[str, Dict[str, Any]]]) -> Dict[str, Any]:
        rejected: Dict[str, int] = {}
        adopted = 0
        frames = received = 0
        valid = getattr(self, "_valid_frames", [])
        for i, rep in enumerate(reports):
            cam = rep.get("runtime", {}).get("camera", {})
            for reason, n in cam.get("reasons", {}).items():
                rejected[reason] = rejected.get(reason, 0) + n
            frames += cam.get("frames", 0)
            received += cam.get("received", 0)
            if cam and i < len(valid):
                adopted += max(0, cam.get("frames", 0) - valid[i])
        applied = dict(getattr(self, "_applied", {}))  # chunks answering a fuzz state: none expected here
        if adopted:
            applied["frames_beyond_valid"] = adopted
        return {"applied": sum(applied.values()), "applied_by_class": applied, "rejected": sum(rejected.values()),
                "rejected_by_reason": rejected, "camera_frames": frames, "camera_received": received,
                "valid_frames_sent": sum(valid), "runtime_chunks": getattr(self, "_chunks", 0),
                "accounting": "at most: newest wins; applied counts frames the camera took beyond the valid ones sent "
                              "(a lower bound)"}


class CameraJpegTarget(CameraTarget):
    name = "camera-jpeg"
    link = "jpeg"
    socket = "runtime camera SUB, image_server (JPEG)"


class CameraRawTarget(CameraTarget):
    name = "camera-raw"
    link = "frames"
    socket = "runtime camera SUB, raw_zmq (frame messages)"


class FaultsTarget(RuntimeTarget):
    name = "faults"
    link = "faults"
    socket = "runtime fault-injection REP (faults.endpoint)"

    def make_context(self) -> Context:
        return Context(self.link, self.opts.seed, 64 * 1024, app_max_bytes=4096)  # runtime/faults.py

    def role_overrides(self, inc: Incarnation) -> Dict[str, List[str]]:
        out = super().role_overrides(inc)
        out["runtime"] += ["faults.enabled=true", f"faults.endpoint={inc.endpoint('faults')}"]
        return out

    def after_ready(self, inc: Incarnation) -> None:
        self.rep = RepClient(self, inc.endpoint("faults"), self.count_map_reply)
        super().after_ready(inc)

    def send(self, msg: Message) -> Optional[str]:
        return self.send_request(msg)

    def account(self, reports: List[Dict[str, Dict[str, Any]]]) -> Dict[str, Any]:
        applied = dict(self.replies_ok)
        injected: Dict[str, int] = {}
        for rep in reports:
            for name, n in rep.get("runtime", {}).get("faults_injected", {}).items():
                injected[name] = injected.get(name, 0) + n
        extra = sum(injected.values()) - sum(applied.values())
        if extra > 0:
            applied["fault_injected"] = extra
        return {"applied": sum(applied.values()), "applied_by_class": applied, "rejected": self.replies_refused,
                "rejected_source": "refusing replies (the runtime's report keeps no count)",
                "refused_replies": self.replies_refused,
                "faults_injected": injected, "bad_replies": self.bad_replies,
                "runtime_chunks": getattr(self, "_chunks", 0)}


TARGETS = {t.name: t for t in (ChunksTarget, ControlTarget, StateTarget, CameraJpegTarget, CameraRawTarget,
                               FaultsTarget, SimTarget)}
#: In this order when none are named.
ORDER = ("chunks", "control", "state", "camera-jpeg", "camera-raw", "faults", "sim")


def dds_available() -> Optional[str]:
    """None when `wam-edge sim` can run here (cyclonedds importable), else why not."""
    try:
        import cyclonedds  # noqa: F401
    except ImportError as exc:
        return f"cyclonedds is not installed ({exc}); tools/install_dds.sh"
    return None
