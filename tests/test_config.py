"""config.yaml and its schema: errors name the file and the key; --set overrides; the file documents every key."""

import os
import subprocess
import sys

import pytest
import yaml

from runtime.config import SCHEMA, ConfigError, defaults, load_config, render_defaults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "config.yaml")


def test_root_config_is_the_schema_defaults_and_documents_every_key():
    with open(CONFIG, encoding="utf-8") as f:
        text = f.read()
    assert text == render_defaults(), "config.yaml is out of date: run `wam-edge config --defaults > config.yaml`"
    assert load_config(CONFIG).data == load_config(None).data  # the same, placeholders expanded alike
    assert defaults()["controller"]["latch_file"] == "{state_dir}/estop.latched"  # the file keeps the placeholders
    for section, keys in SCHEMA.items():
        for name, key in keys.items():
            assert f"# {key.doc}" in text, f"{section}.{name} is not documented in config.yaml"


def _write(tmp_path, tree):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(tree))
    return str(p)


@pytest.mark.parametrize("tree,needle", [
    ({"policy": {"stepz": 1}}, "unknown key policy.stepz"),
    ({"polcy": {"steps": 1}}, "unknown section 'polcy'"),
    ({"policy": {"steps": "four"}}, "policy.steps: expected int"),
    ({"policy": {"steps": True}}, "policy.steps: expected int"),
    ({"policy": {"steps": 1000}}, "policy.steps: 1000 is outside"),
    ({"controller": {"max_velocity": -1}}, "controller.max_velocity"),
    ({"camera": {"source": "webcam"}}, "camera.source: 'webcam' is not one of"),
    ({"camera": {"layout": [{"name": "head"}]}}, "camera.layout: item 0"),
    ({"camera": {"layout": [{"name": "a", "width": 64}, {"name": "a", "width": 64}]}}, "names repeat"),
    ({"transport": {"chunks": "tcp://10.0.0.5:5000"}}, "transport.chunks: 'tcp://10.0.0.5:5000': no authentication"),
    ({"transport": {"state": "udp://x"}}, "transport.state"),
    ({"policy": 3}, "policy: expected a mapping"),
])
def test_errors_name_file_and_key(tmp_path, tree, needle):
    path = _write(tmp_path, tree)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert needle in str(info.value) and path in str(info.value)


def test_partial_file_and_overrides(tmp_path):
    path = _write(tmp_path, {"policy": {"rate_hz": 7}})
    cfg = load_config(path, ["policy.steps=4", "camera.layout=[{name: head, width: 320}]", "model.verify_hashes=false"])
    assert cfg["policy"]["rate_hz"] == 7.0 and isinstance(cfg["policy"]["rate_hz"], float)
    assert cfg["policy"]["steps"] == 4
    assert cfg["camera"]["layout"] == [{"name": "head", "width": 320}]
    assert cfg["model"]["verify_hashes"] is False
    assert cfg.resolve("exported/reference") == os.path.join(str(tmp_path), "exported", "reference")


@pytest.mark.parametrize("text,needle", [
    ("policy.steps=x", "--set policy.steps=x: policy.steps: expected int"),
    ("policy.nope=1", "unknown key policy.nope"),
    ("steps=1", "expected section.key=value"),
    ("policy.steps", "expected section.key=value"),
    ("transport.chunks=tcp://192.168.123.164:5555", "no authentication on tcp"),
])
def test_override_errors(text, needle):
    with pytest.raises(ConfigError) as info:
        load_config(CONFIG, [text])
    assert needle in str(info.value)


WAM_ENDPOINTS = ["transport.chunks", "transport.state", "transport.control", "sim.control", "faults.endpoint"]


@pytest.mark.parametrize("key", WAM_ENDPOINTS)
@pytest.mark.parametrize("value,needle", [
    ("tcp://127.0.0.1:6000", "no authentication on tcp"),  # loopback too: any local user could connect
    ("tcp://localhost:6000", "no authentication on tcp"),
    ("tcp://[::1]:6001", "no authentication on tcp"),
    ("ipc://@wam-edge/control", "abstract socket"),
    ("ipc://relative/control", "must be absolute"),
    ("ipc://", "no path"),
])
def test_endpoints_that_other_local_users_could_reach_are_refused(key, value, needle):
    """The operator, fault and simulator control sockets and the robot's links: only ipc with a path, whose
    directory is checked to be private when bound; tcp has no authentication, an abstract socket no permissions."""
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"{key}={value}"])
    assert needle in str(info.value) and key in str(info.value)


def test_camera_endpoint_takes_tcp_but_not_an_abstract_socket():
    assert load_config(None, ["camera.endpoint=tcp://192.168.123.164:5555"])["camera"]["endpoint"].endswith("5555")
    with pytest.raises(ConfigError, match="camera.endpoint.*abstract socket"):
        load_config(None, ["camera.endpoint=ipc://@frames"])


