"""`wam-edge controller`: receives action chunks and drives the robot at its control rate.

Each tick is read -> update -> write (ros2_control's shape): read the robot, take in new messages, compute the
target from the executing chunk, pass it through the one JointLimiter, write it, and now and then publish the robot
state back. The first watchdog: when chunks stop arriving (or the policy reports a fault) the controller holds its
last safe targets, and if chunks do not resume it stops; a stop is latched for the life of the process. It never
jumps: the limiter bounds every step.
"""

from __future__ import annotations

import logging
import signal
import time
from typing import Any, Dict, List, Optional

import numpy as np
import zmq

from runtime.config import Config
from runtime.controller.limits import JointLimiter
from runtime.controller.schedule import ChunkSchedule
from runtime.metrics import LatencyRecorder
from runtime.protocol import (
    ActionChunk,
    DecodeError,
    Heartbeat,
    RejectCounter,
    RobotState,
    decode,
    encode_state,
    sockets,
)
from runtime.robot import g1
from runtime.robot.sim_g1 import SimulatedG1

log = logging.getLogger("wam_edge.controller")

WAITING, RUNNING, HOLDING, STOPPED = "waiting", "running", "holding", "stopped"
#: States in which the robot is not being driven by the policy: where a run may end.
SAFE_STATES = (WAITING, HOLDING, STOPPED)
#: Messages taken in per tick at most; the rest wait for the next tick (bounded work per tick).
MAX_MESSAGES_PER_TICK = 8


