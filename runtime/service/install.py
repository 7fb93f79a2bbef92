"""`wam-edge install-units`: render the systemd unit templates (systemd/*.in) with this machine's paths and write them.

The templates hold ``@PLACEHOLDERS@`` (the venv's ``wam-edge`` script, the config file, the user, the working
directory, the CPU cores); rendering replaces every one of them and refuses values systemd would read differently
(relative paths, whitespace, quotes, ``%`` specifiers, ``$`` expansions). See docs/systemd.md.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from typing import Dict, List, Optional, Sequence, Union

__all__ = [
    "DEFAULT_DEST",
    "DEFAULT_ENV_FILE",
    "InstallError",
    "SIM_UNIT",
    "UNITS",
    "add_arguments",
    "build_parser",
    "find_templates_dir",
    "install_units",
    "main",
    "next_steps",
    "render_units",
    "run",
]

DEFAULT_DEST = "/etc/systemd/system"
DEFAULT_ENV_FILE = "/etc/wam-edge/env"
#: Installed by default, in this order; the simulated G1 only with ``with_sim`` (hardware-in-the-loop rigs).
UNITS = ("wam-edge-controller.service", "wam-edge-runtime.service", "wam-edge.target")
SIM_UNIT = "wam-edge-sim.service"
TEMPLATE_SUFFIX = ".in"

_PLACEHOLDER = re.compile(r"@([A-Z][A-Z0-9_]*)@")
# what a path or user may hold in a unit file without quoting: no whitespace, quotes, backslashes, specifiers (%),
# variable expansion ($) or command separators (;)
_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_./+,:=@~-]+$")
_USER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_CPUS = re.compile(r"^\d+(-\d+)?([ ,]\d+(-\d+)?)*$")


class InstallError(Exception):
    """A value the units cannot hold, or no templates found."""


def find_templates_dir() -> str:
    """Where the unit templates are: ``$WAM_EDGE_UNITS_DIR``; the repository's systemd/ (a source checkout or an
    editable install); or ``<prefix>/share/wam-edge/systemd`` (a wheel installed with setup.py's data_files)."""
    candidates = []
    env = os.environ.get("WAM_EDGE_UNITS_DIR")
    if env:
        candidates.append(env)
    here = os.path.dirname(os.path.abspath(__file__))
    candidates.append(os.path.normpath(os.path.join(here, os.pardir, os.pardir, "systemd")))
    candidates.append(os.path.join(sys.prefix, "share", "wam-edge", "systemd"))
    for d in candidates:
        if os.path.isfile(os.path.join(d, UNITS[0] + TEMPLATE_SUFFIX)):
            return d
    raise InstallError("unit templates (%s%s) not found; looked in: %s. Install from a source checkout "
                       "(pip install -e .) or set WAM_EDGE_UNITS_DIR to the repository's systemd/ folder"
                       % (UNITS[0], TEMPLATE_SUFFIX, ", ".join(candidates)))


def _path(name: str, value: str) -> str:
    value = os.path.abspath(os.path.expanduser(value))
    if not _SAFE_VALUE.match(value):
        raise InstallError("%s %r: a unit file cannot hold this path unquoted (whitespace, quotes, '%%', '$', ';' "
                           "or '\\'); use a path without them" % (name, value))
    return value


def _cpus(name: str, value: Union[int, str]) -> str:
    text = str(value).strip()
    if not _CPUS.match(text):
        raise InstallError("%s %r: expected CPU indices or ranges such as 7, 6-7 or 0-5 (or 0,1,2)" % (name, value))
    return text


def _cpu_set(spec: str) -> set:
    cpus = set()
    for part in re.split(r"[ ,]", spec):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def _env_line(name: str, value: Optional[str]) -> str:
    if not value:
        return "# %s: not set here (--cyclonedds-uri, or the EnvironmentFile below)" % name
    if "\n" in value or "\r" in value:
        raise InstallError("%s must be one line" % name)
    # Environment="NAME=value": quoted for spaces (inline XML), backslash-escaped quotes, '%' doubled (specifiers)
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return 'Environment="%s=%s"' % (name, escaped)


def default_user() -> str:
    """The user who ran sudo, else the current user."""
    user = os.environ.get("SUDO_USER")
    if user:
        return user
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def default_group(user: str) -> str:
    """The user's primary group (the user's name when this machine does not know the user)."""
    try:
        import grp
        import pwd

        return grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name
    except (ImportError, KeyError):
        return user


def default_venv() -> str:
    """The running interpreter's environment (``sys.prefix``): the venv whose ``bin/wam-edge`` is running."""
    return sys.prefix


def default_config() -> str:
    return os.environ.get("WAM_EDGE_CONFIG") or os.path.join(os.getcwd(), "config.yaml")


def render_units(venv: Optional[str] = None, config: Optional[str] = None, user: Optional[str] = None,
                 workdir: Optional[str] = None, with_sim: bool = False, cpu_controller: Union[int, str] = 7,
                 cpu_runtime: Union[int, str] = "0-5", group: Optional[str] = None,
                 cyclonedds_uri: Optional[str] = None, env_file: str = DEFAULT_ENV_FILE,
                 templates_dir: Optional[str] = None) -> Dict[str, str]:
    """Render the templates: {unit file name: text}, in install order. Raises InstallError on unusable values.

    ``venv``: runs ``<venv>/bin/wam-edge`` (default: ``sys.prefix``); ``config``: the config file (default:
    ``$WAM_EDGE_CONFIG`` or ./config.yaml); ``workdir``: default the config's folder; ``user``/``group``: default the
    sudo user (or the current one) and its primary group; ``cpu_controller``/``cpu_runtime``: CPUAffinity= of the
    controller (its own core) and of the runtime (the rest), which must not overlap."""
    venv = _path("venv", venv or default_venv())
    config = _path("config", config or default_config())
    workdir = _path("workdir", workdir or os.path.dirname(config))
    env_file = _path("env_file", env_file)
    user = user or default_user()
    group = group or default_group(user)
    for name, value in (("user", user), ("group", group)):
        if not _USER.match(value):
            raise InstallError("%s %r: not a valid user/group name" % (name, value))
    cpu_c = _cpus("cpu_controller", cpu_controller)
    cpu_r = _cpus("cpu_runtime", cpu_runtime)
    shared = _cpu_set(cpu_c) & _cpu_set(cpu_r)
    if shared:
        raise InstallError("the controller's CPUs (%s) and the runtime's (%s) overlap on %s: give the real-time "
                           "controller a core of its own" % (cpu_c, cpu_r, ",".join(str(c) for c in sorted(shared))))
    values = {
        "WAM_EDGE": os.path.join(venv, "bin", "wam-edge"),
        "VENV": venv,
        "CONFIG": config,
        "WORKDIR": workdir,
        "USER": user,
        "GROUP": group,
        "CPU_CONTROLLER": cpu_c,
        "CPU_RUNTIME": cpu_r,
        "ENV_FILE": env_file,
        "CYCLONEDDS_ENV": _env_line("CYCLONEDDS_URI", cyclonedds_uri),
    }
    tdir = templates_dir or find_templates_dir()
    names = list(UNITS) + ([SIM_UNIT] if with_sim else [])
    out: Dict[str, str] = {}
    for name in names:
        path = os.path.join(tdir, name + TEMPLATE_SUFFIX)
        try:
            with open(path, encoding="utf-8") as f:
                template = f.read()
        except OSError as exc:
            raise InstallError("cannot read the template %s: %s" % (path, exc)) from exc
        unknown = sorted(set(_PLACEHOLDER.findall(template)) - set(values))
        if unknown:
            raise InstallError("%s: unknown placeholders %s" % (path, ", ".join("@%s@" % u for u in unknown)))
        out[name] = _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)
    return out


