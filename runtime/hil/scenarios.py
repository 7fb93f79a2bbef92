"""The faults `wam-edge hil` injects, what the robot must see after each, and within how long.

Each scenario injects one fault into a running loop and returns the fault time (time.monotonic(), shared by every
process on the host). ``expect`` lists the controller states a trial may end in; ``bound`` is the longest allowed
time from the fault to the first command of the final run of safe commands on the wire (runtime/hil/judge.py), with
the formula it came from. Bounds from the issue: a lost action stream and lost robot state, their configured timeout
plus two control periods. Elsewhere the detection delay plus two control periods plus DELIVERY_S for the message
that carries the fault (a heartbeat, a remote state, an operator command) to reach the controller.
"""

from __future__ import annotations

import json
import signal
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from runtime.config import Config
from runtime.hil.rig import HilRig, RigError
from runtime.robot import g1

#: Allowance for one message hop on this host (ZeroMQ ipc, DDS loopback) and its receiver's next loop turn.
DELIVERY_S = 0.01

STOPPED_OR_IDLE = ("stopped", "idle")


class Scenario:
    """One fault. ``inject(rig, ctx) -> fault time``; ``after`` runs once the controller is safe (resume, respawn);
    ``recover`` puts the rig back for the next trial (prepare() does the rest)."""

    def __init__(self, name: str, doc: str, inject: Callable[[HilRig, Dict[str, Any]], float],
                 bound: Callable[[Config], Tuple[Optional[float], str]], expect: Sequence[str] = ("stopped",),
                 needs_sim: bool = False, after: Optional[Callable[[HilRig, Dict[str, Any]], None]] = None,
                 recover: Optional[Callable[[HilRig, Dict[str, Any]], None]] = None, via_sim: bool = False,
                 ends_state: bool = False) -> None:
        self.name, self.doc = name, doc
        self.inject, self.bound, self.expect = inject, bound, tuple(expect)
        self.needs_sim = needs_sim
        # for judging the rig's own starvation (harness.rig_starved): the fault reaches the controller in the
        # simulated G1's robot state (its publishing is on the reaction's path), or the fault is the end of that
        # state stream (gaps after it are the fault, not the rig's)
        self.via_sim, self.ends_state = via_sim, ends_state
        self.after = after or (lambda rig, ctx: None)
        self.recover = recover or (lambda rig, ctx: None)


# -- bounds -----------------------------------------------------------------------------------------------------------

def _periods(cfg: Config) -> float:
    return 2.0 / cfg["controller"]["rate_hz"]


def lost_action_stream(cfg: Config) -> Tuple[float, str]:
    c = cfg["controller"]["chunk_timeout_s"]
    return c + _periods(cfg), f"controller.chunk_timeout_s {c} + 2 control periods"


def lost_robot_state(cfg: Config) -> Tuple[float, str]:
    s = cfg["controller"]["state_timeout_s"]
    return s + _periods(cfg), f"controller.state_timeout_s {s} + 2 control periods"


def frozen_camera(cfg: Config) -> Tuple[float, str]:
    f, c = cfg["policy"]["frame_max_age_s"], cfg["controller"]["chunk_timeout_s"]
    return f + c + _periods(cfg), (f"policy.frame_max_age_s {f} (chunks from the last frame) + "
                                   f"controller.chunk_timeout_s {c} + 2 control periods")


def no_reaction(cfg: Config) -> Tuple[Optional[float], str]:
    return None, "none: the loop must carry on"


def message(cfg: Config) -> Tuple[float, str]:
    return _periods(cfg) + DELIVERY_S, f"2 control periods + {DELIVERY_S} s delivery"


def runtime_message(cfg: Config) -> Tuple[float, str]:
    w = 1.0 / cfg["controller"]["state_publish_hz"]
    return w + _periods(cfg) + DELIVERY_S, (f"the runtime's loop wake-up {w:.3f} (it wakes on each robot state, "
                                            f"controller.state_publish_hz) + 2 control periods + {DELIVERY_S} s "
                                            "delivery")


def robot_state_message(cfg: Config) -> Tuple[float, str]:
    p = 1.0 / cfg["sim"]["rate_hz"]
    return p + _periods(cfg) + DELIVERY_S, (f"1 rt/lowstate period {p:.4f} + 2 control periods + {DELIVERY_S} s "
                                            "delivery")


def stall(cfg: Config) -> Tuple[float, str]:
    s = cfg["hil"]["stall_s"]
    return s + _periods(cfg) + DELIVERY_S, f"hil.stall_s {s} + 2 control periods + {DELIVERY_S} s delivery"


def restart(cfg: Config) -> Tuple[float, str]:
    b = cfg["hil"]["restart_bound_s"]
    return b, f"hil.restart_bound_s {b} (a new controller process starts and finds the command record)"


