"""Pacer: the deadline loop the controller and the bench's reference loop share."""

from __future__ import annotations

import time

from runtime.pacing import Pacer


def test_a_wake_up_over_a_period_late_is_missed_and_re_anchors_without_a_burst():
    p = Pacer(0.002)
    p.start()
    p.wait()
    time.sleep(0.05)  # the loop was busy for 25 periods
    t_late = p.wait()
    assert p.late and p.missed == 1
    t_next = p.wait()  # the schedule re-anchored at the late wake-up: the next tick is a period on, not at once
    assert t_next - t_late >= 0.002 - 1e-4
    assert p.period_error.summary()["count"] == 3
    p.reset()
    assert p.missed == 0 and p.period_error.summary()["count"] == 0
