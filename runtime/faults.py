"""Fault injection inside the policy runtime: a test rig for `wam-edge hil`, never for field use.

Only with ``faults.enabled``. The runtime then wraps its policy and camera in the ``FaultInjecting...`` stand-ins
below and binds a REP socket on ``faults.endpoint``. Each fault makes the runtime's own, real code path fire (the
Policy's non-finite check, the overrun check, the stale-frame check) or sends what a broken policy would send
(actions outside the joint limits, a jump), so the harness sees what the controller does about it.

Socket: REP, one msgpack map per request (at most 4096 bytes), answered with one msgpack map:

  {"inject": NAME}  ->  {"ok": true, "fault": NAME, "t": time.monotonic() in the runtime when it took effect}
  {"status": true}  ->  {"ok": true, "fault": current NAME, "t": when it took effect, "injected": {NAME: count}}
  anything else     ->  {"ok": false, "error": "..."}, and nothing changes (also a multipart request, and any
                       request whose handling failed); refusals are counted by reason (FaultSocket.rejects)

NAME is one of FAULTS:
  none            no fault (healthy chunks again)
  nan             the stage that feeds the sampler's velocity writes NaN into its host output buffers after each
                  run: the policy's own finite check raises PolicyError -> heartbeat "fault", no chunk
  outside_limits  every action lies 0.5 rad beyond its joint's upper position limit (the controller must reject it)
  jump            actions + 0.5 rad, kept inside the joint limits (the controller rejects it: first_step_too_far)
  slow            each inference sleeps longer than policy.max_inference_s first -> overrun fault, no chunk
  freeze_camera   the camera keeps handing out the frame it last handed out (same seq, old stamp) -> stale frames,
                  then after policy.frame_fault_s the "no fresh camera frame" fault
A request takes effect when the runtime's loop reads it (within one wake-up: the loop also waits on this socket);
a fault acts from the next inference (or, for freeze_camera, the next frame taken) on.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

import msgpack
import numpy as np
import zmq

from runtime.cameras.base import CameraFrame, CameraSource
from runtime.policy.backends.base import StageBackend
from runtime.policy.wrapper import PolicyWrapper
from runtime.protocol import RejectCounter, sockets
from runtime.robot import g1

log = logging.getLogger("wam_edge.faults")

FAULTS: Tuple[str, ...] = ("none", "nan", "outside_limits", "jump", "slow", "freeze_camera")
MAX_REQUEST_BYTES = 4096
#: Requests up to this size are read and answered with an error; larger ones ZeroMQ drops unread (no answer).
_SOCKET_MAX_BYTES = 64 * 1024
#: outside_limits: this far beyond each joint's upper limit; jump: this offset, then kept inside the limits
OUTSIDE_LIMITS_RAD = 0.5
JUMP_RAD = 0.5
#: jump keeps actions this far inside the hard limits (float32 rounding must not push one across)
_JUMP_INSIDE_RAD = 0.01


class FaultInjector:
    """The current fault, shared by the wrappers and the socket. The runtime's loop thread is the only writer (it
    serves the socket); readers there and on other threads see either the old or the new fault."""

    def __init__(self) -> None:
        self.fault = "none"
        self.since = time.monotonic()
        self.counts: Dict[str, int] = {name: 0 for name in FAULTS if name != "none"}

    def inject(self, name: str) -> float:
        """Set the current fault; returns time.monotonic() when it took effect. ValueError for an unknown name."""
        if name not in FAULTS:
            raise ValueError(f"unknown fault {name!r} (known: {', '.join(FAULTS)})")
        now = time.monotonic()
        self.fault, self.since = name, now
        if name != "none":
            self.counts[name] += 1
            log.warning("fault injected: %s", name)
        else:
            log.warning("fault injection cleared")
        return now

    def handle(self, raw: bytes) -> Dict[str, Any]:
        """One request (msgpack bytes) -> its reply map; a bad request changes nothing."""
        if len(raw) > MAX_REQUEST_BYTES:
            return _error(f"request of {len(raw)} bytes is larger than {MAX_REQUEST_BYTES}")
        try:
            request = msgpack.unpackb(raw, raw=False, strict_map_key=True)
        except Exception as exc:  # msgpack raises several types (ValueError, ExtraData, FormatError, ...)
            return _error(f"could not decode the request as msgpack ({type(exc).__name__}: {str(exc)[:200]})")
        if not isinstance(request, dict):
            return _error(f"a request is a msgpack map, got {type(request).__name__}")
        if len(request) != 1:
            keys = ", ".join(sorted(_short(k) for k in list(request)[:8]))
            return _error(f"a request has exactly one key, 'inject' or 'status'; got {len(request)}: {keys}")
        (key, value), = request.items()
        if key == "inject":
            if not isinstance(value, str) or value not in FAULTS:
                return _error(f"unknown fault {_short(value)} (known: {', '.join(FAULTS)})")
            t = self.inject(value)
            return {"ok": True, "fault": value, "t": t}
        if key == "status":
            if value is not True:
                return _error(f"status takes true, got {_short(value)}")
            return {"ok": True, "fault": self.fault, "t": self.since, "injected": dict(self.counts)}
        return _error(f"unknown request key {_short(key)} (known: 'inject', 'status')")


def _short(value: Any) -> str:
    """A value named in an error: a short string shown (cut), anything else by its type only (never a repr of
    arbitrary, maybe deeply nested, client data)."""
    if isinstance(value, str):
        return repr(value[:32]) + ("..." if len(value) > 32 else "")
    if value is None or type(value) in (bool, int, float):
        return repr(value)[:32]
    return type(value).__name__


def _error(message: str) -> Dict[str, Any]:
    return {"ok": False, "error": message}


def _packed(reply: Dict[str, Any]) -> bytes:
    return msgpack.packb(reply, use_bin_type=True)


class FaultSocket:
    """REP socket on ``endpoint``: ``serve()`` answers the requests waiting, without blocking, each received whole and
    answered once (sockets.RequestServer). ZeroMQ's own size limit is above MAX_REQUEST_BYTES, so an oversized
    request gets an answer that says so. Refusals are counted by reason in ``rejects`` ("bad_request", "multipart",
    "handler_error") and logged rate-limited."""

    #: Requests answered per serve() at most: a flood of requests cannot hold the runtime's loop.
    MAX_PER_SERVE = 16

    def __init__(self, ctx: zmq.Context, endpoint: str, injector: FaultInjector) -> None:
        self.endpoint = endpoint
        self.injector = injector
        self.sock = sockets.rep_bound(ctx, endpoint, _SOCKET_MAX_BYTES)
        self.requests = 0
        self.rejects = RejectCounter(log.warning, "fault request")
        self._server = sockets.RequestServer(self.sock, self._reply, lambda reason: _packed(_error(reason)),
                                             self.rejects, _packed(_error("internal error")))

    @property
    def refused(self) -> int:
        return self.rejects.total

    def _reply(self, raw: bytes, now: float) -> bytes:
        reply = self.injector.handle(raw)
        if not reply["ok"]:
            self.rejects.count("bad_request", reply["error"])
        return _packed(reply)

    def serve(self) -> None:
        """Answer the waiting requests (at most MAX_PER_SERVE). Guarded: a socket error is counted, never fatal."""
        try:
            self.requests += self._server.serve(time.monotonic(), self.MAX_PER_SERVE)
        except Exception as exc:  # noqa: BLE001
            self.rejects.count("handler_error", sockets.describe_error(exc))

    def close(self) -> None:
        self.sock.close(0)


class FaultInjectingBackend(StageBackend):
    """Test-rig stand-in around the real backend: with fault "nan", fills the host output buffers of the stage
    that ran (its sinks, what the host reads) with NaN in place after the real run. No allocation per call."""

    def __init__(self, inner: StageBackend, manifest: Any, injector: FaultInjector) -> None:
        self.inner = inner
        self.injector = injector
        self.name = f"fault-injecting {inner.name}"
        sinks: Dict[str, List[np.ndarray]] = {}
        for stage in manifest.stages:
            for t in stage.outputs:
                if t.sink:
                    sinks.setdefault(stage.name, []).append(inner.host_output(stage.name, t.name))
        self._sinks: Dict[str, Tuple[np.ndarray, ...]] = {k: tuple(v) for k, v in sinks.items()}
        self._none: Tuple[np.ndarray, ...] = ()
        self.fuses_groups = inner.fuses_groups

    @classmethod
    def install(cls, policy: Any, injector: FaultInjector) -> "FaultInjectingBackend":
        """Put the stand-in between a loaded Policy and its backend (the buffers it bound stay the same arrays)."""
        wrapped = cls(policy.backend, policy.manifest, injector)
        policy.backend = wrapped
        return wrapped

    def host_input(self, stage: str, tensor: str) -> np.ndarray:
        return self.inner.host_input(stage, tensor)

    def host_output(self, stage: str, tensor: str) -> np.ndarray:
        return self.inner.host_output(stage, tensor)

    def run(self, stage: str) -> None:
        self.inner.run(stage)
        if self.injector.fault == "nan":
            for buf in self._sinks.get(stage, self._none):
                buf.fill(np.nan)

    def run_group(self, stages: Tuple[str, ...]) -> None:
        self.inner.run_group(stages)
        if self.injector.fault == "nan":
            for stage in stages:
                for buf in self._sinks.get(stage, self._none):
                    buf.fill(np.nan)

    def close(self) -> None:
        self.inner.close()

    @property
    def providers(self) -> Tuple[str, ...]:
        return self.inner.providers

    def describe(self) -> str:
        return f"fault-injecting {self.inner.describe()}"


class FaultInjectingPolicy(PolicyWrapper):
    """Test-rig stand-in around a Policy: faults that happen after inference (outside_limits, jump), before it
    (slow), and, through FaultInjectingBackend (installed here), inside it (nan). Everything else is the Policy's."""

    def __init__(self, policy: Any, injector: FaultInjector, max_inference_s: float) -> None:
        super().__init__(policy)
        self.injector = injector
        #: slow: sleep this long before the real inference, so the whole call overruns max_inference_s
        self.slow_s = max_inference_s * 1.25 + 0.02
        FaultInjectingBackend.install(policy, injector)
        m = policy.manifest
        shape = (m.horizon, m.action_dim)
        idx = g1.indices(m.action_joints)
        self._out = np.zeros(shape, np.float32)
        self._outside = np.empty(shape, np.float32)
        self._outside[...] = (g1.POSITION_MAX[idx] + OUTSIDE_LIMITS_RAD).astype(np.float32)
        self._lo = np.empty(shape, np.float32)
        self._lo[...] = (g1.POSITION_MIN[idx] + _JUMP_INSIDE_RAD).astype(np.float32)
        self._hi = np.empty(shape, np.float32)
        self._hi[...] = (g1.POSITION_MAX[idx] - _JUMP_INSIDE_RAD).astype(np.float32)

    def infer(self, images: Mapping[str, np.ndarray], state: np.ndarray) -> np.ndarray:
        fault = self.injector.fault
        if fault == "slow":
            time.sleep(self.slow_s)
        actions = self.policy.infer(images, state)
        if fault == "outside_limits":
            np.copyto(self._out, self._outside)
            return self._out
        if fault == "jump":
            np.add(actions, np.float32(JUMP_RAD), out=self._out)
            np.clip(self._out, self._lo, self._hi, out=self._out)
            return self._out
        return actions


    def __getattr__(self, name: str) -> Any:  # anything else (sampler, infer_normalised, ...) is the Policy's
        if name == "policy":  # not set yet (during construction): no recursion
            raise AttributeError(name)
        return getattr(self.policy, name)


