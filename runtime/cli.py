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
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

from runtime.config import Config, ConfigError, default_config_path, load_config, render_defaults
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


class Command(NamedTuple):
    """One `wam-edge` command: its one-line help, what adds its arguments, what runs it (returns the exit code).

    ``standalone``: the command reads no config and reports its own errors (install-units and the engine path's
    tools), so main() runs it as it is, without the logging set-up and the one-line error reports."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    standalone: bool = False


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config or default_config_path(), args.overrides)  # ConfigError: exit 2


# -- the processes ------------------------------------------------------------------------------------------------

def _process_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    _process(p)


def _run(args: argparse.Namespace) -> int:
    from runtime import runner

    return runner.main(_config(args), args.report, args.ready_file, args.seconds)


def _controller(args: argparse.Namespace) -> int:
    from runtime.controller import controller

    return controller.main(_config(args), args.report, args.ready_file, args.seconds)


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--seconds", type=float, help="how long to run (default: demo.seconds)")
    p.add_argument("--report", metavar="PATH", help="write the JSON report here")


def _demo(args: argparse.Namespace) -> int:
    from runtime import demo

    cfg = _config(args)
    summary = demo.run_demo(cfg, args.overrides, args.seconds or cfg["demo"]["seconds"], args.report)
    demo.print_summary(summary)
    return 0 if summary["ok"] else 1


def _bench_arguments(p: argparse.ArgumentParser) -> None:
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


# -- operator commands --------------------------------------------------------------------------------------------

def _operator(cmd: str, text: str) -> Command:
    def add_arguments(p: argparse.ArgumentParser) -> None:
        _common(p)
        p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the controller's answer")

    def run(args: argparse.Namespace) -> int:
        from runtime.controller import operator

        reply = operator.send(_config(args)["transport"]["control"], cmd, timeout_s=args.timeout)
        sys.stdout.write(f"{'ok' if reply.ok else 'refused'}: state {reply.state}: {reply.detail}\n")
        return 0 if reply.ok else 1

    return Command(text, add_arguments, run)


# -- the machine, the config, rigs --------------------------------------------------------------------------------

def _install_arguments(p: argparse.ArgumentParser) -> None:
    from runtime.service import install

    install.add_arguments(p)


def _install(args: argparse.Namespace) -> int:  # takes its own --config; no --set
    from runtime.service import install

    return install.run(args)


def _doctor_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--json", action="store_true", help='print {"ok": bool, "checks": [{name, status, detail}]}')
    p.add_argument("--load", action="store_true", help="also load the policy as `wam-edge run` does (backend, "
                   "warm-up) and time a few inferences on blank frames: a smoke test, not a benchmark")


def _doctor(args: argparse.Namespace) -> int:  # a configuration error is one of its failed checks, not exit 2
    from runtime import doctor

    return doctor.main(args.config or default_config_path(), args.overrides, args.json, load=args.load)


def _config_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--defaults", action="store_true", help="print the schema's defaults as commented YAML")


def _print_config(args: argparse.Namespace) -> int:
    sys.stdout.write(render_defaults() if args.defaults else _config(args).to_yaml())
    return 0


def _sim_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--seconds", type=float, help="run this long (default: until SIGTERM)")
    p.add_argument("--summary", metavar="PATH", help="write what it received (counts, unsafe commands) here")


def _sim(args: argparse.Namespace) -> int:
    from runtime.robot.dds import sim

    cfg = _config(args)
    d, s = cfg["dds"], cfg["sim"]
    sim.main(d["domain_id"], d["interface"] or None, s["rate_hz"], args.seconds, s["mode_machine"], s["control"],
             None, args.summary)
    return 0


def _hil_arguments(p: argparse.ArgumentParser) -> None:
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


def _fuzz_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    from runtime.fuzz import command as fuzz_command

    fuzz_command.add_arguments(p)


def _fuzz(args: argparse.Namespace) -> int:
    from runtime.fuzz import command as fuzz_command

    return fuzz_command.run(_config(args), args.overrides, args)


def _image_server_sim_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--endpoint", default="tcp://127.0.0.1:5555", help="where to bind the PUB socket: loopback tcp "
                   "or ipc, as for every socket wam-edge binds (default tcp://127.0.0.1:5555)")
    p.add_argument("--seconds", type=float, help="run this long (default: until interrupted)")


def _image_server_sim(args: argparse.Namespace) -> int:
    from runtime.cameras.image_server_sim import check_endpoint, serve

    cfg = _config(args)
    try:
        check_endpoint(args.endpoint)
    except ValueError as exc:
        sys.stderr.write(f"wam-edge image-server-sim: --endpoint {exc}\n")
        return 2
    c = cfg["camera"]
    return serve(args.endpoint, [(x["name"], x["width"]) for x in c["layout"]], c["height"], c["fps"], c["header"],
                 args.seconds)


# -- the engine path (tools/: export needs torch, build TensorRT; imported only when their command runs) -----------

class ToolMissing(Exception):
    """A tool's module could not be imported (torch, onnx, ... missing here)."""


