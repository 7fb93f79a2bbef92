"""One fuzz run: for each socket, start its processes, send every class's share of malformed messages, watch the
processes the whole time, and count.

Per socket the classes go one after the other (each class's messages together, so a crash or a stall is blamed on
the class that caused it). After each class the processes must show they are alive and answering (a robot state
and an operator reply, or a chunk and a heartbeat, newer than the class's last message). A process that exits is a
crash; one that stops answering or sending is a stall. Either way the rest of that class is skipped, the
processes are started again (a fresh private directory) and the run goes on with the next class, so one run shows
every class that crashes. RSS is read after start-up and again at the end.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional

from runtime.config import Config
from runtime.fuzz import messages
from runtime.fuzz.rig import FuzzError, Incarnation, describe_exit
from runtime.fuzz.targets import FUZZ_DEFAULTS, Options, Target

#: How often the processes are checked while messages go out.
CHECK_S = 0.02

Hook = Callable[[str, Dict[str, int]], None]


class TargetRun:
    """The counts of one socket."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.sent = 0
        self.crashes = 0
        self.stalls = 0
        self.restarts = 0
        self.events: List[Dict[str, Any]] = []
        self.classes: Dict[str, Dict[str, Any]] = {}
        self.rss_before: Dict[str, Optional[int]] = {}
        self.rss_after: Dict[str, Optional[int]] = {}
        self.reports: List[Dict[str, Dict[str, Any]]] = []
        self.exit_codes: List[Dict[str, Optional[int]]] = []
        self.seconds = 0.0
        self.error: Optional[str] = None

    def cls(self, name: str, planned: int) -> Dict[str, Any]:
        return self.classes.setdefault(name, {"planned": planned, "sent": 0, "crashes": 0, "stalls": 0,
                                              "skipped": 0})


def _start(target: Target, cfg: Config, overrides: List[str], opts: Options, run: TargetRun,
           on_started: Optional[Hook]) -> Incarnation:
    roles = target.active_roles()
    name = f"{target.name}-{len(run.exit_codes) + 1}"
    inc = Incarnation(cfg, FUZZ_DEFAULTS + list(overrides), {}, roles, opts.log_dir, name,
                      cfg["demo"]["startup_timeout_s"])
    inc.role_overrides = target.role_overrides(inc)
    try:
        inc.check()
        target.inc = inc
        target.started_at = time.monotonic()
        target.before_spawn(inc)
        for role in roles:
            inc.spawn(role)
        for role in roles:
            if role == "sim":
                inc.wait_ready(role, is_ready=lambda: _sim_ready(target, inc))
            else:
                inc.wait_ready(role, pump=lambda: target.startup_pump(time.monotonic()))
        target.after_ready(inc)
    except BaseException:
        try:
            target.close()
        except Exception:  # noqa: BLE001 - peers that were never opened
            pass
        inc.stop(timeout_s=5.0)
        inc.remove()
        raise
    if on_started is not None:
        on_started(target.name, {role: p.pid for role, p in inc.procs.items()})
    return inc


def _sim_ready(target: Target, inc: Incarnation) -> bool:
    import msgpack

    from runtime.protocol import sockets

    raw = sockets.request(target.zctx, inc.endpoint("sim"), msgpack.packb({}), 0.2)
    return raw is not None


def _finish(target: Target, inc: Incarnation, run: TargetRun, failed: bool) -> None:
    """Close the fuzzer's peers and stop (or, after a failure, kill) the processes; keep their reports."""
    try:
        target.close()
    except Exception:  # noqa: BLE001 - a peer that never opened (start-up failed)
        pass
    codes = inc.stop(timeout_s=5.0 if failed else 15.0)  # a stalled process may still write its report
    run.exit_codes.append(codes)
    run.reports.append({role: p.report() for role, p in inc.procs.items()})
    inc.remove()


def _failure(target: Target, inc: Incarnation, now: float) -> Optional[Dict[str, Any]]:
    dead = inc.dead()
    if dead is not None:
        code = dead.exit_code()
        return {"kind": "crash", "process": dead.role, "exit": describe_exit(code if code is not None else 0),
                "returncode": code, "log_tail": dead.log_tail()}
    problem = target.stalled(now)
    if problem:
        return {"kind": "stall", "detail": problem}
    return None