class FaultInjectingCamera(CameraSource):
    """Test-rig stand-in around a camera source: with fault "freeze_camera" it keeps handing out the frame it last
    handed out (same seq, same old stamp), without asking the real source, whose buffer contract keeps that frame's
    arrays untouched until the next take. With no fault it is the real source."""

    #: how often a frozen wait_newer() checks whether the freeze ended
    WAIT_STEP_S = 0.01

    def __init__(self, inner: CameraSource, injector: FaultInjector) -> None:
        self.inner = inner
        self.injector = injector
        self._last: Optional[CameraFrame] = None
        self._frozen: Optional[CameraFrame] = None
        self.freezes = 0

    @property
    def names(self) -> Tuple[str, ...]:
        return self.inner.names

    def start(self) -> None:
        self.inner.start()

    def _frozen_frame(self) -> Optional[CameraFrame]:
        """The frozen frame while freeze_camera is on (freezing at the first call), else None."""
        if self.injector.fault != "freeze_camera":
            self._frozen = None
            return None
        if self._frozen is None:
            self._frozen = self._last if self._last is not None else self.inner.latest()
            self._last = self._frozen
            if self._frozen is not None:
                self.freezes += 1
                log.warning("camera frozen at frame %d", self._frozen.seq)
        return self._frozen

    def latest(self) -> Optional[CameraFrame]:
        if self.injector.fault == "freeze_camera":
            frozen = self._frozen_frame()
            if frozen is not None:
                return frozen
        self._frozen = None
        self._last = self.inner.latest()
        return self._last

    def wait_newer(self, after_seq: int, timeout: float) -> Optional[CameraFrame]:
        deadline = time.monotonic() + max(0.0, timeout)
        while self.injector.fault == "freeze_camera":
            frozen = self._frozen_frame()
            if frozen is None:
                break  # nothing was ever handed out: nothing to freeze
            if frozen.seq > after_seq:
                return frozen
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            time.sleep(min(remaining, self.WAIT_STEP_S))
        self._frozen = None
        frame = self.inner.wait_newer(after_seq, max(0.0, deadline - time.monotonic()))
        if frame is not None:
            self._last = frame
        return frame

    def close(self) -> None:
        self.inner.close()

    def stats(self) -> Dict[str, Any]:
        out = dict(self.inner.stats())
        out["frozen"] = self._frozen is not None
        out["freezes"] = self.freezes
        return out