def _write(path: str, text: str) -> None:
    """Write atomically (a unit is never seen half-written), mode 0644."""
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".wam-edge-", dir=d)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def install_units(prefix_dir_for_units: str = DEFAULT_DEST, venv: Optional[str] = None,
                  config: Optional[str] = None, user: Optional[str] = None, workdir: Optional[str] = None,
                  with_sim: bool = False, cpu_controller: Union[int, str] = 7, cpu_runtime: Union[int, str] = "0-5",
                  dry_run: bool = False, group: Optional[str] = None, cyclonedds_uri: Optional[str] = None,
                  env_file: str = DEFAULT_ENV_FILE) -> List[str]:
    """Render the units (see ``render_units``) and write them into ``prefix_dir_for_units`` (created if missing).

    Returns the paths written, in install order; with ``dry_run``, writes nothing and returns the rendered texts
    (same order). Raises InstallError for unusable values, OSError (e.g. PermissionError: run with sudo) when
    writing fails. ``next_steps()`` says what to run afterwards."""
    units = render_units(venv=venv, config=config, user=user, workdir=workdir, with_sim=with_sim,
                         cpu_controller=cpu_controller, cpu_runtime=cpu_runtime, group=group,
                         cyclonedds_uri=cyclonedds_uri, env_file=env_file)
    if dry_run:
        return list(units.values())
    dest = os.path.abspath(prefix_dir_for_units)
    os.makedirs(dest, exist_ok=True)
    written = []
    for name, text in units.items():
        path = os.path.join(dest, name)
        _write(path, text)
        written.append(path)
    return written


