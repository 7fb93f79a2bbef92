"""`wam-edge doctor`: what this machine can run and what the configured model will run on, before the services start.

Every check is one row (name, status, detail); a detail names what is wrong and how to fix it. Nothing is loaded (no
ONNX Runtime session, no engine), torch is never imported, and TensorRT and pycuda only inside the TensorRT probe.
The probes are parameters of run_checks, the real ones by default, so tests can stand in for a GPU.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, TextIO, Tuple

from runtime.config import Config, ConfigError, load_config
from runtime.policy.backends import (
    EngineFileMissing,
    TrtPlatform,
    engine_path,
    match_engines,
    probe_onnxruntime,
    probe_tensorrt,
    read_engine_meta,
    select_backend,
    select_ort,
)
from runtime.policy.backends.cuda_graph import load_driver
from runtime.policy.backends.engine_meta import EngineMetaError, EngineMismatch, check_engine_bytes
from runtime.policy.manifest import Manifest, ManifestError, load_manifest, sha256_file

OK, WARN, FAIL, ABSENT = "ok", "warn", "fail", "absent"
STATUSES = (OK, WARN, FAIL, ABSENT)
TEGRA_RELEASE = "/etc/nv_tegra_release"
CYCLONEDDS_PINNED = "0.10.2"
LOAD_RUNS = 10  # --load: timed inferences after the warm-up

#: camera.source -> the modules it imports, and how to install each
CAMERA_MODULES: Dict[str, Sequence[str]] = {
    "synthetic": (),
    "replay": ("simplejpeg",),
    "image_server": ("simplejpeg", "zmq"),
    "raw_zmq": ("zmq",),
    "v4l2": ("cv2",),
}
INSTALL_HINTS: Dict[str, str] = {
    "simplejpeg": "pip install simplejpeg",
    "zmq": "pip install pyzmq",
    "cv2": "pip install 'wam-edge[camera]'",
}


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | warn | fail | absent
    detail: str


class _Context:
    """The config, the probes, and what earlier checks found (the manifest, TensorRT, the engines)."""

    def __init__(self, cfg: Optional[Config], config_error: Optional[Exception], overrides: Sequence[str],
                 trt_probe: Callable[[], Optional[TrtPlatform]], ort_probe: Callable[[], Sequence[str]],
                 cuda_driver: Callable[[], Any], import_module: Callable[[str], Any], tegra_release: str,
                 environ: Mapping[str, str]) -> None:
        self.cfg, self.config_error, self.overrides = cfg, config_error, list(overrides)
        self.model: Dict[str, Any] = cfg["model"] if cfg is not None else {}
        self.ort_probe, self.cuda_driver, self.import_module = ort_probe, cuda_driver, import_module
        self.tegra_release, self.environ = tegra_release, environ
        self._trt_probe = trt_probe
        self._trt: Optional[List[Any]] = None  # [platform or None, exception or None], probed once
        self.manifest: Optional[Manifest] = None
        self.model_dir = ""
        self.ort_error: Optional[str] = None
        self.engine_problem: Optional[str] = None  # why the engines cannot run here; None when they all match
        self.load = False  # --load: load the policy as the runtime does and run it
        self.engine_summary = ""

    def trt(self) -> Optional[TrtPlatform]:
        """The TensorRT probe's platform; its exception raised again on every call (select_backend calls it too)."""
        if self._trt is None:
            try:
                self._trt = [self._trt_probe(), None]
            except Exception as exc:  # ImportError, CUDA init errors: kept and re-raised
                self._trt = [None, exc]
        if self._trt[1] is not None:
            raise self._trt[1]
        return self._trt[0]

    def trt_problem(self) -> Optional[str]:
        """Why TensorRT cannot be used here, or None."""
        try:
            return None if self.trt() is not None else "TensorRT is not available on this machine"
        except ImportError as exc:
            return "TensorRT is not installed (%s)" % (exc,)
        except Exception as exc:
            return "TensorRT cannot be used here (%s: %s)" % (type(exc).__name__, exc)

    def build_hint(self) -> str:
        return "run `wam-edge build --model %s` on this machine" % self.model_dir


