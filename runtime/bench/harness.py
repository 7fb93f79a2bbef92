"""`wam-edge bench`: run the loop (controller + runtime, two processes, as `wam-edge demo` does) once per injected
inference latency (``policy.inject_latency``) and measure what the robot would feel: stalls, seams between chunks,
latencies per stage, the controller's timing beside the policy, start-up to the first action, resident memory, and
the watchdog's reaction to a kill -9 of the runtime.

Every time here is time.monotonic() on this host: the controller's report stamps (transitions, first chunk applied)
use the same clock, so differences between them and the bench's own stamps are exact (to the reports' 0.1 ms).
"""

from __future__ import annotations

import os
import platform
import signal
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from runtime import demo
from runtime.bench import OWN_TIME, plot
from runtime.config import Config, load_config
from runtime.controller import operator
from runtime.controller.safety import SAFE_STATES
from runtime.metrics import paired_difference, write_json
from runtime.policy.latency import in_flight_needed, nominal_max_latency
from runtime.policy.manifest import load_manifest
from runtime.service import scheduling

#: the default latencies: a 10 ms and a 100 ms model, and 80 % of the reference model's 0.64 s chunk (0.51 s). One
#: inference at a time covers a chunk only while the latency stays under half its duration; above that the bench
#: runs the setting with several inferences in flight (IN_FLIGHT_ABOVE, in_flight_overrides; docs/bench.md).
DEFAULT_LATENCIES = ("0.01", "0.1", "80%")
#: a latency above this share of the chunk runs with policy.max_in_flight > 1 (one at a time needs L < D / 2)
IN_FLIGHT_ABOVE = 0.45
#: policy.rate_hz for a setting in flight: starts come every D - L - margin, well under the default 5 Hz period
IN_FLIGHT_RATE_HZ = 50.0
#: policy.max_inference_s during the bench: above every injected latency, so no chunk is an overrun
MAX_INFERENCE_S = 2.0
#: slack for the comparisons of steps with the allowed step (the reports round to 1e-6 rad)
STEP_TOLERANCE_RAD = 1e-6
#: the watchdog's hold may come this much after controller.chunk_timeout_s (ticks, scheduling)
WATCHDOG_MARGIN_S = 0.05


# -- pure helpers ----------------------------------------------------------------------------------------------------

