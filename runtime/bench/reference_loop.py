"""The machine's floor: a plain 2 ms loop alone in its own process (like Unitree's RecurrentThread), doing nothing but
keeping its deadlines, timed exactly as the controller's loop is (absolute deadlines; a wake-up more than one period
late is a missed tick and re-anchors the schedule, no burst). `wam-edge demo` and `bench` run it beside the
controller, scheduled like it on the other cores, so a report can tell the controller's jitter from the machine's.

    python -m runtime.bench.reference_loop --report loop.json     # until SIGTERM
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from typing import Any, Dict, Optional

from runtime.metrics import write_json
from runtime.pacing import Pacer

PERIOD_S = 0.002
#: every this many ticks the loop looks whether its scheduling changed (the rig applies the real-time priority once
#: the controller is ready): the figures restart from then, so they cover the scheduling reported
CHECK_EVERY = 100


def _scheduling() -> Any:
    try:
        return os.sched_getscheduler(0), os.sched_getparam(0).sched_priority
    except (AttributeError, OSError):  # not Linux
        return None


def timing_from(ticks: int, missed: int, period_error_ms: Dict[str, Any]) -> Dict[str, Any]:
    """The figures a report gives for a periodic loop: ticks, missed ticks and their share, the period error's
    summary (LatencyRecorder.summary())."""
    return {"ticks": ticks, "missed": missed,
            "missed_pct": round(100.0 * missed / ticks, 4) if ticks else None,
            "period_error_ms": period_error_ms}


class ReferenceLoop:
    def __init__(self, period_s: float = PERIOD_S) -> None:
        self.pacer = Pacer(period_s)
        self.ticks = 0
        self._stop = False

    def stop(self, *_: Any) -> None:
        self._stop = True

    def run(self, seconds: Optional[float] = None) -> Dict[str, Any]:
        pacer = self.pacer
        pacer.start()
        start = time.monotonic()
        scheduled = _scheduling()
        now = start
        while not self._stop and (seconds is None or now - start < seconds):
            now = pacer.wait()
            if self.ticks % CHECK_EVERY == CHECK_EVERY - 1 and _scheduling() != scheduled:
                scheduled = _scheduling()  # the rig made it real-time: measure from now, as the controller runs
                pacer.reset()
                self.ticks = 0
            self.ticks += 1
        return self.report()

    def report(self) -> Dict[str, Any]:
        out = timing_from(self.ticks, self.pacer.missed, self.pacer.period_error.summary())
        out["period_ms"] = self.pacer.period * 1000.0
        return out


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--report", required=True, help="where the JSON figures go when it ends")
    p.add_argument("--period-s", type=float, default=PERIOD_S)
    p.add_argument("--seconds", type=float, default=None, help="default: until SIGTERM or SIGINT")
    a = p.parse_args(argv)
    loop = ReferenceLoop(a.period_s)
    signal.signal(signal.SIGTERM, loop.stop)
    signal.signal(signal.SIGINT, loop.stop)
    write_json(a.report, loop.run(a.seconds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