# -- injections -------------------------------------------------------------------------------------------------------

def _runtime_fault(name: str) -> Callable[[HilRig, Dict[str, Any]], float]:
    def inject(rig: HilRig, ctx: Dict[str, Any]) -> float:
        reply = rig.fault(name)
        if not reply.get("ok"):
            raise RigError(f"the runtime refused fault {name!r}: {reply.get('error')}")
        return float(reply["t"])

    return inject


def _clear_runtime_fault(rig: HilRig, ctx: Dict[str, Any]) -> None:
    reply = rig.fault("none", timeout_s=10.0)  # a "slow" runtime answers after its current inference
    if not reply.get("ok"):
        raise RigError(f"could not clear the runtime's fault: {reply.get('error')}")


def _sim(request: Dict[str, Any]) -> Callable[[HilRig, Dict[str, Any]], float]:
    def inject(rig: HilRig, ctx: Dict[str, Any]) -> float:
        reply = rig.sim(request)
        if not reply.get("ok"):
            raise RigError(f"the simulated G1 refused {request}: {reply.get('error')}")
        return float(reply["t"])

    return inject


def _press(which: str) -> Callable[[HilRig, Dict[str, Any]], float]:
    def inject(rig: HilRig, ctx: Dict[str, Any]) -> float:
        t = _sim({"press": list(rig.cfg["remote"][which])})(rig, ctx)
        time.sleep(0.1)
        rig.sim({"press": []})
        return t

    return inject


def _signal(rig: HilRig, ctx: Dict[str, Any], role: str, sig: int) -> float:
    """Send ``sig`` to ``role``: the fault time, and in ctx["harness_late_s"] how long the harness took to send it
    after (a starved harness sends late, and the reaction it measures grows by as much)."""
    t = time.monotonic()
    rig.signal(role, sig)
    ctx["harness_late_s"] = time.monotonic() - t
    return t


def _kill(role: str) -> Callable[[HilRig, Dict[str, Any]], float]:
    def inject(rig: HilRig, ctx: Dict[str, Any]) -> float:
        t = _signal(rig, ctx, role, signal.SIGKILL)
        rig.procs[role].wait()  # reap it
        return t

    return inject


def _respawn(role: str) -> Callable[[HilRig, Dict[str, Any]], None]:
    def go(rig: HilRig, ctx: Dict[str, Any]) -> None:
        if not rig.alive(role):
            rig.spawn(role)

    return go


def _kill_and_restart(role: str) -> Callable[[HilRig, Dict[str, Any]], float]:
    """kill -9, then start it again at once (systemd's Restart=on-failure, without its RestartSec)."""
    def inject(rig: HilRig, ctx: Dict[str, Any]) -> float:
        t = _signal(rig, ctx, role, signal.SIGKILL)
        rig.procs[role].wait()  # reap it
        rig.spawn(role, wait=False)
        return t

    return inject


def _terminate_and_restart(role: str) -> Callable[[HilRig, Dict[str, Any]], float]:
    """SIGTERM, let the process finish its own shutdown, start it again (`systemctl restart`)."""
    def inject(rig: HilRig, ctx: Dict[str, Any]) -> float:
        t = _signal(rig, ctx, role, signal.SIGTERM)
        code = rig.terminate(role, timeout_s=15.0)  # waits for it (a second SIGTERM changes nothing)
        if code != 0:
            ctx.setdefault("errors", []).append(f"{role} exited with code {code} after SIGTERM")
        if role == "runtime":
            ctx["bound_extra"] = _inference_in_progress(rig)
        rig.spawn(role, wait=False)
        return t

    return inject


def _inference_in_progress(rig: HilRig) -> Tuple[float, str]:
    """A SIGTERM that lands during an inference is seen when the inference ends: the bound grows by the longest
    inference the terminated runtime made (its report, written as it exits, holds it; the reference model's take a
    few ms, a real model's hundreds). Without the report, policy.max_inference_s, the longest the runtime allows."""
    try:
        with open(rig.path("runtime.json")) as f:
            ms = json.load(f)["latency_ms"]["inference"]["max"]
        s = float(ms) / 1000.0
        if not 0.0 <= s < float("inf"):
            raise ValueError(ms)
        return s, f" + the longest inference this runtime made, {s:.4f} s (a SIGTERM during one waits for its end)"
    except (OSError, ValueError, KeyError, TypeError):
        m = rig.cfg["policy"]["max_inference_s"]
        return m, f" + policy.max_inference_s {m} (an inference in progress; the runtime left no report)"


def _wait_ready(role: str) -> Callable[[HilRig, Dict[str, Any]], None]:
    return lambda rig, ctx: rig.wait_ready(role)


