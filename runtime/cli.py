"""`wam-edge <command>`: one CLI for every job. Every command takes --config and any number of --set key=value.

An error a person can act on (a configuration, model, engine or start-up problem) ends the command with one line
saying what is wrong; its traceback is printed only with --verbose. Exit codes: 2 for usage and configuration
errors, 1 for any other failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from typing import List, Optional

from runtime.config import ConfigError, default_config_path, load_config, render_defaults
from runtime.service.paths import PathError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="PATH", help="config file (default: $WAM_EDGE_CONFIG or ./config.yaml)")
    p.add_argument("--set", dest="overrides", metavar="SECTION.KEY=VALUE", action="append", default=[],
                   help="override one config key (repeatable; the same key set twice: the last wins), e.g. "
                   "--set policy.steps=4")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)


#: --verbose, before or after the command (the processes a command starts inherit it through $WAM_EDGE_VERBOSE)
VERBOSE_ENV = "WAM_EDGE_VERBOSE"
VERBOSE_HELP = ("on an error, also print its traceback (default: one line saying what is wrong); the processes the "
                "command starts do the same (%s=1 sets it too)" % VERBOSE_ENV)


def _process(p: argparse.ArgumentParser) -> None:
    p.add_argument("--report", metavar="PATH", help="write a JSON report here on exit")
    p.add_argument("--ready-file", metavar="PATH", help="create this file once warmed up and running")
    p.add_argument("--seconds", type=float, help="run this long, then stop (default: until SIGTERM/SIGINT)")


# The engine path's commands live in tools/ (export needs torch, build TensorRT); they parse their own arguments.
TOOL_COMMANDS = {
    "export": ("tools.export", "PyTorch model (module:function factory + checkpoint) -> ONNX stages + manifest "
               "(workstation; needs the export extra)"),
    "build": ("tools.build_engine", "ONNX stages -> TensorRT engines with their metadata (on the robot)"),
    "verify": ("tools.verify", "PyTorch vs ONNX Runtime vs TensorRT engines, stage by stage: errors, cosine"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wam-edge", description="On-robot runtime for one-step world action "
                                     "models on the Unitree G1.", epilog="An error ends a command with one line "
                                     "saying what is wrong (exit 2: usage or configuration, 1: anything else); "
                                     "--verbose adds its traceback.")
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True

    p = sub.add_parser("run", help="the policy runtime: camera -> policy -> action chunks")
    _common(p)
    _process(p)

    p = sub.add_parser("controller", help="receive chunks and drive the robot (simulated G1 by default)")
    _common(p)
    _process(p)

    p = sub.add_parser("demo", help="controller + runtime as separate processes on the embedded default")
    _common(p)
    p.add_argument("--seconds", type=float, help="how long to run (default: demo.seconds)")
    p.add_argument("--report", metavar="PATH", help="write the JSON report here")

    p = sub.add_parser("bench", help="the loop under injected inference latencies: stalls, seams, latencies, "
                       "start-up, memory, watchdog; JSON report and PNG plot")
    _common(p)
    p.add_argument("--latency", dest="latencies", action="append", metavar="SPEC",
                   help="an injected inference latency in policy.inject_latency's grammar (repeatable): 0.35 (s), "
                   "80%% (of the chunk), uniform(a,b), normal(mu,sigma); default: 0.01, 0.1, 80%%")
    p.add_argument("--seconds", type=float, default=8.0, help="how long each latency setting runs (default 8)")
    p.add_argument("--report", metavar="PATH", help="write the JSON report here")
    p.add_argument("--plot", metavar="PATH", help="write the PNG plot here (default: next to the report, .png; "
                   "needs matplotlib: the bench extra)")
    p.add_argument("--sweep", nargs="?", const="all", metavar="FACTORS",
                   help="instead of the latency runs: how the runtime's overhead grows with image, cameras and/or "
                   "horizon (comma-separated; default all), at the first --latency (default 0.01)")
    p.add_argument("--sweep-points", type=int, metavar="N", help="--sweep: only the first N points of each factor")
    p.add_argument("--sweep-cache", metavar="DIR", help="--sweep horizon: where the model variants are built "
                   "(default ~/.cache/wam-edge/bench-models)")

    for name, cmd, text in (
            ("arm", "arm", "arm the controller (a person's decision): the robot starts following the policy"),
            ("stop", "stop", "stop: the robot is brought to a safe state (not latched)"),
            ("estop", "estop", "e-stop: latched, survives restarts, until a person clears it"),
            ("clear-estop", "clear_estop", "clear a latched e-stop (the controller goes to stopped; arm again)"),
            ("status", "status", "the controller's safety state and why"),
            ("next-task", "next_task", "select the next task instruction"),
            ("prev-task", "prev_task", "select the previous task instruction")):
        p = sub.add_parser(name, help=text)
        _common(p)
        p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the controller's answer")
        p.set_defaults(operator_cmd=cmd)

    p = sub.add_parser("install-units", help="install the systemd units for this machine (docs/systemd.md)")
    from runtime.service import install

    install.add_arguments(p)

    p = sub.add_parser("doctor", help="what this machine can run and what the configured model will run on: "
                       "Python, model, ONNX Runtime, TensorRT, engines, backend, DDS, camera, Jetson (exit 1 on a "
                       "failed check)")
    _common(p)
    p.add_argument("--json", action="store_true", help='print {"ok": bool, "checks": [{name, status, detail}]}')
    p.add_argument("--load", action="store_true", help="also load the policy as `wam-edge run` does (backend, "
                   "warm-up) and time a few inferences on blank frames: a smoke test, not a benchmark")

    p = sub.add_parser("config", help="print the effective configuration, or the documented defaults")
    _common(p)
    p.add_argument("--defaults", action="store_true", help="print the schema's defaults as commented YAML")

    p = sub.add_parser("sim", help="a simulated G1 (not the robot) on the G1's DDS topics, for HIL rigs and tests: "
                       "uses dds.domain_id, dds.interface and sim.*")
    _common(p)
    p.add_argument("--seconds", type=float, help="run this long (default: until SIGTERM)")
    p.add_argument("--summary", metavar="PATH", help="write what it received (counts, unsafe commands) here")

    p = sub.add_parser("hil", help="fault-injection suite: each scenario N times against `wam-edge sim` (or a G1 "
                       "on a stand), judged on the DDS wire; JSON report (docs/hil.md)")
    _common(p)
    p.add_argument("--trials", type=int, default=5, help="trials per scenario (default 5)")
    p.add_argument("--scenario", dest="scenarios", action="append", metavar="NAME",
                   help="run only this scenario (repeatable; --list shows them)")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    p.add_argument("--report", metavar="PATH", help="write the JSON report here")
    p.add_argument("--log-dir", metavar="DIR", help="keep the processes' logs here (made if missing; default: a "
                   "temporary directory)")
    p.add_argument("--robot-on-stand", action="store_true",
                   help="hil.robot: stand only: confirm that a real G1 hangs on a stand, clear of people; the suite "
                   "arms it and injects faults")

    for name, (_, text) in TOOL_COMMANDS.items():
        sub.add_parser(name, help=text + " (`wam-edge %s --help`)" % name, add_help=False)

    p = sub.add_parser("fuzz", help="rig use: malformed messages of every class to each socket of the running "
                       "processes (loopback only); sent, crashes, stalls, applied, rejected, RSS (docs/fuzz.md)")
    _common(p)
    from runtime.fuzz import command as fuzz_command

    fuzz_command.add_arguments(p)

    p = sub.add_parser("image-server-sim", help="a simulation of Unitree's image server: synthetic side-by-side "
                       "JPEG frames over ZeroMQ, laid out as camera.layout says (camera.header: timestamp_id sends "
                       "the test-mode header; none and auto, plain JPEG)")
    _common(p)
    p.add_argument("--endpoint", default="tcp://127.0.0.1:5555", help="where to bind the PUB socket: loopback tcp "
                   "or ipc, as for every socket wam-edge binds (default tcp://127.0.0.1:5555)")
    p.add_argument("--seconds", type=float, help="run this long (default: until interrupted)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in TOOL_COMMANDS:
        import importlib

        try:
            module = importlib.import_module(TOOL_COMMANDS[argv[0]][0])
        except ImportError as exc:  # export needs torch + onnx: a workstation's job
            sys.stderr.write(f"wam-edge {argv[0]}: {exc}; install the extra it needs "
                             f"(pip install 'wam-edge[export]' for export)\n")
            return 2
        return module.main(argv[1:], prog="wam-edge " + argv[0])
    args = build_parser().parse_args(argv)
    if args.command == "install-units":  # takes its own --config; no --set
        from runtime.service import install

        return install.run(args)
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"  # the processes this command starts (demo, bench, hil) inherit it
    verbose = os.environ.get(VERBOSE_ENV, "") not in ("", "0")
    logging.basicConfig(level=getattr(logging, args.log_level), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import zmq

    try:
        return _command(args)
    except ConfigError as exc:
        return _report(args.command, exc, 2, verbose)
    except EXPECTED_ERRORS + (zmq.ZMQError,) as exc:
        return _report(args.command, exc, 1, verbose)


#: Errors that say what a person can fix (a model file that changed, a missing engine or module, a busy address, a
#: policy that produced non-finite actions at warm-up, a socket directory others could write): one line. Anything
#: else is a bug: Python's own traceback.
EXPECTED_ERRORS = (ValueError, RuntimeError, OSError, ImportError, PathError)


def _report(command: str, exc: BaseException, code: int, verbose: bool) -> int:
    """One line on stderr (after the traceback with --verbose); returns the exit code."""
    if verbose:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    kind = type(exc)
    text = str(exc).strip() or kind.__name__
    if isinstance(exc, ConfigError):
        text = "configuration error: " + text
    elif kind not in (ValueError, RuntimeError) and not kind.__module__.startswith(("runtime.", "tools.")):
        text = f"{kind.__name__}: {text}"  # an OSError, a missing module, a library's own error: its type helps
    hint = "" if verbose or isinstance(exc, ConfigError) else " (--verbose shows the traceback)"
    sys.stderr.write(f"wam-edge {command}: {text}{hint}\n")
    return code


def _command(args: argparse.Namespace) -> int:
    if args.command == "doctor":  # a configuration error is one of its failed checks, not exit 2
        from runtime import doctor

        return doctor.main(args.config or default_config_path(), args.overrides, args.json, load=args.load)
    if args.command == "config" and args.defaults:
        sys.stdout.write(render_defaults())
        return 0
    cfg = load_config(args.config or default_config_path(), args.overrides)  # ConfigError: exit 2

    if args.command == "config":
        sys.stdout.write(cfg.to_yaml())
        return 0
    if getattr(args, "operator_cmd", None):
        from runtime.controller import operator

        reply = operator.send(cfg["transport"]["control"], args.operator_cmd, timeout_s=args.timeout)
        sys.stdout.write(f"{'ok' if reply.ok else 'refused'}: state {reply.state}: {reply.detail}\n")
        return 0 if reply.ok else 1
    if args.command == "run":
        from runtime import runner

        return runner.main(cfg, args.report, args.ready_file, args.seconds)
    if args.command == "controller":
        from runtime.controller import controller

        return controller.main(cfg, args.report, args.ready_file, args.seconds)
    if args.command == "demo":
        from runtime import demo

        summary = demo.run_demo(cfg, args.overrides, args.seconds or cfg["demo"]["seconds"], args.report)
        demo.print_summary(summary)
        return 0 if summary["ok"] else 1
    if args.command == "bench":
        return _bench(cfg, args)
    if args.command == "sim":
        from runtime.robot.dds import sim

        d, s = cfg["dds"], cfg["sim"]
        sim.main(d["domain_id"], d["interface"] or None, s["rate_hz"], args.seconds, s["mode_machine"],
                 s["control"], None, args.summary)
        return 0
    if args.command == "hil":
        return _hil(cfg, args)
    if args.command == "fuzz":
        from runtime.fuzz import command as fuzz_command

        return fuzz_command.run(cfg, args.overrides, args)
    if args.command == "image-server-sim":
        from runtime.cameras.image_server_sim import check_endpoint, serve

        try:
            check_endpoint(args.endpoint)
        except ValueError as exc:
            sys.stderr.write(f"wam-edge image-server-sim: --endpoint {exc}\n")
            return 2
        c = cfg["camera"]
        return serve(args.endpoint, [(x["name"], x["width"]) for x in c["layout"]], c["height"], c["fps"],
                     c["header"], args.seconds)
    return 2


def _bench(cfg, args) -> int:
    import os

    from runtime.bench import harness
    from runtime.policy.latency import parse_latency

    latencies = args.latencies or list(harness.DEFAULT_LATENCIES)
    for spec in latencies:
        try:
            parse_latency(spec, 1.0)
        except ValueError as exc:
            sys.stderr.write(f"wam-edge bench: --latency {spec}: {exc}\n")
            return 2
    if args.seconds <= 0:
        sys.stderr.write("wam-edge bench: --seconds must be positive\n")
        return 2
    plot = args.plot or (os.path.splitext(args.report)[0] + ".png" if args.report else None)
    if args.sweep is not None:
        from runtime.bench import sweep

        try:
            factors = sweep.parse_factors(args.sweep)
        except ValueError as exc:
            sys.stderr.write(f"wam-edge bench: --sweep: {exc}\n")
            return 2
        if args.sweep_points is not None and args.sweep_points < 1:
            sys.stderr.write("wam-edge bench: --sweep-points must be at least 1\n")
            return 2
        latency = args.latencies[0] if args.latencies else "0.01"
        report = harness.run_sweep_bench(cfg, args.overrides, factors, latency, args.seconds, args.report, plot,
                                         args.sweep_cache, args.sweep_points)
        harness.print_sweep_summary(report)
        return 0 if report["ok"] else 1
    report = harness.run_bench(cfg, args.overrides, latencies, args.seconds, args.report, plot, harness.print_row)
    harness.print_summary(report)
    return 0 if report["ok"] else 1


def _hil(cfg, args) -> int:
    from runtime.hil import harness
    from runtime.hil.scenarios import SCENARIOS

    if args.list:
        for sc in SCENARIOS:
            bound, formula = sc.bound(cfg)
            sim = " (simulated G1 only)" if sc.needs_sim else ""
            b = "" if bound is None else f"{bound * 1000:.0f} ms = "
            sys.stdout.write(f"{sc.name:<22} {sc.doc}{sim}\n{'':<22} ends {' or '.join(sc.expect)}; reaction bound "
                             f"{b}{formula}\n")
        return 0
    if args.trials < 1:
        sys.stderr.write("wam-edge hil: --trials must be at least 1\n")
        return 2
    if cfg["hil"]["robot"] == "stand" and not args.robot_on_stand:
        sys.stderr.write("wam-edge hil: hil.robot is stand: this arms a real robot and injects faults. Hang it on a "
                         "stand, clear the area, stop the wam-edge services, then add --robot-on-stand.\n")
        return 2
    try:
        harness.select(args.scenarios)
    except ValueError as exc:
        sys.stderr.write(f"wam-edge hil: {exc}\n")
        return 2
    report = harness.run_hil(cfg, args.overrides, args.trials, args.scenarios, args.report, harness.print_row,
                             args.log_dir)
    harness.print_summary(report)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