def next_steps(with_sim: bool = False, dest: str = DEFAULT_DEST) -> List[str]:
    """The commands an operator runs after installing the units."""
    units = ["wam-edge.target", "wam-edge-controller.service", "wam-edge-runtime.service"]
    if with_sim:
        units.append(SIM_UNIT)
    steps = []
    if os.path.abspath(dest) != DEFAULT_DEST:
        steps.append("# systemd reads units from %s (and /etc/systemd/system); copy or link them there first"
                     % dest)
    steps += [
        "sudo systemctl daemon-reload",
        "sudo systemctl enable --now " + " ".join(units),
        "systemctl status wam-edge-controller wam-edge-runtime",
        "journalctl -u wam-edge-controller -u wam-edge-runtime -f",
    ]
    return steps


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `wam-edge install-units` (for a subparser of the wam-edge CLI)."""
    p.add_argument("--dest", default=DEFAULT_DEST, metavar="DIR",
                   help="where to write the units (default: %(default)s)")
    p.add_argument("--venv", metavar="DIR",
                   help="the environment whose bin/wam-edge the units run (default: this one, %s)" % default_venv())
    p.add_argument("--config", metavar="PATH",
                   help="the config file the services load (default: $WAM_EDGE_CONFIG or ./config.yaml)")
    p.add_argument("--user", metavar="NAME", help="run the services as this user (default: $SUDO_USER or you)")
    p.add_argument("--group", metavar="NAME", help="and this group (default: the user's primary group)")
    p.add_argument("--workdir", metavar="DIR", help="working directory (default: the config file's folder)")
    p.add_argument("--with-sim", action="store_true",
                   help="also install wam-edge-sim.service, the simulated G1 (hardware-in-the-loop rigs only; "
                   "never on a real robot)")
    p.add_argument("--cpu-controller", default="7", metavar="CPUS",
                   help="CPUAffinity of the real-time controller: a core of its own (default: %(default)s; "
                   "the 6-core Orin NX 8GB has cores 0-5)")
    p.add_argument("--cpu-runtime", default="0-5", metavar="CPUS",
                   help="CPUAffinity of the policy runtime (default: %(default)s)")
    p.add_argument("--cyclonedds-uri", metavar="URI",
                   help="CYCLONEDDS_URI for the services (a file:// URI or inline XML); default: unset, or "
                   "whatever %s sets" % DEFAULT_ENV_FILE)
    p.add_argument("--dry-run", action="store_true", help="print the rendered units; write nothing")


def build_parser(prog: str = "wam-edge install-units") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Install the wam-edge systemd units (controller, runtime, "
                                "target; the simulated G1 with --with-sim). See docs/systemd.md.")
    add_arguments(p)
    return p


#: TimeoutStopSec= of wam-edge-controller.service (systemd/wam-edge-controller.service.in), in seconds.
CONTROLLER_TIMEOUT_STOP_S = 5.0


def _load_config(config: str):
    """(the loaded config, None) or (None, why it does not load)."""
    from runtime.config import ConfigError, load_config

    try:
        return load_config(config, []), None
    except ConfigError as exc:
        return None, str(exc)


def _stop_sequence_s(cfg) -> Optional[float]:
    """How long the controller's stop sequence takes with this config (hold, then ramp or damp), if known."""
    try:
        c = cfg["controller"]
        ramp = c["stop_ramp_s"] if c["mode"] == "arm_sdk" else c["hold_before_damp_s"]
        return float(c["hold_s"]) + float(ramp)
    except (KeyError, TypeError, ValueError):
        return None


#: where the units keep sockets and state (RuntimeDirectory=wam-edge, StateDirectory=wam-edge in systemd/*.in)
UNIT_RUNTIME_DIR = "/run/wam-edge"
UNIT_STATE_DIR = "/var/lib/wam-edge"
#: the config keys that name sockets (the units share them) and state (the controller's latch and record)
_SOCKET_KEYS = (("transport", "chunks"), ("transport", "state"), ("transport", "control"), ("sim", "control"),
                ("faults", "endpoint"))
_STATE_KEYS = (("controller", "latch_file"), ("controller", "command_record"))


