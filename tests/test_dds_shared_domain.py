"""One DDS domain per process, shared: our link beside a domain unitree_sdk2py created first (its
ChannelFactoryInitialize creates ``Domain(id, config)`` and one participant; cyclonedds refuses a second Domain on
the same id). Each case runs in a process of its own, as the controller does: the domain lives as long as the
process. unitree_sdk2py is not on any registry: the SDK's side is either cyclonedds called as the SDK calls it, or
tests/standins/unitree_sdk2py_standin_no_robot.py (the same calls, plus a robot's motion_switcher service)."""

import json
import os
import random
import subprocess
import sys
import textwrap
import time

import pytest

pytest.importorskip("cyclonedds", reason="cyclonedds (tools/install_dds.sh) is needed for the DDS tests")

from runtime.controller import operator  # noqa: E402
from runtime.robot.dds import transport  # noqa: E402
from runtime.robot.dds.sim import SimulatedG1Dds  # noqa: E402
from runtime.robot.dds.unitree_hg import LowState_  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BASE = random.Random().randint(100, 200)  # DDS domain ids (< 233): one per test, random per run: no cross-talk
_next_domain = [_BASE]


def new_domain() -> int:
    _next_domain[0] += 1
    return _next_domain[0]


def run_python(code: str, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def last_json(out: str):
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def sim():
    made = []

    def make():
        domain = new_domain()
        made.append(SimulatedG1Dds(domain_id=domain, interface="lo").start())
        return domain, made[-1]

    yield make
    for s in made:
        s.close()


LINK_AFTER_THE_SDK = """
    import json, sys, time
    from cyclonedds.domain import Domain, DomainParticipant
    from tests.standins.unitree_sdk2py_standin_no_robot import config_xml

    domain_id = int(sys.argv[1])
    domain = Domain(domain_id, config_xml("lo"))  # what ChannelFactoryInitialize does: the domain, its config
    sdk_participant = DomainParticipant(domain_id)  # ... and one participant, kept for the life of the process

    from runtime.robot import g1
    from runtime.robot.dds.driver import DdsG1Driver

    drv = DdsG1Driver("lowcmd", domain_id, "lo")
    got_state = drv.link.wait_for_state(10.0)
    c = drv.command
    c.q[:] = g1.NOMINAL_POSE
    c.kp[:] = g1.DEFAULT_KP
    c.kd[:] = g1.DEFAULT_KD
    c.enable[:] = True
    for _ in range(150):
        drv.read(time.monotonic())
        drv.write()
        time.sleep(0.004)
    print(json.dumps({"got_state": got_state, "states": drv.reading.count, "published": drv.link.published,
                      "shares_the_sdk_participant": drv.link.participant is sdk_participant,
                      "participants": len(domain.get_participants())}))
"""


def test_a_link_shares_the_domain_and_participant_the_sdk_created_first(sim):
    domain, robot = sim()
    r = run_python(LINK_AFTER_THE_SDK, str(domain))
    assert r.returncode == 0, r.stderr[-3000:]
    out = last_json(r.stdout)
    assert out["got_state"] and out["states"] > 20 and out["published"] > 100
    assert out["shares_the_sdk_participant"] and out["participants"] == 1  # never a second participant
    s = robot.summary()
    assert s["lowcmd"] > 100 and s["bad_crc"] == 0 and s["wrong_mode_machine"] == 0 and s["debug_mode"]


def test_the_controller_releases_motion_control_through_the_sdk_and_drives_on_its_domain(sim, tmp_path):
    """`wam-edge controller` with controller.release_motion_control=true and unitree_sdk2py present: the SDK creates
    the domain, the controller's link shares it; the controller arms and its commands reach the robot."""
    domain, robot = sim()
    ready, report, control = tmp_path / "ready", tmp_path / "ctl.json", f"ipc://{tmp_path}/k"
    sets = [f"transport.chunks=ipc://{tmp_path}/c", f"transport.state=ipc://{tmp_path}/s",
            f"transport.control={control}", f"controller.latch_file={tmp_path}/latch",
            f"controller.command_record={tmp_path}/record", "controller.driver=dds", "controller.mode=lowcmd",
            "controller.release_motion_control=true", f"dds.domain_id={domain}", "dds.interface=lo",
            "controller.arm_ramp_s=0.1", "controller.hold_before_damp_s=0.1"]
    code = """
        import sys
        from tests.standins.unitree_sdk2py_standin_no_robot import Factory, MotionSwitcherClient, install
        install()
        from runtime.cli import main
        code = main(sys.argv[1:])
        print("released", MotionSwitcherClient.releases, "factory calls", Factory.calls)
        sys.exit(code)
    """
    args = ["controller", "--seconds", "6", "--report", str(report), "--ready-file", str(ready)]
    args += [a for s in sets for a in ("--set", s)]
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if not ready.exists():
            proc.kill()
            pytest.fail("the controller never got ready: " + proc.communicate(timeout=30)[1][-3000:])
        assert operator.send(control, "arm", "test").ok
        deadline = time.monotonic() + 10
        while robot.summary()["lowcmd"] < 100 and time.monotonic() < deadline:
            time.sleep(0.05)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    assert "released 1 factory calls 1" in out
    assert "Unitree's motion controller released (was 'ai')" in err
    ctl = json.loads(report.read_text())
    assert ctl["robot_link"]["states_taken"] > 100 and ctl["robot_link"]["commands_published"] > 100
    s = robot.summary()
    assert s["lowcmd"] > 100 and s["debug_mode"] and s["bad_crc"] == 0 and s["wrong_mode_machine"] == 0


CONFLICTS = """
    import json, sys
    from tests.standins.unitree_sdk2py_standin_no_robot import Factory, install
    install()
    from runtime.robot.dds import transport
    from runtime.robot.dds.driver import release_motion_control
    from runtime.robot.dds.link import G1Link

    first, second = int(sys.argv[1]), int(sys.argv[2])
    out = {}
    release_motion_control(first, "lo")  # the SDK creates the domain on lo
    try:
        G1Link(first, "eth7")
    except transport.DomainConflict as exc:
        out["conflict"] = str(exc)
    release_motion_control(first, "lo")  # again: the SDK's factory is initialised already; not a second domain
    out["factory_calls"] = Factory.calls
    link = G1Link(second, "lo")  # ours first: the SDK cannot create this domain any more
    try:
        release_motion_control(second, "lo")
    except RuntimeError as exc:
        out["too_late"] = str(exc)
    out["factory_calls_after"] = Factory.calls
    print(json.dumps(out))
"""


def test_a_link_on_another_interface_than_the_sdk_s_domain_is_a_clear_error():
    first, second = new_domain(), new_domain()
    r = run_python(CONFLICTS, str(first), str(second))
    assert r.returncode == 0, r.stderr[-3000:]
    out = last_json(r.stdout)
    assert out["conflict"] == (
        f"DDS domain {first} is already open in this process on interface 'lo' (created by unitree_sdk2py's "
        "ChannelFactoryInitialize), but wam-edge asks for interface 'eth7': a process has one domain per id, so "
        "both must name the same network interface (dds.interface)")
    assert out["factory_calls"] == 1
    assert f"DDS domain {second} is already open in this process (created by wam-edge)" in out["too_late"]
    assert "release the motion controller before opening the DDS link" in out["too_late"]
    assert out["factory_calls_after"] == 1  # refused before the SDK was asked: it would have failed


def test_one_participant_per_domain_in_a_process_and_it_outlives_its_users():
    domain = new_domain()
    p = transport.open_participant(domain, "lo")
    assert transport.open_participant(domain, "lo") is p and transport.domain_creator(domain) == transport.WAM_EDGE
    transport.delete(p)  # a user closing: the shared participant stays
    w = transport.writer(p, transport.LOWSTATE_TOPIC, LowState_)  # still usable
    transport.delete(w)
    assert transport.open_participant(domain, "lo") is p
    with pytest.raises(transport.DomainConflict, match="another config"):
        transport.open_participant(domain, "lo", loopback=False)
    with pytest.raises(transport.DomainConflict, match="interface 'eth7'"):
        transport.open_participant(domain, "eth7")
    assert transport.domain_creator(new_domain()) is None
