"""`wam-edge hil`: the wire judge on known command sequences, and the suite itself against `wam-edge sim`."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from runtime.hil.judge import ARM_SDK_TOPIC_ID, LOWCMD_TOPIC_ID, judge
from runtime.robot import g1

N = g1.NUM_JOINTS
STEP = 2.0 / 500.0  # controller.max_velocity / rate_hz


def window(qs, weights=None, kps=None, topic=ARM_SDK_TOPIC_ID, t0=0.0, dt=0.002, crc_ok=None, before=1):
    """A CommandLog.window()-shaped dict: commands at t0, t0+dt, ...; the first ``before`` flagged as earlier."""
    n = len(qs)
    q = np.asarray(qs, dtype=np.float32)
    if q.ndim == 1:
        q = np.repeat(q[:, None], N, axis=1)
    kp = np.asarray(kps if kps is not None else [60.0] * n, dtype=np.float32)
    if kp.ndim == 1:
        kp = np.repeat(kp[:, None], N, axis=1)
    return {"t": t0 + dt * np.arange(n), "topic": np.full(n, topic, dtype=np.int8),
            "crc_ok": np.ones(n, bool) if crc_ok is None else np.asarray(crc_ok),
            "applied": np.ones(n, bool), "q": q, "kp": kp, "kd": np.ones((n, N), np.float32),
            "weight": np.asarray(weights if weights is not None else [1.0] * n, dtype=np.float32),
            "before": np.arange(n) < before}


def driving(n, start=0.0):
    return [start + STEP * i for i in range(n)]  # every joint moves at the velocity limit


def test_driving_then_weight_ramp_is_a_reaction_at_the_first_falling_weight():
    qs = driving(10) + [driving(10)[-1]] * 6
    weights = [1.0] * 10 + [0.8, 0.6, 0.4, 0.2, 0.0, 0.0]
    j = judge(window(qs, weights), "arm_sdk", t_fault=0.005, max_step=STEP)
    assert j["reaction_s"] == pytest.approx(0.020 - 0.005)
    assert j["released_at_end"] and j["safe_at_end"]
    assert j["steps_over_limit"] == 0 and j["out_of_limits"] == 0 and j["non_finite"] == 0
    assert j["max_step_rad"] == pytest.approx(STEP, abs=1e-6)


def test_a_hold_is_safe_but_driving_again_moves_the_reaction_to_the_final_safe_run():
    hold = [0.1] * 5
    qs = driving(4) + hold + driving(4, start=0.1) + [0.112] * 4
    weights = [1.0] * 13 + [0.5, 0.4, 0.3, 0.0]
    j = judge(window(qs, weights), "arm_sdk", t_fault=0.0, max_step=STEP)
    assert j["reaction_s"] == pytest.approx(0.002 * 13)  # the hold did not count: the robot moved again after it


def test_still_driving_at_the_end_means_no_reaction():
    j = judge(window(driving(20)), "arm_sdk", t_fault=0.01, max_step=STEP)
    assert j["reaction_s"] is None and not j["safe_at_end"] and not j["released_at_end"]


def test_rising_weight_is_not_safe_even_when_holding():
    qs = [0.1] * 6
    j = judge(window(qs, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]), "arm_sdk", t_fault=0.0, max_step=STEP)
    assert j["reaction_s"] is None


def test_a_step_beyond_the_velocity_limit_is_caught_and_a_release_is_not_a_step():
    qs = [0.0, STEP, 2 * STEP, 2 * STEP + 0.05, 2 * STEP + 0.05]
    j = judge(window(qs), "arm_sdk", None, STEP)
    assert j["steps_over_limit"] == 1 and j["max_step_rad"] == pytest.approx(0.05, abs=1e-6)
    # arming from weight 0: the first command jumps to where the robot is, with (almost) no authority: not a step
    j = judge(window([0.0, 0.3, 0.3 + STEP], [0.0, 0.002, 0.004]), "arm_sdk", None, STEP)
    assert j["steps_over_limit"] == 0


def test_outside_limits_and_non_finite_are_counted_only_inside_the_window():
    lo = float(g1.POSITION_MIN[g1.UPPER_BODY_MASK].min())
    qs = np.zeros((4, N), np.float32)
    qs[2, 15] = g1.POSITION_MAX[15] + 0.1
    qs[3, 16] = np.nan
    j = judge(window(qs), "arm_sdk", None, STEP)
    assert j["out_of_limits"] == 1 and j["non_finite"] == 1 and j["commands"] == 3
    qs = np.zeros((2, N), np.float32)
    qs[0, 15] = lo - 1.0  # the earlier command (before the window) is only a reference
    assert judge(window(qs), "arm_sdk", None, STEP)["out_of_limits"] == 0


def test_bad_crc_and_the_wrong_topic_are_reported_not_judged():
    w = window(driving(5), crc_ok=[True, True, False, True, True])
    j = judge(w, "arm_sdk", None, STEP)
    assert j["bad_crc"] == 1 and j["commands"] == 3
    w = window(driving(5), topic=LOWCMD_TOPIC_ID)
    assert judge(w, "arm_sdk", None, STEP)["other_topic"] == 4


def test_lowcmd_damping_is_safe_even_while_targets_track_the_robot():
    qs = driving(5) + [0.5, 0.3, 0.1, 0.2]  # damping: q follows the measured pose, kp 0
    kps = [60.0] * 5 + [0.0] * 4
    j = judge(window(qs, kps=kps, topic=LOWCMD_TOPIC_ID), "lowcmd", t_fault=0.0, max_step=STEP)
    assert j["reaction_s"] == pytest.approx(0.010)
    assert j["steps_over_limit"] == 0 and j["released_at_end"]


def test_command_log_window_keeps_the_newest_earlier_command_per_topic():
    from runtime.robot.dds.cdr_buffers import LowCmdBuffer
    from runtime.robot.dds.sim import CommandLog

    log = CommandLog(size=8)
    cmd = LowCmdBuffer()
    for i in range(12):  # wraps the ring
        cmd.q[:N] = i
        log.record(float(i), i % 2, cmd, True, True, True)
    w = log.window(9.0)
    assert list(w["t"]) == [7.0, 8.0, 9.0, 10.0, 11.0]
    assert list(w["before"]) == [True, True, False, False, False]
    assert w["q"][0][0] == 7.0 and list(w["topic"]) == [1, 0, 1, 0, 1]
    assert list(log.window(9.0, 10.0)["t"]) == [7.0, 8.0, 9.0, 10.0]


# -- the suite, for real: processes, DDS on loopback, the simulated G1 ----------------------------------------------

_DOMAIN = random.Random().randint(201, 230)  # a DDS domain of its own: no cross-talk with a rig on this host
FAST = [f"dds.domain_id={_DOMAIN}", "controller.arm_ramp_s=0.2", "controller.stop_ramp_s=0.3", "controller.hold_s=0.2",
        "controller.hold_before_damp_s=0.2", "hil.settle_s=0.5", "hil.observe_s=0.3", "hil.stall_s=0.4",
        "policy.max_inference_s=0.3"]


def _dds():
    pytest.importorskip("cyclonedds", reason="cyclonedds (tools/install_dds.sh) is needed for DDS")


def _run_hil(tmp_path, overrides, scenarios, trials=1):
    from runtime.config import load_config
    from runtime.hil import harness

    cfg = load_config(None, overrides)
    return harness.run_hil(cfg, overrides, trials, scenarios, str(tmp_path / "hil.json"))


def _explain(report):
    return json.dumps([{k: r.get(k) for k in ("scenario", "trial", "errors", "reaction_s", "logs")}
                       for r in report["rows"] if not r["ok"]] + report["errors"], indent=1)


@pytest.mark.slow
def test_every_scenario_passes_against_the_simulated_g1_in_arm_sdk_mode(tmp_path):
    _dds()
    report = _run_hil(tmp_path, FAST, None)
    assert report["ok"], _explain(report)
    from runtime.hil.scenarios import SCENARIOS

    assert [r["scenario"] for r in report["rows"]] == [s.name for s in SCENARIOS]
    for r in report["rows"]:
        if "running" not in r["expect"]:
            assert 0.0 <= r["reaction_s"] <= r["bound_s"], r
            assert r["wire"]["released_at_end"], r
        assert r["wire"]["steps_over_limit"] == 0 and r["wire"]["max_step_rad"] <= STEP + 1e-5
    assert report["wire"]["non_finite"] == 0 and report["wire"]["out_of_limits"] == 0
    assert report["restarts"]["controller"] >= 3 and report["restarts"]["sim"] >= 2
    saved = json.loads((tmp_path / "hil.json").read_text())
    assert saved["ok"] and len(saved["rows"]) == len(SCENARIOS)


@pytest.mark.slow
def test_lowcmd_mode_holds_then_damps_and_survives_a_controller_kill(tmp_path):
    _dds()
    report = _run_hil(tmp_path, FAST + ["controller.mode=lowcmd"], ["lost_state", "kill_runtime", "kill_controller",
                                                                     "remote_estop"])
    assert report["ok"], _explain(report)
    assert report["wire"]["lowcmd"] > 0 and report["wire"]["arm_sdk"] == 0


@pytest.mark.slow
def test_a_reaction_slower_than_its_bound_fails_the_trial(tmp_path, monkeypatch):
    _dds()
    from runtime.hil import scenarios

    sc = scenarios.BY_NAME["lost_state"]
    monkeypatch.setattr(sc, "bound", lambda cfg: (0.05, "a bound the controller cannot meet"))
    report = _run_hil(tmp_path, FAST, ["lost_state"])
    assert not report["ok"] and report["failed"] == ["lost_state#0"]
    assert any("exceeds the bound" in e for e in report["rows"][0]["errors"])


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    return subprocess.run([sys.executable, "-m", "runtime.cli", "hil", *args], capture_output=True, text=True,
                          timeout=60, env=env)


def test_cli_lists_scenarios_and_refuses_a_stand_without_confirmation():
    out = _cli("--list")
    assert out.returncode == 0 and "kill_controller" in out.stdout and "reaction bound" in out.stdout
    out = _cli("--set", "hil.robot=stand", "--trials", "1")
    assert out.returncode == 2 and "--robot-on-stand" in out.stderr
    out = _cli("--scenario", "no_such_fault")
    assert out.returncode == 2 and "unknown scenarios" in out.stderr


# -- the step judged by what it commands: weighted by the command's authority (issue 10, item 11) --------------------

def test_a_correct_re_arm_jumps_at_weight_0_and_is_no_step():
    drive_then_stop = driving(5) + [driving(5)[-1]] * 5  # driving at weight 1, then a stop ramp, targets held
    rearm = [driving(5)[-1] - 0.3] * 6  # re-armed: the targets jump to where the robot is now, at weight 0
    weights = [1.0] * 5 + [0.8, 0.6, 0.4, 0.2, 0.0] + [0.0, 0.0, 0.004, 0.008, 0.012, 0.016]
    j = judge(window(drive_then_stop + rearm, weights), "arm_sdk", None, STEP)
    assert j["steps_over_limit"] == 0 and j["max_step_rad"] == pytest.approx(STEP, abs=1e-6)


def test_a_jump_at_full_weight_right_after_weight_0_is_a_step():
    j = judge(window([0.0, 0.0, 0.3], [1.0, 0.0, 1.0]), "arm_sdk", None, STEP)
    assert j["steps_over_limit"] == 1 and j["max_step_rad"] == pytest.approx(0.3, abs=1e-6)


def test_a_step_counts_in_proportion_to_the_weight_it_is_commanded_with():
    j = judge(window([0.0, 0.3, 0.3 + 1.5 * STEP], [0.5, 0.5, 0.5]), "arm_sdk", None, STEP)
    assert j["steps_over_limit"] == 1 and j["max_step_rad"] == pytest.approx(0.15, abs=1e-6)  # not 1.5 * STEP * 0.5


def test_lowcmd_steps_are_weighted_by_the_gains():
    full, none = g1.DEFAULT_KP, np.zeros(N)
    rearm = [0.0, 0.0, 0.3, 0.3, 0.3]  # damping with stale targets, then arming from kp 0 where the robot is
    kps = np.array([full, none, none, 0.01 * full, 0.02 * full])
    j = judge(window(rearm, kps=kps, topic=LOWCMD_TOPIC_ID), "lowcmd", None, STEP)
    assert j["steps_over_limit"] == 0
    j = judge(window([0.0, 0.0, 0.3], kps=np.array([full, none, full]), topic=LOWCMD_TOPIC_ID), "lowcmd", None, STEP)
    assert j["steps_over_limit"] == 1  # a jump onto the default gains is a full step


# -- a rig that starves is a rig fault: reported invalid and rerun, never a pass or a silent fail (issue 11) ----------

def _starving_sim_first(monkeypatch, name, attempts):
    """Wrap scenario ``name``'s injection: on the first ``attempts`` calls, pause the simulated G1 (SIGSTOP) for
    longer than the controller's state timeout before the fault, as a busy machine would starve it."""
    import signal
    import time

    from runtime.hil import scenarios

    sc = scenarios.BY_NAME[name]
    inject, calls = sc.inject, []

    def starved(rig, ctx):
        calls.append(1)
        if len(calls) <= attempts:
            rig.signal("sim", signal.SIGSTOP)
            time.sleep(0.25)
            rig.signal("sim", signal.SIGCONT)
            time.sleep(0.05)
        return inject(rig, ctx)

    monkeypatch.setattr(sc, "inject", starved)
    return calls


