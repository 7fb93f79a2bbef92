"""`wam-edge hil`: run each fault scenario N times against the simulated G1 (or a G1 on a stand) and judge the wire.

One trial: bring the rig to a known state (every process up, no fault, the controller stopped or idle), arm, let the
policy drive for hil.settle_s, inject the fault, wait until the controller reports a safe state, watch the wire for
hil.observe_s more, then judge every command published since the trial began (runtime/hil/judge.py). A trial passes
when the controller ended where the scenario expects, the reaction came within the scenario's bound, every command
after it stayed safe, and no command in the trial was non-finite, outside the joint limits, or a step beyond the
velocity limit. The JSON report has one row per scenario and trial, and ``ok`` over all of them.
"""

from __future__ import annotations

import platform
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from runtime.config import Config
from runtime.controller.safety import SAFE_STATES
from runtime.hil.judge import judge
from runtime.hil.rig import HilRig, RigError
from runtime.hil.scenarios import BY_NAME, DELIVERY_S, SCENARIOS, Scenario
from runtime.metrics import worst_gap, write_json
from runtime.service import scheduling


def _prepare(rig: HilRig) -> None:
    """Every process up, the simulated robot neutral, no runtime fault, the controller safe (stopped if a broken-off
    trial left it driving: chunks that resume would otherwise keep it out of a safe state) and not latched."""
    for role in ("sim", "controller", "runtime"):
        if role == "sim" and not rig.with_sim:
            continue
        if not rig.alive(role):
            rig.spawn(role)
    if rig.with_sim:
        reply = rig.sim({"press": [], "tilt": [0.0, 0.0, 0.0], "freeze": False})
        if not reply.get("ok"):
            raise RigError(f"the simulated G1 did not answer: {reply.get('error')}")
    reply = rig.fault("none", timeout_s=10.0)
    if not reply.get("ok"):
        raise RigError(f"the runtime's fault socket did not answer: {reply.get('error')}")
    c = rig.cfg["controller"]
    if rig.state().state not in SAFE_STATES:  # a trial that broke off left it driving: stopped, as a person would
        rig.operator("stop")
    settle = c["chunk_timeout_s"] + c["hold_s"] + max(c["stop_ramp_s"], c["hold_before_damp_s"]) + 3.0
    status = rig.wait_state(SAFE_STATES, settle)
    if status is None:
        raise RigError(f"the controller did not reach a safe state within {settle:.1f} s: {rig.state().detail}")
    if status.state == "estop":  # the harness stands in for the person who clears it
        reply = rig.operator("clear_estop")
        if not reply.ok:
            raise RigError(f"clearing the e-stop was refused: {reply.detail}")
        # cleared during the e-stop's weight ramp, the controller is stopping until the weight is 0
        if rig.wait_state(("stopped",), c["estop_ramp_s"] + 2.0) is None:
            raise RigError(f"not stopped after clearing the e-stop: {rig.state().detail}")


