"""ChunkSchedule: alignment on the controller clock and the three seams, against straightforward references."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from runtime.controller.schedule import (
    ALIGN_EPS,
    CROSSFADE_CHAIN,
    ChunkSchedule,
    chunk_position,
    smoothstep,
    start_index,
)
from runtime.protocol import ActionChunk
from runtime.protocol.codec import MAX_HORIZON
from runtime.robot import g1

JOINTS = ("left_shoulder_pitch", "left_elbow", "right_wrist_roll")
IDX = g1.indices(JOINTS)
D = len(JOINTS)


def _chunk(actions, obs_stamp, step_s, joints=JOINTS):
    return ActionChunk("t", 0, 1, obs_stamp, obs_stamp, step_s, tuple(joints), np.asarray(actions, np.float32))


# -- references (float64, written the obvious way) -------------------------------------------------------------------

def ref_action(actions, obs, step, now):
    a = np.asarray(actions, np.float64)
    f = (now - obs) / step
    x = np.arange(a.shape[0], dtype=np.float64)
    return np.array([np.interp(f, x, a[:, j]) for j in range(a.shape[1])])


def covers(chunk, now):
    actions, obs, step, _ = chunk
    return (now - obs) / step + ALIGN_EPS < len(actions) - 1


def ref_target(seam, chunks, now, crossfade_s=0.1, m=0.01):
    """chunks: (actions, obs_stamp, step_s, loaded_at), oldest first; all loaded at or before now."""
    newest = chunks[-1]
    if seam == "replace" or not covers(newest, now):
        return ref_action(*newest[:3], now)
    if seam == "crossfade":
        t = ref_action(*chunks[0][:3], now)
        for actions, obs, step, loaded in chunks[1:]:
            x = 1.0 if crossfade_s <= 0 else min(max((now - loaded) / crossfade_s, 0.0), 1.0)
            w = x * x * (3 - 2 * x)
            t = (1 - w) * t + w * ref_action(actions, obs, step, now)
        return t
    live = [c for c in chunks if covers(c, now)]
    ws = np.exp(-m * np.arange(len(live)))
    return sum(w * ref_action(*c[:3], now) for w, c in zip(ws, live)) / ws.sum()


# -- alignment ------------------------------------------------------------------------------------------------------

@given(st.integers(50, 1000), st.integers(1, 50), st.integers(0, 3000), st.integers(1, MAX_HORIZON),
       st.floats(0.0, 1e5), st.integers(0, 10 ** 6))
def test_start_index_is_the_number_of_action_steps_executed_since_the_observed_state(rate, m, n, h, t0, j0):
    """The controller ticks at ``rate`` (its clock: t0 + j / rate), publishes its state at tick j0 and loads the
    chunk answering it n ticks later; an action step lasts m ticks. It executed n // m whole action steps meanwhile:
    the new chunk starts there."""
    tick = 1.0 / rate
    step_s = m * tick
    obs, now = t0 + j0 * tick, t0 + (j0 + n) * tick
    assert start_index(obs, step_s, now, h) == min(n // m, h - 1)
    assert chunk_position(obs, step_s, now) == pytest.approx(n / m, abs=1e-6)
    # and the schedule's target is exactly that position in the chunk (actions numbered by their index)
    s = ChunkSchedule()
    s.load(_chunk(np.arange(h)[:, None] * np.ones((1, D)), obs, step_s), IDX, now)
    out = np.zeros(g1.NUM_JOINTS)
    assert s.target_at(now, out) == (n // m < h - 1)
    assert out[IDX] == pytest.approx(np.full(D, min(n / m, h - 1)), abs=1e-6 * max(1, h))


def test_a_chunk_stamped_just_ahead_starts_at_its_first_action():
    assert start_index(10.0, 0.02, 9.999, 8) == 0
    assert start_index(10.0, 0.02, 10.0 + 0.02 * 3 - 1e-12, 8) == 3  # floating-point stamps: the whole step
    assert start_index(10.0, 0.02, 11.0, 8) == 7


# -- seams against the references -----------------------------------------------------------------------------------

actions_st = st.integers(2, 40).flatmap(
    lambda h: hnp.arrays(np.float32, (h, D), elements=st.floats(-2.0, 2.0, width=32)))


@st.composite
def scenarios(draw, max_chunks):
    step_s = draw(st.floats(0.005, 0.1))
    n = draw(st.integers(1, max_chunks))
    t = draw(st.floats(0.0, 1000.0))
    chunks = []
    for _ in range(n):
        t += draw(st.floats(0.0, 0.2))  # the load time
        latency = draw(st.floats(0.0, 0.3))
        chunks.append((draw(actions_st), t - latency, step_s, t))
    now = t + draw(st.floats(0.0, 0.5))
    return chunks, now


@pytest.mark.parametrize("seam", ["replace", "crossfade", "ensemble"])
@settings(max_examples=300, deadline=None)
@given(scenario=scenarios(4), crossfade_s=st.floats(0.0, 0.3), m=st.floats(0.0, 2.0), ticks=st.integers(0, 5))
def test_targets_equal_the_reference(seam, scenario, crossfade_s, m, ticks):
    chunks, now = scenario
    s = ChunkSchedule(seam, crossfade_s, m, 4)
    out = np.zeros(g1.NUM_JOINTS)
    kept = []  # what the reference keeps: every chunk, less the ones the rules drop at an evaluation

    def check(t):
        nonlocal kept
        if seam == "replace" or not covers(kept[-1], t):
            kept = kept[-1:]  # the newest ran out: held at its last action, the older ones are gone
        elif seam == "ensemble":
            kept = [c for c in kept if c is kept[-1] or covers(c, t)]
        more = s.target_at(t, out)
        assert np.allclose(out[IDX], ref_target(seam, kept, t, crossfade_s, m), rtol=0, atol=1e-9)
        assert more == covers(kept[-1], t)
        assert (out[:12] == 0).all()  # joints no chunk drives are untouched

    for c in chunks:  # the controller evaluates the target at every tick, so at every load too
        s.load(_chunk(c[0], c[1], c[2]), IDX, c[3])
        kept.append(c)
        check(c[3])
    for k in range(ticks + 1):
        check(now + k * 0.013)


def test_ensemble_drops_chunks_that_no_longer_cover_now_even_between_loads():
    s = ChunkSchedule("ensemble", ensemble_m=0.5, ensemble_chunks=4)
    short = np.zeros((3, D))
    long_ = np.ones((20, D))
    s.load(_chunk(short, 0.0, 0.01), IDX, 0.0)
    s.load(_chunk(long_, 0.005, 0.01), IDX, 0.005)
    out = np.zeros(g1.NUM_JOINTS)
    assert s.target_at(0.01, out) and 0.0 < out[IDX[0]] < 1.0  # both live
    assert s.target_at(0.05, out) and out[IDX[0]] == 1.0  # the short one ran out: only the long one
    assert s.count == 1


def test_crossfade_endpoints_and_smoothness():
    old = np.zeros((50, D))
    new = np.ones((50, D))
    s = ChunkSchedule("crossfade", crossfade_s=0.1)
    s.load(_chunk(old, 0.0, 0.02), IDX, 0.0)
    s.load(_chunk(new, 0.05, 0.02), IDX, 0.1)
    out = np.zeros(g1.NUM_JOINTS)
    s.target_at(0.1, out)
    assert (out[IDX] == 0.0).all() and s.weights(0.1) == (1.0, 0.0)  # w = 0 at the load
    s.target_at(0.15, out)
    assert out[IDX] == pytest.approx(0.5)
    assert s.weights(0.2) == (0.0, 1.0)  # w = 1 after crossfade_s
    s.target_at(0.2, out)
    assert (out[IDX] == 1.0).all()
    assert s.count == 1  # the old chunk is dropped once faded out
    xs = np.linspace(0, 1, 1001)
    w = np.array([smoothstep(x) for x in xs])
    assert np.all(np.diff(w) >= 0) and np.abs(np.diff(w)).max() <= 1.5 / 1000 + 1e-12  # max slope 1.5


def test_crossfade_from_a_chunk_that_ran_out_uses_its_last_action():
    s = ChunkSchedule("crossfade", crossfade_s=0.1)
    s.load(_chunk(np.full((4, D), 0.3), 0.0, 0.01), IDX, 0.0)
    s.load(_chunk(np.full((20, D), 0.5), 0.1, 0.01), IDX, 0.1)
    out = np.zeros(g1.NUM_JOINTS)
    s.target_at(0.1, out)
    assert out[IDX] == pytest.approx(0.3)


def test_crossfade_chain_is_bounded():
    s = ChunkSchedule("crossfade", crossfade_s=1.0)
    out = np.zeros(g1.NUM_JOINTS)
    for k in range(CROSSFADE_CHAIN + 3):
        s.load(_chunk(np.full((50, D), 0.1 * k), 0.01 * k, 0.02), IDX, 0.01 * k)
        assert s.count <= CROSSFADE_CHAIN
        s.target_at(0.01 * k, out)
    assert s.evicted == 3


@given(st.integers(1, 16), st.floats(0.0, 3.0), st.integers(1, 16))
def test_ensemble_weights_normalise_and_decay_from_the_oldest(cap, m, n):
    s = ChunkSchedule("ensemble", ensemble_m=m, ensemble_chunks=cap)
    for k in range(n):
        s.load(_chunk(np.zeros((30, D)), 0.001 * k, 0.02), IDX, 0.001 * k)
    assert s.count == min(n, cap)
    w = s.weights(0.02)
    assert sum(w) == pytest.approx(1.0)
    expect = np.exp(-m * np.arange(len(w)))
    assert np.allclose(w, expect / expect.sum())


@pytest.mark.parametrize("seam", ["replace", "crossfade", "ensemble"])
def test_the_newest_chunk_running_out_returns_false_and_holds_its_last_action(seam):
    s = ChunkSchedule(seam, crossfade_s=0.05)
    s.load(_chunk(np.zeros((40, D)), 0.0, 0.01), IDX, 0.0)
    s.load(_chunk(np.linspace(0.1, 0.4, 4)[:, None] * np.ones((1, D)), 0.01, 0.01), IDX, 0.01)
    out = np.zeros(g1.NUM_JOINTS)
    assert s.target_at(0.02, out)
    assert not s.target_at(0.05, out)  # position 4 >= last index 3
    assert out[IDX] == pytest.approx(0.4)
    assert not s.target_at(1.0, out) and out[IDX] == pytest.approx(0.4)
    assert s.count == 1


def test_another_joint_list_replaces_at_once():
    s = ChunkSchedule("crossfade", crossfade_s=0.5)
    s.load(_chunk(np.zeros((40, D)), 0.0, 0.01), IDX, 0.0)
    other = ("left_shoulder_pitch", "left_elbow")
    s.load(_chunk(np.ones((40, 2)), 0.01, 0.01, other), g1.indices(other), 0.01)
    out = np.zeros(g1.NUM_JOINTS)
    s.target_at(0.01, out)
    assert s.count == 1 and (out[g1.indices(other)] == 1.0).all() and out[IDX[2]] == 0.0


def test_unknown_seam_is_refused():
    with pytest.raises(ValueError):
        ChunkSchedule("average")


def test_no_allocation_growth_per_tick():
    s = ChunkSchedule("ensemble", ensemble_chunks=4)
    buffers = s._actions
    for k in range(4):
        s.load(_chunk(np.zeros((50, D)), 0.01 * k, 0.02), IDX, 0.01 * k)
    out = np.zeros(g1.NUM_JOINTS)
    for i in range(2000):
        s.target_at(0.04 + i * 0.002, out)
    assert s._actions is buffers and len(s._order) == 4 and math.isfinite(out.sum())
