"""Where state and sockets live, and that nobody else on the machine can touch them (issue 10, items 5-7):
runtime/service/paths.py, the controller's latch and command record, the ipc directories, against real processes."""

import os
import pwd
import signal
import stat
import subprocess
import sys
import tempfile
import time

import pytest
import zmq
from test_controller import Rig

from runtime.config import load_config
from runtime.controller import operator
from runtime.controller.controller import EXIT_REFUSED
from runtime.controller.record import CommandRecord
from runtime.controller.safety import ARMING, ESTOP, IDLE, STOPPED, STOPPING
from runtime.protocol import sockets
from runtime.service import paths
from runtime.service.paths import PathError, check_private_file, ensure_private_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


def _mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


def _nobody():
    return pwd.getpwnam("nobody").pw_uid


# -- where: the order of the directories --------------------------------------------------------------------------

def test_runtime_and_state_directories_in_their_documented_order(tmp_path, monkeypatch):
    uid = os.geteuid()
    monkeypatch.setattr(paths, "SYSTEM_RUNTIME_DIR", str(tmp_path / "run-wam-edge"))
    monkeypatch.setattr(paths, "SYSTEM_STATE_DIR", str(tmp_path / "lib-wam-edge"))
    (tmp_path / "xdg-run").mkdir(mode=0o700)
    (tmp_path / "home").mkdir()
    env = {"RUNTIME_DIRECTORY": "/run/a:/run/b", "STATE_DIRECTORY": "/var/lib/a", "XDG_RUNTIME_DIR":
           str(tmp_path / "xdg-run"), "XDG_STATE_HOME": str(tmp_path / "xdg-state"), "HOME": str(tmp_path / "home")}
    assert paths.runtime_dir(env)[0] == "/run/a"  # systemd's, the first listed
    assert paths.state_dir(env)[0] == "/var/lib/a"
    del env["RUNTIME_DIRECTORY"], env["STATE_DIRECTORY"]
    assert paths.runtime_dir(env)[0] == str(tmp_path / "xdg-run" / "wam-edge")
    assert paths.state_dir(env)[0] == str(tmp_path / "xdg-state" / "wam-edge")
    # the services' directories, when this user owns them: `sudo -u <service user> wam-edge arm` finds the sockets
    (tmp_path / "run-wam-edge").mkdir(mode=0o700)
    (tmp_path / "lib-wam-edge").mkdir(mode=0o700)
    assert paths.runtime_dir(env) == (str(tmp_path / "run-wam-edge"), "the services' runtime directory, owned by "
                                                                      "this user")
    assert paths.state_dir(env)[0] == str(tmp_path / "lib-wam-edge")
    if os.geteuid() == 0:  # someone else's are not ours
        os.chown(tmp_path / "run-wam-edge", _nobody(), -1)
        assert paths.runtime_dir(env)[0] == str(tmp_path / "xdg-run" / "wam-edge")
    os.rmdir(tmp_path / "run-wam-edge")
    os.rmdir(tmp_path / "lib-wam-edge")
    del env["XDG_RUNTIME_DIR"], env["XDG_STATE_HOME"]
    assert paths.runtime_dir(env)[0] == f"/tmp/wam-edge-{uid}"
    assert paths.state_dir(env)[0] == str(tmp_path / "home" / ".local" / "state" / "wam-edge")
    env["HOME"] = "/nonexistent"
    monkeypatch.setattr(pwd, "getpwuid", lambda _uid: pwd.struct_passwd(("x", "x", uid, 0, "", "/nonexistent", "")))
    where, why = paths.state_dir(env)
    assert where == f"/tmp/wam-edge-{uid}" and "NOT kept across a reboot" in why