def run_trial(rig: HilRig, monitor, sc: Scenario, trial: int) -> Dict[str, Any]:
    cfg = rig.cfg
    c, h = cfg["controller"], cfg["hil"]
    mode = c["mode"]
    max_step = c["max_velocity"] / c["rate_hz"]
    bound, formula = sc.bound(cfg)
    row: Dict[str, Any] = {"scenario": sc.name, "trial": trial, "ok": False, "expect": list(sc.expect),
                           "bound_s": None if bound is None else round(bound, 4), "bound": formula,
                           "reaction_s": None, "safe_after_s": None,
                           "final_state": None, "reason": None, "errors": []}
    errors: List[str] = row["errors"]
    ctx: Dict[str, Any] = {"monitor": monitor}
    t_start = time.monotonic()
    t_fault: Optional[float] = None
    try:
        _prepare(rig)
        reply = rig.operator("arm")
        if not reply.ok:
            raise RigError(f"arming refused: {reply.detail}")
        if rig.wait_state(("running",), c["arm_ramp_s"] + 2.0) is None:
            raise RigError(f"not running {c['arm_ramp_s'] + 2.0:.1f} s after arming: {rig.state().detail}")
        t_run = time.monotonic()
        time.sleep(h["settle_s"])
        status = rig.state()
        if status.state != "running":
            raise RigError(f"left running before the fault: {status.state} ({status.detail})")
        driving = judge(monitor.window(t_run), mode, None, max_step)
        if driving["commands"] == 0:
            raise RigError("no command reached the wire while running")
        ctx["sim_gaps"] = _sim_gaps(rig, t_start)  # before the fault: kill_sim replaces the process that knows them
        t_fault = sc.inject(rig, ctx)
        if "bound_extra" in ctx and bound is not None:  # what the bound depends on, known once injected
            bound, formula = bound + ctx["bound_extra"][0], formula + ctx["bound_extra"][1]
            row["bound_s"], row["bound"] = round(bound, 4), formula
        if "running" in sc.expect:
            time.sleep(h["observe_s"])
        else:
            wait = (bound or 0.0) + c["hold_s"] + max(c["stop_ramp_s"], c["hold_before_damp_s"]) + 3.0
            status = rig.wait_state(SAFE_STATES, wait)
            if status is None:
                errors.append(f"no safe state within {wait:.1f} s of the fault")
            else:
                row["safe_after_s"] = round(time.monotonic() - t_fault, 3)
            sc.after(rig, ctx)
            time.sleep(h["observe_s"])
        status = rig.state()
        row["final_state"], row["reason"] = status.state, status.detail
        t_end = time.monotonic()
        j = judge(monitor.window(t_start, t_end), mode, None if "running" in sc.expect else t_fault, max_step)
        row["wire"] = j
        row["reaction_s"] = j["reaction_s"]
        errors.extend(ctx.get("errors", []))
        if status.state not in sc.expect:
            errors.append(f"ended {status.state} ({status.detail}), expected {' or '.join(sc.expect)}")
        for key, what in (("non_finite", "non-finite"), ("out_of_limits", "outside the joint limits"),
                          ("steps_over_limit", "stepping beyond the velocity limit"),
                          ("other_topic", f"on the topic {mode} mode does not use")):
            if j[key]:
                errors.append(f"{j[key]} commands {what}")
        sent = ctx.get("bad_crc_sent", 0)
        if j["bad_crc"] != sent:
            errors.append(f"{j['bad_crc']} commands with a bad CRC on the wire ({sent} injected by the harness)")
        if "robot_bad_crc" in ctx and ctx["robot_bad_crc"] != sent:
            errors.append(f"the simulated G1 counted {ctx['robot_bad_crc']} bad-CRC commands of {sent} injected")
        if "running" not in sc.expect:
            if j["reaction_s"] is None:
                errors.append("no final run of safe commands after the fault: the robot was still being driven")
            elif bound is not None and j["reaction_s"] > bound:
                errors.append(f"reaction {j['reaction_s']:.4f} s exceeds the bound {bound:.4f} s ({formula})")
            if not j["released_at_end"]:
                errors.append("the last command does not release the robot (arm_sdk weight 0 / lowcmd kp 0)")
        sc.recover(rig, ctx)
    except RigError as exc:
        errors.append(str(exc))
    except Exception as exc:  # noqa: BLE001 - one broken trial must not lose the report of the others
        errors.append(f"{type(exc).__name__}: {exc}")
    row["t_fault"] = t_fault
    t_end = time.monotonic()
    row["seconds"] = round(t_end - t_start, 3)
    gaps = ctx.get("sim_gaps", []) + _sim_gaps(rig, t_start)  # (the same gap twice does not matter)
    row["rig"] = rig_lateness(cfg, sc, gaps, monitor.lateness(t_start), ctx.get("harness_late_s"), t_start,
                              t_fault, row.get("wire", {}).get("first_safe_t"), t_end, bound)
    row["invalid"] = row["rig"]["starved"]
    row["ok"] = not errors
    if errors:
        row["logs"] = {r: rig.log_tail(r, 8) for r in ("controller", "runtime") + (("sim",) if rig.with_sim else ())}
    return row