@pytest.mark.slow
def test_a_trial_during_which_the_simulated_g1_starved_is_invalid_and_rerun(tmp_path, monkeypatch):
    _dds()
    calls = _starving_sim_first(monkeypatch, "operator_estop", 1)
    report = _run_hil(tmp_path, FAST, ["operator_estop"])
    assert report["ok"], _explain(report)
    assert len(calls) == 2 and report["reruns"] == 1 and report["rig_starved"] == []
    row = report["rows"][0]
    assert row["ok"] and row["invalid"] is None and row["reruns"] == 1
    first = row["invalid_attempts"][0]
    assert first["invalid"].startswith("rig starved:") and "simulated G1's publishing" in first["invalid"]
    assert report["invalid"] == [f"operator_estop#0: {first['invalid']}"]


@pytest.mark.slow
def test_a_rig_that_keeps_starving_fails_the_run_as_a_rig_fault(tmp_path, monkeypatch):
    _dds()
    calls = _starving_sim_first(monkeypatch, "operator_estop", 99)
    report = _run_hil(tmp_path, FAST + ["hil.rerun_starved=1"], ["operator_estop"])
    assert not report["ok"] and len(calls) == 2 and report["reruns"] == 1
    assert report["rig_starved"] == ["operator_estop#0"] and report["failed"] == []
    assert any("a rig fault, not a system fault" in e for e in report["errors"])
    assert report["rows"][0]["invalid"].startswith("rig starved:")


