"""`wam-edge controller`: receives action chunks and drives the robot at its control rate, safely.

Each tick is read -> update -> write (ros2_control's shape): read the robot; take in chunks, heartbeats, operator
commands and the remote's buttons; run the monitors; let the safety state machine (safety.py, the one owner of
transitions) advance; shape the command the state calls for; pass positions through the one JointLimiter; record it
(record.py: a restarted controller takes over from it); write.
docs/safety.md describes every state, trigger and what each mode commands.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any, Callable, Dict, Optional

import numpy as np
import zmq

from runtime.config import Config
from runtime.controller.approach import Approach, load_start_pose
from runtime.controller.chunk_guard import ChunkGuard, ChunkRejected
from runtime.controller.latch import EstopLatch
from runtime.controller.limits import JointLimiter, Limits
from runtime.controller.monitors import Monitors
from runtime.controller.record import STATE_CODES, CommandRecord, Snapshot
from runtime.controller.remote import RemoteControls
from runtime.controller.safety import (
    ACCEPTS_CHUNKS,
    APPROACHING,
    ARMING,
    ESTOP,
    HOLDING,
    IDLE,
    RUNNING,
    SAFE_STATES,
    STOPPED,
    STOPPING,
    SafetyStateMachine,
)
from runtime.controller.schedule import ChunkSchedule, start_index
from runtime.controller.seam_recorder import SeamRecorder
from runtime.controller.takeover import TakeOver
from runtime.metrics import LatencyRecorder
from runtime.pacing import Pacer
from runtime.protocol import (
    ActionChunk,
    DecodeError,
    Heartbeat,
    RejectCounter,
    Reply,
    RobotState,
    decode,
    encode_reply,
    encode_state,
    sockets,
)
from runtime.robot import g1
from runtime.robot.driver import ARM_SDK, RobotDriver, RobotReading
from runtime.service import paths
from runtime.service.notify import Notifier

log = logging.getLogger("wam_edge.controller")

__all__ = ["EXIT_REFUSED", "SAFE_STATES", "Controller", "make_driver", "main"]

#: The exit status of a controller that refuses to start because its state directory, latch, record or socket
#: directory cannot be used safely (sysexits' EX_CONFIG): its unit does not restart it (RestartPreventExitStatus=).
EXIT_REFUSED = 78

#: Messages taken in per tick at most; the rest wait for the next tick (bounded work per tick).
MAX_MESSAGES_PER_TICK = 8
#: report()["chunks_applied_by_session"] counts this many sessions by name, any further ones under "(other)".
MAX_SESSIONS_COUNTED = 64

class Controller:
    """The control loop; ``tick(now)`` is one read -> update -> write cycle, ``run()`` paces it."""

    def __init__(self, cfg: Config, driver: RobotDriver, ctx: Optional[zmq.Context] = None) -> None:
        c, t = cfg["controller"], cfg["transport"]
        self.c = c
        self.mode = c["mode"]
        self.rate_hz = c["rate_hz"]
        self.period = 1.0 / self.rate_hz
        self.driver = driver
        self.limits = Limits.from_config(c)
        self.limiter = JointLimiter(self.limits)
        self.seam = c["seam"]
        self.schedule = ChunkSchedule(c["seam"], c["crossfade_s"], c["ensemble_m"], c["ensemble_chunks"])
        self.guard = ChunkGuard(self.limits, self.schedule.joint_indices)
        self.monitors = Monitors(self.limits)
        self.seam_recorder = SeamRecorder(self.rate_hz, c["seam"], c["crossfade_s"])
        self.remote = RemoteControls(cfg["remote"])
        self.tasks = list(c["tasks"])
        self.task_index = 0
        self.latch = EstopLatch(c["latch_file"])
        self.latch_file = self.latch.path
        arm_sdk = self.mode == ARM_SDK
        now = time.monotonic()
        self.record: Optional[CommandRecord] = None
        relatched = self._open_state(c["command_record"])  # PathError: refuse to start
        self.approach = Approach(self.rate_hz, c["approach_velocity"], c["max_velocity"], c["approach_tolerance"],
                                 self.limiter.lo, self.limiter.hi,
                                 load_start_pose(cfg.resolve(cfg["model"]["path"]), arm_sdk))
        self.sm = SafetyStateMachine(
            arm_s=c["arm_ramp_s"], hold_s=c["hold_s"],
            stop_s=c["stop_ramp_s"] if arm_sdk else c["hold_before_damp_s"],
            immediate_stop_s=c["estop_ramp_s"] if arm_sdk else 0.0,
            estop_latched=relatched is not None or self.latch.latched(), now=now,
            approach_s=c["approach_timeout_s"], approach_after_arming=self.approach.start_pose is not None)
        if relatched is not None:
            self.sm.reason = self.sm.cause = relatched

        self._ctx = ctx or zmq.Context.instance()
        self._inbox = self._state_pub = self._control = None
        try:
            self._inbox = sockets.pull_bound(self._ctx, t["chunks"], hwm=16, max_bytes=t["max_message_bytes"])
            self._state_pub = sockets.pub_bound(self._ctx, t["state"], hwm=4)
            self._control = sockets.rep_bound(self._ctx, t["control"])
        except BaseException:  # nothing bound or locked stays behind a controller that did not start
            for sock in (self._inbox, self._state_pub, self._control):
                if sock is not None:
                    sock.close(0)
            if self.record is not None:
                self.record.close()
            raise
        self._max_bytes = t["max_message_bytes"]
        self._publish_every = max(1, int(round(self.rate_hz / c["state_publish_hz"])))
        self.rejects = RejectCounter(log.warning, "message")
        self._command_server = sockets.RequestServer(  # operator requests: each received whole, answered once
            self._control, self._command_reply, self._refuse_command, self.rejects,
            encode_reply(Reply(False, "unknown", "internal error")))

        r = driver.read(now)
        self.q_cmd = r.q.copy()  # the last position command: the limiter's reference, never a jump from here
        self._target = r.q.copy()
        self._rejections_in_a_row = 0
        self.last_chunk_at = 0.0
        self.last_heartbeat_at = 0.0
        self.policy_health = "unknown"
        self.ticks = 0
        self.state_seq = 0
        self.chunks_received = 0
        self.chunks_applied = 0
        self.applied_by_session: Dict[str, int] = {}  # who drove: `wam-edge fuzz` checks no fuzz session ever did
        self.applied_not_newer = 0  # applied chunks whose seq was not newer than the last applied one of the session
        self._applied_last = ("", -1)  # (session, seq) of the last chunk applied
        self.first_chunk_applied_at: Optional[float] = None  # time.monotonic() of the first chunk applied
        self.chunks_ignored = 0  # valid, but arrived while the controller does not accept chunks
        self.chunks_superseded_by_hold = 0  # valid, but a fault or stopping heartbeat came after them in the same tick
        self.heartbeats = 0
        self.commands = 0
        self.pacer = Pacer(self.period)  # its missed ticks are the loop's overruns
        self._late_in_a_row = 0
        # execution of chunks (report()["execution"]); see docs/safety.md, "Seams between chunks"
        self.stalls = 0
        self._starved = False  # the executing chunk ran out while running; until a chunk resumes
        self.chunks_dropped = 0
        # per chunk decoded, from its frame's stamp (the runtime's clock: meaningful on one host, as in `wam-edge
        # bench`), keyed by seq so a bench can subtract the runtime's model time chunk by chunk
        self.frame_to_decode_ms = LatencyRecorder(1024, keyed=True)
        self._signal: Optional[str] = None
        self._last_tick_at: Optional[float] = None  # the previous tick's clock: a longer gap is a stalled loop
        self.takeover = TakeOver(self.limits, now)
        self._record_path = self.record.path if self.record is not None else None
        if self.record is not None:
            previous = self.record.read()
            if previous is not None:
                self.takeover.start(previous, now, self.sm, driver.command, self.q_cmd)
            self._write_record(now, self.sm.state)

    # -- state that outlives the process: the e-stop latch and the command record ----------------------------------

    def _open_state(self, record_path: str) -> Optional[str]:
        """Before anything is bound: the latch must be writable in a private state directory and the record must
        open, or the controller refuses to start (PathError): an e-stop it could not keep would be lost on the next
        restart. Returns the reason when the record's e-stop was latched again (latch.py), else None."""
        self.latch.check()
        if not record_path:
            return None
        try:
            self.record = CommandRecord(record_path, self.mode)
        except (OSError, ValueError) as exc:
            raise paths.PathError(f"command record {record_path}: {exc}") from None
        try:
            return self.latch.relatch_from_record(self.record)
        except paths.PathError:
            self.record.close()
            self.record = None
            raise

    def _write_record(self, now: float, state: str) -> None:
        cmd = self.driver.command
        self.record.write(STATE_CODES[state], self.sm.immediate, cmd.weight, self.q_cmd, cmd.kp, cmd.kd, now,
                          self.ticks)

    # -- operator actions (remote, control socket, signals) --------------------------------------------------------

    def _operator(self, action: str, now: float, who: str) -> Reply:
        sm = self.sm
        problem: Optional[str] = None
        if action == "arm":
            if now - self.driver.reading.stamp > self.limits.state_timeout_s:
                problem = "robot state is stale: cannot arm"
            else:
                problem = sm.arm(now, who)
                if problem is None:
                    np.copyto(self.q_cmd, self.driver.reading.q)  # arm from where the robot is
                    np.clip(self.q_cmd, self.limiter.lo, self.limiter.hi, out=self.q_cmd)
                    self.approach.arm(self.q_cmd)
                    self.guard.arm()
                    self.schedule.reset()
                    self.seam_recorder.arm()
                    self._rejections_in_a_row = 0
        elif action == "stop":
            sm.stop(now, f"stop by {who}")
        elif action == "estop":  # latched in memory at once; the reply says whether it was also saved
            sm.estop(now, f"e-stop by {who}")
            failed = self._latch(True)
            if failed:
                problem = f"e-stop active, but NOT saved ({failed}): a restart would lose it"
        elif action == "clear_estop":  # the file goes first: memory is cleared only once the file is gone
            failed = self._latch(False) if sm.state == ESTOP else None
            problem = f"e-stop kept: {failed}" if failed else sm.clear_estop(now, who)
        elif action in ("next_task", "prev_task"):
            self.task_index = (self.task_index + (1 if action == "next_task" else -1)) % len(self.tasks)
            log.info("task %d: %s", self.task_index, self.tasks[self.task_index])
        if problem:
            log.warning("%s by %s refused: %s", action, who, problem)
        return Reply(problem is None, sm.state, problem or self.tasks[self.task_index])

    def _latch(self, on: bool) -> Optional[str]:
        """Write the latch file (synced: it survives a power cut) or remove it; None, or why that failed. An event, not
        a tick's work: the sync may make this tick late by a few milliseconds, counted like any late tick."""
        return self.latch.write(self.sm.reason) if on else self.latch.remove()

    @property
    def took_over(self) -> Optional[Snapshot]:
        """The last command of a predecessor that died driving the robot (takeover.py), or None."""
        return self.takeover.snapshot

    @property
    def session(self) -> Optional[str]:
        """The runtime session driving since arming (chunk_guard.py follows it)."""
        return self.guard.session

    @property
    def released(self) -> bool:
        """Safe, and the command last written has let go of the robot: the robot is no longer on this controller's
        command (arm_sdk: an e-stop's weight ramp has come down to 0; stopped waits for that itself)."""
        return self.sm.safe and (self.sm.state == IDLE or self._let_go)

    @property
    def _let_go(self) -> bool:
        """The command last written has no authority left (arm_sdk weight 0). lowcmd has no ramp to wait for: its
        stop holds for a time, then damps from the tick it becomes stopped."""
        return self.mode != ARM_SDK or self.driver.command.weight <= 0.0

    def request_stop(self, reason: str) -> None:
        """Safe from a signal handler: the loop stops the robot at its next tick, then returns."""
        self._signal = reason

    # -- messages ---------------------------------------------------------------------------------------------------

    def _take_messages(self, now: float) -> None:
        newest: Optional[ActionChunk] = None
        valid = 0
        inbox = self._inbox
        for _ in range(MAX_MESSAGES_PER_TICK):
            try:
                raw = inbox.recv(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                break
            except zmq.ZMQError as exc:  # never fatal: the loop must go on commanding the robot
                self.rejects.count("handler_error", sockets.describe_error(exc))
                break
            try:
                if inbox.getsockopt(zmq.RCVMORE):  # received whole, refused: our messages are one part
                    raise DecodeError("multipart", f"a message of {1 + sockets.discard_rest(inbox)} parts")
                msg = decode(raw, ("chunk", "heartbeat"), self._max_bytes)
                if isinstance(msg, Heartbeat):
                    if self._on_heartbeat(msg, now) and newest is not None:
                        # the runtime said fault or stopping after these chunks: never resume the hold with them
                        self.chunks_superseded_by_hold += valid
                        newest, valid = None, 0
                    continue
                self.chunks_received += 1
                self.frame_to_decode_ms.add((time.monotonic() - msg.frame_stamp) * 1000.0, msg.seq)
                if self.sm.state not in ACCEPTS_CHUNKS:
                    self.chunks_ignored += 1
                    continue
                self._check_chunk(msg, now)
            except DecodeError as err:
                self.rejects.reject(err)
                if err.reason not in ("malformed", "bad_version", "unexpected_type", "too_large", "multipart"):
                    self._rejections_in_a_row += 1
                continue
            except ChunkRejected as err:
                self._rejected(err, now)
                continue
            except Exception as exc:  # noqa: BLE001 - a bug in handling one message: counted, a rejection, never fatal
                self.rejects.count("handler_error", sockets.describe_error(exc))
                self._rejections_in_a_row += 1
                continue
            self._rejections_in_a_row = 0
            newest = msg
            valid += 1
        if newest is not None:
            try:
                if not self._approach_with(newest, valid, now):
                    self._apply(newest, valid, now)
            except Exception as exc:  # noqa: BLE001 - a bug applying a chunk: counted, and the robot stops
                self.rejects.count("handler_error", sockets.describe_error(exc))
                self.sm.stop(now, f"internal error applying a chunk: {sockets.describe_error(exc)}")
        if self._rejections_in_a_row >= self.limits.max_rejections:
            self.sm.stop(now, f"{self._rejections_in_a_row} chunks rejected in a row")
            self._rejections_in_a_row = 0

    def _rejected(self, err: ChunkRejected, now: float) -> None:
        if err.stop is not None:
            self.sm.stop(now, err.stop)
        self.rejects.count(err.reason, err.detail)
        if err.reason == "stale_chunk":
            self.chunks_dropped += 1
        self._rejections_in_a_row += 1

    def _approach_with(self, chunk: ActionChunk, valid: int, now: float) -> bool:
        """Until the first chunk after arming is applied: a chunk taken in by the approach instead (True). The
        first one farther than max_first_step from the commanded pose starts an approach to its current action;
        during an approach, chunks only show the policy is alive (and move the target when it follows them)."""
        ap = self.approach
        if not ap.open:
            return False
        joints = self.schedule.joint_indices(chunk.joints)
        current = chunk.actions[start_index(chunk.obs_stamp, chunk.step_s, now, chunk.actions.shape[0])]
        if not ap.active:
            far = float(np.abs(current - self.q_cmd[joints]).max())
            if far <= self.limits.max_first_step:
                ap.open = False  # near enough: executed as any chunk; from here max_first_step guards
                return False
            ap.begin(joints, current, self.q_cmd, "the first chunk's current action", from_chunks=True)
            self.sm.approach(now, f"the first chunk's current action is {far:.2f} rad from the commanded pose "
                             f"(max_first_step {self.limits.max_first_step}): approaching it")
        elif ap.from_chunks:
            ap.retarget(joints, current, self.q_cmd)
        ap.chunks += 1
        self.chunks_dropped += valid - 1
        self.last_chunk_at = now
        self.sm.chunk_arrived(now)  # holding during the approach resumes it
        return True

    def _apply(self, newest: ActionChunk, valid: int, now: float) -> None:
        """The newest valid chunk of this tick takes over (the seam counters watch the hand-over)."""
        self.chunks_dropped += valid - 1  # superseded in this tick: never executed
        joints = self.schedule.joint_indices(newest.joints)
        self.seam_recorder.on_load(newest, joints, now, self.ticks, self.schedule.active)
        self.schedule.load(newest, joints, now)
        self._starved = False
        self.chunks_applied += 1
        key = newest.session if (newest.session in self.applied_by_session
                                 or len(self.applied_by_session) < MAX_SESSIONS_COUNTED) else "(other)"
        self.applied_by_session[key] = self.applied_by_session.get(key, 0) + 1
        if newest.session == self._applied_last[0] and newest.seq <= self._applied_last[1]:
            self.applied_not_newer += 1
        self._applied_last = (newest.session, newest.seq)
        if self.first_chunk_applied_at is None:
            self.first_chunk_applied_at = now
        self.last_chunk_at = now
        self.sm.chunk_arrived(now)

    def _check_chunk(self, chunk: ActionChunk, now: float) -> None:
        """Raises ChunkRejected (chunk_guard.py); until the first chunk is applied an approach goes first."""
        self.guard.check(chunk, now, self.q_cmd, self.approach.open)

    def _on_heartbeat(self, hb: Heartbeat, now: float) -> bool:
        """A heartbeat of another session than the one followed (chunk_guard.py) is counted (foreign_session) and
        changes nothing. True when it says fault or stopping: chunks received before it in the same tick are then
        not applied."""
        if not self.guard.follows(hb.session, self.sm.state):
            self.rejects.count("foreign_session", f"a heartbeat from session {hb.session!r}, not from "
                               f"{self.guard.session!r}, the one armed with")
            return False
        self.heartbeats += 1
        self.last_heartbeat_at = now
        self.policy_health = hb.health
        if hb.health in ("fault", "stopping"):
            self.sm.hold(now, f"policy heartbeat says {hb.health}: {hb.detail}")
            return True
        return False

    def _take_commands(self, now: float) -> None:
        """At most one operator request per tick, received whole and answered exactly once (sockets.RequestServer:
        a multipart request or a handler error gets a refusal, counted). Guarded: a socket error is counted, never
        fatal."""
        try:
            self.commands += self._command_server.serve(now)
        except Exception as exc:  # noqa: BLE001
            self.rejects.count("handler_error", sockets.describe_error(exc))

    def _command_reply(self, raw: bytes, now: float) -> bytes:
        try:
            cmd = decode(raw, ("command",), 4096)
        except DecodeError as err:
            self.rejects.reject(err)
            return encode_reply(Reply(False, self.sm.state, str(err)))
        reply = self._operator(cmd.cmd, now, cmd.who) if cmd.cmd != "status" else \
            Reply(True, self.sm.state, self._status(now))
        return encode_reply(reply)

    def _status(self, now: float) -> str:
        """`wam-edge status`: the state's reason (and cause); while approaching, how far is left and for how long."""
        detail = self.sm.describe()
        if self.sm.state == APPROACHING:
            detail += f" ({self.approach.progress(now, self.q_cmd, self.c['approach_timeout_s'])})"
        return "; ".join(filter(None, (detail, self.driver.status_note())))

    def _refuse_command(self, reason: str) -> bytes:
        return encode_reply(Reply(False, self.sm.state, reason))

    # -- monitors ---------------------------------------------------------------------------------------------------

    def _monitor(self, now: float, r: RobotReading) -> None:
        """The monitors (monitors.py) while the robot is not safe; stale robot state skips the rest."""
        m, sm = self.monitors, self.sm
        if sm.state in SAFE_STATES:
            return
        m.stall(sm, now, self._last_tick_at)
        if m.robot(sm, now, r, self.takeover.awaiting_state):
            m.late(sm, now, self._late_in_a_row)
            m.policy(sm, now, self.last_chunk_at, self.last_heartbeat_at)

    # -- the command each state calls for ----------------------------------------------------------------------------

    def _shape(self, now: float, state: str, r: RobotReading) -> bool:
        """Fill the driver's command for ``state``; False when nothing is to be sent (idle)."""
        cmd, c = self.driver.command, self.c
        arm_sdk = self.mode == ARM_SDK
        if self.takeover.awaiting_state:  # the robot stays on its last command, as it was before this process started
            return False
        if state == IDLE:
            self.seam_recorder.on_release()
            np.copyto(self.q_cmd, r.q)  # track the robot so that arming starts from where it is
            np.clip(self.q_cmd, self.limiter.lo, self.limiter.hi, out=self.q_cmd)
            return False
        target = self._target
        np.copyto(target, self.q_cmd)
        if state == RUNNING and self.schedule.active:
            if not self.schedule.target_at(now, target):
                self._starved = True
                self.sm.hold(now, "chunk ran out")
        elif state == APPROACHING:
            self.approach.target(now, self.q_cmd, target)
        if self._starved:
            if state in (RUNNING, HOLDING):
                self.stalls += 1  # driven by the policy, no fresh action: a stall
            else:
                self._starved = False
        damp = not arm_sdk and (state in (STOPPED, ESTOP) or (state == STOPPING and self.sm.immediate))
        if damp:
            np.copyto(target, r.q)  # kp is 0: the position is not pulled anywhere
            np.clip(target, self.limiter.lo, self.limiter.hi, out=target)
            np.copyto(self.q_cmd, target)
            self.seam_recorder.on_release()
        else:
            clamped = self.limiter.clamped_ticks
            self.limiter.apply(target, self.q_cmd)  # limits, in one place
            self.seam_recorder.on_command(now, target, self.q_cmd, self.limiter.clamped_ticks != clamped)
            np.copyto(self.q_cmd, target)
        np.copyto(cmd.q, self.q_cmd)
        cmd.dq[:] = 0.0
        cmd.tau[:] = 0.0
        cmd.enable[:] = True
        if arm_sdk:
            np.copyto(cmd.kp, g1.DEFAULT_KP)
            np.copyto(cmd.kd, g1.DEFAULT_KD)
            if state == ARMING:
                cmd.weight = self.sm.progress(now, c["arm_ramp_s"])
            elif state in (APPROACHING, RUNNING, HOLDING):
                cmd.weight = 1.0
            else:  # stopping, stopped, e-stop: release the upper body to Unitree's controller, never abruptly
                ramp = c["estop_ramp_s"] if (state == ESTOP or self.sm.immediate) else c["stop_ramp_s"]
                share = self.period / ramp if ramp > 0 else 1.0  # one tick's share, late tick or not
                w = cmd.weight - share
                cmd.weight = w if w > share * 1e-6 else 0.0  # a rounding residue is no authority: 0 on time
        elif damp:
            cmd.kp[:] = 0.0
            cmd.kd[:] = c["damping_kd"]
        elif state == STOPPING and self.takeover.holds(self.sm.since):  # hold at the recorded gains
            self.takeover.gains(cmd)
        else:
            scale = self.sm.progress(now, c["arm_ramp_s"]) if state == ARMING else 1.0
            np.multiply(g1.DEFAULT_KP, scale, out=cmd.kp)
            np.copyto(cmd.kd, g1.DEFAULT_KD)
        return True

    # -- the tick -----------------------------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        r = self.driver.read(now)  # read
        if self.takeover.awaiting_state:
            self.takeover.on_state(now, r, self.sm, self.driver.command, self.q_cmd)
        self._take_messages(now)
        self._take_commands(now)
        action = self.remote.poll(r.buttons, now)
        if action is not None:
            self._operator(action, now, "remote")
        if self._signal is not None:
            self.sm.stop(now, self._signal)
        self._monitor(now, r)
        if self.approach.active:
            self._approach_tick(now, r)
        state = self.sm.update(now, self._let_go)  # update: a stop is complete once what was written let go
        send = self._shape(now, state, r)
        if self.record is not None:
            self._write_record(now, state)
        if send:
            self.driver.write()  # write
        self._last_tick_at = now
        if self.ticks % self._publish_every == 0:
            self.state_seq += 1
            sockets.try_send(self._state_pub, encode_state(RobotState(
                self.state_seq, now, state, r.q, r.dq, self.tasks[self.task_index])))
        self.ticks += 1

    def _approach_tick(self, now: float, r: RobotReading) -> None:
        """An approach under way: done once at the target (then running), or over when something stopped it."""
        ap, state = self.approach, self.sm.state
        if state == APPROACHING and ap.done(self.q_cmd, r.q):
            took = 0.0 if ap.started_at is None else now - ap.started_at
            self.sm.approached(now, f"start pose reached ({ap.source}, {ap.distance:.2f} rad in {took:.1f} s)")
            ap.finish(now, "reached")
        elif state not in (ARMING, APPROACHING, HOLDING):  # stopped by a trigger, the operator, or its timeout
            ap.finish(now, f"{state}: {self.sm.reason}")

    def run(self, should_continue=lambda: True, notifier: Optional[Notifier] = None,
            on_ready: Optional[Callable[[], None]] = None) -> None:
        """Pace ticks on absolute deadlines; a late tick is counted and the schedule re-anchored (no bursts); a gap
        over max_tick_gap_s between two ticks (the process was paused or starved) stops the robot at once (_monitor).
        After a signal, keeps ticking until the robot is in a safe state and released (``released``), then returns.

        systemd: READY after the first tick that saw fresh robot state; a watchdog ping on every tick while the
        loop keeps its deadlines. Stale robot state does not withhold pings: the controller handles it itself (it
        stops the robot and keeps commanding the stop), and a watchdog kill would end that.
        """
        notifier = notifier or Notifier(None)
        pinger = notifier.watchdog_pinger()
        ready = False
        self._last_tick_at = None  # however long before the loop started, that was no stall
        pacer = self.pacer
        pacer.start()
        while should_continue() and not (self._signal is not None and self.released):
            now = pacer.wait()
            self._late_in_a_row = self._late_in_a_row + 1 if pacer.late else 0
            self.tick(now)
            if not ready and now - self.driver.reading.stamp <= self.limits.state_timeout_s:
                ready = True
                notifier.ready(f"{self.sm.state}, {self.rate_hz:.0f} Hz, {self.mode}")
                pinger.reset()
                if on_ready is not None:
                    on_ready()
            if ready and self._late_in_a_row < self.limits.max_missed_ticks:
                pinger.ping(now)

    def report(self) -> Dict[str, Any]:
        return {
            "state": self.sm.state,
            "safe": self.sm.safe,
            "released": self.released,
            "mode": self.mode,
            "control_ticks": self.ticks,
            "chunks_received": self.chunks_received,
            "chunks_applied": self.chunks_applied,
            "chunks_applied_by_session": dict(self.applied_by_session),
            "chunks_applied_not_newer": self.applied_not_newer,
            "first_chunk_applied_t": (None if self.first_chunk_applied_at is None
                                      else round(self.first_chunk_applied_at, 4)),
            "chunks_ignored": self.chunks_ignored,
            "chunks_superseded_by_hold": self.chunks_superseded_by_hold,
            "heartbeats": self.heartbeats,
            "commands": self.commands,
            "policy_health": self.policy_health,
            "rejected": dict(self.rejects.counts),
            "stops": [t for t in self.sm.transitions() if t["to"] in (HOLDING, STOPPING, STOPPED, ESTOP)],
            "transitions": self.sm.transitions(),
            "overruns": self.pacer.missed,
            "period_error_ms": self.pacer.period_error.summary(),
            "limiter": {"clamped_ticks": self.limiter.clamped_ticks,
                        "non_finite_ticks": self.limiter.non_finite_ticks,
                        "max_step_rad": round(self.seam_recorder.max_step, 6),
                        "max_step_allowed_rad": round(self.limiter.max_step, 6)},
            "execution": {
                "seam": self.seam,
                "stalls": self.stalls,
                **self.seam_recorder.report(),
                "frame_to_decode_ms": self.frame_to_decode_ms.summary(keyed=True),
                "chunks_dropped": self.chunks_dropped,
                "chunks_evicted": self.schedule.evicted,
                "seam_traces": self.seam_recorder.traces(),
            },
            "robot_link": self.driver.report(),
            "approach": self.approach.report(),
            "task": self.tasks[self.task_index],
            "final_q": [round(float(v), 5) for v in self.q_cmd],
            "command_record": self._record_path,
            "took_over": self.takeover.report(),
        }

    def close(self) -> None:
        if self.record is not None:  # the final state: a clean exit leaves safe behind (or what the robot is on)
            self._write_record(time.monotonic(), self.sm.state)
            self.record.close()
            self.record = None
        self._inbox.close(0)
        self._state_pub.close(0)
        self._control.close(0)
        self.driver.close()


def lock_memory() -> bool:
    """mlockall, so the control loop never waits on a page fault; only where the limit allows all of it (the
    systemd unit sets LimitMEMLOCK=infinity): with a small limit, MCL_FUTURE would make later allocations fail."""
    import ctypes
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft != resource.RLIM_INFINITY:
        log.info("memory not locked: RLIMIT_MEMLOCK is %d bytes (the systemd unit sets it unlimited)", soft)
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mlockall(1 | 2) != 0:  # MCL_CURRENT | MCL_FUTURE
        log.warning("mlockall failed: %s", os.strerror(ctypes.get_errno()))
        return False
    return True


def make_driver(cfg: Config) -> RobotDriver:
    c, s = cfg["controller"], cfg["sim"]
    if c["driver"] == "sim":
        from runtime.robot.sim_g1 import SimulatedG1

        return SimulatedG1(mode=c["mode"], time_constant_s=s["time_constant_s"], initial_pose=s["initial_pose"])
    from runtime.robot.dds.driver import DdsG1Driver, release_motion_control

    d = cfg["dds"]
    if c["mode"] == "lowcmd" and c["release_motion_control"]:
        try:  # before our link: unitree_sdk2py creates the DDS domain itself; the link then shares it
            was = release_motion_control(d["domain_id"], d["interface"] or None)
            log.info("Unitree's motion controller released (was %r)", was or "none")
        except RuntimeError as exc:
            log.warning("lowcmd mode: %s", exc)
    return DdsG1Driver(mode=c["mode"], domain_id=d["domain_id"], interface=d["interface"] or None,
                       lowstate_crc=d["lowstate_crc"])


def main(cfg: Config, report_path: Optional[str] = None, ready_file: Optional[str] = None,
         seconds: Optional[float] = None) -> int:
    """Run until SIGTERM/SIGINT (or ``seconds``), bring the robot to a safe state, write the report.
    Exit 0 when it ended safe."""
    from runtime.metrics import write_json

    notifier = Notifier.from_env(unset_environment=True)
    lock_memory()
    driver = make_driver(cfg)
    try:
        controller = Controller(cfg, driver)
    except paths.PathError as exc:  # its state or sockets are not safe to use: a restart would not change that
        driver.close()
        log.critical("controller refuses to start: %s", exc)
        notifier.status(f"refused to start: {exc}")
        return EXIT_REFUSED

    def on_signal(signum, _frame) -> None:
        controller.request_stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    deadline = None if seconds is None else time.monotonic() + seconds

    def keep_going() -> bool:
        if deadline is not None and time.monotonic() >= deadline:
            controller.request_stop("time limit")
        return True

    def on_ready() -> None:  # robot state is fresh: only now may a person arm
        if ready_file:
            open(ready_file, "w").close()
        log.info("controller ready at %.0f Hz, %s mode, driver %s, state %s", controller.rate_hz, controller.mode,
                 cfg["controller"]["driver"], controller.sm.state)

    try:
        controller.run(keep_going, notifier, on_ready)
    finally:
        notifier.stopping()
        report = controller.report()
        controller.close()
        if report_path:
            write_json(report_path, report)
    return 0 if report["safe"] else 1