def _sim_gaps(rig: HilRig, since: float) -> List[List[float]]:
    """The simulated G1's publishing gaps since ``since`` ([[t_end, gap_s], ...]); [] without one or if it is gone."""
    if not rig.with_sim or not rig.alive("sim"):
        return []
    reply = rig.sim({"summary": {"since": since}}, timeout_s=2.0)
    return list(reply.get("summary", {}).get("gaps", [])) if reply.get("ok") else []


def rig_lateness(cfg: Config, sc: Scenario, sim_gaps: Sequence[Sequence[float]],
                 monitor_late: Sequence[Sequence[float]], harness_late_s: Optional[float], t_start: float,
                 t_fault: Optional[float], first_safe_t: Optional[float], t_end: float,
                 bound: Optional[float]) -> Dict[str, Any]:
    """How late the rig's own parts were during one trial, each against the bound its lateness threatens
    (docs/hil.md, "When the rig itself starves"); ``starved``: why the trial is invalid, or None.

    - The simulated G1's publishing gaps, anywhere in the trial (up to the fault where the fault is the end of its
      state stream): the controller stops the robot once its state is controller.state_timeout_s old, at the last
      tick before (one control period early), a hop after the publication: a gap of state_timeout_s - 1 period -
      DELIVERY_S could stop it for the rig's sake, before the fault or in place of the reaction.
    - Its gaps between the fault and the bound, where the fault travels in its robot state (remote, tilt): the
      bound allows DELIVERY_S for that hop.
    - The harness's delay in sending a signal after taking the fault time, and the wire monitor's lateness in
      stamping the commands from the fault to the first of the final safe run: either adds to the measured
      reaction, beyond the DELIVERY_S the bound allows for a hop.
    """
    c = cfg["controller"]
    state_gap = c["state_timeout_s"] - 1.0 / c["rate_hz"] - DELIVERY_S
    until_state = t_fault if (sc.ends_state and t_fault is not None) else t_end
    checks = [("the simulated G1's publishing", worst_gap(sim_gaps, t_start, until_state), state_gap)]
    if t_fault is not None:
        if sc.via_sim:
            end = t_fault + (bound if bound is not None else cfg["hil"]["observe_s"])
            checks.append(("the simulated G1's publishing after the fault", worst_gap(sim_gaps, t_fault, end),
                           DELIVERY_S))
        if harness_late_s is not None:
            checks.append(("the harness sending the fault", (harness_late_s, t_fault), DELIVERY_S))
        if "running" not in sc.expect:
            checks.append(("the wire monitor's stamps", worst_gap(monitor_late, t_fault, first_safe_t or t_end),
                           DELIVERY_S))
    out: Dict[str, Any] = {"starved": None, "worst": {}}
    for what, (gap, t), limit in checks:
        out["worst"][what] = {"gap_ms": round(gap * 1000.0, 1), "limit_ms": round(limit * 1000.0, 1),
                              "ended_t": round(t, 4)}
        if gap > limit and out["starved"] is None:
            out["starved"] = f"rig starved: {gap * 1000.0:.0f} ms gap in {what} (limit {limit * 1000.0:.0f} ms)"
    return out