def check_python(ctx: _Context) -> List[Check]:
    import numpy

    return [Check("python", OK, "Python %s (%s), numpy %s" % (sys.version.split()[0], sys.executable,
                                                                numpy.__version__))]


def check_config(ctx: _Context) -> List[Check]:
    if ctx.cfg is None:
        return [Check("config", FAIL, "%s (fix it; `wam-edge config --defaults` lists every key)"
                      % (ctx.config_error,))]
    where = "loaded from %s" % os.path.abspath(ctx.cfg.path) if ctx.cfg.path else "no config file: schema defaults"
    sets = "; " + ", ".join("--set " + s for s in ctx.overrides) if ctx.overrides else ""
    return [Check("config", OK, where + sets)]


def check_model(ctx: _Context) -> List[Check]:
    if ctx.cfg is None:
        return []
    ctx.model_dir = ctx.cfg.resolve(ctx.model["path"])
    verify = ctx.model["verify_hashes"]
    try:
        ctx.manifest = m = load_manifest(ctx.model_dir, verify_hashes=verify)
    except ManifestError as exc:
        return [Check("model", FAIL, "%s (model.path is %s)" % (exc, ctx.model_dir))]
    steps = ctx.cfg["policy"]["steps"]
    sampler = "%s, %d step%s%s" % (m.sampler.type, m.sampler.steps, "" if m.sampler.steps == 1 else "s",
                                   " (distilled)" if m.sampler.distilled else "")
    if steps:
        sampler += ", policy.steps runs %d" % steps
    return [Check("model", OK, "%s at %s: stages %s; sampler %s; cameras %s; %s" % (
        m.name, ctx.model_dir, ", ".join(s.name for s in m.stages), sampler, ", ".join(m.camera_names),
        "sha256 checked" if verify else "sha256 NOT checked (model.verify_hashes is false)"))]


def check_onnxruntime(ctx: _Context) -> List[Check]:
    try:
        providers = list(ctx.ort_probe())
    except ImportError as exc:
        ctx.ort_error = "onnxruntime is not installed (%s): pip install 'wam-edge[cpu]', or NVIDIA's onnxruntime-gpu " \
                        "wheel for this JetPack" % (exc,)
        return [Check("onnxruntime", ABSENT, ctx.ort_error)]
    except Exception as exc:
        ctx.ort_error = "onnxruntime does not load: %s: %s (reinstall it)" % (type(exc).__name__, exc)
        return [Check("onnxruntime", FAIL, ctx.ort_error)]
    try:
        version = str(ctx.import_module("onnxruntime").__version__)
    except Exception:
        version = "(version unknown)"
    return [Check("onnxruntime", OK, "onnxruntime %s, providers: %s" % (version, ", ".join(providers) or "none"))]


def check_tensorrt(ctx: _Context) -> List[Check]:
    try:
        platform = ctx.trt()
    except ImportError as exc:
        return [Check("tensorrt", ABSENT, "not installed: %s (TensorRT comes with JetPack, python3-libnvinfer; "
                      "pycuda: pip install 'wam-edge[tensorrt]')" % (exc,))]
    except Exception as exc:
        status = FAIL if ctx.model.get("backend") == "tensorrt" else WARN
        return [Check("tensorrt", status, "TensorRT and pycuda import, but CUDA does not start: %s: %s (check the "
                      "NVIDIA driver: nvidia-smi or tegrastats; the user needs the video group)"
                      % (type(exc).__name__, exc))]
    if platform is None:
        return [Check("tensorrt", ABSENT, "not available on this machine")]
    return [Check("tensorrt", OK, "TensorRT %s on %s (sm %s)" % (platform.trt_version, platform.gpu_name,
                                                               platform.compute_capability))]


def check_cuda_graph(ctx: _Context) -> List[Check]:
    if not ctx.model.get("cuda_graph"):
        return []
    try:
        ctx.cuda_driver()
    except Exception as exc:
        return [Check("cuda_graph", FAIL, "model.cuda_graph is true, but %s" % (exc,))]
    return [Check("cuda_graph", OK, "the CUDA driver API for graphs loads (libcuda.so.1)")]