def test_rig_lateness_is_judged_against_the_bound_it_threatens():
    from runtime.config import load_config
    from runtime.hil.harness import rig_lateness
    from runtime.hil.scenarios import BY_NAME

    cfg = load_config(None, [])  # state_timeout_s 0.1 at 500 Hz: a publishing gap of 88 ms could stop the robot
    estop, remote, lost = BY_NAME["operator_estop"], BY_NAME["remote_stop"], BY_NAME["lost_state"]

    def judged(sc, sim=(), monitor=(), harness=None, first_safe=10.005, bound=0.014):
        return rig_lateness(cfg, sc, list(sim), list(monitor), harness, 0.0, 10.0, first_safe, 12.0, bound)["starved"]

    assert judged(estop) is None
    assert judged(estop, sim=[[5.0, 0.080]]) is None  # late, but the state stays fresh enough
    assert "89 ms gap in the simulated G1's publishing" in judged(estop, sim=[[5.0, 0.089]])
    assert judged(lost, sim=[[11.0, 0.5]]) is None  # after the fault the state's end is the fault itself
    assert judged(lost, sim=[[9.9, 0.5]]) is not None
    assert judged(estop, sim=[[10.01, 0.02]]) is None  # the estop does not travel in the robot state
    assert "after the fault" in judged(remote, sim=[[10.01, 0.02]], bound=0.016)
    assert "harness sending the fault" in judged(estop, harness=0.011)
    assert "wire monitor" in judged(estop, monitor=[[10.004, 0.011]])
    assert judged(estop, monitor=[[10.2, 0.05]]) is None  # after the first safe command: no reaction depends on it