def _tool_module(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # export needs torch + onnx: a workstation's job
        raise ToolMissing(exc) from exc


def _tool(name: str, module: str, text: str) -> Command:
    return Command(text + " (`wam-edge %s --help`)" % name,
                   lambda p: _tool_module(module).add_arguments(p),
                   lambda args: _tool_module(module).run(args, "wam-edge " + name), standalone=True)


#: Every command, in the order `wam-edge --help` lists them.
COMMANDS: Dict[str, Command] = {
    "run": Command("the policy runtime: camera -> policy -> action chunks", _process_arguments, _run),
    "controller": Command("receive chunks and drive the robot (simulated G1 by default)", _process_arguments,
                          _controller),
    "demo": Command("controller + runtime as separate processes on the embedded default", _demo_arguments, _demo),
    "bench": Command("the loop under injected inference latencies: stalls, seams, latencies, start-up, memory, "
                     "watchdog; JSON report and PNG plot", _bench_arguments, lambda args: _bench(_config(args), args)),
    "arm": _operator("arm", "arm the controller (a person's decision): the robot starts following the policy"),
    "stop": _operator("stop", "stop: the robot is brought to a safe state (not latched)"),
    "estop": _operator("estop", "e-stop: latched, survives restarts, until a person clears it"),
    "clear-estop": _operator("clear_estop", "clear a latched e-stop (the controller goes to stopped; arm again)"),
    "status": _operator("status", "the controller's safety state and why"),
    "next-task": _operator("next_task", "select the next task instruction"),
    "prev-task": _operator("prev_task", "select the previous task instruction"),
    "install-units": Command("install the systemd units for this machine (docs/systemd.md)", _install_arguments,
                             _install, standalone=True),
    "doctor": Command("what this machine can run and what the configured model will run on: Python, model, ONNX "
                      "Runtime, TensorRT, engines, backend, DDS, camera, Jetson (exit 1 on a failed check)",
                      _doctor_arguments, _doctor),
    "config": Command("print the effective configuration, or the documented defaults", _config_arguments,
                      _print_config),
    "sim": Command("a simulated G1 (not the robot) on the G1's DDS topics, for HIL rigs and tests: uses "
                   "dds.domain_id, dds.interface and sim.*", _sim_arguments, _sim),
    "hil": Command("fault-injection suite: each scenario N times against `wam-edge sim` (or a G1 on a stand), "
                   "judged on the DDS wire; JSON report (docs/hil.md)", _hil_arguments,
                   lambda args: _hil(_config(args), args)),
    "export": _tool("export", "tools.export", "PyTorch model (module:function factory + checkpoint) -> ONNX stages "
                    "+ manifest (workstation; needs the export extra)"),
    "build": _tool("build", "tools.build_engine", "ONNX stages -> TensorRT engines with their metadata (on the "
                   "robot)"),
    "verify": _tool("verify", "tools.verify", "PyTorch vs ONNX Runtime vs TensorRT engines, stage by stage: errors, "
                    "cosine"),
    "fuzz": Command("rig use: malformed messages of every class to each socket of the running processes (loopback "
                    "only); sent, crashes, stalls, applied, rejected, RSS (docs/fuzz.md)", _fuzz_arguments, _fuzz),
    "image-server-sim": Command("a simulation of Unitree's image server: synthetic side-by-side JPEG frames over "
                                "ZeroMQ, laid out as camera.layout says (camera.header: timestamp_id sends the "
                                "test-mode header; none and auto, plain JPEG)", _image_server_sim_arguments,
                                _image_server_sim),
}


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser, with the arguments of ``command`` only: the others are listed but not built, so `wam-edge
    --help` imports no tool (torch, TensorRT) and no command's modules."""
    return _parsers(command)[0]


def _parsers(command: Optional[str]) -> Tuple[argparse.ArgumentParser, Optional[argparse.ArgumentParser]]:
    """The parser and the sub-parser of ``command`` (None when it names none)."""
    parser = argparse.ArgumentParser(prog="wam-edge", description="On-robot runtime for one-step world action "
                                     "models on the Unitree G1.", epilog="An error ends a command with one line "
                                     "saying what is wrong (exit 2: usage or configuration, 1: anything else); "
                                     "--verbose adds its traceback.")
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True
    chosen = None
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help)
        if name == command:
            cmd.add_arguments(p)
            chosen = p
    return parser, chosen


def _command_in(argv: List[str]) -> Optional[str]:
    """The command ``argv`` names: its first word that is not an option (the top level takes only --verbose)."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command_in(argv)
    try:
        parser, chosen = _parsers(command)
    except ToolMissing as exc:
        sys.stderr.write(f"wam-edge {command}: {exc}; install the extra it needs "
                         f"(pip install 'wam-edge[export]' for export)\n")
        return 2
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said with the command's own usage line (exit 2)
        (chosen or parser).error("unrecognized arguments: " + " ".join(unknown))
    cmd = COMMANDS[args.command]
    if cmd.standalone:
        return cmd.run(args)
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"  # the processes this command starts (demo, bench, hil) inherit it
    verbose = os.environ.get(VERBOSE_ENV, "") not in ("", "0")
    logging.basicConfig(level=getattr(logging, args.log_level), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import zmq

    try:
        return cmd.run(args)
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
