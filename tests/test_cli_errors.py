"""The CLI as a person meets it: commands the README gives work, an error is one line said once (the traceback only
with --verbose), a non-finite policy output names the stage that produced it, `wam-edge hil --log-dir` makes the
directory, and the image server simulation binds only where the config lets sockets bind."""

import logging
import os
import random
import re
import shlex
import socket
import subprocess
import sys
import time

import pytest
from test_policy import copy_reference, nan_model

from runtime.cameras import ImageServerCamera
from runtime.cameras.frame_layout import FrameLayout
from runtime.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wam_edge(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("WAM_EDGE_VERBOSE", None)
    return subprocess.run([sys.executable, "-m", "runtime.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- wam-edge image-server-sim ------------------------------------------------------------------------------------

def _readme_command(name):
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        for line in f:
            if line.startswith(f"wam-edge {name} "):
                return shlex.split(line.split("#", 1)[0])
    raise AssertionError(f"README.md has no `wam-edge {name}` command")


def test_the_readme_image_server_sim_command_serves_frames_and_stops_cleanly():
    """The README's own command, default config (camera.header auto) and all: it starts, a subscriber gets a whole
    side-by-side frame, and SIGTERM stops it with exit 0. Only the port is swapped for a free one."""
    argv = _readme_command("image-server-sim")
    assert argv[:3] == ["wam-edge", "image-server-sim", "--endpoint"] and argv[3].startswith("tcp://127.0.0.1:")
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    argv[3] = endpoint
    cfg = load_config(os.path.join(ROOT, "config.yaml"))
    assert cfg["camera"]["header"] == "auto"
    layout = FrameLayout.from_config(cfg["camera"]["layout"], cfg["camera"]["height"])
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", *argv[1:]], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cam = ImageServerCamera(endpoint, layout, header="auto")
    try:
        cam.start()
        frame = cam.wait_newer(0, 30.0)
        assert frame is not None, f"no frame from the simulated image server ({cam.stats()})"
        assert set(frame.images) == {"head", "left_wrist", "right_wrist"}
        assert frame.images["head"].shape == (480, 640, 3) and cam.stats()["dropped"] == 0
        assert proc.poll() is None
    finally:
        cam.close()
        proc.terminate()
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "simulated image server stopped after" in err


@pytest.mark.parametrize("endpoint", ["tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://192.168.123.164:5555",
                                      "tcp://eth0:5555", "udp://127.0.0.1:5555"])
@pytest.mark.parametrize("header", ["auto", "timestamp_id"])
def test_image_server_sim_refuses_an_endpoint_that_leaves_this_machine(endpoint, header):
    r = wam_edge("image-server-sim", "--endpoint", endpoint, "--set", f"camera.header={header}", "--seconds", "3",
                 timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"wam-edge image-server-sim: --endpoint {endpoint!r} ")  # then the config's reason
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1


def test_image_server_sim_header_follows_camera_header():
    from runtime.cameras.image_server_sim import sim_header

    assert sim_header("auto") == "none"  # the camera accepts either; the sim sends what Unitree's server sends
    assert sim_header("none") == "none" and sim_header("timestamp_id") == "timestamp_id"
    with pytest.raises(ValueError, match="header must be auto or one of"):
        sim_header("sometimes")


# -- wam-edge hil --log-dir ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_hil_makes_the_log_dir_it_is_given(tmp_path):
    pytest.importorskip("cyclonedds", reason="cyclonedds (tools/install_dds.sh) is needed for DDS")
    logs = tmp_path / "not" / "there" / "yet"
    domain = random.Random().randint(201, 230)  # a DDS domain of its own, as tests/test_hil.py does
    r = wam_edge("hil", "--scenario", "operator_estop", "--trials", "1", "--log-dir", str(logs),
                 "--set", f"dds.domain_id={domain}", "--set", "controller.arm_ramp_s=0.2",
                 "--set", "controller.stop_ramp_s=0.3", "--set", "hil.settle_s=0.5", "--set", "hil.observe_s=0.3",
                 timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1/1 trials passed" in r.stdout
    assert sorted(os.listdir(logs)) == ["controller.log", "runtime.log", "sim.log"]
    assert "controller ready" in (logs / "controller.log").read_text()


def test_hil_says_in_one_line_when_the_log_dir_cannot_be_made(tmp_path):
    pytest.importorskip("cyclonedds", reason="cyclonedds (tools/install_dds.sh) is needed for DDS")
    (tmp_path / "file").write_text("")
    r = wam_edge("hil", "--trials", "1", "--log-dir", str(tmp_path / "file" / "logs"), timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"wam-edge hil: cannot create the log directory '{tmp_path}/file/logs'" in r.stderr


# -- errors: one line, the traceback with --verbose ------------------------------------------------------------------

def _changed_model(tmp_path):
    model = copy_reference(tmp_path)
    path = model / "world.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte: the sha256 no longer matches the manifest's
    path.write_bytes(bytes(data))
    return model


def test_run_with_a_changed_model_file_says_so_in_one_line_and_the_traceback_only_with_verbose(tmp_path):
    model = _changed_model(tmp_path)
    r = wam_edge("run", "--set", f"model.path={model}", "--seconds", "1")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith(f"wam-edge run: {model}/world.onnx: sha256 mismatch")
    assert "re-export the model" in lines[0] and lines[0].endswith("(--verbose shows the traceback)")
    for argv in (["--verbose", "run"], ["run", "--verbose"]):  # before or after the command
        r = wam_edge(*argv, "--set", f"model.path={model}", "--seconds", "1")
        assert r.returncode == 1
        assert r.stderr.startswith("Traceback (most recent call last):") and "ManifestError" in r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith(f"wam-edge run: {model}/world.onnx: sha256 mismatch")
        assert "--verbose shows" not in r.stderr


def test_run_with_a_missing_stage_file_says_so_in_one_line(tmp_path):
    model = copy_reference(tmp_path)
    os.remove(str(model / "action_expert.onnx"))
    r = wam_edge("run", "--set", f"model.path={model}", "--seconds", "1")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "action_expert.onnx" in r.stderr


def test_a_socket_directory_others_could_write_is_refused_in_one_line(tmp_path):
    squatted = tmp_path / "squatted"
    squatted.mkdir()
    os.chmod(str(squatted), 0o777)
    r = wam_edge("run", "--set", "faults.enabled=true", "--set", f"faults.endpoint=ipc://{squatted}/faults",
                 "--seconds", "1")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    said = [line for line in r.stderr.splitlines() if line.startswith("wam-edge run:")]
    assert len(said) == 1 and "0777" in said[0] and str(squatted) in said[0], r.stderr


def test_a_config_error_is_still_exit_2_without_a_hint(tmp_path):
    r = wam_edge("run", "--set", "policy.steps=many")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr == "wam-edge run: configuration error: --set policy.steps=many: policy.steps: expected int, " \
                       "got str 'many'\n"


def test_a_nan_model_names_the_stage_once(tmp_path):
    """A real ONNX graph whose world stage outputs NaN: `wam-edge run` fails its warm-up with one message that names
    the stage and the output, not twice and not as a traceback."""
    model = nan_model(tmp_path, "world", "kv_1_v")
    r = wam_edge("run", "--set", f"model.path={model}", "--seconds", "1", "--log-level", "WARNING")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("non-finite") == 2  # "544 non-finite values" and the output's own count, one line
    assert len(r.stderr.strip().splitlines()) == 1
    assert "stage 'world' produced them (output 'kv_1_v': 12288 of 12288 non-finite)" in r.stderr


def test_doctor_load_names_the_nan_stage(tmp_path):
    model = nan_model(tmp_path, "action_expert", "velocity")
    r = wam_edge("doctor", "--load", "--set", f"model.path={model}", "--log-level", "WARNING")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    row = next(line for line in r.stdout.splitlines() if line.startswith("load "))
    assert "fail" in row and "stage 'action_expert' produced them (output 'velocity'" in row


def test_a_runtime_fault_names_the_stage_and_is_logged_once(tmp_path, runtime_rig, caplog):
    """NaN after start-up: the loop reports the fault once (heartbeat and log), naming the stage, and sends nothing.
    A detail longer than a heartbeat carries is logged once too (it used to be compared untruncated)."""
    from conftest import publish_state, read_chunks

    model = nan_model(tmp_path, "world", "kv_1_v")
    rt, pull, pub, _ = runtime_rig(f"model.path={model}", "policy.warmup_runs=0", "policy.state_max_age_s=10",
                                   "policy.trigger=fixed", "policy.rate_hz=100")
    publish_state(pub, rt, 1.0)
    with caplog.at_level(logging.ERROR, logger="wam_edge.runtime"):
        deadline = time.monotonic() + 10.0
        while rt.stats.counters["policy_errors"] < 5 and time.monotonic() < deadline:
            rt.step(time.monotonic())
            time.sleep(0.01)
    assert rt.stats.counters["policy_errors"] >= 5 and rt.stats.counters["faults"] == 1
    faults = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fault:")]
    assert len(faults) == 1 and "stage 'world' produced them (output 'kv_1_v'" in faults[0]
    assert rt.health == "fault" and "stage 'world'" in rt.detail
    assert read_chunks(pull) == []
    caplog.clear()
    long = "x" * 300
    with caplog.at_level(logging.ERROR, logger="wam_edge.runtime"):
        for _ in range(3):
            rt._fault(time.monotonic(), long)
    assert rt.stats.counters["faults"] == 2 and len(caplog.records) == 1 and rt.detail == long[:256]


@pytest.mark.parametrize("command", ["run", "demo", "doctor", "bench", "controller", "hil", "image-server-sim"])
def test_help_says_what_verbose_does(command):
    r = wam_edge(command, "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert re.search(r"--verbose on an error, also print its traceback \(default: one line", text), text
