"""`wam-edge demo`: the whole loop on the embedded default, as two real processes.

Starts the controller (with the simulated G1) and the policy runtime, each as its own process over ZeroMQ ipc
sockets in a private directory, lets them run, stops the runtime first (the controller holds, then stops: the
watchdog path) and then the controller, and sums up both reports. Exit 0 only when the loop ran without errors and
ended in a safe state.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from runtime.config import Config
from runtime.controller import operator
from runtime.controller.safety import SAFE_STATES
from runtime.metrics import write_json
from runtime.service import scheduling


def config_args(config_path: Optional[str], overrides: Sequence[str]) -> List[str]:
    args = ["--config", config_path] if config_path else []
    for o in overrides:
        args += ["--set", o]
    return args


def _spawn(role: str, config_path: Optional[str], overrides: Sequence[str], report: str, ready: str,
           placement: Optional[scheduling.Placement] = None) -> subprocess.Popen:
    """`wam-edge <role>` (controller or run); with ``placement``, scheduled as its systemd unit (its real-time
    priority comes once it is ready: placement.realtime())."""
    cmd = [sys.executable, "-m", "runtime.cli", role, "--report", report, "--ready-file", ready]
    cmd += config_args(config_path, overrides)
    return subprocess.Popen(cmd) if placement is None else placement.spawn(cmd)


def _wait_files(paths: List[str], procs: List[subprocess.Popen], timeout: float) -> Optional[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                return f"process {p.args[3]} exited early with code {p.returncode}"
        if all(os.path.exists(p) for p in paths):
            return None
        time.sleep(0.05)
    return f"not ready within {timeout} s"


def _stop(proc: subprocess.Popen, timeout: float) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return -9


def _load(path: str) -> Dict[str, Any]:
    import json

    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def controller_timing(ct: Dict[str, Any]) -> Dict[str, Any]:
    """The controller report's loop timing as runtime/bench/reference_loop.timing() gives the reference loop's."""
    from runtime.bench.reference_loop import timing_from

    return timing_from(ct.get("control_ticks", 0), ct.get("overruns", 0), ct.get("period_error_ms", {}))


def loop_overrides(tmp: str, dds: bool) -> List[str]:
    """The loop's private endpoints and files in the directory ``tmp`` (the demo, the bench, `wam-edge hil`)."""
    own = [f"transport.chunks=ipc://{tmp}/chunks", f"transport.state=ipc://{tmp}/state",
           f"transport.control=ipc://{tmp}/control", f"controller.latch_file={tmp}/estop.latched",
           f"controller.command_record={tmp}/controller.record",
           f"sim.control=ipc://{tmp}/sim"]
    if dds:  # the demo never drives a real robot: a simulated G1 on loopback, in its own process
        own.append("dds.interface=lo")
    return own


