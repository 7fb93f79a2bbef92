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
    assert load_config(CONFIG).data == defaults()
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
    ({"transport": {"chunks": "tcp://10.0.0.5:5000"}}, "transport.chunks"),
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
    ("transport.chunks=tcp://192.168.123.164:5555", "leaves this machine"),
])
def test_override_errors(text, needle):
    with pytest.raises(ConfigError) as info:
        load_config(CONFIG, [text])
    assert needle in str(info.value)


def test_loopback_endpoints_accepted():
    cfg = load_config(None, ["transport.chunks=tcp://127.0.0.1:6000", "transport.state=tcp://[::1]:6001"])
    assert cfg["transport"]["chunks"].endswith(":6000")


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