def test_systemd_directories_are_what_the_controller_process_uses(tmp_path):
    """As under systemd (RuntimeDirectory=, StateDirectory=): the default config puts the sockets and the state there,
    each directory private."""
    run, lib = tmp_path / "run", tmp_path / "lib"
    env = dict(os.environ, RUNTIME_DIRECTORY=str(run), STATE_DIRECTORY=str(lib))
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "controller", "--ready-file", str(ready)], cwd=ROOT,
                            env=env)
    ctx = zmq.Context()
    try:
        _wait_for(ready, proc)
        assert operator.send(f"ipc://{run}/control", "status", "test", ctx=ctx).state == IDLE
        assert sorted(os.listdir(run)) == ["chunks", "control", "state"]
        assert sorted(os.listdir(lib)) == ["controller.record"]
        assert _mode(run) == 0o700 and _mode(lib) == 0o700 and _mode(lib / "controller.record") == 0o600
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        ctx.destroy(0)


# -- ensure_private_dir and check_private_file ------------------------------------------------------------------------

def test_a_new_directory_is_0700_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        d = ensure_private_dir(str(tmp_path / "a" / "b" / "run"))
    finally:
        os.umask(old)
    assert _mode(d) == 0o700 and _mode(tmp_path / "a") == 0o700 and _mode(tmp_path / "a" / "b") == 0o700
    assert ensure_private_dir(d) == d  # and the one there is accepted


@pytest.mark.parametrize("mode,strict,ok", [(0o700, True, True), (0o750, True, False), (0o777, True, False),
                                            (0o755, False, True), (0o775, False, False), (0o757, False, False)])
def test_an_existing_directory_must_have_no_group_or_other_access(tmp_path, mode, strict, ok):
    d = tmp_path / "d"
    d.mkdir()
    os.chmod(d, mode)
    if ok:
        ensure_private_dir(str(d), strict=strict)
        return
    with pytest.raises(PathError) as info:
        ensure_private_dir(str(d), "runtime directory", strict=strict)
    msg = str(info.value)
    assert f"runtime directory {d} has mode {mode:04o}" in msg and "expected 0700" in msg


@ROOT_ONLY
def test_a_directory_owned_by_someone_else_is_refused(tmp_path):
    d = tmp_path / "d"
    d.mkdir(mode=0o700)
    os.chown(d, _nobody(), -1)
    with pytest.raises(PathError, match=rf"state directory {d} is owned by nobody \(uid {_nobody()}\); expected "
                                        r"root \(uid 0\)"):
        ensure_private_dir(str(d), "state directory")


def test_a_symlinked_directory_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(PathError, match=f"{tmp_path}/link is a symbolic link"):
        ensure_private_dir(str(tmp_path / "link"))


def test_a_parent_others_can_write_is_refused_unless_sticky(tmp_path):
    pub = tmp_path / "pub"
    pub.mkdir()
    os.chmod(pub, 0o777)
    with pytest.raises(PathError, match=f"{pub} above it has mode 0777"):
        ensure_private_dir(str(pub / "wam"))
    os.chmod(pub, 0o1777)  # like /tmp: others cannot remove or rename what is ours
    assert _mode(ensure_private_dir(str(pub / "wam"))) == 0o700


@ROOT_ONLY
def test_a_parent_owned_by_someone_else_is_refused(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, _nobody(), -1)
    with pytest.raises(PathError, match=f"{theirs} above it is owned by nobody"):
        ensure_private_dir(str(theirs / "wam"))


def test_latch_and_record_files_must_be_ours_regular_and_not_writable_by_others(tmp_path):
    f = tmp_path / "latch"
    assert check_private_file(str(f), "latch") is False
    f.write_text("x")
    os.chmod(f, 0o644)
    assert check_private_file(str(f), "latch") is True
    os.chmod(f, 0o666)
    with pytest.raises(PathError, match="has mode 0666: writable by group or others"):
        check_private_file(str(f), "latch")
    os.chmod(f, 0o600)
    (tmp_path / "link").symlink_to(f)
    with pytest.raises(PathError, match="is a symbolic link"):
        check_private_file(str(tmp_path / "link"), "latch")
    with pytest.raises(PathError, match="is not a regular file"):
        check_private_file(str(tmp_path), "latch")
    if os.geteuid() == 0:
        os.chown(f, _nobody(), -1)
        with pytest.raises(PathError, match="is owned by nobody"):
            check_private_file(str(f), "latch")