def _path_warnings(cfg, user: str) -> List[str]:
    """Sockets and state the units do not place themselves: a fixed path in the config instead of {runtime_dir} /
    {state_dir} (which the units make /run/wam-edge and /var/lib/wam-edge, owned by the user, mode 0700)."""
    out = []
    for keys, token, unit_dir, prefix, why in (
            (_SOCKET_KEYS, "{runtime_dir}", UNIT_RUNTIME_DIR, "ipc://", "every unit and `sudo -u %s wam-edge arm` "
             "must find the same socket" % user),
            (_STATE_KEYS, "{state_dir}", UNIT_STATE_DIR, "", "it must survive a reboot (not /tmp or /run: tmpfs)")):
        for section, key in keys:
            raw = cfg.templates.get((section, key), cfg[section][key])
            if not raw or raw.startswith(prefix + token) or raw.startswith(prefix + unit_dir + "/"):
                continue
            out.append("%s.%s is %s, not in %s (%s under systemd): it must be in a directory owned by %s with mode "
                       "0700, and %s" % (section, key, raw, token, unit_dir, user, why))
    return out


def run(args: argparse.Namespace) -> int:
    """`wam-edge install-units` with parsed arguments (see ``add_arguments``). Exit status: 0 done, 1 could not
    write, 2 bad values."""
    out, err = sys.stdout, sys.stderr
    config = os.path.abspath(args.config or default_config())
    venv = args.venv or default_venv()
    warnings = []
    if not os.path.isfile(config):
        warnings.append("the config file %s does not exist (yet): the services will not start without it" % config)
    else:
        cfg, problem = _load_config(config)
        if problem:
            err.write("wam-edge install-units: %s does not load: %s\n" % (config, problem))
            return 2
        stop_s = _stop_sequence_s(cfg)
        if stop_s is not None and stop_s + 1.0 > CONTROLLER_TIMEOUT_STOP_S:
            warnings.append("the controller's stop sequence takes %.1f s with this config, close to or over its "
                            "TimeoutStopSec=%gs (then SIGKILL): raise it with `systemctl edit wam-edge-controller` "
                            "([Service] TimeoutStopSec=...)" % (stop_s, CONTROLLER_TIMEOUT_STOP_S))
    exe = os.path.join(os.path.abspath(venv), "bin", "wam-edge")
    if not os.access(exe, os.X_OK):
        warnings.append("%s is not an executable: is --venv the environment wam-edge is installed in?" % exe)
    user = args.user or default_user()
    if os.path.isfile(config):
        warnings.extend(_path_warnings(cfg, user))
    if user == "root":
        warnings.append("the services will run as root (pass --user to run them as the robot's user)")
    try:
        cpu_count = os.cpu_count() or 0
        for unit, spec in (("controller", args.cpu_controller), ("runtime", args.cpu_runtime)):
            cpus = _cpu_set(_cpus("cpu_" + unit, spec))
            missing = sorted(c for c in cpus if c >= cpu_count)
            if cpu_count and missing:
                effect = "the unit will fail to start here" if len(missing) == len(cpus) else "it runs on the others"
                warnings.append("the %s's CPU(s) %s not on this machine (%d CPUs): %s" % (
                    unit, ",".join(str(c) for c in missing), cpu_count, effect))
        result = install_units(args.dest, venv=venv, config=config, user=user, workdir=args.workdir,
                               with_sim=args.with_sim, cpu_controller=args.cpu_controller,
                               cpu_runtime=args.cpu_runtime, dry_run=args.dry_run, group=args.group,
                               cyclonedds_uri=args.cyclonedds_uri)
    except InstallError as exc:
        err.write("wam-edge install-units: %s\n" % exc)
        return 2
    except PermissionError as exc:
        err.write("wam-edge install-units: cannot write to %s (%s): run it with sudo, e.g.\n  sudo %s install-units "
                  "--user %s ...\n" % (args.dest, exc.strerror, exe, user))
        return 1
    except OSError as exc:
        err.write("wam-edge install-units: cannot write the units: %s\n" % exc)
        return 1
    for w in warnings:
        err.write("wam-edge install-units: warning: %s\n" % w)
    names = list(UNITS) + ([SIM_UNIT] if args.with_sim else [])
    if args.dry_run:
        for name, text in zip(names, result):
            out.write("# ---- %s ----\n%s\n" % (os.path.join(args.dest, name), text))
        return 0
    for path in result:
        out.write("wrote %s\n" % path)
    sim_path = os.path.join(args.dest, SIM_UNIT)
    if not args.with_sim and os.path.exists(sim_path):
        err.write("wam-edge install-units: warning: %s (the SIMULATED robot) is still installed from an earlier "
                  "--with-sim; on a real robot: sudo systemctl disable --now %s && sudo rm %s\n"
                  % (sim_path, SIM_UNIT, sim_path))
    out.write("next:\n")
    for step in next_steps(args.with_sim, args.dest):
        out.write("  %s\n" % step)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`wam-edge install-units [options]` as a standalone entry point."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