def _pause(role: str) -> Callable[[HilRig, Dict[str, Any]], float]:
    def inject(rig: HilRig, ctx: Dict[str, Any]) -> float:
        t = _signal(rig, ctx, role, signal.SIGSTOP)
        ctx["paused"] = role
        return t

    return inject


def _resume(rig: HilRig, ctx: Dict[str, Any]) -> None:
    role = ctx.pop("paused", None)
    if role and rig.alive(role):
        rig.signal(role, signal.SIGCONT)


def _stall_controller(rig: HilRig, ctx: Dict[str, Any]) -> float:
    t = _signal(rig, ctx, "controller", signal.SIGSTOP)
    try:
        time.sleep(rig.cfg["hil"]["stall_s"])
    finally:
        rig.signal("controller", signal.SIGCONT)
    return t


def _bad_crc(rig: HilRig, ctx: Dict[str, Any]) -> float:
    before = rig.sim({"summary": True}).get("summary", {}).get("bad_crc") if rig.with_sim else None
    topic = 1 if rig.cfg["controller"]["mode"] == "arm_sdk" else 0
    t = time.monotonic()
    ctx["bad_crc_sent"] = ctx["monitor"].publish_bad_crc(topic, 5)
    if not ctx["bad_crc_sent"]:
        raise RigError("no command seen on the wire to corrupt")
    if before is not None:  # what the robot counted: asked until all arrived (how fast is not the point), 1 s at most
        deadline = time.monotonic() + 1.0
        while True:
            time.sleep(0.05)
            after = rig.sim({"summary": True}).get("summary", {}).get("bad_crc")
            ctx["robot_bad_crc"] = None if after is None else after - before
            if ctx["robot_bad_crc"] == ctx["bad_crc_sent"] or time.monotonic() >= deadline:
                break
    return t


def _stop_after_running(rig: HilRig, ctx: Dict[str, Any]) -> None:
    rig.operator("stop")


#: Arms hanging (as in zero torque): about 1 rad from where the reference policy starts (its nominal pose).
HANGING_ARMS = {"left_shoulder_pitch": 0.3, "left_shoulder_roll": 0.0, "left_elbow": 1.31,
                "right_shoulder_pitch": 0.3, "right_shoulder_roll": 0.0, "right_elbow": 1.31}


def _start_far(rig: HilRig, ctx: Dict[str, Any]) -> float:
    """Stop the run the trial armed, put the simulated G1's arms where they hang, arm again: the controller must
    approach the policy's start pose (no first chunk may be refused as too far), then run the policy's chunks.
    The fault is the operator's stop that ends the run; the harness judges every command from the trial's start,
    the approach's included (no step beyond the velocity limit)."""
    c = rig.cfg["controller"]
    rig.operator("stop")
    if rig.wait_state(("stopped",), c["hold_s"] + max(c["stop_ramp_s"], c["hold_before_damp_s"]) + 3.0) is None:
        raise RigError(f"not stopped before posing the robot: {rig.state().detail}")
    reply = rig.sim({"pose": HANGING_ARMS})
    if not reply.get("ok"):
        raise RigError(f"the simulated G1 refused the pose: {reply.get('error')}")
    try:
        return _approach_and_run(rig, ctx)
    except BaseException:  # the next trials must not start far away: stop, then pose the robot back
        rig.operator("stop")
        if rig.wait_state(("stopped", "idle", "estop"), c["hold_s"] + max(c["stop_ramp_s"], c["hold_before_damp_s"])
                          + c["approach_timeout_s"] + 3.0) is not None:
            _pose_back(rig, ctx)
        raise


def _approach_and_run(rig: HilRig, ctx: Dict[str, Any]) -> float:
    c = rig.cfg["controller"]
    time.sleep(0.1)  # robot states at the new pose reach the controller
    reply = rig.operator("arm")
    if not reply.ok:
        raise RigError(f"arming refused: {reply.detail}")
    if rig.wait_state(("approaching",), c["arm_ramp_s"] + 2.0) is None:
        raise RigError(f"no approach after arming far from the start pose: {rig.state().detail}")
    running = rig.wait_state(("running",), c["approach_timeout_s"] + 1.0)
    if running is None:
        raise RigError(f"the approach did not end in running: {rig.state().detail}")
    ctx["approach"] = running.detail
    t_run = time.monotonic()
    time.sleep(rig.cfg["hil"]["settle_s"] + c["chunk_timeout_s"])
    status = rig.state()
    if status.state != "running":
        raise RigError(f"left running after the approach: {status.state} ({status.detail})")
    w = ctx["monitor"].window(t_run)
    mine = w["crc_ok"] & ~w["before"] & (w["topic"] == (1 if c["mode"] == "arm_sdk" else 0))
    q = w["q"][mine]
    if len(q) < 2 or float(np.abs(np.diff(q, axis=0)).max()) <= 1e-4:
        raise RigError("after the approach, no chunk moved the robot: the policy's chunks were not executed")
    t = time.monotonic()
    reply = rig.operator("stop")
    if not reply.ok:
        raise RigError(f"stop refused: {reply.detail}")
    return t