# -- the sockets ------------------------------------------------------------------------------------------------------

def test_binding_refuses_an_abstract_socket_and_a_squatted_directory(tmp_path):
    ctx = zmq.Context()
    try:
        with pytest.raises(PathError, match="abstract socket"):
            sockets.rep_bound(ctx, "ipc://@wam-edge-test-control")
        squat = tmp_path / "squat"
        squat.mkdir()
        os.chmod(squat, 0o777)
        with pytest.raises(PathError, match=f"ipc socket directory {squat} has mode 0777"):
            sockets.rep_bound(ctx, f"ipc://{squat}/control")
        assert os.listdir(squat) == []  # nothing bound there
        sock = sockets.rep_bound(ctx, f"ipc://{tmp_path}/new/control")
        sock.close(0)
        assert _mode(tmp_path / "new") == 0o700
    finally:
        ctx.destroy(0)


def test_image_server_sim_makes_its_ipc_directory_private(tmp_path):
    from runtime.cameras.image_server_sim import _ensure_ipc_dir

    _ensure_ipc_dir(f"ipc://{tmp_path}/cam/frames")
    assert _mode(tmp_path / "cam") == 0o700
    os.chmod(tmp_path / "cam", 0o777)
    with pytest.raises(PathError, match="has mode 0777"):
        _ensure_ipc_dir(f"ipc://{tmp_path}/cam/frames")


# -- the controller refuses to start on state or sockets it cannot trust ------------------------------------------

