"""The systemd units (systemd/*.in, rendered by runtime/service/install.py) and the sd_notify client."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

import pytest

from runtime.service import install
from runtime.service.notify import Notifier, WatchdogPinger

REPO = Path(__file__).resolve().parents[1]
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
ALL_UNITS = list(install.UNITS) + [install.SIM_UNIT]

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="AF_UNIX datagrams as systemd uses them")


# -- helpers -------------------------------------------------------------------------------------------------------

def _current_user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def _fake_venv(root: Path) -> Path:
    """A venv-shaped folder whose bin/wam-edge is a real executable (systemd-analyze verify checks ExecStart)."""
    venv = root / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    exe = venv / "bin" / "wam-edge"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    return venv


def _render_kwargs(tmp_path: Path) -> Dict[str, object]:
    config = tmp_path / "robot.yaml"
    config.write_text((REPO / "config.yaml").read_text())
    return dict(venv=str(_fake_venv(tmp_path)), config=str(config), user=_current_user(), with_sim=True,
                cpu_controller=7, cpu_runtime="0-5")


def _parse_unit(text: str) -> Dict[str, Dict[str, List[str]]]:
    """{section: {key: [values in order]}} (systemd keys may repeat)."""
    sections: Dict[str, Dict[str, List[str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, "key outside a section: %r" % line
        key, sep, value = line.partition("=")
        assert sep, "not a key=value line: %r" % line
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _words(unit: Dict[str, Dict[str, List[str]]], section: str, key: str) -> List[str]:
    return [w for v in unit.get(section, {}).get(key, []) for w in v.split()]


def _one(unit: Dict[str, Dict[str, List[str]]], section: str, key: str) -> str:
    values = unit[section][key]
    assert len(values) == 1, (section, key, values)
    return values[0]


def _timespan_s(value: str) -> float:
    for suffix, scale in (("ms", 1e-3), ("min", 60.0), ("s", 1.0)):
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * scale
    return float(value)


def _verify(paths: List[Path]) -> subprocess.CompletedProcess:
    # offline: no man pages to look up, no generators to run (they need privileges and a booted systemd);
    # --recursive-errors=no: judge our units (and that what they require exists), not the host's other units
    env = dict(os.environ, SYSTEMD_LOG_COLOR="0", SYSTEMD_PAGER="", LC_ALL="C")
    flags = ["--man=no", "--generators=no"]
    helptext = subprocess.run([SYSTEMD_ANALYZE, "--help"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              universal_newlines=True, timeout=30, env=env).stdout
    if "--recursive-errors" in helptext:  # systemd >= 250; older ones (Ubuntu 22.04: 249) lack the flag
        flags.append("--recursive-errors=no")
    cmd = [SYSTEMD_ANALYZE, "verify"] + flags + [str(p) for p in paths]
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                          timeout=60, env=env)


@pytest.fixture
def units(tmp_path: Path) -> Dict[str, Dict[str, Dict[str, List[str]]]]:
    rendered = install.render_units(**_render_kwargs(tmp_path))
    return {name: _parse_unit(text) for name, text in rendered.items()}


# -- the unit files --------------------------------------------------------------------------------------------------

def test_templates_are_the_ones_installed() -> None:
    found = sorted(p.name for p in (REPO / "systemd").iterdir() if p.name.endswith(install.TEMPLATE_SUFFIX))
    assert found == sorted(u + install.TEMPLATE_SUFFIX for u in ALL_UNITS)
    assert Path(install.find_templates_dir()).resolve() == (REPO / "systemd").resolve()


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed")
def test_rendered_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    dest = tmp_path / "units"
    written = install.install_units(str(dest), **_render_kwargs(tmp_path))
    assert [Path(p).name for p in written] == ALL_UNITS
    result = _verify([Path(p) for p in written])
    ours = [line for line in result.stdout.splitlines()
            if str(tmp_path) in line or any(u in line for u in ALL_UNITS) or "wam-edge" in line]
    assert result.returncode == 0, result.stdout
    assert ours == [], result.stdout


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed")
def test_verify_would_catch_a_broken_unit(tmp_path: Path) -> None:
    """The check above means something: the same call flags an unknown key and a missing binary in our units."""
    dest = tmp_path / "units"
    kwargs = _render_kwargs(tmp_path)
    install.install_units(str(dest), **kwargs)
    controller = dest / "wam-edge-controller.service"
    controller.write_text(controller.read_text().replace("KillMode=mixed", "KillMode=mixed\nWatchdogSecs=1s"))
    runtime = dest / "wam-edge-runtime.service"
    runtime.write_text(runtime.read_text().replace(str(kwargs["venv"]), str(tmp_path / "nowhere")))
    result = _verify([controller, runtime])
    assert "WatchdogSecs" in result.stdout and "wam-edge-controller.service" in result.stdout, result.stdout
    assert str(tmp_path / "nowhere") in result.stdout, result.stdout
    assert result.returncode != 0, result.stdout


def test_controller_unit_is_real_time_notify_and_watched(units, tmp_path: Path) -> None:
    c = units["wam-edge-controller.service"]
    s = c["Service"]
    assert _one(c, "Service", "Type") == "notify"
    assert _one(c, "Service", "NotifyAccess") == "main"
    assert 0 < _timespan_s(_one(c, "Service", "WatchdogSec")) <= 2.0
    assert _one(c, "Service", "Restart") == "on-failure"
    assert _timespan_s(_one(c, "Service", "RestartSec")) > 0
    assert "StartLimitIntervalSec" in c["Unit"] and int(_one(c, "Unit", "StartLimitBurst")) >= 1
    assert _one(c, "Service", "CPUSchedulingPolicy") == "fifo"
    assert 50 <= int(_one(c, "Service", "CPUSchedulingPriority")) <= 99
    assert _one(c, "Service", "CPUAffinity") == "7"
    assert _one(c, "Service", "LimitMEMLOCK") == "infinity"
    assert int(_one(c, "Service", "Nice")) < 0
    assert _one(c, "Service", "KillSignal") == "SIGTERM"
    assert _one(c, "Service", "KillMode") == "mixed"
    assert _timespan_s(_one(c, "Service", "TimeoutStopSec")) == install.CONTROLLER_TIMEOUT_STOP_S  # install checks it
    exe = _one(c, "Service", "ExecStart").split()
    assert exe[0] == str(tmp_path / "venv" / "bin" / "wam-edge") and exe[1] == "controller"
    assert exe[2:] == ["--config", str(tmp_path / "robot.yaml")]
    assert _one(c, "Service", "User") == _current_user()
    assert _one(c, "Service", "WorkingDirectory") == str(tmp_path)
    env = _words(c, "Service", "Environment")
    assert "WAM_EDGE_CONFIG=%s" % (tmp_path / "robot.yaml") in env
    assert "WatchdogSignal" not in s  # the default, SIGABRT: PYTHONFAULTHANDLER dumps every thread's stack
    assert "PYTHONFAULTHANDLER=1" in env


def test_rigs_schedule_each_process_as_its_unit_does(units) -> None:
    """`wam-edge hil`, `bench` and `demo` apply runtime/service/scheduling.UNITS; it must say what the units say:
    the controller first, the simulated G1 next, the runtime at normal priority (issue 11)."""
    from runtime.service.scheduling import UNITS

    cores = {"@CPU_CONTROLLER@": "own", "@CPU_RUNTIME@": "others"}
    template = {n: (REPO / "systemd" / (n + install.TEMPLATE_SUFFIX)).read_text() for n in ALL_UNITS}
    for role, name in (("controller", "wam-edge-controller.service"), ("runtime", "wam-edge-runtime.service"),
                       ("sim", install.SIM_UNIT)):
        u, want = units[name], UNITS[role]
        policy = u["Service"].get("CPUSchedulingPolicy", ["other"])[0]
        assert policy == want.policy, (role, policy)
        if policy == "fifo":
            assert int(_one(u, "Service", "CPUSchedulingPriority")) == want.priority, role
            assert _one(u, "Service", "CPUSchedulingResetOnFork") == "yes", role
        nice = u["Service"].get("Nice")
        assert (int(nice[0]) if nice else None) == want.nice, role
        affinity = [ln.split("=", 1)[1] for ln in template[name].splitlines() if ln.startswith("CPUAffinity=")]
        assert [cores[a] for a in affinity] == [want.cores], role
        assert (u["Service"].get("LimitMEMLOCK") == ["infinity"]) == want.memlock, role
    assert UNITS["controller"].priority > UNITS["sim"].priority  # ordered, never one priority for all


def test_runtime_follows_the_controller_and_can_never_take_it_down(units) -> None:
    r, c = units["wam-edge-runtime.service"], units["wam-edge-controller.service"]
    ctl, rt = "wam-edge-controller.service", "wam-edge-runtime.service"
    assert ctl in _words(r, "Unit", "After") and ctl in _words(r, "Unit", "Wants")
    # no restart/stop propagation from controller restarts into the runtime (keeps the runtime warm) ...
    for key in ("Requires", "BindsTo", "PartOf", "Requisite"):
        assert ctl not in _words(r, "Unit", key), key
    # ... and nothing at all that lets the runtime's fate reach the controller
    for key in ("Requires", "BindsTo", "PartOf", "Requisite", "Wants", "After", "Upholds"):
        assert rt not in _words(c, "Unit", key), key
    assert _one(r, "Service", "Type") == "notify"
    assert _timespan_s(_one(r, "Service", "TimeoutStartSec")) >= 60.0  # model load + TensorRT warm-up
    assert _timespan_s(_one(r, "Service", "WatchdogSec")) > 0
    assert _one(r, "Service", "Restart") == "on-failure"
    assert int(_one(r, "Service", "Nice")) > int(_one(c, "Service", "Nice"))
    assert "CPUSchedulingPolicy" not in r["Service"]
    assert _one(r, "Service", "CPUAffinity") == "0-5"
    for unit in (r, c):
        assert "wam-edge.target" in _words(unit, "Unit", "PartOf")
        assert _words(unit, "Install", "WantedBy") == ["wam-edge.target"]
    assert _one(units["wam-edge.target"], "Install", "WantedBy") == "multi-user.target"


def test_units_keep_sockets_and_state_in_private_directories(units) -> None:
    """/run/wam-edge for the sockets (shared by the units, kept while any of them runs), /var/lib/wam-edge on disk
    for the e-stop latch and the command record, both 0700 and owned by the services' user; paths.py looks there."""
    from runtime.controller.controller import EXIT_REFUSED
    from runtime.service import paths

    for name in ("wam-edge-controller.service", "wam-edge-runtime.service", "wam-edge-sim.service"):
        u = units[name]
        assert _one(u, "Service", "RuntimeDirectory") == "wam-edge", name
        assert _one(u, "Service", "RuntimeDirectoryMode") == "0700", name
        assert _one(u, "Service", "RuntimeDirectoryPreserve") == "yes", name  # one stopping keeps the others' sockets
        assert "StateDirectory" not in u["Service"] or name == "wam-edge-controller.service"
    c = units["wam-edge-controller.service"]
    assert _one(c, "Service", "StateDirectory") == "wam-edge"
    assert _one(c, "Service", "StateDirectoryMode") == "0700"
    assert paths.SYSTEM_RUNTIME_DIR == install.UNIT_RUNTIME_DIR == "/run/wam-edge"
    assert paths.SYSTEM_STATE_DIR == install.UNIT_STATE_DIR == "/var/lib/wam-edge"
    # a controller that refuses to start (unsafe or unwritable state) is not restarted into the same refusal
    assert {str(EXIT_REFUSED), "2"} <= set(_words(c, "Service", "RestartPreventExitStatus"))


