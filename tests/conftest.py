"""What several test files share: a real PolicyRuntime between a real PULL (chunks) and a real PUB (robot state);
the runtime's own heap growth over repeated calls."""

import os
import time
import tracemalloc

import numpy as np
import pytest
import zmq

from runtime.config import load_config
from runtime.protocol import RobotState, decode, encode_state
from runtime.robot import g1
from runtime.runner import PolicyRuntime

RUNTIME_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runtime")


def runtime_heap_growth(step, warmup=200, runs=50, windows=3):
    """Bytes still held after `runs` more calls of step(i) than before them, counting only allocations made with
    the runtime package on the stack, as the least over `windows` successive windows.

    The filter keeps out what another thread of the test process allocates meanwhile. The least of several windows
    keeps out one-off noise: numpy's small-buffer cache hands back blocks tracemalloc still counts, so how much a
    window appears to hold depends on what earlier tests left in that cache (CI saw 3.9 kB once in 50 calls). A
    real leak grows in every window."""
    only_runtime = [tracemalloc.Filter(True, os.path.join(RUNTIME_DIR, "*"), all_frames=True)]
    tracemalloc.start(25)
    growth = []
    try:
        for i in range(warmup):  # let numpy/ORT fill their small internal caches while traced
            step(i)
        done = warmup
        for _ in range(windows):
            before = tracemalloc.take_snapshot().filter_traces(only_runtime)
            for i in range(runs):
                step(done + i)
            done += runs
            after = tracemalloc.take_snapshot().filter_traces(only_runtime)
            growth.append(sum(stat.size_diff for stat in after.compare_to(before, "filename")))
            if growth[-1] <= 0:
                break
    finally:
        tracemalloc.stop()
    return min(growth)


def heap_peak_above_baseline(step, warmup=100, runs=50, windows=3):
    """The least, over `windows` windows of `runs` calls of step(i), of how far the traced heap rose above where it
    stood at the window's start: array-sized temporaries show here even when freed. Whole-process (a peak cannot be
    filtered by stack), so the least of several windows keeps out a one-off allocation by another thread."""
    tracemalloc.start()
    peaks = []
    try:
        for i in range(warmup):
            step(i)
        done = warmup
        for _ in range(windows):
            _reset_peak()
            before, _ = tracemalloc.get_traced_memory()
            for i in range(runs):
                step(done + i)
            done += runs
            peaks.append(tracemalloc.get_traced_memory()[1] - before)
    finally:
        tracemalloc.stop()
    return min(peaks)


def _reset_peak():
    """tracemalloc.reset_peak is Python 3.9+; on 3.8 a restart resets the peak (and the baseline) too."""
    if hasattr(tracemalloc, "reset_peak"):
        tracemalloc.reset_peak()
    else:
        tracemalloc.stop()
        tracemalloc.start()


@pytest.fixture
def runtime_rig(tmp_path):
    """make(*sets, start=True) -> (runtime, pull, pub, ctx): the runtime on ipc endpoints in tmp_path, warmed up,
    its state SUB connected; everything closed after the test."""
    made = []

    def make(*sets, start=True):
        cfg = load_config(None, [f"transport.chunks=ipc://{tmp_path}/chunks", f"transport.state=ipc://{tmp_path}/state",
                                 "policy.warmup_runs=1", *sets])
        ctx = zmq.Context()
        pull = ctx.socket(zmq.PULL)
        pull.bind(cfg["transport"]["chunks"])
        pub = ctx.socket(zmq.PUB)
        pub.bind(cfg["transport"]["state"])
        rt = PolicyRuntime(cfg, ctx)
        made.append((rt, ctx, [pull, pub]))
        if start:
            rt.start(cfg["policy"]["warmup_runs"])
        time.sleep(0.1)  # let the SUB connect
        return rt, pull, pub, ctx

    yield make
    for rt, ctx, socks in made:
        rt.close()
        for sock in socks:
            sock.close(0)
        ctx.term()


def publish_state(pub, rt, stamp, q=None):
    """Publish one robot state and wait until the runtime has taken it."""
    q = g1.NOMINAL_POSE.astype(np.float32) if q is None else q
    pub.send(encode_state(RobotState(1, stamp, "running", q, np.zeros_like(q))))
    deadline = time.monotonic() + 2
    while rt.robot_state is None or rt.robot_state.stamp != stamp:
        rt._poll_state(time.monotonic())
        assert time.monotonic() < deadline, "state never arrived"
        time.sleep(0.005)


def read_chunks(pull):
    """Every chunk waiting on ``pull`` (heartbeats skipped)."""
    out = []
    while pull.poll(50):
        msg = decode(pull.recv(), ("chunk", "heartbeat"))
        if hasattr(msg, "actions"):
            out.append(msg)
    return out