def run_demo(cfg: Config, overrides: Sequence[str], seconds: float, report_path: Optional[str],
             watch: Optional[Callable[[Dict[str, int]], None]] = None) -> Dict[str, Any]:
    """``watch`` (benchmarks): called about every 50 ms during the run with the processes' pids by role."""
    errors: List[str] = []
    with tempfile.TemporaryDirectory(prefix="wam-edge-demo-") as tmp:
        dds = cfg["controller"]["driver"] == "dds"
        all_overrides = list(overrides) + loop_overrides(tmp, dds)
        files = {k: os.path.join(tmp, k) for k in ("controller.json", "runtime.json", "controller.ready",
                                                       "runtime.ready", "sim.json", "reference.json")}
        t_start = time.monotonic()
        places = scheduling.Placements(cfg["demo"]["scheduling"])
        sim = None
        if dds:
            sim = places["sim"].spawn([sys.executable, "-m", "runtime.cli", "sim", "--summary", files["sim.json"]]
                                      + config_args(cfg.path, all_overrides), stdout=subprocess.DEVNULL)
        controller = _spawn("controller", cfg.path, all_overrides, files["controller.json"], files["controller.ready"],
                            places["controller"])
        runtime = _spawn("run", cfg.path, all_overrides, files["runtime.json"], files["runtime.ready"],
                         places["runtime"])
        # the machine's floor, beside the controller for the whole run (runtime/bench/reference_loop.py)
        reference = places[scheduling.REFERENCE].spawn([sys.executable, "-m", "runtime.bench.reference_loop",
                                                        "--report", files["reference.json"]])
        procs = [controller, runtime, reference] + ([sim] if sim else [])
        try:
            problem = _wait_files([files["controller.ready"], files["runtime.ready"]], procs,
                                  cfg["demo"]["startup_timeout_s"])
            startup_s = time.monotonic() - t_start
            if not problem:  # the controller is ready once it has fresh robot state: the simulated G1 is up too
                for placement in places.by_role.values():
                    placement.realtime()
            if not problem:  # the demo stands in for the person who arms the robot
                reply = operator.send(f"ipc://{tmp}/control", "arm", "wam-edge demo", timeout_s=5.0)
                if not reply.ok:
                    problem = f"arming refused: {reply.detail}"
            if problem:
                errors.append(f"start-up: {problem}")
            else:
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    if any(p.poll() is not None for p in procs):
                        errors.append("a process exited during the run")
                        break
                    if watch is not None:
                        watch({"controller": controller.pid, "runtime": runtime.pid})
                    time.sleep(0.05)
            # the runtime goes first: the controller must hold, then stop on its own (the watchdog path)
            rc_runtime = _stop(runtime, 15.0)
            c = cfg["controller"]
            stop_s = c["stop_ramp_s"] if c["mode"] == "arm_sdk" else c["hold_before_damp_s"]
            deadline = time.monotonic() + c["chunk_timeout_s"] + c["hold_s"] + stop_s + 2.0
            while time.monotonic() < deadline:
                reply = operator.send(f"ipc://{tmp}/control", "status", "wam-edge demo", timeout_s=1.0)
                if reply.state in SAFE_STATES:
                    break
                time.sleep(0.1)
            rc_controller = _stop(controller, 10.0)
            _stop(reference, 5.0)
            if sim is not None:
                _stop(sim, 10.0)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        rt = _load(files["runtime.json"])
        ct = _load(files["controller.json"])
        wire = _load(files["sim.json"]) if dds else {}
        ref = _load(files["reference.json"])

    if rc_runtime != 0:
        errors.append(f"runtime exited with code {rc_runtime}")
    if rc_controller != 0:
        errors.append(f"controller exited with code {rc_controller}")
    if not rt or not ct:
        errors.append("a process wrote no report")
    if ct.get("chunks_received", 0) == 0 and not errors:
        errors.append("the controller received no chunks")
    if ct:  # a loop that never drove the robot did not run, whatever else went right
        applied = ct.get("chunks_applied", 0)
        if not applied and not any(t.get("to") == "running" for t in ct.get("transitions", [])):
            errors.append("the controller never reached running")
        elif not applied:
            errors.append("the controller applied no chunk")
    if ct.get("rejected"):
        errors.append(f"the controller rejected messages: {ct['rejected']}")
    if rt.get("policy_errors"):
        errors.append(f"policy errors: {rt['policy_errors']}")
    if ct.get("limiter", {}).get("non_finite_ticks"):
        errors.append("non-finite targets reached the limiter")
    if dds:  # what the simulated G1 saw on the DDS wire
        if not wire:
            errors.append("the simulated G1 wrote no summary")
        unsafe = {k: wire.get(k) for k in ("bad_crc", "non_finite", "out_of_limits") if wire.get(k)}
        if unsafe:
            errors.append(f"unsafe commands on the DDS wire: {unsafe}")
        # effective steps (runtime/hil/judge.py, authority): a re-arm's targets jump to where the robot is at
        # weight 0, rightly; a step the command drives the robot with is bounded by the velocity limit
        allowed = ct.get("limiter", {}).get("max_step_allowed_rad", 0.0)
        step = max(wire.get("max_q_step_arm_sdk", [0.0]) + wire.get("max_q_step_lowcmd", [0.0])) if wire else 0.0
        if step > allowed + 1e-5:
            errors.append(f"a command on the DDS wire stepped {step:.4f} rad, farther than the velocity limit allows "
                          f"({allowed:.4f} rad per tick; the step weighted by the authority its command has)")
    final_state = ct.get("state", "unknown")
    if final_state not in SAFE_STATES:
        errors.append(f"ended in an unsafe state: {final_state}")
    lat = rt.get("latency_ms", {})
    summary = {
        "ok": not errors,
        "errors": errors,
        "seconds": seconds,
        "startup_s": round(startup_s, 3),
        "started_t": round(t_start, 4),  # time.monotonic() just before the processes were started
        "frames": rt.get("frames", 0),
        "frames_used": rt.get("frames_used", 0),
        "chunks_sent": rt.get("chunks_sent", 0),
        "chunks_dropped": rt.get("chunks_dropped", 0),
        "chunks_received": ct.get("chunks_received", 0),
        "chunks_applied": ct.get("chunks_applied", 0),
        "control_ticks": ct.get("control_ticks", 0),
        "controller_overruns": ct.get("overruns", 0),
        # missed ticks and period error, the controller's beside a plain 2 ms loop's in the same run (the machine's)
        "timing": {"controller": controller_timing(ct), "reference_loop": ref or None},
        "scheduling": places.records(),
        "latency_ms": {
            "frame_to_chunk": lat.get("frame_to_chunk", {}),
            "inference": lat.get("inference", {}),
            "preprocess": lat.get("preprocess", {}),
            "stages": lat.get("stages", {}),
            "controller_period_error": ct.get("period_error_ms", {}),
        },
        "stops": ct.get("stops", []),
        "final_state": final_state,
        "driver": cfg["controller"]["driver"],
        "limiter": ct.get("limiter", {}),
        "runtime": rt,
        "controller": ct,
        "dds_wire": wire,
    }
    if report_path:
        write_json(report_path, summary)
    return summary