def test_cli_warns_about_sockets_and_state_outside_the_units_directories(tmp_path: Path, capsys) -> None:
    kwargs = _render_kwargs(tmp_path)
    base = ["--venv", str(kwargs["venv"]), "--dry-run"]
    assert install.main(base + ["--config", str(kwargs["config"])]) == 0  # the defaults: {runtime_dir}, {state_dir}
    assert "not in {" not in capsys.readouterr().err
    old = tmp_path / "old.yaml"
    old.write_text("controller:\n  latch_file: /tmp/wam-edge/estop.latched\ntransport:\n"
                   "  control: ipc:///tmp/wam-edge/control\n")
    assert install.main(base + ["--config", str(old)]) == 0
    err = capsys.readouterr().err
    assert "controller.latch_file is /tmp/wam-edge/estop.latched, not in {state_dir} (/var/lib/wam-edge" in err
    assert "must survive a reboot" in err
    assert "transport.control is ipc:///tmp/wam-edge/control, not in {runtime_dir} (/run/wam-edge" in err


def test_sim_unit_is_a_simulation_ordered_before_the_controller_and_only_on_request(units, tmp_path: Path) -> None:
    s = units["wam-edge-sim.service"]
    assert "SIMULATED" in _one(s, "Unit", "Description")
    assert "wam-edge-controller.service" in _words(s, "Unit", "Before")
    assert _one(s, "Service", "ExecStart").split()[1] == "sim"
    kwargs = _render_kwargs(tmp_path)
    kwargs["with_sim"] = False
    plain = install.render_units(**kwargs)
    assert list(plain) == list(install.UNITS)
    assert install.SIM_UNIT not in " ".join(t for t in plain.values())


