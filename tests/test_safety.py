"""The safety state machine, transition by transition, and the remote's field controls."""

import pytest

from runtime.config import BUTTONS, load_config
from runtime.controller.remote import RemoteControls, button_mask, decode_buttons, pressed
from runtime.controller.safety import (
    APPROACHING,
    ARMING,
    ESTOP,
    HOLDING,
    IDLE,
    RUNNING,
    STATES,
    STOPPED,
    STOPPING,
    SafetyStateMachine,
)


def sm(**kw):
    args = dict(arm_s=1.0, hold_s=0.5, stop_s=2.0, immediate_stop_s=0.3)
    args.update(kw)
    return SafetyStateMachine(**args)


def run_to_running(m, t=0.0):
    assert m.arm(t, "test") is None
    m.update(t + 1.0)
    assert m.state == RUNNING
    return t + 1.0


def test_idle_arming_running_by_time():
    m = sm()
    assert m.state == IDLE and m.safe
    assert m.arm(0.0, "alice") is None
    assert m.state == ARMING and not m.safe
    assert m.update(0.99) == ARMING and m.progress(0.5, 1.0) == 0.5
    assert m.update(1.0) == RUNNING
    assert [t["to"] for t in m.transitions()] == [ARMING, RUNNING]
    assert m.transitions()[0]["reason"] == "armed by alice"


def test_hold_resume_and_hold_timeout_to_stopping_to_stopped():
    m = sm()
    t = run_to_running(m)
    m.hold(t + 0.1, "no chunk")
    assert m.state == HOLDING
    m.chunk_arrived(t + 0.2)
    assert m.state == RUNNING
    m.hold(t + 0.3, "no chunk")
    assert m.update(t + 0.79) == HOLDING
    assert m.update(t + 0.8) == STOPPING and not m.immediate
    assert m.update(t + 2.79) == STOPPING
    assert m.update(t + 2.81) == STOPPED and m.safe


def test_immediate_stop_is_short_and_escalates_a_gentle_one():
    m = sm()
    t = run_to_running(m)
    m.stop(t, "operator")
    assert m.state == STOPPING and not m.immediate
    m.stop(t + 0.1, "robot state stale", immediate=True)
    assert m.immediate and m.reason == "robot state stale"
    assert m.update(t + 0.29) == STOPPING  # the stop's clock still runs from when it began
    assert m.update(t + 0.3) == STOPPED


@pytest.mark.parametrize("state_after", [IDLE, ARMING, APPROACHING, RUNNING, HOLDING, STOPPING, STOPPED])
def test_estop_from_anywhere_is_latched_until_a_person_clears_it(state_after):
    m = sm()
    path = {IDLE: [], ARMING: ["arm"], APPROACHING: ["arm", "run", "approach"], RUNNING: ["arm", "run"],
            HOLDING: ["arm", "run", "hold"], STOPPING: ["arm", "run", "stop"],
            STOPPED: ["arm", "run", "stop", "done"]}[state_after]
    t = 0.0
    for step in path:
        if step == "approach":
            assert m.approach(t, "far")
        elif step == "arm":
            m.arm(t, "x")
        elif step == "run":
            t += 1.0
            m.update(t)
        elif step == "hold":
            m.hold(t, "h")
        elif step == "stop":
            m.stop(t, "s")
        elif step == "done":
            t += 2.0
            m.update(t)
    assert m.state == state_after
    m.estop(t, "remote")
    assert m.state == ESTOP and m.safe
    for later in (t + 1, t + 100):
        assert m.update(later) == ESTOP
    assert m.arm(t + 1, "x") == "e-stop is latched: clear it first"
    m.chunk_arrived(t + 1)
    m.stop(t + 1, "again")
    assert m.state == ESTOP
    assert m.clear_estop(t + 2, "bob") is None
    assert m.state == STOPPED  # cleared to stopped, never to running
    assert m.clear_estop(t + 2, "bob") == "no e-stop to clear"
    assert m.arm(t + 3, "bob") is None


def test_latched_at_start():
    m = sm(estop_latched=True)
    assert m.state == ESTOP and "latched" in m.reason


def test_arming_is_refused_while_driving_and_stop_does_nothing_when_safe():
    m = sm()
    t = run_to_running(m)
    assert m.arm(t, "x") == "cannot arm while running"
    m2 = sm()
    m2.stop(0.0, "x")
    m2.hold(0.0, "x")
    m2.chunk_arrived(0.0)
    assert m2.state == IDLE and m2.transitions() == []


