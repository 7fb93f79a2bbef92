"""`wam-edge bench`: the loop under an injected inference latency, measured end to end."""

import json
import os
import subprocess
import sys

import pytest

from runtime.bench import harness

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_vmrss_kib():
    text = "Name:\tpython\nVmPeak:\t  200 kB\nVmRSS:\t  123456 kB\nThreads:\t4\n"
    assert harness.parse_vmrss_kib(text) == 123456
    assert harness.parse_vmrss_kib("Name:\tkthreadd\n") is None  # kernel threads have no VmRSS


def test_first_stop_after_skips_earlier_stops():
    trs = [{"t": 1.0, "from": "idle", "to": "arming", "reason": "armed"},
           {"t": 2.0, "from": "running", "to": "holding", "reason": "old"},
           {"t": 2.5, "from": "holding", "to": "running", "reason": "resumed"},
           {"t": 5.3, "from": "running", "to": "holding", "reason": "no chunk"},
           {"t": 5.8, "from": "holding", "to": "stopping", "reason": "no resume"}]
    assert harness.first_stop_after(trs, 5.0)["t"] == 5.3
    assert harness.first_stop_after(trs, 6.0) is None


def test_run_ok():
    assert harness.run_ok(0, 0.004, 0.004, True)
    assert harness.run_ok(0, 0.004 + 5e-7, 0.004, True)  # rounding in the reports
    assert not harness.run_ok(1, 0.001, 0.004, True)  # a stall
    assert not harness.run_ok(0, 0.005, 0.004, True)  # a seam stepped too far
    assert not harness.run_ok(0, 0.001, 0.004, False)  # the loop itself failed


def test_rss_sampler_reads_this_process():
    if not os.path.exists("/proc/self/status"):
        pytest.skip("no /proc")
    s = harness.RssSampler()
    s({"me": os.getpid()})
    s({"me": os.getpid(), "gone": 2 ** 22 + 12345})  # a pid that does not exist is left out
    summary = s.summary()
    assert list(summary) == ["me"] and summary["me"]["samples"] == 2 and summary["me"]["max_mib"] > 1


def test_bench_rejects_a_bad_latency():
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "bench", "--latency", "fast"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2 and "--latency fast" in r.stderr


@pytest.mark.slow
def test_bench_one_latency(tmp_path):
    report = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "bench", "--latency", "0.05", "--seconds", "3",
                        "--report", str(report)], cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    b = json.loads(report.read_text())
    assert b["ok"] is True
    assert set(b["host"]) >= {"cpus", "python", "machine"} and b["notes"]
    assert len(b["runs"]) == 1
    run = b["runs"][0]
    assert run["latency"] == "0.05" and run["ok"] is True and run["errors"] == []
    ex = run["execution"]
    assert ex["stalls"] == 0
    assert ex["seam_max_step_rad"] <= ex["max_step_allowed_rad"] + 1e-6
    assert ex["max_step_allowed_rad"] == pytest.approx(2.0 / 500.0, abs=1e-6)  # max_velocity / rate_hz
    assert run["chunks"]["sent"] >= 3 and run["chunks"]["applied"] >= 2
    lat = run["latency_ms"]
    assert lat["inference"]["p50_ms"] >= 50.0  # the injected 50 ms is in the call
    assert lat["frame_to_chunk"]["p50_ms"] >= lat["inference"]["p50_ms"]
    assert lat["overhead_per_chunk"]["count"] == lat["inference"]["count"] and lat["overhead_per_chunk"]["p50_ms"] > 0
    assert set(lat["stages"]) and all(v["count"] > 0 for v in lat["stages"].values())
    assert run["controller"]["period_error_ms"]["p99_ms"] is not None and run["controller"]["control_ticks"] > 1000
    assert 0 < run["startup"]["ready_s"] < run["startup"]["first_action_s"] < 30
    assert run["rss"]["controller"]["max_mib"] > 10 and run["rss"]["runtime"]["max_mib"] > 10
    # kill -9 of the runtime: the controller holds within chunk_timeout_s (0.5 s) and a small margin
    assert b["watchdog"]["error"] is None and b["watchdog"]["to"] == "holding"
    assert 0 < b["watchdog_reaction_ms"] <= 500.0 + 50.0
    plot = tmp_path / "bench.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert b["plot"] is None and any("plot skipped" in n for n in b["notes"])
    else:
        assert b["plot"] == str(plot) and plot.stat().st_size > 1000
    assert "wam-edge bench: OK" in r.stdout


def test_in_flight_overrides():
    assert harness.in_flight_overrides("0.1", 0.64, 0.05) == []
    assert harness.in_flight_overrides("45%", 0.64, 0.05) == []
    assert harness.in_flight_overrides("80%", 0.64, 0.05) == ["policy.max_in_flight=8", "policy.rate_hz=50"]
    # ceil(0.5 / 0.09) + 1
    assert harness.in_flight_overrides("uniform(0.1,0.5)", 0.64, 0.05)[0] == "policy.max_in_flight=7"
    assert harness.DEFAULT_LATENCIES == ("0.01", "0.1", "80%")


@pytest.mark.slow
def test_bench_80_percent_in_flight(tmp_path):
    report = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "bench", "--latency", "80%", "--seconds", "4",
                        "--report", str(report)], cwd=ROOT, capture_output=True, text=True,
                       timeout=240, check=False)
    b = json.loads(report.read_text())
    run = b["runs"][0]
    assert run["in_flight"]["max_in_flight"] == 8 and run["in_flight"]["rate_hz"] == 50.0, r.stdout
    assert run["in_flight"]["in_flight_max"] >= 2
    ex = run["execution"]
    assert ex["stalls"] == 0, r.stdout
    assert ex["seam_max_step_rad"] <= ex["max_step_allowed_rad"] + 1e-6
    assert run["ok"] is True and run["latency_ms"]["inference"]["p50_ms"] >= 512.0 - 1
    assert r.returncode == 0, r.stdout + r.stderr