def test_cyclonedds_uri_is_quoted_for_systemd(tmp_path: Path) -> None:
    xml = '<CycloneDDS><Domain><General><Interfaces><NetworkInterface name="eth0"/></Interfaces></General>' \
          '</Domain></CycloneDDS>'
    text = install.render_units(cyclonedds_uri=xml + " 100%", **_render_kwargs(tmp_path))["wam-edge-controller.service"]
    line = [ln for ln in text.splitlines() if ln.startswith('Environment="CYCLONEDDS_URI=')]
    assert line == ['Environment="CYCLONEDDS_URI=%s 100%%%%"' % xml.replace('"', '\\"')]
    plain = install.render_units(**_render_kwargs(tmp_path))["wam-edge-controller.service"]
    assert not [ln for ln in plain.splitlines() if "CYCLONEDDS_URI=" in ln and not ln.startswith("#")]


# -- install_units ---------------------------------------------------------------------------------------------------

def test_install_units_dry_run_writes_nothing_and_a_real_write_matches(tmp_path: Path) -> None:
    kwargs = _render_kwargs(tmp_path)
    dest = tmp_path / "etc" / "systemd" / "system"
    texts = install.install_units(str(dest), dry_run=True, **kwargs)
    assert not dest.exists()
    assert len(texts) == len(ALL_UNITS)
    for text in texts:
        assert "@" not in text.replace("@...@", "")  # every placeholder rendered
    paths = install.install_units(str(dest), **kwargs)
    assert paths == [str(dest / u) for u in ALL_UNITS]
    for path, text in zip(paths, texts):
        assert Path(path).read_text() == text
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert sorted(os.listdir(dest)) == sorted(ALL_UNITS)  # no temporary files left behind
    again = install.install_units(str(dest), **kwargs)  # idempotent
    assert again == paths


