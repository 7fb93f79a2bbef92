"""The safety state machine: the one place that owns every transition of the controller (docs/safety.md).

    idle -> arming -> running <-> holding -> stopping -> stopped -> (arm) -> arming ...
    arming -> approaching -> running        (the manifest declares a start pose: move there first)
    running -> approaching -> running       (no chunk applied since arming, the first one is far: move to it first)
    approaching <-> holding; approaching -> stopping (not there within approach_s)
    (start, predecessor died driving) -> stopping
    any state -> estop (latched: only a person clears it, and only to stopped; through stopping while its
                        weight ramp is still under way)

A stop is complete (stopped) only once its time is up *and* the command last written has let go of the robot
(``released``: the arm_sdk weight is 0). The weight ramps by one tick's share per tick, so after late ticks it ends
after the stop's clock: stopping lasts until it does, and the weight never steps by more than its share.

Pure logic on a clock the caller passes in: no I/O, so every transition is tested exactly. What each state commands
(hold, weight ramp, damping) is the controller's business; this class only says which state we are in, since when,
why, and how far a ramp has come.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

IDLE, ARMING, RUNNING, HOLDING, STOPPING, STOPPED, ESTOP, APPROACHING = (
    "idle", "arming", "running", "holding", "stopping", "stopped", "estop", "approaching")
#: Every state; the index is a state's code in the command record (record.py): approaching came later and is
#: appended, so records written before it keep their meaning.
STATES = (IDLE, ARMING, RUNNING, HOLDING, STOPPING, STOPPED, ESTOP, APPROACHING)
#: States in which the policy does not drive the robot: where a run may end.
SAFE_STATES = (IDLE, STOPPED, ESTOP)
#: States in which chunks are checked: executed in running (holding resumes on a fresh chunk), taken as the
#: approach's target in approaching.
ACCEPTS_CHUNKS = (APPROACHING, RUNNING, HOLDING)
#: States entered by arming: the controller follows the one runtime session it first hears from in them.
ARMED_STATES = (ARMING, APPROACHING, RUNNING, HOLDING)


class Transition:
    __slots__ = ("t", "src", "dst", "reason")

    def __init__(self, t: float, src: str, dst: str, reason: str) -> None:
        self.t, self.src, self.dst, self.reason = t, src, dst, reason

    def to_dict(self) -> Dict[str, Any]:
        return {"t": round(self.t, 4), "from": self.src, "to": self.dst, "reason": self.reason}


class SafetyStateMachine:
    """Transitions and their timers. ``update(now, released)`` advances the timed ones (arming done, hold over,
    stop done)."""

    def __init__(self, arm_s: float, hold_s: float, stop_s: float, immediate_stop_s: float = 0.0,
                 estop_latched: bool = False, now: float = 0.0, max_log: int = 1000,
                 approach_s: float = float("inf"), approach_after_arming: bool = False) -> None:
        self.arm_s = arm_s
        self.hold_s = hold_s
        self.approach_s = approach_s  # an approach that takes longer stops the robot
        self.approach_after_arming = approach_after_arming  # a start pose is known: arming ends in approaching
        self.approach_since = now  # when the current approach began (holding in between counts)
        self._held_from = RUNNING  # where a fresh chunk resumes holding to
        self.stop_s = stop_s  # a gentle stop: arm_sdk weight ramp, or lowcmd hold before damping
        self.immediate_stop_s = immediate_stop_s  # no holding: stale state, tilt
        self.state = ESTOP if estop_latched else IDLE
        self.since = now
        self.reason = "e-stop latched from an earlier run" if estop_latched else "started"
        self.immediate = estop_latched  # this stop must not hold first (stale state, e-stop)
        self.cause: Optional[str] = self.reason if estop_latched else None  # why the robot was last held or stopped
        self.log: List[Transition] = []
        self._max_log = max_log
        # the command last written has let go of the robot (arm_sdk weight 0); the controller says so every update
        self.released = True

    # -- transitions ---------------------------------------------------------------------------------------------

    def _go(self, dst: str, now: float, reason: str) -> bool:
        if dst == self.state:
            return False
        if len(self.log) < self._max_log:
            self.log.append(Transition(now, self.state, dst, reason))
        self.state, self.since, self.reason = dst, now, reason
        return True

    def describe(self) -> str:
        """The state's reason, and what held or stopped the robot when that is something else (for `status`)."""
        if self.cause and self.cause != self.reason and self.state not in (ARMING, APPROACHING, RUNNING):
            return f"{self.reason} (cause: {self.cause})"
        return self.reason

    def restart_timer(self, now: float) -> None:
        """The current state's timed transition (a ramp, a hold) counts from ``now``."""
        self.since = now

    def arm(self, now: float, who: str) -> Optional[str]:
        """A person arms: from idle or stopped only. Returns None, or why arming was refused."""
        if self.state == ESTOP:
            return "e-stop is latched: clear it first"
        if self.state not in (IDLE, STOPPED):
            return f"cannot arm while {self.state}"
        self.immediate = False
        self._held_from = RUNNING
        self._go(ARMING, now, f"armed by {who}")
        self.cause = None
        return None

    def chunk_arrived(self, now: float) -> None:
        """A valid chunk: holding resumes what it held (running, or an approach); arming, stopped and the rest
        ignore it."""
        if self.state == HOLDING:
            self._go(self._held_from, now, "chunks resumed")

    def hold(self, now: float, reason: str) -> None:
        """Pause the policy (or the approach), keep the last targets; stops by itself if nothing resumes within
        hold_s."""
        if self.state in (RUNNING, APPROACHING):
            self._held_from = self.state
            self._go(HOLDING, now, reason)
            self.cause = reason

    def approach(self, now: float, reason: str) -> bool:
        """Running (or holding) before any chunk was applied since arming, the first chunk is far: move to it first.
        Returns whether it entered approaching."""
        if self.state not in (RUNNING, HOLDING):
            return False
        self.approach_since = now
        return self._go(APPROACHING, now, reason)

    def approached(self, now: float, reason: str = "start pose reached") -> None:
        """The approach is done: the policy's chunks are executed from here."""
        if self.state == APPROACHING:
            self._go(RUNNING, now, reason)

    def stop(self, now: float, reason: str, immediate: bool = False) -> None:
        """Bring the robot to a safe state; ``immediate`` skips holding (nothing to hold on: stale state)."""
        if self.state in (ARMING, APPROACHING, RUNNING, HOLDING):
            self.immediate = immediate
            self._go(STOPPING, now, reason)
            self.cause = reason
        elif self.state == STOPPING and immediate and not self.immediate:
            self.immediate = True  # escalate a gentle stop already under way
            self.reason = self.cause = reason
            if len(self.log) < self._max_log:
                self.log.append(Transition(now, STOPPING, STOPPING, f"escalated to an immediate stop: {reason}"))

    def resume_stop(self, now: float, reason: str, immediate: bool = False) -> bool:
        """At start only: a controller restarted after its predecessor died while driving the robot (its command
        record, record.py) takes over in stopping, from the command the robot was left on. Nothing moves again until
        a person arms. A latched e-stop wins: only from idle. Returns whether it entered stopping."""
        if self.state in (IDLE, ESTOP):  # the robot is on the predecessor's command until this one's first update
            self.released = False
        if self.state != IDLE:
            return False
        self.immediate = immediate
        self.cause = reason
        return self._go(STOPPING, now, reason)

    def estop(self, now: float, reason: str) -> None:
        """Latched: from any state. Only ``clear_estop`` by a person leaves it."""
        self.immediate = True
        if self._go(ESTOP, now, reason):
            self.cause = reason

    def clear_estop(self, now: float, who: str) -> Optional[str]:
        """A person clears the latch: to stopped, or, while the e-stop's release is still under way (``released``
        is False: the arm_sdk weight is not 0 yet), to an immediate stopping that ends in stopped once it is."""
        if self.state != ESTOP:
            return "no e-stop to clear"
        self.immediate = True
        self._go(STOPPED if self.released else STOPPING, now, f"e-stop cleared by {who}")
        return None

    def update(self, now: float, released: bool = True) -> str:
        """Advance timed transitions; returns the state. ``released``: the command last written has let go of the
        robot (arm_sdk: its weight is 0; lowcmd has no ramp to wait for: always). Stopping ends only then."""
        self.released = released
        elapsed = now - self.since
        if self.state == ARMING and elapsed >= self.arm_s:
            if self.approach_after_arming:
                self.approach_since = now
                self._go(APPROACHING, now, "armed: approaching the start pose")
            else:
                self._go(RUNNING, now, "armed")
        elif self.state == APPROACHING and now - self.approach_since >= self.approach_s:
            self.stop(now, f"the start pose was not reached within {self.approach_s} s")
        elif self.state == HOLDING and elapsed >= self.hold_s:
            self._go(STOPPING, now, f"chunks did not resume within {self.hold_s} s")
        elif self.state == STOPPING and released and \
                elapsed >= (self.immediate_stop_s if self.immediate else self.stop_s):
            self._go(STOPPED, now, "stop complete")
        return self.state

    def progress(self, now: float, duration: float) -> float:
        """How far (0..1) the current state's ramp has come."""
        if duration <= 0.0:
            return 1.0
        return min(1.0, max(0.0, (now - self.since) / duration))

    @property
    def safe(self) -> bool:
        return self.state in SAFE_STATES

    def transitions(self) -> List[Dict[str, Any]]:
        return [t.to_dict() for t in self.log]
