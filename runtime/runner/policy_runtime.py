"""PolicyRuntime: the loop of `wam-edge run` (newest frame + newest robot state -> policy -> action chunk).

Never answers old data; every chunk leaves through the outbox. Design notes: docs/runtime.md.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import uuid
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import zmq

from runtime.cameras import open_camera
from runtime.cameras.base import CameraFrame
from runtime.config import Config
from runtime.faults import FaultInjectingCamera, FaultInjectingPolicy, FaultInjector, FaultSocket
from runtime.metrics import write_json
from runtime.policy import PolicyError, load_policy
from runtime.policy.latency import (
    LatencyEstimate,
    LatencyInjectingPolicy,
    LatencySampler,
    next_trigger_time,
    next_trigger_time_in_flight,
    parse_latency,
)
from runtime.policy.policy import Policy, rtc_delay, rtc_offset
from runtime.protocol import (
    ActionChunk,
    DecodeError,
    Heartbeat,
    RejectCounter,
    RobotState,
    decode,
    encode_chunk,
    encode_heartbeat,
    sockets,
)
from runtime.protocol.subscriber import NewestSubscriber
from runtime.robot import g1
from runtime.runner.outbox import ChunkOutbox
from runtime.runner.stats import RuntimeStats
from runtime.service.notify import Notifier

log = logging.getLogger("wam_edge.runtime")

#: trigger = latency: how soon to look again when an inference was due but there was nothing fresh to answer
RETRY_S = 0.01


def camera_config(cfg: Config, used: Sequence[str]) -> Dict[str, Any]:
    """The camera section for open_camera; a view the model uses (``used``) that the layout lacks fails here."""
    camera_cfg = dict(cfg["camera"])
    if camera_cfg["replay_path"]:
        camera_cfg["replay_path"] = cfg.resolve(camera_cfg["replay_path"])
    have = [c["name"] for c in camera_cfg["layout"]]
    missing = [name for name in used if name not in have]
    if missing:
        raise ValueError(f"model {cfg['model']['path']} needs cameras {missing} that camera.layout does not have "
                         f"{have}")
    ignored = [name for name in have if name not in used]  # never preprocessed
    log.info("camera views used by the model: %s; ignored: %s", ", ".join(used), ", ".join(ignored) or "none")
    return camera_cfg


def policy_from_config(cfg: Config) -> Policy:
    """The policy as the runtime loads it: the model, backend, sampler overrides and backend options of the config."""
    p, m = cfg["policy"], cfg["model"]
    return load_policy(cfg.resolve(m["path"]), backend=m["backend"], steps=p["steps"] or None,
                       shift=p["shift"] or None, seed=p["seed"], intra_op_threads=m["intra_op_threads"],
                       verify_hashes=m["verify_hashes"], options=dict(m, cache_dir=cfg.resolve(m["cache_dir"])))


class PolicyRuntime:
    """Owns the camera, the policy and the two sockets; ``step(now)`` does whatever is due at ``now``."""

    def __init__(self, cfg: Config, ctx: Optional[zmq.Context] = None) -> None:
        p, t = cfg["policy"], cfg["transport"]
        self.policy = policy_from_config(cfg)
        manifest = self.policy.manifest
        # RTC inside the model: the real Policy (before any stand-in wraps it) and the last sent chunk, preallocated
        self.rtc = manifest.supports_rtc
        self._rtc_policy = self.policy if self.rtc else None
        self._rtc_last = np.zeros((manifest.horizon, manifest.action_dim), dtype=np.float32)
        self._rtc_last_start: Optional[float] = None  # its start on our clock (== chunk_start once one is sent)
        camera_cfg = camera_config(cfg, manifest.camera_names)
        self.state_index = g1.indices(manifest.state_joints)
        g1.indices(manifest.action_joints)  # an unknown joint name fails here, at start-up
        self.session = uuid.uuid4().hex[:12]
        self.episode = 0
        self.frame_max_age_s = p["frame_max_age_s"]
        self.frame_fault_s = p["frame_fault_s"]
        self.max_inference_s = p["max_inference_s"]
        self.last_fresh_frame_at = 0.0
        self.state_max_age_s = p["state_max_age_s"]
        self.infer_period = 1.0 / p["rate_hz"]
        self.trigger = p["trigger"]
        self.trigger_margin_s = p["trigger_margin_s"]
        self.horizon = manifest.horizon
        self.step_s = manifest.step_s
        self.latency = LatencyEstimate(p["latency_window"], p["latency_percentile"], p["cold_runs"])
        self.chunk_start: Optional[float] = None  # the last sent chunk's start: receipt time of the state it answers
        self.last_infer_start: Optional[float] = None  # ``now`` of the step that last called the policy
        # the controller holds after this long without a chunk: the next one must leave before (same config file)
        self.chunk_timeout_s = cfg["controller"]["chunk_timeout_s"]
        self.last_sent_at: Optional[float] = None
        self.heartbeat_period = 1.0 / t["heartbeat_hz"]
        self._max_bytes = t["max_message_bytes"]
        self._ctx = ctx or zmq.Context.instance()
        self._chunks = sockets.push_connected(self._ctx, t["chunks"], hwm=t["send_hwm"])
        # robot state: newest wins (drained each step, no CONFLATE); multipart and link resets are counted here
        self.rejects = RejectCounter(log.warning, "robot state")
        sockets.check_connect(t["state"])  # a state stream from a directory others control could be invented
        self._state = NewestSubscriber(self._ctx, t["state"], t["max_message_bytes"], self.rejects)
        self.camera = open_camera(camera_cfg)
        self._state_vec = np.zeros(len(manifest.state_joints), dtype=np.float32)
        self.robot_state: Optional[RobotState] = None
        self.robot_state_at = 0.0  # local receipt time
        self.health = "starting"
        self.detail = ""
        self.chunk_seq = 0
        self.hb_seq = 0
        self.next_infer = 0.0
        self.next_heartbeat = 0.0
        self.last_frame_seq = -1
        sampler = self._install_stand_ins(cfg)
        self.stats = RuntimeStats(self.policy.last_stage_ms, injected=sampler is not None)
        # every chunk goes through the outbox; in flight it waits there for its release time
        self.max_in_flight = p["max_in_flight"]
        self.in_flight = self._injecting is not None and self.max_in_flight > 1
        self.outbox = ChunkOutbox(self.max_in_flight if self.in_flight else 1, manifest.horizon,
                                  len(manifest.action_joints))
        self._newest_start: Optional[float] = None  # start of the newest chunk sent (in flight: drop older ones)
        # the loop sleeps until the next due time or until robot state (or a fault request) arrives
        self._poller = zmq.Poller()
        self._poller.register(self._state.sock, zmq.POLLIN)
        if self._fault_socket is not None:
            self._poller.register(self._fault_socket.sock, zmq.POLLIN)

    def _install_stand_ins(self, cfg: Config) -> Optional[LatencySampler]:
        """Test rigs and benchmarks only: fault injection and injected latency around the camera and the policy."""
        p = cfg["policy"]
        # test rigs only (`wam-edge hil`): the policy and camera go behind fault-injecting stand-ins
        self.faults: Optional[FaultInjector] = None
        self._fault_socket: Optional[FaultSocket] = None
        if cfg["faults"]["enabled"]:
            endpoint = cfg["faults"]["endpoint"]
            log.warning("fault injection enabled on %s: a test rig, not for field use", endpoint)
            self.faults = FaultInjector()
            self.policy = FaultInjectingPolicy(self.policy, self.faults, self.max_inference_s)
            self.camera = FaultInjectingCamera(self.camera, self.faults)
            self._fault_socket = FaultSocket(self._ctx, endpoint, self.faults)
        # benchmarks and rigs: injected latency goes outermost (around any fault-injecting stand-in), so the fault
        # stand-in still sees the real Policy and the runtime's timing sees real + injected
        sampler = parse_latency(p["inject_latency"], self.horizon * self.step_s, seed=p["seed"])
        self._injecting: Optional[LatencyInjectingPolicy] = None
        if sampler is not None:
            log.warning("injected inference latency %s: a benchmark/rig setting, not for field use", sampler.text)
            self._injecting = LatencyInjectingPolicy(self.policy, sampler)
            self.policy = self._injecting
        return sampler

    def _fault(self, now: float, detail: str) -> None:
        """Report at once (the next heartbeat goes now) and send no chunk until the cause clears. Logged once per
        fault: again only when the (heartbeat-sized) detail changes."""
        short = detail[:256]
        if self.health != "fault" or self.detail != short:
            log.error("fault: %s", detail)
            self.stats.counters["faults"] += 1
        self.health, self.detail = "fault", short
        self.next_heartbeat = now
        self._drop_pending()

    def _drop_pending(self) -> None:
        """In flight: a fault (or stopping) lets none of the pending chunks out."""
        self.stats.counters["chunks_dropped"] += self.outbox.drop_all()

    def start(self, warmup_runs: int, first_frame_timeout_s: float = 10.0) -> None:
        """Start the camera and warm the policy up on a real frame (its sizes and memory layout)."""
        self.camera.start()
        frame = self.camera.wait_newer(0, first_frame_timeout_s)
        if frame is None:
            raise RuntimeError(f"no camera frame within {first_frame_timeout_s} s from {self.camera.stats()}")
        self.policy.warmup(warmup_runs, images=frame.images)
        self.health = "ok"
        self.last_fresh_frame_at = time.monotonic()

    # -- inputs ----------------------------------------------------------------------------------------------------

    def _poll_state(self, now: float) -> None:
        """Take the newest robot state waiting, if any. Guarded: whatever goes wrong receiving or handling one message
        is counted (a DecodeError by its reason, anything else as "handler_error") and the loop goes on."""
        try:
            msg = self._state.newest(now)
            if msg is None:
                return
            state = decode(msg.buffer, ("state",), self._max_bytes)
            if state.joints_count != g1.NUM_JOINTS:
                raise DecodeError("bad_shape", f"state.q: {state.joints_count} joints, the G1 has {g1.NUM_JOINTS}")
        except DecodeError as err:
            self.rejects.reject(err)
            return
        except Exception as exc:  # noqa: BLE001 - a bug in handling one message must not end the runtime
            self.rejects.count("handler_error", sockets.describe_error(exc))
            return
        self.robot_state = state
        self.robot_state_at = now

    # -- the loop ----------------------------------------------------------------------------------------------------

    def step(self, now: float) -> None:
        if self._fault_socket is not None:
            self._fault_socket.serve()
        self._poll_state(now)
        due = self.outbox.next_release()
        if due is not None and now >= due:
            self._release_due(now)
            if self.trigger == "latency":
                self.next_infer = self.next_trigger()  # a slot is free and the estimate moved
        if now >= self.next_infer:
            if self.trigger == "fixed":
                # keep a regular grid; after a late step (or the first one) re-anchor instead of catching up in a burst
                self.next_infer += self.infer_period
                if self.next_infer <= now:
                    self.next_infer = now + self.infer_period
                self._infer_and_send(now)
            else:
                started = self._infer_and_send(now)
                if started:
                    self.next_infer = self.next_trigger()
                else:  # nothing to answer yet (no fresh frame or state): look again soon, not in a busy loop
                    self.next_infer = now + min(self.infer_period, RETRY_S)
        if now >= self.next_heartbeat:
            self.next_heartbeat = now + self.heartbeat_period
            self.hb_seq += 1
            sockets.try_send(self._chunks, encode_heartbeat(
                Heartbeat(self.session, self.hb_seq, now, self.health, self.detail)))

    def next_trigger(self) -> float:
        """trigger = latency: when the next inference is due (-inf: at once)."""
        if self.in_flight:
            coverage_end = None
            last_release = self.last_sent_at
            newest = self.outbox.newest_pending_state_at()
            if newest is not None:
                coverage_end = newest + self.horizon * self.step_s
                last_release = self.outbox.releases[-1]
            elif self.chunk_start is not None:
                coverage_end = self.chunk_start + self.horizon * self.step_s
            return next_trigger_time_in_flight(
                coverage_end, self.latency.value, self.trigger_margin_s, self.last_infer_start, self.infer_period,
                self.outbox.releases, self.max_in_flight,
                None if last_release is None else last_release + self.chunk_timeout_s)
        return next_trigger_time(self.chunk_start, self.horizon, self.step_s, self.latency.value,
                                 self.trigger_margin_s, self.last_infer_start, self.infer_period,
                                 None if self.last_sent_at is None else self.last_sent_at + self.chunk_timeout_s)

    def _infer_and_send(self, now: float) -> bool:
        """Infer and submit if there is fresh data to answer; True when the policy was called."""
        frame = self._fresh_frame(now)
        if frame is None or not self._fresh_state(now):
            return False
        self._set_inputs(now, frame)
        if not self.outbox.free:  # the trigger keeps to max_in_flight; never overwrite a pending chunk
            return False
        self._infer_and_submit(now, frame)
        return True

    def _fresh_frame(self, now: float) -> Optional[CameraFrame]:
        """The newest frame if young enough; none for ``policy.frame_fault_s``: a fault."""
        frame = self.camera.latest()
        if frame is None or now - frame.stamp > self.frame_max_age_s:
            self.stats.counters["skipped_no_frame" if frame is None else "skipped_stale_frame"] += 1
            if now - self.last_fresh_frame_at > self.frame_fault_s:
                self._fault(now, f"no fresh camera frame for {now - self.last_fresh_frame_at:.1f} s")
            return None
        self.last_fresh_frame_at = now
        return frame

    def _fresh_state(self, now: float) -> bool:
        """A robot state to answer, young on our clock (time since we received it: stamps are the controller's)."""
        if self.robot_state is None:
            self.stats.counters["skipped_no_state"] += 1
            return False
        if now - self.robot_state_at > self.state_max_age_s:
            self.stats.counters["skipped_stale_state"] += 1
            return False
        return True

    def _set_inputs(self, now: float, frame: CameraFrame) -> None:
        """The state vector and, with RTC, the executing chunk's prefix and the delay; notes the start."""
        assert self.robot_state is not None
        np.take(self.robot_state.q, self.state_index, out=self._state_vec)
        if self._rtc_policy is not None:
            self._set_rtc(self.robot_state_at)
        if self.chunk_start is not None:
            self.stats.starts_left.add((self.chunk_start + self.horizon * self.step_s - now) * 1000.0)
        self.last_infer_start = now
        self.stats.frame_age.add((now - frame.stamp) * 1000.0)

    def _infer_and_submit(self, now: float, frame: CameraFrame) -> None:
        """Call the policy; submit its chunk for the call's start + any held latency, unless that is too late."""
        state, state_at = self.robot_state, self.robot_state_at
        assert state is not None
        start = time.monotonic()
        try:
            actions, held, slept = self._infer(frame.images)
        except PolicyError as exc:
            self.stats.counters["policy_errors"] += 1
            self._fault(now, f"policy: {exc}")
            return
        done = time.monotonic()
        release = max(done, start + held)
        if release - start > self.max_inference_s:  # its answer would be old: never send it
            self.latency.add(release - start)
            self.stats.counters["overruns"] += 1
            self._fault(now, f"inference took {(release - start) * 1000:.0f} ms "
                             f"(limit {self.max_inference_s * 1000:.0f} ms)")
            return
        self.health, self.detail = "ok", ""
        if frame.seq != self.last_frame_seq:
            self.stats.counters["frames_used"] += 1
            self.last_frame_seq = frame.seq
        stages = self._stages_ms()
        own = (done - start - slept) * 1000.0 - stages  # the real call, less the network and any injected sleep
        model = stages + (slept + release - done) * 1000.0  # the network plus the injected latency, slept or held
        self.outbox.submit(actions, start, release, state.stamp, state_at, frame.stamp, own, model)
        self.stats.policy_called(self.policy.last_preprocess_ms, self.policy.last_stage_ms)
        self._release_due(done)

    def _infer(self, images: Any) -> Tuple[np.ndarray, float, float]:
        """The policy's call -> (actions, seconds to hold them after the call's start, seconds slept in it). In
        flight the injected latency is held in the outbox, otherwise it is slept inside the call."""
        if self.in_flight:
            assert self._injecting is not None
            actions, delay = self._injecting.infer_deferred(images, self._state_vec)
            self.stats.injected.add(delay * 1000.0)
            return actions, delay, 0.0
        actions = self.policy.infer(images, self._state_vec)
        if self._injecting is not None:
            self.stats.injected.add(self._injecting.last_injected_s * 1000.0)
            return actions, 0.0, self._injecting.last_slept_s
        return actions, 0.0, 0.0

    def _stages_ms(self) -> float:
        total = 0.0
        for ms in self.policy.last_stage_ms.values():
            total += ms
        return total

    def _set_rtc(self, new_start: float) -> None:
        """RTC inside the model: the executing (last sent) chunk on the new chunk's timeline, and the delay."""
        assert self._rtc_policy is not None
        if self._rtc_last_start is None:
            self._rtc_policy.set_rtc(None, 0)  # nothing executing: the model holds the current state
            return
        offset = rtc_offset(self._rtc_last_start, new_start, self.step_s, self.horizon)
        self._rtc_policy.set_rtc(self._rtc_last[offset:], rtc_delay(self.latency.value, self.step_s, self.horizon))

    def _release_due(self, now: float) -> None:
        """Send every chunk whose release time has come, in release order."""
        slot = self.outbox.pop_due(now)
        while slot >= 0:
            self._send(slot)
            slot = self.outbox.pop_due(now)

    def _send(self, slot: int) -> None:
        """One released chunk to the controller; a chunk released after a newer one answers older state: dropped."""
        c, ob = self.stats.counters, self.outbox
        start = ob.start[slot]
        released = time.monotonic()
        self.latency.add(released - start)  # start to release: the whole call, injected latency included
        if self._newest_start is not None and start < self._newest_start:
            c["chunks_dropped"] += 1
            return
        sent_from = time.monotonic()  # the runtime's own time again from here: encoding and sending
        # obs_stamp: the controller's own stamp of the state we answered; it places the chunk on its clock
        self.chunk_seq += 1
        payload = encode_chunk(ActionChunk(self.session, self.episode, self.chunk_seq, ob.state_stamp[slot],
                                           ob.frame_stamp[slot], self.policy.manifest.step_s,
                                           self.policy.manifest.action_joints, ob.actions[slot]))
        delivered = sockets.try_send(self._chunks, payload)
        sent = time.monotonic()
        if delivered:
            c["chunks_sent"] += 1
            self.chunk_start = ob.state_at[slot]  # the chunk starts (on our clock) when its state arrived
            if self.rtc:
                np.copyto(self._rtc_last, ob.actions[slot])
                self._rtc_last_start = self.chunk_start
            self.last_sent_at = sent
            self._newest_start = start
            self.stats.model.add(ob.model_ms[slot], self.chunk_seq)
        else:
            c["chunks_dropped"] += 1
        self.stats.chunk_released((sent - ob.frame_stamp[slot]) * 1000.0, (released - start) * 1000.0,
                                  ob.own_ms[slot] + (sent - sent_from) * 1000.0)

    def run(self, should_continue, pinger=None) -> None:
        while should_continue():
            now = time.monotonic()
            self.step(now)
            if pinger is not None and self.health != "fault":
                pinger.ping(now)
            wake = min(self.next_infer, self.next_heartbeat)
            due = self.outbox.next_release()
            if due is not None:
                wake = min(wake, due)
            delay = wake - time.monotonic()
            if delay > 0 and should_continue():  # a SIGTERM seen during the step (an inference) stops at once
                # wake early for robot state, which arrives often (and fault requests); bounded by the next due time
                self._poller.poll(timeout=max(1, int(delay * 1000)))

    def stop(self) -> None:
        """Tell the controller we are stopping (it holds, then stops) before the process goes."""
        self.health, self.detail = "stopping", "runtime shutting down"
        self._drop_pending()
        self.hb_seq += 1
        sockets.try_send(self._chunks, encode_heartbeat(
            Heartbeat(self.session, self.hb_seq, time.monotonic(), self.health, self.detail)))

    def report(self) -> Dict[str, Any]:
        cam = self.camera.stats()
        out: Dict[str, Any] = {
            "session": self.session,
            "frames": cam.get("frames", 0),
            "camera": cam,
            **self.stats.counters,
            "state_rejected": dict(self.rejects.counts),  # includes "multipart", "link_reset", "handler_error"
            "state_superseded": self._state.superseded,
            "backend": self.policy.describe() if hasattr(self.policy, "describe") else self.policy.manifest.name,
            "latency_ms": self.stats.latency_report(),
        }
        est = self.latency.value
        out["trigger"] = self.trigger
        out["latency_estimate_ms"] = None if est is None else round(est * 1000.0, 4)
        out["inference_starts_left_ms"] = self.stats.starts_left.summary()
        out["rtc"] = self.rtc
        out["max_in_flight"] = self.max_in_flight
        sent_any = 1 if self.stats.counters["chunks_sent"] else 0
        out["in_flight_max"] = self.outbox.most_pending if self.in_flight else sent_any
        if self.stats.injected is not None:
            out["injected_latency_ms"] = self.stats.injected.summary()
        if self.faults is not None:
            out["faults_injected"] = dict(self.faults.counts)
        return out

    def close(self) -> None:
        self.camera.close()
        # give what is queued (the last chunk, the stopping heartbeat) a bounded chance to leave
        self._chunks.close(linger=500)
        self._state.close()
        if self._fault_socket is not None:
            self._fault_socket.close()


def main(cfg: Config, report_path: Optional[str] = None, ready_file: Optional[str] = None,
         seconds: Optional[float] = None) -> int:
    """Run until SIGTERM/SIGINT (or ``seconds``), then send a stopping heartbeat and write the report."""
    notifier = Notifier.from_env(unset_environment=True)
    runtime = PolicyRuntime(cfg)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append("SIGTERM"))
    signal.signal(signal.SIGINT, lambda *_: stopping.append("SIGINT"))
    deadline = None if seconds is None else time.monotonic() + seconds
    ok = True
    try:
        runtime.start(cfg["policy"]["warmup_runs"])
        if ready_file:
            open(ready_file, "w").close()
        notifier.ready(runtime.policy.describe())
        log.info("runtime ready: %s, pid %d", runtime.policy.describe(), os.getpid())
        runtime.run(lambda: not stopping and (deadline is None or time.monotonic() < deadline),
                    notifier.watchdog_pinger())
        notifier.stopping()
        runtime.stop()
    except Exception:
        ok = False
        raise  # said once, by the CLI: one line, or the traceback (--verbose, or a bug)
    finally:
        report = runtime.report()
        report["ok"] = ok
        runtime.close()
        if report_path:
            write_json(report_path, report)
    return 0