def test_chunks_never_start_motion_outside_running():
    m = sm()
    m.chunk_arrived(0.0)
    assert m.state == IDLE
    m.arm(0.0, "x")
    m.chunk_arrived(0.5)
    assert m.state == ARMING
    m.update(1.0)
    m.stop(1.0, "x")
    m.update(3.1)
    assert m.state == STOPPED
    m.chunk_arrived(3.2)
    assert m.state == STOPPED


# -- remote ---------------------------------------------------------------------------------------------------------

def _raw(*names):
    bits = button_mask(list(names))
    raw = bytearray(40)
    raw[2], raw[3] = bits & 0xFF, bits >> 8
    return bytes(raw)


@pytest.mark.parametrize("name", BUTTONS)
def test_each_button_decodes_from_raw_bytes(name):
    assert pressed(decode_buttons(_raw(name))) == [name]


def test_button_bit_positions_match_the_wire_notes():
    # bytes 2-3 little-endian: bit 0 R1 ... bit 8 A, bit 15 left
    assert decode_buttons(bytes([0, 0, 0x01, 0x00] + [0] * 36)) == button_mask(["R1"])
    assert decode_buttons(bytes([0, 0, 0x00, 0x01] + [0] * 36)) == button_mask(["A"])
    assert decode_buttons(bytes([0, 0, 0x00, 0x80] + [0] * 36)) == button_mask(["left"])
    with pytest.raises(ValueError):
        decode_buttons(b"\0\0")


def test_remote_combos_fire_once_on_press_and_held_ones_need_holding():
    r = RemoteControls(load_config(None)["remote"])
    arm = decode_buttons(_raw("L1", "A"))
    assert r.poll(arm, 0.0) is None
    assert r.poll(arm, 0.49) is None
    assert r.poll(arm, 0.5) == "arm"
    assert r.poll(arm, 0.6) is None  # not again while held
    assert r.poll(0, 0.7) is None
    assert r.poll(decode_buttons(_raw("select")), 0.8) == "estop"  # at once
    assert r.poll(decode_buttons(_raw("select")), 0.9) is None
    both = decode_buttons(_raw("B", "select"))
    assert r.poll(0, 1.0) is None
    assert r.poll(both, 1.1) == "estop"  # e-stop wins the tick
    assert r.poll(both, 1.2) == "stop"  # and stop fires the next one, once
    assert r.poll(decode_buttons(_raw("right")), 2.0) == "next_task"


# -- taking over from a controller that died driving the robot --------------------------------------------------------

def test_resume_stop_at_start_stops_and_needs_a_person():
    m = sm()
    assert m.resume_stop(5.0, "controller restarted while driving the robot (previous pid 7, state running)")
    assert m.state == STOPPING and not m.immediate and not m.safe
    assert m.transitions() == [{"t": 5.0, "from": IDLE, "to": STOPPING,
                                "reason": "controller restarted while driving the robot (previous pid 7, state "
                                          "running)"}]
    m.chunk_arrived(5.1)
    assert m.arm(5.1, "x") == "cannot arm while stopping"
    assert m.update(6.99) == STOPPING and m.update(7.0) == STOPPED
    assert m.update(100.0) == STOPPED  # nothing moves again on its own
    assert m.arm(100.0, "x") is None


def test_resume_stop_immediate_uses_the_short_stop():
    m = sm()
    assert m.resume_stop(0.0, "restarted", immediate=True)
    assert m.immediate and m.update(0.29) == STOPPING and m.update(0.3) == STOPPED


def test_a_latched_estop_wins_over_resume_stop():
    m = sm(estop_latched=True)
    assert not m.resume_stop(0.0, "restarted")
    assert m.state == ESTOP and m.transitions() == []


def test_resume_stop_only_at_start():
    m = sm()
    t = run_to_running(m)
    assert not m.resume_stop(t, "restarted") and m.state == RUNNING


# -- a stop is complete only once the command written let go (issue 10, item 11) ------------------------------------

def test_stopping_lasts_until_the_command_written_let_go_as_well_as_its_time():
    m = sm()
    t = run_to_running(m)
    m.stop(t, "operator")
    assert m.update(t + 2.0, released=False) == STOPPING  # time is up, the weight on the wire is not 0 yet
    assert m.update(t + 2.5, released=False) == STOPPING and not m.safe
    assert m.update(t + 2.502, released=True) == STOPPED
    assert m.transitions()[-1] == {"t": t + 2.502, "from": STOPPING, "to": STOPPED, "reason": "stop complete"}
    m2 = sm()
    t = run_to_running(m2)
    m2.stop(t, "operator")
    assert m2.update(t + 1.0, released=True) == STOPPING  # let go early: the stop's time still counts