def _send_class(target: Target, inc: Incarnation, cls: messages.FuzzClass, count: int, rng: Any,
                crec: Dict[str, Any], run: TargetRun, deadline: Optional[float]) -> Optional[Dict[str, Any]]:
    """Send the class's messages, checking the processes every CHECK_S; the crash or stall that ended it, or None."""
    next_check = 0.0
    for i in range(count):
        if deadline is not None and time.monotonic() > deadline:
            crec["skipped"] += count - i
            return None
        msg = cls.make(target.ctx, rng)
        if any(len(f) > target.ctx.max_bytes for f in msg.frames):
            msg.oversized = True  # the receiving socket drops it (and its peer): no answer to wait for
        problem = target.send(msg)
        if problem is None:
            crec["sent"] += 1
            run.sent += 1
        now = time.monotonic()
        if problem is not None or now >= next_check:
            next_check = now + CHECK_S
            event = _failure(target, inc, now) or ({"kind": "stall", "detail": problem} if problem else None)
            if event is not None:
                event.update({"class": cls.name, "message": i + 1})
                crec["skipped"] += count - i - 1
                return event
    return None


def _settle(target: Target, inc: Incarnation, cls: messages.FuzzClass, count: int,
            stall_s: float) -> Optional[Dict[str, Any]]:
    """After a class: the processes must show they are alive and answering within stall_s, and the target puts
    back what the class may have changed; the crash or stall, or None."""
    class_end = time.monotonic()
    event: Optional[Dict[str, Any]] = None
    while event is None:
        now = time.monotonic()
        target.pump(now)
        event = _failure(target, inc, now)
        if event is None and target.answered_since(class_end):
            problem = target.after_class()
            if not problem:
                return None
            event = {"kind": "stall", "detail": problem}
        elif event is None and now > class_end + stall_s:
            event = {"kind": "stall", "detail": f"no sign of life within {stall_s:.1f} s after the class ended"}
        time.sleep(0.001)
    event.update({"class": cls.name, "message": count, "after_class": True})
    return event


def run_target(target: Target, cfg: Config, overrides: List[str], opts: Options,
               on_started: Optional[Hook] = None, progress: Optional[Callable[[str], None]] = None) -> TargetRun:
    """Fuzz one socket: every class in turn, processes restarted after a crash or a stall."""
    run = TargetRun(target)
    t0 = time.monotonic()
    plan = messages.plan(target.link, messages.classes_for(target.link, opts.classes, opts.canary), opts.messages)
    all_classes = [c.name for c in messages.LINKS[target.link]]
    deadline = None if opts.seconds is None else t0 + opts.seconds
    say = progress or (lambda line: None)
    try:
        inc = _start(target, cfg, overrides, opts, run, on_started)
    except FuzzError as exc:
        run.error = str(exc)
        run.seconds = time.monotonic() - t0
        return run
    run.rss_before = inc.rss()
    for cls, count in plan:
        crec = run.cls(cls.name, count)
        if deadline is not None and time.monotonic() > deadline:
            crec["skipped"] = count
            continue
        target.ctx.class_index = all_classes.index(cls.name)
        target.ctx.class_name = cls.name
        crec["ready"] = target.before_class()  # a controller target: driving when the class starts
        target.windows.append((time.monotonic(), cls.name))
        rng = messages.rng_for(opts.seed, target.name, cls.name)
        event = _send_class(target, inc, cls, count, rng, crec, run, deadline) or \
            _settle(target, inc, cls, count, opts.stall_s)
        if event is not None:
            kind = "crashes" if event["kind"] == "crash" else "stalls"
            setattr(run, kind, getattr(run, kind) + 1)
            crec[kind] += 1
            run.events.append(event)
            target.failed_classes.add(cls.name)
            say(f"  {target.name}: {event['kind']} during {cls.name} (message {event['message']}): "
                f"{event.get('exit') or event.get('detail')}")
            run.rss_after = inc.rss()
            _finish(target, inc, run, failed=True)
            run.restarts += 1
            try:
                inc = _start(target, cfg, overrides, opts, run, on_started)
            except FuzzError as exc:
                run.error = f"restart after the {event['kind']}: {exc}"
                run.seconds = time.monotonic() - t0
                return run
        say(f"  {target.name}: {cls.name}: {crec['sent']} sent")
    run.rss_after = inc.rss()
    _finish(target, inc, run, failed=False)
    run.seconds = time.monotonic() - t0
    return run


def run_fuzz(cfg: Config, overrides: List[str], targets: List[str], opts: Options,
             on_started: Optional[Hook] = None, progress: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Fuzz each named socket in turn; the report (see report.py)."""
    from runtime.fuzz import report
    from runtime.fuzz.targets import TARGETS

    runs = []
    for name in targets:
        target = TARGETS[name](cfg, opts)
        if progress is not None:
            progress(f"{name}: {target.socket}")
        runs.append(run_target(target, cfg, overrides, opts, on_started, progress))
    return report.build(runs, opts, targets)