def check_engines(ctx: _Context) -> List[Check]:
    m = ctx.manifest
    if m is None:
        return []
    needed = ctx.model["backend"] == "tensorrt"
    bad = FAIL if needed else WARN
    if not any(os.path.isfile(engine_path(ctx.model_dir, s.name)) for s in m.stages):
        ctx.engine_problem = "no engines beside the model (%s)" % ", ".join(s.name + ".engine" for s in m.stages)
        if needed:
            return [Check("engines", FAIL, "%s; model.backend is tensorrt: %s"
                          % (ctx.engine_problem, ctx.build_hint()))]
        return [Check("engines", ABSENT, "none built (ONNX Runtime runs the model); for TensorRT: " + ctx.build_hint())]
    rows, problems = [], []
    for stage in m.stages:
        problem, detail = _engine_problem(ctx, m, stage.name)
        rows.append(Check("engine " + stage.name, bad if problem else OK, detail))
        if problem:
            problems.append(detail)
    ctx.engine_problem = "; ".join(problems) or None
    ctx.engine_summary = "engines for all %d stages match this TensorRT and GPU" % len(m.stages)
    return rows


def _engine_problem(ctx: _Context, m: Manifest, stage: str) -> Tuple[bool, str]:
    """(whether this stage's engine cannot run here, why or what it was built for)."""
    try:
        meta = read_engine_meta(stage, ctx.model_dir)
    except (EngineFileMissing, EngineMetaError) as exc:
        return True, str(exc)
    built = "%s, TensorRT %s on %s (sm %s)%s" % (meta.precision, meta.trt_version, meta.gpu_name,
                                                 meta.compute_capability,
                                                 ", VERSION_COMPATIBLE" if meta.version_compatible else "")
    trt_problem = ctx.trt_problem()
    if trt_problem is not None:
        return True, "stage %s: engine built %s; not checked against this machine: %s" % (stage, built, trt_problem)
    try:  # match_engines on this stage alone, so that every stage gets its own row
        match_engines(dataclasses.replace(m, stages=tuple(s for s in m.stages if s.name == stage)),
                      {stage: meta}, ctx.trt())
        check_engine_bytes(meta, sha256_file(engine_path(ctx.model_dir, stage)))
    except EngineMismatch as exc:
        return True, str(exc)
    return False, "matches: " + built


def check_backend(ctx: _Context) -> List[Check]:
    m = ctx.manifest
    if m is None:
        return []
    requested, gpu = ctx.model["backend"], ctx.model["gpu_providers"]
    name, reason = select_backend(m, ctx.model_dir, requested, probe=ctx.trt, ort_probe=ctx.ort_probe,
                                  gpu_providers=gpu)
    if requested == "auto" and name == "tensorrt" and ctx.engine_problem:  # e.g. an engine replaced after the build
        name, why = select_ort(ctx.ort_probe, gpu)
        reason = "%s; %s" % (ctx.engine_problem, why)
    problems: List[str] = []
    if name == "tensorrt":
        problems = [p for p in (ctx.trt_problem(), ctx.engine_problem) if p]
        if problems:
            problems.append(ctx.build_hint() + " (or set model.backend: auto)")
        elif requested == "tensorrt":
            reason = ctx.engine_summary
    elif name == "onnxruntime-gpu":
        ort_name, why = select_ort(ctx.ort_probe, gpu)
        if ort_name != name:
            problems = [why + "; install NVIDIA's onnxruntime-gpu wheel for this JetPack, or set model.backend: auto"]
        reason = why if requested == name else reason
    elif ctx.ort_error:
        problems = [ctx.ort_error]
    if requested == name == "onnxruntime":
        reason = "requested (model.backend), on the CPU"
    if problems:
        return [Check("backend", FAIL, "model.backend is %s, but it cannot run here: %s"
                      % (requested, "; ".join(problems)))]
    return [Check("backend", OK, "would run on %s: %s" % (name, reason))]