def test_an_estop_cleared_before_it_let_go_goes_through_stopping():
    m = sm()
    t = run_to_running(m)
    m.estop(t, "remote")
    m.update(t + 0.1, released=False)
    assert m.clear_estop(t + 0.1, "bob") is None
    assert m.state == STOPPING and m.immediate and m.describe() == "e-stop cleared by bob (cause: remote)"
    assert m.arm(t + 0.2, "bob") == "cannot arm while stopping"
    assert m.update(t + 0.4, released=False) == STOPPING
    assert m.update(t + 0.41, released=True) == STOPPED and m.describe() == "stop complete (cause: remote)"
    m2 = sm(estop_latched=True)
    m2.resume_stop(0.0, "restarted")  # the robot is on the predecessor's command: not let go before an update
    assert not m2.released and m2.clear_estop(0.0, "bob") is None and m2.state == STOPPING


# -- approaching the start pose (issue 11, defect 3) ----------------------------------------------------------------

def test_a_known_start_pose_makes_arming_end_in_approaching_and_reaching_it_runs():
    m = sm(approach_after_arming=True, approach_s=5.0)
    assert m.arm(0.0, "alice") is None
    assert m.update(0.99) == ARMING
    assert m.update(1.0) == APPROACHING and not m.safe and m.approach_since == 1.0
    m.chunk_arrived(1.1)  # chunks do not end an approach: reaching the pose does
    assert m.update(5.99) == APPROACHING
    m.approached(6.0, "start pose reached")
    assert m.state == RUNNING
    assert [t["to"] for t in m.transitions()] == [ARMING, APPROACHING, RUNNING]
    assert m.transitions()[-1]["reason"] == "start pose reached"
    assert m.update(100.0) == RUNNING  # the approach's timeout is over with it


def test_an_approach_begins_only_from_running_or_holding():
    m = sm()
    assert not m.approach(0.0, "far") and m.state == IDLE
    m.arm(0.0, "x")
    assert not m.approach(0.5, "far") and m.state == ARMING  # arming first ramps the authority in
    m.update(1.0)
    assert m.approach(1.0, "far") and m.state == APPROACHING and m.describe() == "far"
    assert not m.approach(1.1, "again") and m.approach_since == 1.0
    m.stop(1.2, "operator")
    assert not m.approach(1.3, "far") and m.state == STOPPING
    m2 = sm()
    t = run_to_running(m2)
    m2.hold(t, "no chunk yet")
    assert m2.approach(t + 0.1, "far") and m2.state == APPROACHING


def test_an_approach_holds_like_running_resumes_to_approaching_and_times_out_holds_included():
    m = sm(approach_s=2.0)
    t = run_to_running(m)
    assert m.approach(t, "far")
    m.hold(t + 0.5, "no chunk for 0.5 s")
    assert m.state == HOLDING and m.describe() == "no chunk for 0.5 s"
    m.chunk_arrived(t + 0.6)
    assert m.state == APPROACHING and m.approach_since == t  # the approach's clock runs on
    m.hold(t + 1.0, "policy heartbeat says fault")
    assert m.update(t + 1.49) == HOLDING
    assert m.update(t + 1.5) == STOPPING and "did not resume" in m.reason  # hold_s, as in running
    m2 = sm(approach_s=2.0)
    t = run_to_running(m2)
    m2.approach(t, "far")
    m2.hold(t + 0.5, "h")
    m2.chunk_arrived(t + 0.9)
    assert m2.update(t + 1.99) == APPROACHING
    assert m2.update(t + 2.0) == STOPPING and not m2.immediate  # a gentle stop: the robot is not falling
    assert m2.reason == "the start pose was not reached within 2.0 s" and m2.cause == m2.reason
    assert m2.update(t + 4.0) == STOPPED
    m2.chunk_arrived(t + 4.1)
    assert m2.state == STOPPED and m2.arm(t + 4.2, "x") is None  # a person arms again


def test_stale_state_and_stop_during_an_approach_stop_as_in_running():
    m = sm()
    t = run_to_running(m)
    m.approach(t, "far")
    m.stop(t + 0.1, "robot state is 120 ms old", immediate=True)
    assert m.state == STOPPING and m.immediate
    assert m.update(t + 0.41) == STOPPED
    assert m.arm(t + 0.5, "x") is None and m.update(t + 1.5) == RUNNING  # re-armed: no approach is left over


def test_record_codes_of_the_states_before_approaching_keep_their_meaning():
    """The command record stores a state's index in STATES: approaching is appended, so a record written by an
    earlier controller (an e-stop at 6) still reads the same."""
    assert STATES[:7] == (IDLE, ARMING, RUNNING, HOLDING, STOPPING, STOPPED, ESTOP)
    assert STATES[7] == APPROACHING