@pytest.mark.slow
def test_a_trial_that_broke_off_while_driving_does_not_fail_the_next(tmp_path, monkeypatch):
    """A rig error after arming leaves the controller running with chunks flowing; the next trial's preparation
    stops it (as a person would) instead of waiting for a safe state that never comes."""
    _dds()
    from runtime.hil import scenarios
    from runtime.hil.rig import RigError

    sc = scenarios.BY_NAME["operator_estop"]
    inject, calls = sc.inject, []

    def broken_first(rig, ctx):
        calls.append(1)
        if len(calls) == 1:
            raise RigError("the rig broke off before the fault")
        return inject(rig, ctx)

    monkeypatch.setattr(sc, "inject", broken_first)
    report = _run_hil(tmp_path, FAST, ["operator_estop"], trials=2)
    assert report["failed"] == ["operator_estop#0"], _explain(report)
    assert report["rows"][0]["errors"] == ["the rig broke off before the fault"]
    assert report["rows"][1]["ok"], _explain(report)


# -- restart_runtime: a SIGTERM during an inference is seen when the inference ends ---------------------------------

def test_restart_runtime_bound_grows_by_the_longest_inference_the_runtime_made(tmp_path):
    from runtime.config import load_config
    from runtime.hil.scenarios import _inference_in_progress

    class RigPaths:  # the two things _inference_in_progress reads from a HilRig
        cfg = load_config(None, ["policy.max_inference_s=0.3"])

        def path(self, name):
            return str(tmp_path / name)

    s, text = _inference_in_progress(RigPaths())
    assert s == 0.3 and "policy.max_inference_s" in text  # no report: the longest the runtime allows
    (tmp_path / "runtime.json").write_text(json.dumps({"latency_ms": {"inference": {"max": 152.5}}}))
    s, text = _inference_in_progress(RigPaths())
    assert s == pytest.approx(0.1525) and "longest inference" in text
    (tmp_path / "runtime.json").write_text(json.dumps({"latency_ms": {"inference": {"max": None}}}))
    assert _inference_in_progress(RigPaths())[0] == 0.3


@pytest.mark.slow
def test_restart_runtime_with_a_slow_model_meets_the_bound_of_its_inference(tmp_path):
    """A 150 ms model: a SIGTERM mid-inference is answered when it ends, within the bound that says so."""
    _dds()
    report = _run_hil(tmp_path, FAST + ["policy.inject_latency=0.15"], ["restart_runtime"], trials=2)
    assert report["ok"], _explain(report)
    for r in report["rows"]:
        assert r["bound_s"] >= 0.15 + 0.014 and "longest inference" in r["bound"], r
        assert 0.0 <= r["reaction_s"] <= r["bound_s"], r
