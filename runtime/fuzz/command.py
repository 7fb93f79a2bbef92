"""The `wam-edge fuzz` command line: its flags, and the run they ask for."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, List, Optional

from runtime.config import Config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--messages", type=int, default=2000, metavar="N",
                   help="malformed messages per socket, shared among its classes (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="seed of every message (a run repeats exactly; default 0)")
    p.add_argument("--target", dest="targets", action="append", metavar="NAME",
                   help="fuzz only this socket (repeatable; --list shows them): chunks, control, state, "
                   "camera-jpeg, camera-raw, faults, sim")
    p.add_argument("--class", dest="classes", action="append", metavar="NAME",
                   help="send only this class of message (repeatable; --list shows them)")
    p.add_argument("--list", action="store_true", help="list the sockets and their classes, and exit")
    p.add_argument("--report", metavar="PATH", help="write the JSON report here")
    p.add_argument("--seconds", type=float, help="stop sending to a socket after this long (default: all N)")
    p.add_argument("--rate", type=float, default=2000.0,
                   help="most messages a second to a subscriber (state, camera; default 2000)")
    p.add_argument("--stall-s", type=float, default=3.0,
                   help="a process that shows no sign of life for this long has stalled (default 3)")
    p.add_argument("--no-sim", action="store_true", help="leave out `wam-edge sim`: controllers drive the "
                   "in-process simulated G1, and the sim socket is skipped")
    p.add_argument("--canary", action="store_true", help="also send the canary classes: valid messages from the "
                   "fuzzer that must be reported as applied (proves the tool sees an applied message)")
    p.add_argument("--log-dir", metavar="DIR", help="keep the processes' logs here (default: their private "
                   "directory)")


def list_targets(out=sys.stdout) -> None:
    from runtime.fuzz import messages
    from runtime.fuzz.targets import ORDER, TARGETS

    for name in ORDER:
        t = TARGETS[name]
        out.write(f"{name:<12} {t.socket}\n")
        for c in messages.LINKS[t.link]:
            out.write(f"  {c.name:<20} {c.doc}\n")


def run(cfg: Config, overrides: List[str], args: Any) -> int:
    from runtime.fuzz import report as report_mod
    from runtime.fuzz.campaign import run_fuzz
    from runtime.fuzz.targets import ORDER, TARGETS, Options, dds_available

    if args.list:
        list_targets()
        return 0
    problems = []
    if args.messages < 1:
        problems.append("--messages must be at least 1")
    if args.rate <= 0 or args.stall_s <= 0 or (args.seconds is not None and args.seconds <= 0):
        problems.append("--rate, --stall-s and --seconds must be positive")
    unknown = [t for t in args.targets or [] if t not in TARGETS]
    if unknown:
        problems.append(f"unknown --target {unknown}; known: {', '.join(ORDER)}")
    if args.classes:
        from runtime.fuzz import messages

        known = {c.name for cs in messages.LINKS.values() for c in cs}
        bad = [c for c in args.classes if c not in known]
        if bad:
            problems.append(f"unknown --class {bad}; `wam-edge fuzz --list` shows them")
    if problems:
        sys.stderr.write("wam-edge fuzz: " + "; ".join(problems) + "\n")
        return 2
    no_dds = "--no-sim given" if args.no_sim else dds_available()
    targets = list(args.targets or ORDER)
    skipped = {}
    if no_dds and "sim" in targets:
        if args.targets:
            sys.stderr.write(f"wam-edge fuzz: --target sim needs `wam-edge sim`: {no_dds}\n")
            return 2
        targets.remove("sim")
        skipped["sim"] = no_dds
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
    opts = Options(args.messages, args.seed, args.stall_s, args.rate, args.canary, args.classes, driving=True,
                   dds=not no_dds, domain_id=_domain(), seconds=args.seconds, log_dir=args.log_dir)

    def progress(line: str) -> None:
        sys.stderr.write(line + "\n")

    report = run_fuzz(cfg, overrides, targets, opts, progress=progress)
    report["skipped"] = skipped
    for name, why in skipped.items():
        sys.stdout.write(f"{name}: skipped: {why}\n")
    report_mod.print_table(report)
    if args.report:
        from runtime.metrics import write_json

        write_json(args.report, report)
    return 0 if report["ok"] else 1


def _domain(pid: Optional[int] = None) -> int:
    """A DDS domain of its own (loopback only, but other rigs on this machine may use DDS too)."""
    return 100 + (pid if pid is not None else os.getpid()) % 120