def timing_lines(timing: Dict[str, Any], places: Dict[str, Any]) -> List[str]:
    """The controller's missed ticks and period error beside the reference loop's, and what each process got."""
    def one(t: Optional[Dict[str, Any]]) -> str:
        if not t or not t.get("ticks"):
            return "n/a"
        pe = t["period_error_ms"]
        return (f"missed {t['missed']} of {t['ticks']} ticks ({t['missed_pct']:.3f} %), period error p50 "
                f"{pe['p50']:.3f} ms, p99 {pe['p99']:.3f} ms, max {pe['max']:.3f} ms")

    lines = [f"  controller loop:     {one(timing.get('controller'))}",
             f"  reference 2 ms loop: {one(timing.get('reference_loop'))} (the machine's floor)"]
    for role, how in places.items():
        refused = f" (refused: {'; '.join(how['refused'])})" if how.get("refused") else ""
        lines.append(f"  scheduling {role}: {how.get('got')}{refused}")
    return lines


def print_summary(s: Dict[str, Any], out=sys.stdout) -> None:
    def pct(d: Dict[str, Any]) -> str:
        if not d or d.get("p50") is None:
            return "n/a"
        return f"p50 {d['p50']:.2f} ms, p99 {d['p99']:.2f} ms (n={d['count']})"

    lat = s["latency_ms"]
    lines = [
        f"wam-edge demo: {'OK' if s['ok'] else 'FAILED'} after {s['seconds']:.1f} s (start-up {s['startup_s']:.1f} s)",
        f"  frames in {s['frames']} (used {s['frames_used']}), chunks sent {s['chunks_sent']}, "
        f"received {s['chunks_received']} (applied {s['chunks_applied']}), control ticks {s['control_ticks']} "
        f"(overruns {s['controller_overruns']})",
        f"  frame -> chunk: {pct(lat['frame_to_chunk'])}",
        f"  inference:      {pct(lat['inference'])}",
        f"  preprocess:     {pct(lat['preprocess'])}",
    ]
    for name, d in lat.get("stages", {}).items():
        lines.append(f"    stage {name}: {pct(d)}")
    lines.append(f"  controller period error: {pct(lat['controller_period_error'])}")
    lines += timing_lines(s["timing"], s["scheduling"])
    lines.append(f"  largest step {s['limiter'].get('max_step_rad')} rad/tick "
                 f"(allowed {s['limiter'].get('max_step_allowed_rad')})")
    for stop in s["stops"]:
        lines.append(f"  stop at {stop['t']}: {stop['from']} -> {stop['to']} ({stop['reason']})")
    lines.append(f"  final state: {s['final_state']}")
    for e in s["errors"]:
        lines.append(f"  error: {e}")
    out.write("\n".join(lines) + "\n")