def test_dir_placeholders_are_expanded_at_load(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path / "run"))
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "lib"))
    cfg = load_config(CONFIG, ["sim.control=ipc://{runtime_dir}/x", "faults.endpoint=ipc:///elsewhere/f"])
    assert cfg["transport"]["control"] == f"ipc://{tmp_path}/run/control"
    assert cfg["sim"]["control"] == f"ipc://{tmp_path}/run/x"
    assert cfg["faults"]["endpoint"] == "ipc:///elsewhere/f"
    assert cfg["controller"]["latch_file"] == f"{tmp_path}/lib/estop.latched"
    assert cfg["controller"]["command_record"] == f"{tmp_path}/lib/controller.record"
    assert cfg.templates[("controller", "latch_file")] == "{state_dir}/estop.latched"
    assert cfg.dirs["{state_dir}"][0] == f"{tmp_path}/lib" and "STATE_DIRECTORY" in cfg.dirs["{state_dir}"][1]
    assert not os.path.exists(tmp_path / "run") and not os.path.exists(tmp_path / "lib")  # loading makes nothing
    assert load_config(None, ["controller.latch_file={state_dir}/l"])["controller"]["latch_file"] == f"{tmp_path}/lib/l"
    with pytest.raises(ConfigError, match=r"controller.latch_file: unknown placeholder \{home\}"):
        load_config(None, ["controller.latch_file=/x/{home}/latch"])
    with pytest.raises(ConfigError, match="longer than a unix socket address holds"):
        load_config(None, ["transport.state=ipc://{runtime_dir}/" + "s" * 120])


def test_cli_config_prints_effective_paths_and_defaults_keep_placeholders(tmp_path):
    env = dict(os.environ, RUNTIME_DIRECTORY=str(tmp_path / "run"), STATE_DIRECTORY=str(tmp_path / "lib"))
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "config"], capture_output=True, text=True, cwd=ROOT,
                       env=env, check=True)
    assert f"control: ipc://{tmp_path}/run/control" in r.stdout
    assert f"latch_file: {tmp_path}/lib/estop.latched" in r.stdout
    assert f"# {{state_dir}} = {tmp_path}/lib: $STATE_DIRECTORY" in r.stdout
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "config", "--defaults"], capture_output=True, text=True,
                       cwd=ROOT, env=env, check=True)
    assert "control: ipc://{runtime_dir}/control" in r.stdout and str(tmp_path) not in r.stdout


def test_cli_reports_config_error_and_exits_2(tmp_path):
    path = _write(tmp_path, {"controller": {"rate_hz": "fast"}})
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "config", "--config", path], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 2
    assert path in r.stderr and "controller.rate_hz" in r.stderr


def test_cli_help_everywhere():
    for cmd in ([], ["run"], ["controller"], ["demo"], ["config"], ["image-server-sim"]):
        r = subprocess.run([sys.executable, "-m", "runtime.cli", *cmd, "--help"], capture_output=True, text=True,
                           cwd=ROOT)
        assert r.returncode == 0 and "usage: wam-edge" in r.stdout


# -- duplicate keys: YAML lets the last one win; the config refuses them, naming the file, the key and both lines --

@pytest.mark.parametrize("text,needle", [
    ("controller:\n  max_velocity: 1.0\n  rate_hz: 500\n  max_velocity: 9.0\n",
     "duplicate key controller.max_velocity at lines 2 and 4"),
    ("policy:\n  steps: 1\ncontroller:\n  rate_hz: 100\npolicy:\n  seed: 1\n", "duplicate key policy at lines 1 and 5"),
    ("camera:\n  layout:\n  - name: head\n    width: 64\n  - name: a\n    width: 64\n    name: b\n",
     "duplicate key camera.layout[1].name at lines 5 and 7"),
    ("camera:\n  layout: [{name: a, width: 64, width: 65}]\n",
     "duplicate key camera.layout[0].width at line 2 (columns 22 and 33)"),
    ("remote:\n  hold_s: 0.5\n  hold_s: 0.5\n", "duplicate key remote.hold_s at lines 2 and 3"),  # even if equal
])
def test_duplicate_keys_in_the_file_are_refused_at_every_level(tmp_path, text, needle):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value).startswith(f"{path}: ") and needle in str(info.value)


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("camera:\n  layout:\n  - &cam {name: head, width: 64}\n  - <<: *cam\n    name: wrist\n")
    assert load_config(str(path))["camera"]["layout"] == [{"name": "head", "width": 64},
                                                           {"name": "wrist", "width": 64}]


def test_duplicate_key_in_a_set_value_is_refused_and_a_key_set_twice_takes_the_last():
    with pytest.raises(ConfigError, match=r"--set camera.layout=.*duplicate key \[0\].width"):
        load_config(None, ["camera.layout=[{name: a, width: 64, width: 65}]"])
    cfg = load_config(None, ["controller.max_velocity=1.0", "controller.max_velocity=1.5"])
    assert cfg["controller"]["max_velocity"] == 1.5  # as on any command line: documented in --help


def test_cli_refuses_a_duplicate_key_with_exit_2_and_says_set_twice_wins(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("controller:\n  max_velocity: 1.0\n  max_velocity: 9.0\n")
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "config", "--config", str(path)], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stdout == ""
    assert f"{path}: duplicate key controller.max_velocity at lines 2 and 3" in r.stderr
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "run", "--help"], capture_output=True, text=True,
                       cwd=ROOT)
    assert "the last wins" in " ".join(r.stdout.split())