def check_dds(ctx: _Context) -> List[Check]:
    needed = ctx.cfg is not None and ctx.cfg["controller"]["driver"] == "dds"
    why = "controller.driver is dds: needed" if needed else "needed only for controller.driver dds"
    home = ctx.environ.get("CYCLONEDDS_HOME")
    where = "; CYCLONEDDS_HOME=%s" % home if home else ""
    try:
        module = ctx.import_module("cyclonedds")
    except Exception as exc:  # ImportError, or an OSError from a missing libddsc
        return [Check("dds", FAIL if needed else WARN, "cyclonedds not importable: %s: %s (%s; install it with "
                      "tools/install_dds.sh)%s" % (type(exc).__name__, exc, why, where))]
    version = _dist_version("cyclonedds") or str(getattr(module, "__version__", "(version unknown)"))
    if version != CYCLONEDDS_PINNED:
        return [Check("dds", WARN, "cyclonedds %s, but runtime/robot/dds is written against %s (the version "
                      "Unitree's SDK pins): install it with tools/install_dds.sh%s" % (version, CYCLONEDDS_PINNED,
                                                                                        where))]
    return [Check("dds", OK, "cyclonedds %s (%s)%s" % (version, why, where))]


def check_camera(ctx: _Context) -> List[Check]:
    if ctx.cfg is None:
        return []
    c = ctx.cfg["camera"]
    source = c["source"]
    problems: List[str] = []
    for module in CAMERA_MODULES[source]:
        try:
            ctx.import_module(module)
        except Exception as exc:
            problems.append("%s is not importable (%s): %s" % (module, exc, INSTALL_HINTS[module]))
    if source == "replay":
        path = ctx.cfg.resolve(c["replay_path"]) if c["replay_path"] else ""
        if not path:
            problems.append("camera.replay_path is empty: set it to a directory of recorded JPEG frames")
        elif not os.path.isdir(path):
            problems.append("camera.replay_path %s is not a directory" % path)
    if source == "v4l2":
        devices = [d.strip() for d in c["v4l2_device"].split(",") if d.strip()]
        gone = [d for d in devices if not os.path.exists(d)] or ([] if devices else ["(none given)"])
        if gone:
            problems.append("camera.v4l2_device %s does not exist (is the camera plugged in? v4l2-ctl "
                            "--list-devices)" % ", ".join(gone))
    if ctx.manifest is not None:
        have = [x["name"] for x in c["layout"]]
        lacking = [n for n in ctx.manifest.camera_names if n not in have]
        if lacking:
            problems.append("the model needs cameras %s that camera.layout %s lacks" % (lacking, have))
    if problems:
        return [Check("camera", FAIL, "camera.source %s: %s" % (source, "; ".join(problems)))]
    needs = ", ".join(CAMERA_MODULES[source]) or "nothing beyond numpy"
    return [Check("camera", OK, "camera.source %s: needs %s, importable" % (source, needs))]


def check_unitree_sdk(ctx: _Context) -> List[Check]:
    try:
        ctx.import_module("unitree_sdk2py")
    except ImportError as exc:
        c = ctx.cfg["controller"] if ctx.cfg is not None else {}
        if c.get("driver") == "dds" and c.get("mode") == "lowcmd" and c.get("release_motion_control"):
            return [Check("unitree_sdk2py", WARN, "not installed (%s), but controller.release_motion_control asks "
                          "for its motion switcher: release the motion controller with the remote (zero-torque "
                          "mode, then L2+R2) or install unitree_sdk2py" % (exc,))]
        return [Check("unitree_sdk2py", ABSENT, "not installed (only lowcmd's motion switcher uses it)")]
    except Exception as exc:
        return [Check("unitree_sdk2py", WARN, "installed but does not import: %s: %s" % (type(exc).__name__, exc))]
    return [Check("unitree_sdk2py", OK, "unitree_sdk2py %s" % (_dist_version("unitree_sdk2py") or "installed"))]


def check_jetson(ctx: _Context) -> List[Check]:
    try:
        with open(ctx.tegra_release, "r", encoding="utf-8", errors="replace") as f:
            line = f.readline().strip().lstrip("#").strip()
    except FileNotFoundError:
        return [Check("jetson", ABSENT, "not a Jetson (no %s)" % ctx.tegra_release)]
    except OSError as exc:
        return [Check("jetson", WARN, "%s: cannot read: %s" % (ctx.tegra_release, exc.strerror or exc))]
    return [Check("jetson", OK, "L4T " + (line or "(empty %s)" % ctx.tegra_release))]


