"""runtime/service/scheduling.py: the rigs give each process its systemd unit's scheduling where the OS permits, to
every thread, and record what each got, or why not (issue 11). Real child processes, real scheduler calls."""

import os
import sys
import threading
import time

import pytest

from runtime.service import scheduling

linux_only = pytest.mark.skipif(not hasattr(os, "sched_setscheduler"), reason="Linux scheduling calls")

CHILD = "import threading, time; threading.Thread(target=time.sleep, args=(20,), daemon=True).start(); time.sleep(20)"


def test_core_plan_gives_the_controller_the_last_core_and_the_others_the_rest():
    assert scheduling.core_plan([0, 1, 2, 3]) == {"own": [3], "others": [0, 1, 2]}
    assert scheduling.core_plan([5]) == {"own": [5], "others": [5]}  # one core: shared, nothing to pin apart


@pytest.fixture
def child():
    made = []

    def spawn(placement):
        proc = placement.spawn([sys.executable, "-c", CHILD])
        made.append(proc)
        deadline = time.monotonic() + 10
        while len(os.listdir(f"/proc/{proc.pid}/task")) < 2:  # its second thread is up
            assert time.monotonic() < deadline
            time.sleep(0.01)
        return proc

    yield spawn
    for proc in made:
        proc.kill()
        proc.wait()


@linux_only
def test_a_real_time_role_gets_its_priority_on_every_thread_or_says_why_not(child):
    plan = scheduling.core_plan()
    placement = scheduling.Placement("sim", True, plan)
    proc = child(placement)
    got = placement.realtime()
    assert got["unit"].startswith("SCHED_FIFO 70")
    if any(r.startswith("SCHED_FIFO") for r in got["refused"]):  # not permitted here: said, not raised
        assert got["policy"] == "SCHED_OTHER" and "SCHED_FIFO" not in got["got"]
        return
    assert got["policy"] == "SCHED_FIFO" and got["priority"] == 70 and got["got"].startswith("SCHED_FIFO 70")
    for tid in os.listdir(f"/proc/{proc.pid}/task"):  # every thread, as systemd's CPUSchedulingPolicy does
        assert os.sched_getscheduler(int(tid)) == os.SCHED_FIFO
        assert sorted(os.sched_getaffinity(int(tid))) == plan["others"]
    assert got["cpus"] == ",".join(str(c) for c in plan["others"])


@linux_only
def test_the_runtime_stays_normal_with_its_units_nice(child):
    placement = scheduling.Placement("runtime", True)
    child(placement)
    got = placement.realtime()
    assert got["policy"] == "SCHED_OTHER"
    if not any(r.startswith("nice") for r in got["refused"]):
        assert got["nice"] == -5 and "nice -5" in got["got"]


@linux_only
def test_the_controller_inherits_an_unlimited_memory_lock_limit_where_permitted(child):
    import resource

    before = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    placement = scheduling.Placement("controller", True)
    proc = child(placement)
    assert resource.getrlimit(resource.RLIMIT_MEMLOCK) == before  # this process's own limit is back
    with open(f"/proc/{proc.pid}/limits", encoding="utf-8") as f:
        line = [ln for ln in f if ln.startswith("Max locked memory")][0]
    got = placement.realtime()
    if any(r.startswith("memory lock limit") for r in got["refused"]):
        assert "memory not locked" in got["got"]
    else:
        assert line.split()[3] == "unlimited"


def test_scheduling_none_starts_processes_as_they_are(child):
    placement = scheduling.Placement("controller", False)
    child(placement)
    got = placement.realtime()
    assert got["got"].startswith("as started") and got["refused"] == []


@linux_only
def test_threads_of_this_process_get_the_monitors_priority_and_give_it_back():
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, args=(20,), daemon=True)
    t.start()
    placement = scheduling.Placement(scheduling.MONITOR, True)
    try:
        got = placement.threads([t.native_id])
        if not got["refused"]:
            assert got["policy"] == "SCHED_FIFO" and got["priority"] == 60
            assert os.sched_getscheduler(t.native_id) == os.SCHED_FIFO
        assert os.sched_getscheduler(threading.get_native_id()) == os.SCHED_OTHER  # the caller is left alone
    finally:
        placement.undo([t.native_id])
        stop.set()
    assert os.sched_getscheduler(t.native_id) == os.SCHED_OTHER


def test_the_rigs_order_the_priorities_as_the_units_do():
    u = scheduling.UNITS
    assert u["controller"].priority > u["sim"].priority > u[scheduling.MONITOR].priority
    assert u["runtime"].policy == "other" and u["controller"].cores == "own" and u["sim"].cores == "others"
    assert u[scheduling.REFERENCE].priority == u["controller"].priority  # the floor, measured as the controller runs