def parse_vmrss_kib(status_text: str) -> Optional[int]:
    """VmRSS (kB, as /proc/<pid>/status writes it; really KiB) from the text of /proc/<pid>/status, or None."""
    for line in status_text.splitlines():
        if line.startswith("VmRSS:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1])
    return None


def first_stop_after(transitions: Sequence[Dict[str, Any]], t: float) -> Optional[Dict[str, Any]]:
    """The first transition at or after ``t`` into a state that no longer follows the policy (holding or beyond)."""
    for tr in transitions:
        if tr.get("t", -1.0) >= t - 1e-4 and tr.get("to") in ("holding", "stopping", "stopped", "estop"):
            return tr
    return None


def run_ok(stalls: int, seam_max_step_rad: float, allowed_rad: float, loop_ok: bool) -> bool:
    """A latency setting passes: the loop ran cleanly, no stall after the first chunk, no seam steps too far."""
    return bool(loop_ok and stalls == 0 and seam_max_step_rad <= allowed_rad + STEP_TOLERANCE_RAD)


class RssSampler:
    """Called with {role: pid} (demo.run_demo's ``watch``): samples VmRSS of each process."""

    def __init__(self) -> None:
        self.samples: Dict[str, List[int]] = {}

    def __call__(self, pids: Dict[str, int]) -> None:
        for role, pid in pids.items():
            try:
                with open(f"/proc/{pid}/status", "r", encoding="utf-8") as f:
                    kib = parse_vmrss_kib(f.read())
            except OSError:  # not Linux, or the process is gone
                continue
            if kib is not None:
                self.samples.setdefault(role, []).append(kib)

    def summary(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for role, s in self.samples.items():
            out[role] = {"samples": len(s), "max_mib": round(max(s) / 1024.0, 1),
                         "mean_mib": round(sum(s) / len(s) / 1024.0, 1), "last_mib": round(s[-1] / 1024.0, 1)}
        return out


# -- one latency setting ---------------------------------------------------------------------------------------------

def in_flight_overrides(latency: str, chunk_s: float, margin: float) -> List[str]:
    """For a latency above IN_FLIGHT_ABOVE of the chunk (its nominal largest draw): policy.max_in_flight =
    ceil(L / (D - L - margin)) + 1 (at most 16) and policy.rate_hz = IN_FLIGHT_RATE_HZ; else nothing."""
    top = nominal_max_latency(latency, chunk_s)
    if top is None or top <= IN_FLIGHT_ABOVE * chunk_s:
        return []
    return [f"policy.max_in_flight={in_flight_needed(top, chunk_s, margin)}", f"policy.rate_hz={IN_FLIGHT_RATE_HZ:g}"]


def bench_overrides(overrides: Sequence[str], latency: str, cfg_path: Optional[str] = None) -> List[str]:
    """The bench's settings for one latency; the in-flight ones go first, so the caller's overrides win."""
    base = load_config(cfg_path, list(overrides))
    manifest = load_manifest(base.resolve(base["model"]["path"]), verify_hashes=False)
    chunk_s = manifest.horizon * manifest.step_s
    extra = in_flight_overrides(latency, chunk_s, base["policy"]["trigger_margin_s"])
    return extra + list(overrides) + [f"policy.inject_latency={latency}", f"policy.max_inference_s={MAX_INFERENCE_S}"]


def run_one(cfg_path: Optional[str], overrides: Sequence[str], latency: str, seconds: float) -> Dict[str, Any]:
    all_overrides = bench_overrides(overrides, latency, cfg_path)
    cfg = load_config(cfg_path, all_overrides)
    rss = RssSampler()
    s = demo.run_demo(cfg, all_overrides, seconds, None, watch=rss)
    return summarize_run(latency, cfg, s, rss.summary())


def _lat(d: Dict[str, Any]) -> Dict[str, Any]:
    return {"count": d.get("count", 0), "p50_ms": d.get("p50"), "p99_ms": d.get("p99"), "max_ms": d.get("max")}


def _loop(t: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    if not t:
        return None
    return {"ticks": t.get("ticks", 0), "missed": t.get("missed", 0), "missed_pct": t.get("missed_pct"),
            "period_error_ms": _lat(t.get("period_error_ms", {}))}


def summarize_run(latency: str, cfg: Config, s: Dict[str, Any], rss: Dict[str, Any]) -> Dict[str, Any]:
    """The bench's view of one demo.run_demo summary."""
    ct, rt = s.get("controller", {}), s.get("runtime", {})
    ex, lim = ct.get("execution", {}), ct.get("limiter", {})
    c = cfg["controller"]
    allowed = lim.get("max_step_allowed_rad", round(c["max_velocity"] / c["rate_hz"], 6))
    stalls = ex.get("stalls", 0)
    seam_step = ex.get("seam_max_step_rad", 0.0)
    first = ct.get("first_chunk_applied_t")
    lat = rt.get("latency_ms", {})
    return {
        "latency": latency,
        "ok": run_ok(stalls, seam_step, allowed, bool(s.get("ok"))),
        "backend": rt.get("backend"),  # what ran the model (and why, for model.backend auto): timings depend on it
        "errors": s.get("errors", []),
        "seconds_s": s.get("seconds"),
        "chunks": {
            "sent": rt.get("chunks_sent", 0),
            "received": ct.get("chunks_received", 0),
            "applied": ct.get("chunks_applied", 0),
            "ignored_while_not_running": ct.get("chunks_ignored", 0),
            "dropped_by_runtime": rt.get("chunks_dropped", 0),  # the socket would not take it
            "dropped_by_controller": ex.get("chunks_dropped", 0),  # superseded in the same tick: never executed
            "evicted": ex.get("chunks_evicted", 0),
            "runtime_overruns": rt.get("overruns", 0),
            "policy_errors": rt.get("policy_errors", 0),
        },
        "execution": {
            "seam": ex.get("seam"),
            "stalls": stalls,
            "seams": ex.get("seams", 0),
            "seam_max_step_rad": seam_step,
            "max_step_rad": lim.get("max_step_rad"),
            "max_step_allowed_rad": allowed,
            "seam_max_accel_rad_s2": ex.get("seam_max_accel_rad_s2"),
            "seam_max_jerk_rad_s3": ex.get("seam_max_jerk_rad_s3"),
            "seam_clamped_ticks": ex.get("seam_clamped_ticks", 0),
            "clamped_ticks": lim.get("clamped_ticks", 0),
            "chunk_age_ms": _lat(ex.get("chunk_age_ms", {})),
            "seam_traces": ex.get("seam_traces", []),
        },
        "latency_ms": {
            "injected": _lat(rt.get("injected_latency_ms", {})),
            "inference": _lat(lat.get("inference", {})),
            "preprocess": _lat(lat.get("preprocess", {})),
            "stages": {k: _lat(v) for k, v in lat.get("stages", {}).items()},
            "frame_to_chunk": _lat(lat.get("frame_to_chunk", {})),
            "overhead_per_chunk": _lat(lat.get("overhead", {})),
            "frame_to_decode": _lat(ex.get("frame_to_decode_ms", {})),
            # what a user waits beyond the model: frame to decoded by the controller, less the model's time, per chunk
            "frame_to_decode_less_model": _lat(paired_difference(ex.get("frame_to_decode_ms", {}).get("keyed", {}),
                                                                 lat.get("model", {}).get("keyed", {})).summary()),
            "frame_age_at_start": _lat(lat.get("frame_age", {})),
            "inference_starts_left": _lat(rt.get("inference_starts_left_ms", {})),
            "estimate_ms": rt.get("latency_estimate_ms"),
            "trigger": rt.get("trigger"),
            "histograms": lat.get("histograms", {}),
        },
        "in_flight": {
            "max_in_flight": cfg["policy"]["max_in_flight"],
            "rate_hz": cfg["policy"]["rate_hz"],
            "in_flight_max": rt.get("in_flight_max"),
        },
        "controller": {
            "rate_hz": c["rate_hz"],
            "control_ticks": ct.get("control_ticks", 0),
            "period_error_ms": _lat(ct.get("period_error_ms", {})),
            "overruns": ct.get("overruns", 0),
            "missed_pct": s.get("timing", {}).get("controller", {}).get("missed_pct"),
        },
        # the machine's floor in the same run: a plain 2 ms loop scheduled like the controller, on the other cores
        "reference_loop": _loop(s.get("timing", {}).get("reference_loop")),
        "scheduling": s.get("scheduling", {}),
        "startup": {
            "ready_s": s.get("startup_s"),
            "first_action_s": None if first is None or s.get("started_t") is None
            else round(first - s["started_t"], 3),
        },
        "rss": rss,
        "final_state": s.get("final_state"),
    }


# -- the watchdog ----------------------------------------------------------------------------------------------------

def watchdog_trial(cfg: Config, overrides: Sequence[str], settle_s: float = 1.0) -> Dict[str, Any]:
    """Arm, let chunks flow, kill -9 the runtime; the reaction is the kill to the controller's hold, both on
    time.monotonic() (the hold's time from the controller's transitions). The status poll (every 5 ms) gives a
    second, coarser number: when the operator link first saw the controller no longer running."""
    out: Dict[str, Any] = {"reaction_ms": None, "seen_by_status_poll_ms": None, "reason": None, "error": None}
    if cfg["controller"]["driver"] != "sim":
        out["error"] = "skipped: needs controller.driver=sim"
        return out
    c = cfg["controller"]
    with tempfile.TemporaryDirectory(prefix="wam-edge-bench-") as tmp:
        all_overrides = list(overrides) + demo.loop_overrides(tmp, False)
        files = {k: os.path.join(tmp, k) for k in ("controller.json", "runtime.json", "controller.ready",
                                                       "runtime.ready")}
        control = f"ipc://{tmp}/control"
        places = scheduling.Placements(cfg["demo"]["scheduling"])
        controller = demo._spawn("controller", cfg.path, all_overrides, files["controller.json"],
                                 files["controller.ready"], places["controller"])
        runtime = demo._spawn("run", cfg.path, all_overrides, files["runtime.json"], files["runtime.ready"],
                              places["runtime"])
        t_kill = None
        try:
            problem = demo._wait_files([files["controller.ready"], files["runtime.ready"]], [controller, runtime],
                                       cfg["demo"]["startup_timeout_s"])
            if not problem:
                for placement in places.by_role.values():
                    placement.realtime()
                out["scheduling"] = places.records()
            if not problem:
                reply = operator.send(control, "arm", "wam-edge bench", timeout_s=5.0)
                problem = None if reply.ok else f"arming refused: {reply.detail}"
            if not problem:
                deadline = time.monotonic() + c["arm_ramp_s"] + 10.0
                while time.monotonic() < deadline:
                    if operator.send(control, "status", "wam-edge bench", timeout_s=1.0).state == "running":
                        break
                    time.sleep(0.02)
                else:
                    problem = "the controller never reached running"
            if problem:
                out["error"] = problem
            else:
                time.sleep(settle_s)  # chunks flowing
                t_kill = time.monotonic()
                runtime.send_signal(signal.SIGKILL)
                deadline = t_kill + c["chunk_timeout_s"] + c["heartbeat_timeout_s"] + 5.0
                while time.monotonic() < deadline:
                    state = operator.send(control, "status", "wam-edge bench", timeout_s=1.0).state
                    if state != "running":
                        out["seen_by_status_poll_ms"] = round((time.monotonic() - t_kill) * 1000.0, 1)
                        break
                    time.sleep(0.005)
                # then let it stop on its own before it goes
                stop_s = c["stop_ramp_s"] if c["mode"] == "arm_sdk" else c["hold_before_damp_s"]
                deadline = time.monotonic() + c["hold_s"] + stop_s + 3.0
                while time.monotonic() < deadline:
                    if operator.send(control, "status", "wam-edge bench", timeout_s=1.0).state in SAFE_STATES:
                        break
                    time.sleep(0.05)
            demo._stop(controller, 10.0)
        finally:
            for p in (controller, runtime):
                if p.poll() is None:
                    p.kill()
                    p.wait()
        ct = demo._load(files["controller.json"])
    if t_kill is not None:
        hold = first_stop_after(ct.get("transitions", []), t_kill)
        if hold is None:
            out["error"] = "no hold after the kill in the controller's transitions"
        else:
            out["reaction_ms"] = round((hold["t"] - t_kill) * 1000.0, 1)
            out["reason"] = hold.get("reason")
            out["to"] = hold.get("to")
    out["bound_ms"] = round((c["chunk_timeout_s"] + WATCHDOG_MARGIN_S) * 1000.0, 1)
    out["final_state"] = ct.get("state")
    return out


# -- the bench -------------------------------------------------------------------------------------------------------

def run_bench(cfg: Config, overrides: Sequence[str], latencies: Sequence[str], seconds: float,
              report_path: Optional[str], plot_path: Optional[str],
              progress: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    t0 = time.monotonic()
    notes = [
        "times are time.monotonic() on this host; the controller's stamps use the same clock",
        "startup.first_action_s: from just before the processes were started to the controller's first chunk "
        "applied (its report's first_chunk_applied_t); it includes the bench's arming and controller.arm_ramp_s "
        "(chunks apply only once running); startup.ready_s: to both ready files",
        "latency_ms.overhead_per_chunk: " + OWN_TIME,
        "latency_ms.inference includes the injected latency (latency_ms.injected); stages and preprocess are the "
        "real model's",
        f"policy.max_inference_s={MAX_INFERENCE_S} during the bench, so injected latency is never an overrun",
        "execution.stalls counts ticks while running or holding after the executing chunk ran out: only possible "
        "after the first chunk",
        "one inference at a time: a chunk answers a state at most its inference latency L old and the next one "
        "arrives about L later, so a chunk of duration D covers the gap only while 2 L (plus the trigger margin and "
        "the frame's age) stays below D; a setting above "
        f"{IN_FLIGHT_ABOVE:.0%} of D therefore runs in flight (in_flight: policy.max_in_flight = "
        f"ceil(L / (D - L - margin)) + 1, at most 16, and policy.rate_hz = {IN_FLIGHT_RATE_HZ:g}): the model "
        "still computes one chunk at a time at once, and each chunk is held and sent L after its inference started; "
        "this models a pure delay (a policy server across a network, a pipelined GPU), not a slower model: the "
        "model's compute must not be the bottleneck. latency_ms.inference is then start to release",
        "rss: VmRSS from /proc/<pid>/status every ~50 ms during the run (MiB)",
        "watchdog: kill -9 of the runtime after the latency runs (first latency setting); reaction_ms from the kill "
        "to the controller's first transition to holding (its report), seen_by_status_poll_ms from a 5 ms "
        "status poll",
    ]
    runs = []
    for latency in latencies:
        run = run_one(cfg.path, overrides, latency, seconds)
        runs.append(run)
        if progress is not None:
            progress(run)
    wd_overrides = bench_overrides(overrides, latencies[0], cfg.path)
    wd_cfg = load_config(cfg.path, wd_overrides)
    watchdog = watchdog_trial(wd_cfg, wd_overrides)
    wd_ok = watchdog["reaction_ms"] is not None and watchdog["reaction_ms"] <= watchdog["bound_ms"]
    report: Dict[str, Any] = {
        "ok": bool(runs) and all(r["ok"] for r in runs) and wd_ok,
        "host": _host(),
        "seconds_per_run_s": seconds,
        "runs": runs,
        "watchdog_reaction_ms": watchdog["reaction_ms"],
        "watchdog": watchdog,
        "plot": None,
        "notes": notes,
    }
    _finish(report, lambda: plot.plot_runs(runs, plot_path), plot_path, t0, report_path)
    return report


def run_sweep_bench(cfg: Config, overrides: Sequence[str], factors: Sequence[str], latency: str, seconds: float,
                    report_path: Optional[str], plot_path: Optional[str], cache_dir: Optional[str] = None,
                    limit: Optional[int] = None) -> Dict[str, Any]:
    """`wam-edge bench --sweep`: instead of the latency runs, the scaling sweeps (runtime/bench/sweep.py) at one
    injected latency; the report's "sweep" section, and a PNG panel per factor."""
    from runtime.bench import sweep

    t0 = time.monotonic()
    section = sweep.run_sweep(cfg, overrides, factors, latency, seconds, run_one, cache_dir, limit,
                              sweep.print_point)
    report: Dict[str, Any] = {
        "ok": bool(section["ok"]),
        "host": _host(),
        "seconds_per_run_s": seconds,
        "sweep": section,
        "plot": None,
        "notes": ["--sweep runs the scaling sweeps only (no latency runs, no watchdog trial); see sweep.notes"],
    }
    _finish(report, lambda: plot.plot_sweep(section, plot_path), plot_path, t0, report_path)
    return report


def _host() -> Dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine(),
            "platform": platform.platform()}


def _finish(report: Dict[str, Any], draw: Callable[[], Optional[str]], plot_path: Optional[str], t0: float,
            report_path: Optional[str]) -> None:
    """The plot when asked for (draw() returns why it was skipped, or None), the bench's duration, the JSON file."""
    if plot_path:
        problem = draw()
        if problem:
            report["notes"].append(f"plot skipped: {problem}")
        else:
            report["plot"] = plot_path
    report["bench_s"] = round(time.monotonic() - t0, 1)
    if report_path:
        write_json(report_path, report)


def print_sweep_summary(report: Dict[str, Any], out=sys.stdout) -> None:
    for name, entry in report["sweep"]["factors"].items():
        if entry.get("skipped"):
            out.write(f"sweep {name}: skipped: {entry['skipped']}\n")
    for n in report["notes"]:
        if n.startswith("plot skipped"):
            out.write(f"{n}\n")
    if report.get("plot"):
        out.write(f"plot: {report['plot']}\n")
    points = sum(len(e["points"]) for e in report["sweep"]["factors"].values())
    out.write(f"wam-edge bench --sweep: {'OK' if report['ok'] else 'FAILED'} ({points} points, "
              f"{report['bench_s']} s)\n")


def _f(v: Any, fmt: str = "{:.2f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def print_row(r: Dict[str, Any], out=sys.stdout) -> None:
    lat, ex, ctl = r["latency_ms"], r["execution"], r["controller"]
    pe, fdm = ctl["period_error_ms"], lat["frame_to_decode_less_model"]
    rss = " ".join(f"{k} {v['max_mib']} MiB" for k, v in r["rss"].items())
    out.write(
        f"latency {r['latency']}: {'OK' if r['ok'] else 'FAILED'}\n"
        f"  inference p50/p99 {_f(lat['inference']['p50_ms'])}/{_f(lat['inference']['p99_ms'])} ms, "
        f"frame->chunk p50/p99 {_f(lat['frame_to_chunk']['p50_ms'])}/{_f(lat['frame_to_chunk']['p99_ms'])} ms, "
        f"overhead p50/p99 {_f(lat['overhead_per_chunk']['p50_ms'])}/{_f(lat['overhead_per_chunk']['p99_ms'])} ms\n"
        f"  in flight: max_in_flight {r['in_flight']['max_in_flight']}, most pending "
        f"{r['in_flight']['in_flight_max']}, policy.rate_hz {r['in_flight']['rate_hz']:g}\n"
        f"  chunks sent {r['chunks']['sent']} applied {r['chunks']['applied']}, stalls {ex['stalls']}, "
        f"seams {ex['seams']}, seam max step {ex['seam_max_step_rad']} rad (allowed {ex['max_step_allowed_rad']}), "
        f"accel {ex['seam_max_accel_rad_s2']} rad/s2, jerk {ex['seam_max_jerk_rad_s3']} rad/s3, "
        f"chunk age p50 {_f(ex['chunk_age_ms']['p50_ms'])} ms\n"
        f"  controller {ctl['rate_hz']:.0f} Hz period error p50/p99/max {_f(pe['p50_ms'], '{:.3f}')}"
        f"/{_f(pe['p99_ms'], '{:.3f}')}/{_f(pe['max_ms'], '{:.3f}')} ms, "
        f"missed {ctl['overruns']} of {ctl['control_ticks']} ticks ({_f(ctl['missed_pct'], '{:.3f}')} %)\n"
        f"  reference 2 ms loop (the machine's floor): {_loop_text(r['reference_loop'])}\n"
        f"  frame->decoded by the controller p50/p99 {_f(lat['frame_to_decode']['p50_ms'])}/"
        f"{_f(lat['frame_to_decode']['p99_ms'])} ms, less the model {_f(fdm['p50_ms'])}/{_f(fdm['p99_ms'])} ms\n"
        f"  start-up: ready {_f(r['startup']['ready_s'])} s, first action {_f(r['startup']['first_action_s'])} s; "
        f"RSS {rss}\n")
    for role, how in r["scheduling"].items():
        refused = f" (refused: {'; '.join(how['refused'])})" if how.get("refused") else ""
        out.write(f"  scheduling {role}: {how.get('got')}{refused}\n")
    for e in r["errors"]:
        out.write(f"  error: {e}\n")
    out.flush()


def _loop_text(t: Optional[Dict[str, Any]]) -> str:
    if not t or not t.get("ticks"):
        return "n/a"
    pe = t["period_error_ms"]
    return (f"period error p50/p99/max {_f(pe['p50_ms'], '{:.3f}')}/{_f(pe['p99_ms'], '{:.3f}')}/"
            f"{_f(pe['max_ms'], '{:.3f}')} ms, missed {t['missed']} of {t['ticks']} "
            f"({_f(t['missed_pct'], '{:.3f}')} %)")


def print_summary(report: Dict[str, Any], out=sys.stdout) -> None:
    wd = report["watchdog"]
    out.write(f"watchdog: kill -9 of the runtime -> {wd.get('to')} after {_f(wd['reaction_ms'], '{:.1f}')} ms "
              f"(bound {wd['bound_ms']} ms; status poll saw it after {_f(wd['seen_by_status_poll_ms'], '{:.1f}')} ms)"
              f"{'; ' + wd['error'] if wd.get('error') else ''}\n")
    for n in report["notes"]:
        if n.startswith("plot skipped"):
            out.write(f"{n}\n")
    if report.get("plot"):
        out.write(f"plot: {report['plot']}\n")
    out.write(f"wam-edge bench: {'OK' if report['ok'] else 'FAILED'} ({len(report['runs'])} latency settings, "
              f"{report['bench_s']} s)\n")