def run_until_valid(rig: HilRig, monitor, sc: Scenario, trial: int,
                    progress: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """One trial, rerun while the rig itself starved during it (``row["invalid"]``), at most hil.rerun_starved times:
    an invalid trial is neither a pass nor a failure of the system. The row returned is the last attempt, with
    ``reruns`` and ``invalid_attempts`` (the reason, reaction and errors of each invalid one)."""
    limit = rig.cfg["hil"]["rerun_starved"]
    invalid: List[Dict[str, Any]] = []
    while True:
        row = run_trial(rig, monitor, sc, trial)
        row["reruns"], row["invalid_attempts"] = len(invalid), invalid
        if row["invalid"]:
            row["ok"] = False
            row["rerun"] = len(invalid) < limit
        if progress is not None:
            progress(row)
        if not row["invalid"] or len(invalid) >= limit:
            return row
        invalid.append({k: row.get(k) for k in ("invalid", "ok", "reaction_s", "errors", "rig")})


def select(names: Optional[Sequence[str]]) -> List[Scenario]:
    if not names:
        return list(SCENARIOS)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ValueError(f"unknown scenarios {unknown}; known: {', '.join(BY_NAME)}")
    return [BY_NAME[n] for n in names]


def run_hil(cfg: Config, overrides: Sequence[str], trials: int, names: Optional[Sequence[str]] = None,
            report_path: Optional[str] = None, progress: Optional[Callable[[Dict[str, Any]], None]] = None,
            log_dir: Optional[str] = None) -> Dict[str, Any]:
    from runtime.hil.wire_monitor import WireMonitor  # needs cyclonedds

    scenarios = select(names)
    with_sim = cfg["hil"]["robot"] == "sim"
    rows: List[Dict[str, Any]] = []
    skipped: List[Dict[str, str]] = []
    errors: List[str] = []
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="wam-edge-hil-") as tmp:
        rig = HilRig(cfg, overrides, tmp, with_sim, log_dir)
        d = cfg["dds"]
        monitor = WireMonitor(d["domain_id"], "lo" if with_sim else (d["interface"] or None)).start()
        stamping = monitor.threads()  # the rig's instrument: real-time below the units' processes, so it stamps on time
        rig.placements[scheduling.MONITOR].threads(stamping)
        codes: Dict[str, Optional[int]] = {}
        try:
            for sc in scenarios:
                if sc.needs_sim and not with_sim:
                    skipped.append({"scenario": sc.name, "why": "needs the simulated G1's fault socket "
                                    "(hil.robot: stand)"})
                    continue
                for trial in range(trials):
                    rows.append(run_until_valid(rig, monitor, sc, trial, progress))
        except KeyboardInterrupt:
            errors.append("interrupted")
        finally:
            codes = rig.close()
            wire = monitor.summary()
            monitor.close()
            rig.placements[scheduling.MONITOR].undo(stamping)
    injected = sum(r.get("wire", {}).get("bad_crc", 0) for r in rows if r["scenario"] == "bad_crc")
    for key in ("non_finite", "out_of_limits"):
        if wire.get(key):
            errors.append(f"{wire[key]} commands {key.replace('_', ' ')} over the whole run")
    if wire.get("bad_crc", 0) > injected:
        errors.append(f"{wire['bad_crc'] - injected} bad-CRC commands not injected by the harness")
    failed = [f"{r['scenario']}#{r['trial']}" for r in rows if not r["ok"] and not r["invalid"]]
    starved = [f"{r['scenario']}#{r['trial']}" for r in rows if r["invalid"]]
    if starved:
        errors.append(f"the rig itself starved: {', '.join(starved)} still invalid after hil.rerun_starved "
                      f"({cfg['hil']['rerun_starved']}) reruns each; a rig fault, not a system fault: run it on a "
                      "quieter machine (docs/hil.md)")
    by_scenario: Dict[str, Dict[str, Any]] = {}
    for r in rows:
        s = by_scenario.setdefault(r["scenario"], {"trials": 0, "passed": 0, "reruns": 0, "reaction_s": [],
                                                   "bound_s": r["bound_s"]})
        s["trials"] += 1
        s["passed"] += int(r["ok"])
        s["reruns"] += r["reruns"]
        if r["reaction_s"] is not None:
            s["reaction_s"].append(r["reaction_s"])
    for s in by_scenario.values():
        rs = s.pop("reaction_s")
        s["reaction_max_s"] = max(rs) if rs else None
        s["reaction_mean_s"] = round(sum(rs) / len(rs), 4) if rs else None
    report = {
        "ok": bool(rows) and not failed and not errors,
        "failed": failed,
        "rig_starved": starved,
        "reruns": sum(r["reruns"] for r in rows),
        "invalid": [f"{r['scenario']}#{r['trial']}: {a['invalid']}" for r in rows for a in r["invalid_attempts"]],
        "errors": errors,
        "robot": cfg["hil"]["robot"],
        "mode": cfg["controller"]["mode"],
        "control_rate_hz": cfg["controller"]["rate_hz"],
        "trials": trials,
        "seconds": round(time.monotonic() - t0, 1),
        "scenarios": by_scenario,
        "skipped": skipped,
        "rows": rows,
        "wire": {k: wire.get(k) for k in ("commands", "lowcmd", "arm_sdk", "bad_crc", "non_finite",
                                           "out_of_limits")},
        "exit_codes": codes,
        "restarts": dict(rig.starts),
        "scheduling": rig.placements.records(),
        "host": {"python": platform.python_version(), "machine": platform.machine()},
    }
    if report_path:
        write_json(report_path, report)
    return report