def _pose_back(rig: HilRig, ctx: Dict[str, Any]) -> None:
    """The next trials start where the policy starts again (the robot is stopped: no command moves it there)."""
    rig.sim({"pose": {name: float(g1.NOMINAL_POSE[g1.JOINT_INDEX[name]]) for name in HANGING_ARMS}})


SCENARIOS: List[Scenario] = [
    Scenario("kill_runtime", "kill -9 of the policy runtime: the action stream ends", _kill("runtime"),
             lost_action_stream, recover=_respawn("runtime")),
    Scenario("stall_runtime", "the controller's peer stalls (SIGSTOP of the runtime, SIGCONT once the robot is "
             "safe): the action stream ends, then old-session chunks come back", _pause("runtime"),
             lost_action_stream, after=_resume),
    Scenario("frozen_camera", "the camera keeps delivering the same frame", _runtime_fault("freeze_camera"),
             frozen_camera, recover=_clear_runtime_fault),
    Scenario("policy_nan", "the policy's network returns NaN", _runtime_fault("nan"), lost_action_stream,
             recover=_clear_runtime_fault),
    Scenario("chunk_outside_limits", "every chunk lies outside the joint limits", _runtime_fault("outside_limits"),
             lost_action_stream, recover=_clear_runtime_fault),
    Scenario("chunk_jump", "every chunk starts 0.5 rad from the commanded pose", _runtime_fault("jump"),
             lost_action_stream, recover=_clear_runtime_fault),
    Scenario("inference_overrun", "inference takes longer than policy.max_inference_s", _runtime_fault("slow"),
             lost_action_stream, recover=_clear_runtime_fault),
    Scenario("lost_state", "rt/lowstate stops (the simulated G1 freezes its state stream)", _sim({"freeze": True}),
             lost_robot_state, needs_sim=True, ends_state=True, recover=lambda rig, ctx: rig.sim({"freeze": False})),
    Scenario("bad_crc", "5 commands with a bad CRC on the control topic: the robot must ignore them and the loop "
             "carries on", _bad_crc, no_reaction, expect=("running",), recover=_stop_after_running),
    Scenario("remote_estop", "the remote's e-stop combination", _press("estop"), robot_state_message,
             expect=("estop",), needs_sim=True, via_sim=True),
    Scenario("remote_stop", "the remote's stop combination", _press("stop"), robot_state_message, needs_sim=True,
             via_sim=True),
    Scenario("operator_estop", "`wam-edge estop` from the operator's terminal",
             lambda rig, ctx: _operator_estop(rig), message, expect=("estop",)),
    Scenario("tilt", "the IMU reports a tilt beyond controller.max_tilt (the robot is falling)",
             lambda rig, ctx: _sim({"tilt": [rig.cfg["controller"]["max_tilt"] + 0.2, 0.0, 0.0]})(rig, ctx),
             robot_state_message, needs_sim=True, via_sim=True,
             recover=lambda rig, ctx: rig.sim({"tilt": [0.0, 0.0, 0.0]})),
    Scenario("stall_controller", "the control loop pauses for hil.stall_s (SIGSTOP .. SIGCONT)", _stall_controller,
             stall),
    Scenario("kill_controller", "kill -9 of the controller, restarted at once: the new process must take the robot "
             "from its last command to a safe state", _kill_and_restart("controller"), restart,
             after=_wait_ready("controller")),
    Scenario("restart_controller", "`systemctl restart` of the controller (SIGTERM, then a new process)",
             _terminate_and_restart("controller"), message, expect=STOPPED_OR_IDLE,
             after=_wait_ready("controller")),
    Scenario("restart_runtime", "`systemctl restart` of the policy runtime (SIGTERM, then a new process whose "
             "chunks must not move the robot)", _terminate_and_restart("runtime"), runtime_message,
             after=_wait_ready("runtime")),
    Scenario("start_far", "arms hanging far from the policy's start pose: armed, the controller approaches it "
             "at controller.approach_velocity, then runs the policy (ended by an operator's stop)", _start_far,
             message, needs_sim=True, recover=_pose_back),
    Scenario("kill_sim", "kill -9 of the simulated G1, restarted at once (the robot's state stream ends, then a "
             "fresh one starts)", _kill_and_restart("sim"), lost_robot_state, needs_sim=True, ends_state=True,
             after=_wait_ready("sim")),
]

BY_NAME = {s.name: s for s in SCENARIOS}


def _operator_estop(rig: HilRig) -> float:
    t = time.monotonic()
    reply = rig.operator("estop")
    if not reply.ok:
        raise RigError(f"e-stop refused: {reply.detail}")
    return t