@pytest.mark.parametrize("bad", [
    dict(config="/robot configs/robot.yaml"),
    dict(venv="/opt/wam%i"),
    dict(workdir="/opt/$HOME"),
    dict(user="bob smith"),
    dict(cpu_controller="seven"),
    dict(cpu_controller=3, cpu_runtime="0-5"),  # overlap: the RT core must be the controller's own
])
def test_install_units_refuses_values_systemd_would_misread(tmp_path: Path, bad: Dict[str, object]) -> None:
    kwargs = _render_kwargs(tmp_path)
    kwargs.update(bad)
    with pytest.raises(install.InstallError):
        install.install_units(str(tmp_path / "out"), dry_run=True, **kwargs)
    assert not (tmp_path / "out").exists()


def test_cli_dry_run_and_write(tmp_path: Path, capsys) -> None:
    kwargs = _render_kwargs(tmp_path)
    base = ["--venv", str(kwargs["venv"]), "--config", str(kwargs["config"]), "--user", str(kwargs["user"])]
    assert install.main(base + ["--dry-run", "--dest", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "wam-edge-controller.service ----" in out and "CPUSchedulingPolicy=fifo" in out
    assert "wam-edge-sim" not in out
    assert not (tmp_path / "out").exists()
    assert install.main(base + ["--dest", str(tmp_path / "out"), "--with-sim", "--cpu-controller", "5",
                                "--cpu-runtime", "0-3"]) == 0
    out = capsys.readouterr().out
    assert "systemctl daemon-reload" in out and "enable --now" in out and "wam-edge-sim.service" in out
    assert "CPUAffinity=5\n" in (tmp_path / "out" / "wam-edge-controller.service").read_text()
    assert install.main(base + ["--dest", str(tmp_path / "out"), "--cpu-controller", "2"]) == 2  # overlaps 0-5
    assert "overlap" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        install.main(["--help"])
    assert exc.value.code == 0
    assert "--with-sim" in capsys.readouterr().out


def test_cli_refuses_a_config_that_does_not_load(tmp_path: Path, capsys) -> None:
    kwargs = _render_kwargs(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy:\n  no_such_key: 1\n")
    argv = ["--venv", str(kwargs["venv"]), "--config", str(bad), "--dry-run"]
    assert install.main(argv) == 2
    assert "no_such_key" in capsys.readouterr().err


# -- the sd_notify client ----------------------------------------------------------------------------------------------

@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch):
    """A bound AF_UNIX datagram socket standing in for systemd; NOTIFY_SOCKET points at it."""
    # sockaddr_un holds ~107 bytes: fall back to a short folder when pytest's tmp_path is too long
    folder = str(tmp_path) if len(str(tmp_path)) < 90 else tempfile.mkdtemp(prefix="wam-notify-")
    path = os.path.join(folder, "notify")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.settimeout(2.0)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    for key in ("WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(key, raising=False)
    yield server, path
    server.close()
    if os.path.exists(path):
        os.unlink(path)
    if folder != str(tmp_path):
        shutil.rmtree(folder, ignore_errors=True)


def _pending(server: socket.socket) -> List[bytes]:
    """Every datagram queued at the server now, without waiting."""
    timeout = server.gettimeout()
    server.setblocking(False)
    out = []
    try:
        while True:
            try:
                out.append(server.recv(4096))
            except BlockingIOError:
                return out
    finally:
        server.settimeout(timeout)


@linux_only
def test_notifier_sends_ready_watchdog_stopping_status(notify_socket) -> None:
    server, path = notify_socket
    n = Notifier.from_env()
    assert n.enabled and n.address == path
    assert n.ready()
    assert server.recv(4096) == b"READY=1"
    assert n.ready("warm: 2 runs")
    assert server.recv(4096) == b"READY=1\nSTATUS=warm: 2 runs"
    assert n.watchdog()
    assert server.recv(4096) == b"WATCHDOG=1"
    assert n.status("holding\nnewline")
    assert server.recv(4096) == b"STATUS=holding newline"
    assert n.extend_timeout(90)
    assert server.recv(4096) == b"EXTEND_TIMEOUT_USEC=90000000"
    assert n.mainpid(1234)
    assert server.recv(4096) == b"MAINPID=1234"
    assert n.stopping()
    assert server.recv(4096) == b"STOPPING=1"
    assert n.stopping("SIGTERM")
    assert server.recv(4096) == b"STOPPING=1\nSTATUS=SIGTERM"
    assert (n.sent, n.errors) == (8, 0)
    n.close()
    assert not n.enabled and not n.watchdog()


@linux_only
def test_notifier_abstract_namespace(monkeypatch) -> None:
    name = "wam-edge-test-%d" % os.getpid()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind("\0" + name)
    server.settimeout(2.0)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        n = Notifier.from_env()
        assert n.ready()
        assert server.recv(4096) == b"READY=1"
    finally:
        server.close()


def test_notifier_is_a_no_op_without_notify_socket(monkeypatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    n = Notifier.from_env()
    assert not n.enabled
    assert not n.ready() and not n.watchdog() and not n.stopping() and not n.status("x")
    assert n.watchdog_interval_s() is None
    pinger = n.watchdog_pinger()
    assert not pinger.enabled and not pinger.ping(0.0)
    assert (n.sent, n.errors) == (0, 0)
    # addresses we cannot speak to are disabled, counted, never raised
    for address in ("relative/path", "vsock:2:1234"):
        odd = Notifier(address)
        assert not odd.enabled and odd.errors == 1 and not odd.ready()


@linux_only
def test_watchdog_interval_from_watchdog_usec(notify_socket, monkeypatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    assert Notifier.from_env().watchdog_interval_s() == pytest.approx(0.5)
    assert Notifier.from_env().watchdog_timeout_s() == pytest.approx(1.0)
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert Notifier.from_env().watchdog_interval_s() == pytest.approx(0.5)
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert Notifier.from_env().watchdog_interval_s() is None
    monkeypatch.delenv("WATCHDOG_PID")
    monkeypatch.setenv("WATCHDOG_USEC", "soon")
    assert Notifier.from_env().watchdog_interval_s() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    n = Notifier.from_env()
    assert n.watchdog_interval_s() is None and not n.watchdog_pinger().enabled


@linux_only
def test_watchdog_pinger_rate_limits(notify_socket, monkeypatch) -> None:
    server, _ = notify_socket
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # WatchdogSec=1s: interval 0.5 s, at most one ping per 0.25 s
    t = [100.0]
    n = Notifier.from_env()
    pinger = n.watchdog_pinger(clock=lambda: t[0])
    assert isinstance(pinger, WatchdogPinger) and pinger.enabled and pinger.period_s == pytest.approx(0.25)
    sent = []
    for _ in range(1000):  # a 500 Hz loop for 2 s
        sent.append(pinger.ping())
        t[0] += 0.002
    assert 7 <= sum(sent) <= 9
    gaps = [i for i, s in enumerate(sent) if s]
    assert all((b - a) * 0.002 >= 0.25 - 1e-9 for a, b in zip(gaps, gaps[1:]))
    assert _pending(server) == [b"WATCHDOG=1"] * sum(sent)
    assert pinger.pings == sum(sent)
    # the loop's own timestamp works as well; reset() makes the next ping go out at once
    assert not pinger.ping(t[0])
    pinger.reset()
    assert pinger.ping(t[0])
    explicit = n.watchdog_pinger(min_period_s=1.0)
    assert explicit.ping(0.0) and not explicit.ping(0.99) and explicit.ping(1.0)


@linux_only
def test_send_errors_are_counted_not_raised(notify_socket) -> None:
    server, path = notify_socket
    n = Notifier.from_env()
    assert n.ready()
    server.close()
    os.unlink(path)  # systemd's socket vanished
    assert not n.watchdog()
    assert not n.ready("again")
    assert not n.stopping()
    assert n.errors == 3 and n.last_errno in (errno.ENOENT, errno.ECONNREFUSED)
    # a new socket at the same path (systemd re-executed) is found again: the address is resolved on every send
    again = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    again.bind(path)
    again.settimeout(2.0)
    try:
        assert n.watchdog()
        assert again.recv(4096) == b"WATCHDOG=1"
    finally:
        again.close()


@linux_only
def test_a_full_notify_queue_never_blocks_the_sender(notify_socket) -> None:
    server, _ = notify_socket
    n = Notifier.from_env()
    results = [n.watchdog() for _ in range(2000)]  # nobody reads: the receiver's queue fills up
    assert results[0] and not all(results)
    assert n.errors == results.count(False) and n.last_errno in (errno.EAGAIN, errno.EWOULDBLOCK)
    assert len(_pending(server)) == results.count(True)


def test_from_env_can_unset_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify")
    monkeypatch.setenv("WATCHDOG_USEC", "500000")
    n = Notifier.from_env(unset_environment=True)
    assert n.address == "/nonexistent/notify" and n.watchdog_timeout_s() == pytest.approx(0.5)
    assert "NOTIFY_SOCKET" not in os.environ and "WATCHDOG_USEC" not in os.environ
    assert not n.ready() and n.errors == 1  # nobody there: counted


def test_cli_warns_when_the_stop_sequence_outlasts_timeout_stop_sec(tmp_path: Path, capsys) -> None:
    kwargs = _render_kwargs(tmp_path)
    slow = tmp_path / "slow.yaml"
    slow.write_text("controller:\n  mode: arm_sdk\n  hold_s: 1.0\n  stop_ramp_s: 6.0\n")
    assert install.main(["--venv", str(kwargs["venv"]), "--config", str(slow), "--dry-run"]) == 0
    assert "TimeoutStopSec" in capsys.readouterr().err
    assert install.main(["--venv", str(kwargs["venv"]), "--config", str(kwargs["config"]), "--dry-run"]) == 0
    assert "TimeoutStopSec" not in capsys.readouterr().err


def test_controller_process_notifies_ready_watchdog_and_stopping(tmp_path):
    """The real controller process against a real notify socket, as systemd would run it (Type=notify)."""
    import signal as _signal
    import subprocess as _subprocess
    import sys as _sys
    import time as _time

    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(20)
    env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC="200000")
    sets = [f"transport.chunks=ipc://{tmp_path}/c", f"transport.state=ipc://{tmp_path}/s",
            f"transport.control=ipc://{tmp_path}/k", f"controller.latch_file={tmp_path}/latch",
            f"controller.command_record={tmp_path}/record"]
    cmd = [_sys.executable, "-m", "runtime.cli", "controller"] + [a for s in sets for a in ("--set", s)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = _subprocess.Popen(cmd, cwd=root, env=env)
    got = []
    try:
        deadline = _time.monotonic() + 20
        while _time.monotonic() < deadline and got.count(b"WATCHDOG=1") < 3:
            got.append(sock.recv(4096).split(b"\n")[0])
        proc.send_signal(_signal.SIGTERM)
        assert proc.wait(20) == 0
        while b"STOPPING=1" not in got:
            got.append(sock.recv(4096).split(b"\n")[0])
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
    assert got[0] == b"READY=1"
    assert got.count(b"WATCHDOG=1") >= 3 and got[-1] == b"STOPPING=1"