def _ms(seconds: Optional[float]) -> str:
    return "none" if seconds is None else f"{seconds * 1000:.0f} ms"


def print_row(row: Dict[str, Any], out=sys.stdout) -> None:
    r, b = row["reaction_s"], row["bound_s"]
    reaction = "   n/a  " if r is None else f"{r * 1000:7.1f} ms"
    verdict = "ok  " if row["ok"] else ("invalid" if row.get("invalid") else "FAIL")
    line = (f"  {verdict} {row['scenario']:<22} #{row['trial']}  reaction {reaction} "
            f"(bound {_ms(b)})  -> {row['final_state']}")
    if row.get("invalid"):
        line += f"  invalid ({row['invalid']}): " + ("rerun" if row.get("rerun") else
                                                     "not rerun, hil.rerun_starved reached")
    out.write(line + "\n")
    for e in row["errors"]:
        out.write(f"       {e}\n")
    out.flush()


def print_summary(report: Dict[str, Any], out=sys.stdout) -> None:
    passed = sum(s["passed"] for s in report["scenarios"].values())
    out.write(f"wam-edge hil: {'OK' if report['ok'] else 'FAILED'}: {passed}/{len(report['rows'])} trials passed "
              f"in {report['seconds']} s ({report['robot']}, {report['mode']}); {report['reruns']} rerun because "
              f"the rig itself starved\n")
    for name, s in report["scenarios"].items():
        mx = "n/a" if s["reaction_max_s"] is None else f"{s['reaction_max_s'] * 1000:.1f} ms"
        rerun = f", {s['reruns']} rerun (rig starved)" if s["reruns"] else ""
        out.write(f"  {name:<22} {s['passed']}/{s['trials']}  worst reaction {mx} (bound {_ms(s['bound_s'])})"
                  f"{rerun}\n")
    for s in report["skipped"]:
        out.write(f"  skipped {s['scenario']}: {s['why']}\n")
    for e in report["errors"]:
        out.write(f"  error: {e}\n")
    for role, how in report["scheduling"].items():
        refused = f" (refused: {'; '.join(how['refused'])})" if how["refused"] else ""
        out.write(f"  {role}: {how['got']}{refused}\n")
    w = report["wire"]
    out.write(f"  wire: {w['commands']} commands ({w['arm_sdk']} arm_sdk, {w['lowcmd']} lowcmd), non-finite "
              f"{w['non_finite']}, outside limits {w['out_of_limits']}, bad CRC {w['bad_crc']} (all injected)\n")