def _controller(tmp, *sets, ready=None, **kw):
    base = [f"transport.chunks=ipc://{tmp}/run/c", f"transport.state=ipc://{tmp}/run/s",
            f"transport.control=ipc://{tmp}/run/k", f"controller.latch_file={tmp}/lib/latch",
            f"controller.command_record={tmp}/lib/record", "controller.arm_ramp_s=0.1",
            "controller.estop_ramp_s=0.05", "controller.chunk_timeout_s=10", "controller.heartbeat_timeout_s=10"]
    cmd = [sys.executable, "-m", "runtime.cli", "controller"] + (["--ready-file", str(ready)] if ready else [])
    cmd += [a for s in base + list(sets) for a in ("--set", s)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _wait_for(ready, proc, seconds=30):
    deadline = time.monotonic() + seconds
    while not os.path.exists(ready) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert os.path.exists(ready), "the controller process did not get ready"


def _refused(proc):
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_REFUSED, (proc.returncode, err)
    assert "controller refuses to start" in err
    return err


@pytest.mark.parametrize("what", ["state", "sockets"])
def test_controller_process_refuses_a_squatted_directory(tmp_path, what):
    """Another user made the directory first, mode 0777 (issue 10: the latch was deleted through it)."""
    squatted = tmp_path / ("lib" if what == "state" else "run")
    squatted.mkdir()
    os.chmod(squatted, 0o777)
    err = _refused(_controller(tmp_path))
    assert f"directory {squatted} has mode 0777" in err and "expected 0700" in err
    assert os.listdir(squatted) == []  # nothing created, bound or locked in it


@ROOT_ONLY
def test_controller_process_refuses_a_state_directory_owned_by_someone_else(tmp_path):
    (tmp_path / "lib").mkdir(mode=0o700)
    os.chown(tmp_path / "lib", _nobody(), -1)
    err = _refused(_controller(tmp_path))
    assert f"state directory {tmp_path}/lib is owned by nobody" in err


def test_controller_process_refuses_a_symlinked_runtime_directory(tmp_path):
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (tmp_path / "run").symlink_to(tmp_path / "elsewhere")
    err = _refused(_controller(tmp_path))
    assert f"ipc socket directory {tmp_path}/run is a symbolic link" in err


def test_controller_process_refuses_to_start_when_its_latch_cannot_be_written(tmp_path):
    (tmp_path / "lib").mkdir(mode=0o700)
    (tmp_path / "lib" / "latch").mkdir()  # where the latch file would go: it could never be written
    err = _refused(_controller(tmp_path))
    assert f"e-stop latch file {tmp_path}/lib/latch is not a regular file" in err
    (tmp_path / "afile").write_text("")
    err = _refused(_controller(tmp_path, f"controller.latch_file={tmp_path}/afile/latch"))
    assert f"state directory {tmp_path}/afile is not a directory" in err


def test_controller_refuses_to_start_when_its_state_directory_is_read_only(tmp_path):
    """The directory is ours and private but cannot be written: refused, where it used to come up and lose the next
    e-stop. Permission bits do not bind root, so the controller is built in a forked process that runs as nobody
    when the tests run as root (the venv's interpreter may be out of nobody's reach: no exec)."""
    from runtime.controller.controller import Controller
    from runtime.robot.sim_g1 import SimulatedG1

    work = tempfile.mkdtemp(prefix="wam-ro-")  # nobody must be able to reach it (pytest's tmp_path is root's 0700)
    lib = os.path.join(work, "lib")
    os.mkdir(lib, 0o500)
    cfg = load_config(None, [f"transport.chunks=ipc://{work}/run/c", f"transport.state=ipc://{work}/run/s",
                             f"transport.control=ipc://{work}/run/k", f"controller.latch_file={lib}/latch",
                             f"controller.command_record={lib}/record"])
    if os.geteuid() == 0:
        for d in (work, lib):
            os.chown(d, _nobody(), _nobody())
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(rfd)
            if os.geteuid() == 0:
                os.setgid(_nobody())
                os.setuid(_nobody())
            try:
                Controller(cfg, SimulatedG1(mode="arm_sdk"), zmq.Context()).close()
                code = 0
            except PathError as exc:
                os.write(wfd, str(exc).encode())
                code = EXIT_REFUSED
        finally:
            os._exit(code)
    os.close(wfd)
    try:
        with os.fdopen(rfd, "rb") as f:
            message = f.read().decode()
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_REFUSED, message
        assert message == f"e-stop latch file {lib}/latch: cannot write in {lib}: Permission denied"
        assert os.listdir(work) == ["lib"]  # refused before any socket was bound
    finally:
        os.chmod(lib, 0o700)
        subprocess.run(["rm", "-rf", work], check=False)


def test_controller_process_under_a_notify_socket_says_why_it_refused(tmp_path):
    """systemd shows the reason (STATUS=), never READY; its unit does not restart it (RestartPreventExitStatus)."""
    import socket

    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(20)
    (tmp_path / "lib").mkdir()
    os.chmod(tmp_path / "lib", 0o777)
    try:
        _refused(_controller(tmp_path, env=dict(os.environ, NOTIFY_SOCKET=path)))
        got = sock.recv(4096).decode()
    finally:
        sock.close()
    assert got.startswith("STATUS=refused to start: state directory") and "0777" in got


# -- e-stops that cannot be saved, and e-stops that must not be lost ------------------------------------------------

def test_an_estop_that_cannot_be_saved_says_so_and_stays_latched(tmp_path):
    r = Rig(tmp_path)
    try:
        c = r.controller
        latch = tmp_path / "estop.latched"
        r.arm()
        os.mkdir(latch)  # the latch file cannot be written any more (a directory in its place; root ignores modes)
        reply = c._operator("estop", time.monotonic(), "test")
        assert reply.ok is False and reply.state == ESTOP
        assert "e-stop active, but NOT saved" in reply.detail and str(latch) in reply.detail
        assert c.sm.state == ESTOP
        assert not c._operator("arm", time.monotonic(), "test").ok
        # and clearing it must not clear memory while the file cannot be removed
        reply = c._operator("clear_estop", time.monotonic(), "test")
        assert reply.ok is False and reply.state == ESTOP and "e-stop kept" in reply.detail
        assert c.sm.state == ESTOP
        os.rmdir(latch)
        assert c._operator("estop", time.monotonic(), "test").ok  # saved now
        assert latch.is_file() and "e-stop by test" in latch.read_text()
        # cleared during its weight ramp: stopping until the weight written is 0, then stopped
        assert c._operator("clear_estop", time.monotonic(), "test").ok and c.sm.state in (STOPPING, STOPPED)
        assert not latch.exists()
    finally:
        r.close()


def test_an_estop_over_the_control_socket_that_cannot_be_saved_replies_not_ok(tmp_path):
    work = tmp_path
    ready = work / "ready"
    proc = _controller(work, ready=ready)
    ctx = zmq.Context()
    try:
        _wait_for(ready, proc)
        os.mkdir(work / "lib" / "latch")
        reply = operator.send(f"ipc://{work}/run/k", "estop", "test", ctx=ctx)
        assert reply.ok is False and reply.state == ESTOP and "NOT saved" in reply.detail
        assert operator.send(f"ipc://{work}/run/k", "status", "test", ctx=ctx).state == ESTOP
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
        ctx.destroy(0)


def test_a_record_whose_last_state_is_estop_latches_again_after_kill_9(tmp_path):
    """The e-stop had finished (arm_sdk weight 0) and its latch file was lost (it could not be written, or someone
    removed it): kill -9, restart. It used to come up idle and accept `arm`; the record says estop: e-stop again."""
    control = f"ipc://{tmp_path}/run/k"
    latch = tmp_path / "lib" / "latch"
    ctx = zmq.Context()
    procs = []
    try:
        procs.append(_controller(tmp_path, ready=tmp_path / "first.ready"))
        _wait_for(tmp_path / "first.ready", procs[0])
        assert operator.send(control, "arm", "test", ctx=ctx).state == ARMING
        assert operator.send(control, "estop", "test", ctx=ctx).ok
        time.sleep(0.5)  # the e-stop ramp (0.05 s) is over: weight 0
        os.remove(latch)
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(10)
        snap = _last_in_record(tmp_path / "lib" / "record")
        assert snap.state == ESTOP and snap.weight == 0.0
        procs.append(_controller(tmp_path, ready=tmp_path / "second.ready"))
        _wait_for(tmp_path / "second.ready", procs[1])
        status = operator.send(control, "status", "test", ctx=ctx)
        assert status.state == ESTOP and "command record" in status.detail
        assert latch.is_file()  # written again
        reply = operator.send(control, "arm", "test", ctx=ctx)
        assert reply.ok is False and "e-stop is latched" in reply.detail
        procs[1].send_signal(signal.SIGTERM)
        assert procs[1].wait(20) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        ctx.destroy(0)
    # a third start: still e-stopped (latch file and record agree) until a person clears it
    r = Rig(tmp_path, f"transport.chunks=ipc://{tmp_path}/run/c", f"transport.state=ipc://{tmp_path}/run/s",
            f"transport.control=ipc://{tmp_path}/run/k", f"controller.latch_file={latch}",
            f"controller.command_record={tmp_path}/lib/record")
    try:
        assert r.controller.sm.state == ESTOP
    finally:
        r.close()


def _last_in_record(path):
    """The record's newest update, read from the file as a new controller would (after its writer died)."""
    rec = CommandRecord(str(path), "arm_sdk")
    try:
        return rec.last()
    finally:
        rec.close()


def test_a_record_written_before_the_latch_existed_latches_on_start(tmp_path):
    """In process: the record alone (estop, weight 0) is enough; the reason says where the e-stop came from."""
    r = Rig(tmp_path)
    r.arm()
    r.controller._operator("estop", time.monotonic(), "test")
    r.run(0.3)
    assert r.controller.driver.command.weight == 0.0
    r.crash()
    os.remove(tmp_path / "estop.latched")
    r2 = Rig(tmp_path, sim=r.sim)
    try:
        c = r2.controller
        assert c.sm.state == ESTOP and "command record" in c.sm.reason
        assert (tmp_path / "estop.latched").is_file()
        assert not c._operator("arm", time.monotonic(), "test").ok
    finally:
        r2.close()


def test_the_default_demo_paths_still_work(tmp_path):
    """`wam-edge demo`, bench and hil put everything in a mkdtemp directory (0700): accepted as it is."""
    from runtime.demo import loop_overrides

    tmp = tempfile.mkdtemp(prefix="wam-edge-demo-")
    try:
        cfg = load_config(None, loop_overrides(tmp, False))
        ctx = zmq.Context()
        try:
            from runtime.controller.controller import Controller
            from runtime.robot.sim_g1 import SimulatedG1

            c = Controller(cfg, SimulatedG1(mode="arm_sdk"), ctx)
            c.close()
        finally:
            ctx.term()
        assert _mode(tmp) == 0o700 and sorted(os.listdir(tmp)) == ["chunks", "control", "controller.record", "state"]
    finally:
        subprocess.run(["rm", "-rf", tmp], check=False)


def test_latch_on_tmpfs_is_warned_about(tmp_path, caplog):
    if paths.on_tmpfs("/dev/shm") is None:
        pytest.skip("no tmpfs at /dev/shm here")
    shm = tempfile.mkdtemp(prefix="wam-edge-test-", dir="/dev/shm")
    try:
        r = Rig(tmp_path, f"controller.latch_file={shm}/latch")
        r.close()
        assert "is on tmpfs: a reboot would clear an e-stop" in caplog.text
    finally:
        subprocess.run(["rm", "-rf", shm], check=False)



# -- the connecting side: wam-edge arm, the runtime ------------------------------------------------------------------

def test_nothing_connects_to_a_socket_in_a_directory_others_control(tmp_path):
    """A squatter's socket could pose as the controller: an e-stop sent there would reach nobody."""
    squatted = tmp_path / "squatted"
    squatted.mkdir()
    os.chmod(str(squatted), 0o777)
    reply = operator.send(f"ipc://{squatted}/control", "estop", "test", timeout_s=0.2)
    assert not reply.ok and "mode 0777" in reply.detail and "not connecting" in reply.detail
    ctx = zmq.Context()
    try:
        with pytest.raises(paths.PathError, match="mode 0777"):
            sockets.push_connected(ctx, f"ipc://{squatted}/chunks", 2)
        link = tmp_path / "link"
        link.symlink_to(squatted)
        with pytest.raises(paths.PathError, match="symbolic link"):
            sockets.check_connect(f"ipc://{link}/state")
        private = tmp_path / "private"
        private.mkdir(mode=0o700)
        sockets.push_connected(ctx, f"ipc://{private}/chunks", 2).close(0)  # a private one is fine
        sockets.check_connect(f"ipc://{tmp_path}/missing/state")  # a missing one: the binder makes and checks it
    finally:
        ctx.term()


def test_the_runtime_refuses_a_state_socket_in_a_directory_others_control(tmp_path):
    squatted = tmp_path / "squatted"
    squatted.mkdir()
    os.chmod(str(squatted), 0o777)
    env = dict(os.environ)
    env.pop("WAM_EDGE_VERBOSE", None)
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "run", "--seconds", "1", "--set",
                        f"transport.state=ipc://{squatted}/state"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=env, check=False)
    said = [line for line in r.stderr.splitlines() if line.startswith("wam-edge run:")]
    assert r.returncode == 1 and len(said) == 1 and "mode 0777" in said[0], r.stderr