def check_load(ctx: _Context) -> List[Check]:
    """--load: the policy as `wam-edge run` loads it (backend, warm-up), then timed inferences on blank frames. The
    only check that loads anything; its times are a smoke test of this machine, not a benchmark (`wam-edge bench`)."""
    if not ctx.load or ctx.cfg is None or ctx.manifest is None:
        return []
    import numpy as np

    from runtime.runner import policy_from_config

    m = ctx.manifest
    start = time.monotonic()
    policy = None
    try:
        policy = policy_from_config(ctx.cfg)
        policy.warmup(max(1, ctx.cfg["policy"]["warmup_runs"]))
        loaded_s = time.monotonic() - start
        images = {c.name: np.zeros((c.height, c.width, 3), np.uint8) for c in m.cameras}
        state = np.asarray(m.state.mean, dtype=np.float32)
        times = []
        for _ in range(LOAD_RUNS):
            t0 = time.perf_counter()
            policy.infer(images, state)
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        return [Check("load", OK, "loaded and warmed up in %.2f s: %s; inference median %.2f ms, max %.2f ms over "
                      "%d runs on blank frames" % (loaded_s, policy.describe(), times[len(times) // 2], times[-1],
                                                   LOAD_RUNS))]
    except Exception as exc:  # whatever stops the runtime from starting, said as it would say it
        return [Check("load", FAIL, "the runtime could not load or run the policy: %s: %s"
                      % (type(exc).__name__, exc))]
    finally:
        if policy is not None:
            policy.close()


CHECKS = (check_python, check_config, check_model, check_onnxruntime, check_tensorrt, check_cuda_graph,
          check_engines, check_backend, check_dds, check_camera, check_unitree_sdk, check_jetson, check_load)


def run_checks(cfg: Optional[Config], config_error: Optional[Exception] = None, overrides: Sequence[str] = (),
               trt_probe: Callable[[], Optional[TrtPlatform]] = probe_tensorrt,
               ort_probe: Callable[[], Sequence[str]] = probe_onnxruntime,
               cuda_driver: Callable[[], Any] = load_driver,
               import_module: Callable[[str], Any] = importlib.import_module,
               tegra_release: str = TEGRA_RELEASE, environ: Optional[Mapping[str, str]] = None,
               load: bool = False) -> List[Check]:
    """Every check in order. cfg None (with config_error): the checks that need the config are left out. load:
    also load the policy and run it (check_load)."""
    ctx = _Context(cfg, config_error, overrides, trt_probe, ort_probe, cuda_driver, import_module, tegra_release,
                   os.environ if environ is None else environ)
    ctx.load = load
    rows: List[Check] = []
    for check in CHECKS:
        rows.extend(check(ctx))
    return rows


def _dist_version(dist: str) -> Optional[str]:
    try:
        from importlib.metadata import version
    except ImportError:  # pragma: no cover (3.8 has it)
        return None
    try:
        return version(dist)
    except Exception:
        return None


def all_ok(checks: Sequence[Check]) -> bool:
    return not any(c.status == FAIL for c in checks)


def format_table(checks: Sequence[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = ["%-*s  %-6s  %s" % (width, c.name, c.status, c.detail) for c in checks]
    failed = [c.name for c in checks if c.status == FAIL]
    lines.append("FAILED: " + ", ".join(failed) if failed else "no check failed")
    return "\n".join(lines) + "\n"


def to_json(checks: Sequence[Check]) -> str:
    return json.dumps({"ok": all_ok(checks), "checks": [dataclasses.asdict(c) for c in checks]}, indent=2) + "\n"


def main(config_path: Optional[str], overrides: Sequence[str] = (), as_json: bool = False,
         out: TextIO = sys.stdout, load: bool = False, **probes: Any) -> int:
    """Load the config (a ConfigError is a failed row), run every check, print; 0 when no row failed, else 1."""
    try:
        cfg: Optional[Config] = load_config(config_path, overrides)
        error: Optional[Exception] = None
    except ConfigError as exc:
        cfg, error = None, exc
    checks = run_checks(cfg, error, overrides, load=load, **probes)
    out.write(to_json(checks) if as_json else format_table(checks))
    return 0 if all_ok(checks) else 1


__all__ = ["CHECKS", "STATUSES", "Check", "all_ok", "format_table", "main", "run_checks", "to_json"]
