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
from runtime.hil.scenarios import BY_NAME, SCENARIOS, Scenario
from runtime.metrics import write_json


def _prepare(rig: HilRig) -> None:
    """Every process up, the simulated robot neutral, no runtime fault, the controller safe and not latched."""
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
        t_fault = sc.inject(rig, ctx)
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
    row["seconds"] = round(time.monotonic() - t_start, 3)
    row["ok"] = not errors
    if errors:
        row["logs"] = {r: rig.log_tail(r, 8) for r in ("controller", "runtime") + (("sim",) if rig.with_sim else ())}
    return row


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
    from runtime.hil.wire import WireMonitor  # needs cyclonedds

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
        codes: Dict[str, Optional[int]] = {}
        try:
            for sc in scenarios:
                if sc.needs_sim and not with_sim:
                    skipped.append({"scenario": sc.name, "why": "needs the simulated G1's fault socket "
                                    "(hil.robot: stand)"})
                    continue
                for trial in range(trials):
                    row = run_trial(rig, monitor, sc, trial)
                    rows.append(row)
                    if progress is not None:
                        progress(row)
        except KeyboardInterrupt:
            errors.append("interrupted")
        finally:
            codes = rig.close()
            wire = monitor.summary()
            monitor.close()
    injected = sum(r.get("wire", {}).get("bad_crc", 0) for r in rows if r["scenario"] == "bad_crc")
    for key in ("non_finite", "out_of_limits"):
        if wire.get(key):
            errors.append(f"{wire[key]} commands {key.replace('_', ' ')} over the whole run")
    if wire.get("bad_crc", 0) > injected:
        errors.append(f"{wire['bad_crc'] - injected} bad-CRC commands not injected by the harness")
    failed = [f"{r['scenario']}#{r['trial']}" for r in rows if not r["ok"]]
    by_scenario: Dict[str, Dict[str, Any]] = {}
    for r in rows:
        s = by_scenario.setdefault(r["scenario"], {"trials": 0, "passed": 0, "reaction_s": [],
                                                   "bound_s": r["bound_s"]})
        s["trials"] += 1
        s["passed"] += int(r["ok"])
        if r["reaction_s"] is not None:
            s["reaction_s"].append(r["reaction_s"])
    for s in by_scenario.values():
        rs = s.pop("reaction_s")
        s["reaction_max_s"] = max(rs) if rs else None
        s["reaction_mean_s"] = round(sum(rs) / len(rs), 4) if rs else None
    report = {
        "ok": bool(rows) and not failed and not errors,
        "failed": failed,
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
        "scheduling": dict(rig.realtime),
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
    line = (f"  {'ok  ' if row['ok'] else 'FAIL'} {row['scenario']:<22} #{row['trial']}  reaction {reaction} "
            f"(bound {_ms(b)})  -> {row['final_state']}")
    out.write(line + "\n")
    for e in row["errors"]:
        out.write(f"       {e}\n")
    out.flush()


def print_summary(report: Dict[str, Any], out=sys.stdout) -> None:
    passed = sum(s["passed"] for s in report["scenarios"].values())
    out.write(f"wam-edge hil: {'OK' if report['ok'] else 'FAILED'}: {passed}/{len(report['rows'])} trials passed "
              f"in {report['seconds']} s ({report['robot']}, {report['mode']})\n")
    for name, s in report["scenarios"].items():
        mx = "n/a" if s["reaction_max_s"] is None else f"{s['reaction_max_s'] * 1000:.1f} ms"
        out.write(f"  {name:<22} {s['passed']}/{s['trials']}  worst reaction {mx} (bound {_ms(s['bound_s'])})\n")
    for s in report["skipped"]:
        out.write(f"  skipped {s['scenario']}: {s['why']}\n")
    for e in report["errors"]:
        out.write(f"  error: {e}\n")
    for role, how in report["scheduling"].items():
        if how:
            out.write(f"  {role}: {how}\n")
    w = report["wire"]
    out.write(f"  wire: {w['commands']} commands ({w['arm_sdk']} arm_sdk, {w['lowcmd']} lowcmd), non-finite "
              f"{w['non_finite']}, outside limits {w['out_of_limits']}, bad CRC {w['bad_crc']} (all injected)\n")