class Controller:
    """The control loop; ``tick(now)`` is one read -> update -> write cycle, ``run()`` paces it."""

    def __init__(self, cfg: Config, driver: Any, ctx: Optional[zmq.Context] = None) -> None:
        c = cfg["controller"]
        t = cfg["transport"]
        self.rate_hz = c["rate_hz"]
        self.period = 1.0 / self.rate_hz
        self.chunk_timeout_s = c["chunk_timeout_s"]
        self.hold_s = c["hold_s"]
        self.max_chunk_age_s = c["max_chunk_age_s"]
        self.driver = driver
        self.limiter = JointLimiter(self.rate_hz, c["max_velocity"], c["position_margin"])
        self.schedule = ChunkSchedule()
        self._ctx = ctx or zmq.Context.instance()
        self._inbox = sockets.pull_bound(self._ctx, t["chunks"], hwm=16, max_bytes=t["max_message_bytes"])
        self._state_pub = sockets.pub_bound(self._ctx, t["state"], hwm=4)
        self._max_bytes = t["max_message_bytes"]
        self._publish_every = max(1, int(round(self.rate_hz / c["state_publish_hz"])))
        self.rejects = RejectCounter(log.warning, "message")

        q, _ = driver.read(time.monotonic())
        self.command = q.copy()  # the last command written: the limiter's reference, never a jump from here
        self._target = q.copy()
        self.state = WAITING
        self.state_since = time.monotonic()
        self.last_chunk_at = 0.0
        self.ticks = 0
        self.state_seq = 0
        self.chunks_received = 0
        self.chunks_superseded = 0
        self.heartbeats = 0
        self.policy_health = "unknown"
        self.stops: List[Dict[str, Any]] = []
        self.period_error = LatencyRecorder()
        self.overruns = 0
        self._max_step = 0.0
        self._step = np.zeros(g1.NUM_JOINTS)
        self._stop_requested: Optional[str] = None

    # -- state machine -------------------------------------------------------------------------------------------

    def _enter(self, state: str, now: float, reason: str) -> None:
        if state == self.state:
            return
        log.info("controller %s -> %s: %s", self.state, state, reason)
        if state in (HOLDING, STOPPED):
            self.stops.append({"t": round(now, 4), "from": self.state, "to": state, "reason": reason})
        self.state = state
        self.state_since = now
        if state != RUNNING:
            self.schedule.active = False

    def request_stop(self, reason: str) -> None:
        """Safe to call from a signal handler: the loop acts on it at its next tick."""
        self._stop_requested = reason

    # -- messages -------------------------------------------------------------------------------------------------

    def _take_messages(self, now: float) -> None:
        newest: Optional[ActionChunk] = None
        for _ in range(MAX_MESSAGES_PER_TICK):
            try:
                raw = self._inbox.recv(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                break
            try:
                msg = decode(raw, ("chunk", "heartbeat"), self._max_bytes)
                if isinstance(msg, Heartbeat):
                    self._on_heartbeat(msg, now)
                    continue
                self._check_chunk(msg, now)
            except DecodeError as err:
                self.rejects.reject(err)
                continue
            self.chunks_received += 1
            if newest is not None:
                self.chunks_superseded += 1
            newest = msg
        if newest is not None:
            self._on_chunk(newest, now)

    def _check_chunk(self, chunk: ActionChunk, now: float) -> None:
        try:
            self.schedule.joint_indices(chunk.joints)
        except KeyError as exc:
            raise DecodeError("unknown_joint", f"chunk.joints: {exc.args[0]}") from None
        age = now - chunk.obs_stamp
        if age > self.max_chunk_age_s:
            raise DecodeError("stale_chunk", f"answers a robot state {age:.3f} s old (limit {self.max_chunk_age_s})")
        if age < -self.period:
            raise DecodeError("future_chunk", f"obs_stamp {chunk.obs_stamp:.3f} is after now {now:.3f}")

    def _on_chunk(self, chunk: ActionChunk, now: float) -> None:
        if self.state == STOPPED:
            self.rejects.reject(DecodeError("stopped", "controller is stopped (latched); chunk ignored"))
            return
        self.schedule.load(chunk, self.schedule.joint_indices(chunk.joints))
        self.last_chunk_at = now
        if self.state != RUNNING:
            self._enter(RUNNING, now, "chunk received")

    def _on_heartbeat(self, hb: Heartbeat, now: float) -> None:
        self.heartbeats += 1
        self.policy_health = hb.health
        if hb.health in ("fault", "stopping") and self.state == RUNNING:
            self._enter(HOLDING, now, f"policy heartbeat says {hb.health}: {hb.detail}")

    # -- the tick ---------------------------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        q, dq = self.driver.read(now)  # read
        self._take_messages(now)

        target = self._target  # update
        np.copyto(target, self.command)
        if self._stop_requested is not None and self.state != STOPPED:
            self._enter(STOPPED, now, self._stop_requested)
        if self.state == RUNNING:
            if now - self.last_chunk_at > self.chunk_timeout_s:
                self._enter(HOLDING, now, f"no chunk for {self.chunk_timeout_s} s")
            elif not self.schedule.target_at(now, target):
                self._enter(HOLDING, now, "chunk ran out")
        elif self.state == HOLDING and now - self.state_since >= self.hold_s:
            self._enter(STOPPED, now, f"chunks did not resume within {self.hold_s} s")

        self.limiter.apply(target, self.command)  # limits, in one place
        np.subtract(target, self.command, out=self._step)
        step = float(np.abs(self._step).max())
        if step > self._max_step:
            self._max_step = step
        np.copyto(self.command, target)
        self.driver.write(self.command)  # write

        if self.ticks % self._publish_every == 0:
            self.state_seq += 1
            sockets.try_send(self._state_pub, encode_state(RobotState(self.state_seq, now, self.state, q, dq)))
        self.ticks += 1

    def run(self, should_continue=lambda: True) -> None:
        """Pace ticks on absolute deadlines; a late tick is counted and the schedule re-anchored (no bursts)."""
        next_tick = time.monotonic()
        while should_continue() and not (self.state == STOPPED and self._stop_requested is not None):
            now = time.monotonic()
            delay = next_tick - now
            if delay > 0:
                time.sleep(delay)
                now = time.monotonic()
            error = now - next_tick
            self.period_error.add(error * 1000.0)
            if error > self.period:
                self.overruns += 1
                next_tick = now
            self.tick(now)
            next_tick += self.period

    def report(self) -> Dict[str, Any]:
        return {
            "state": self.state,
            "safe": self.state in SAFE_STATES,
            "control_ticks": self.ticks,
            "chunks_received": self.chunks_received,
            "chunks_superseded": self.chunks_superseded,
            "heartbeats": self.heartbeats,
            "policy_health": self.policy_health,
            "rejected": dict(self.rejects.counts),
            "stops": list(self.stops),
            "overruns": self.overruns,
            "period_error_ms": self.period_error.summary(),
            "limiter": {"clamped_ticks": self.limiter.clamped_ticks,
                        "non_finite_ticks": self.limiter.non_finite_ticks,
                        "max_step_rad": round(self._max_step, 6),
                        "max_step_allowed_rad": round(self.limiter.max_step, 6)},
            "final_q": [round(float(v), 5) for v in self.command],
        }

    def close(self) -> None:
        self._inbox.close(0)
        self._state_pub.close(0)
        self.driver.close()


def make_driver(cfg: Config) -> Any:
    s = cfg["sim"]
    if cfg["controller"]["driver"] == "sim":
        return SimulatedG1(time_constant_s=s["time_constant_s"], initial_pose=s["initial_pose"])
    raise ValueError(f"controller.driver: unknown driver {cfg['controller']['driver']!r}")


def main(cfg: Config, report_path: Optional[str] = None, ready_file: Optional[str] = None,
         seconds: Optional[float] = None) -> int:
    """Run until SIGTERM/SIGINT (or ``seconds``); end stopped; write the report. 0 when it ended safe."""
    from runtime.metrics import write_json

    controller = Controller(cfg, make_driver(cfg))
    signal.signal(signal.SIGTERM, lambda *_: controller.request_stop("SIGTERM"))
    signal.signal(signal.SIGINT, lambda *_: controller.request_stop("SIGINT"))
    deadline = None if seconds is None else time.monotonic() + seconds
    if deadline is not None:
        def keep_going() -> bool:
            if time.monotonic() >= deadline:
                controller.request_stop("time limit")
            return True
    else:
        def keep_going() -> bool:
            return True
    if ready_file:
        open(ready_file, "w").close()
    log.info("controller ready at %.0f Hz (driver %s)", controller.rate_hz, cfg["controller"]["driver"])
    try:
        controller.run(keep_going)
    finally:
        report = controller.report()
        controller.close()
        if report_path:
            write_json(report_path, report)
    return 0 if report["safe"] else 1
