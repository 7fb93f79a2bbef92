"""Inference backends behind one small interface (see base.StageBackend).

Backends are imported lazily by name so that runtime.policy imports without
onnxruntime (or TensorRT) installed.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

from ..manifest import Manifest
from .base import StageBackend
from .engine_meta import REBUILD_HINT, EngineMeta, EngineMetaError, EngineMismatch, check_engine, meta_path, read_meta

log = logging.getLogger("wam_edge.policy")

# name -> (module, class)
BACKENDS: Dict[str, Tuple[str, str]] = {
    "onnxruntime": (".onnxruntime_backend", "OnnxRuntimeBackend"),
    "onnxruntime-gpu": (".onnxruntime_gpu_backend", "OnnxRuntimeGpuBackend"),
    "tensorrt": (".tensorrt_backend", "TensorRTBackend"),
}

#: model.gpu_providers names -> ONNX Runtime execution provider names, in the default priority order
ORT_GPU_PROVIDERS: Dict[str, str] = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
}
DEFAULT_GPU_PROVIDERS: Tuple[str, ...] = tuple(ORT_GPU_PROVIDERS)

# backend -> {model config key: constructor keyword}; keys a backend does not take are ignored
_OPTION_KEYS: Dict[str, Dict[str, str]] = {
    "onnxruntime": {"intra_op_threads": "intra_op_threads"},
    "onnxruntime-gpu": {"intra_op_threads": "intra_op_threads", "cache_dir": "cache_dir", "fp16": "fp16",
                        "gpu_providers": "providers"},
    # policy.warmup_runs already warms the whole pipeline after load (Policy.warmup): no model key for it
    "tensorrt": {"cuda_graph": "cuda_graph", "warmup_runs": "warmup_runs"},
}


class BackendUnavailable(RuntimeError):
    """A registered backend cannot be imported on this machine (its libraries are missing)."""


def backend_options(name: str, model_cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """Constructor keywords of backend ``name`` from the model config section
    (config keys -> keywords; keys this backend does not take are left out)."""
    if name not in BACKENDS:
        raise ValueError("unknown policy backend %r (available: %s)" % (name, ", ".join(sorted(BACKENDS))))
    keys = _OPTION_KEYS.get(name, {})
    return {kw: model_cfg[key] for key, kw in keys.items() if key in model_cfg}


def create_backend(name: str, manifest: Manifest, model_dir: str, **options: Any) -> StageBackend:
    """Instantiate backend `name` for this manifest; options go to its constructor."""
    if name not in BACKENDS:
        raise ValueError("unknown policy backend %r (available: %s)"
                         % (name, ", ".join(sorted(BACKENDS))))
    module_name, class_name = BACKENDS[name]
    try:
        module = importlib.import_module(module_name, __name__)
    except ImportError as exc:
        raise BackendUnavailable("policy backend %r cannot be used here: %s (module %s%s)"
                                 % (name, exc, __name__, module_name)) from exc
    return getattr(module, class_name)(manifest, model_dir, **options)


#: what model.backend / load_policy(backend=...) accept besides the BACKENDS names
AUTO = "auto"
ENGINE_SUFFIX = ".engine"


@dataclass(frozen=True)
class TrtPlatform:
    """The TensorRT and GPU present on this machine."""
    trt_version: str
    gpu_name: str
    compute_capability: str  # "major.minor"


def probe_tensorrt() -> Optional[TrtPlatform]:
    """The present TensorRT version and GPU 0; raises ImportError (or a CUDA
    error) when TensorRT or pycuda cannot be used. Imports lazily: only called
    when backend "auto" is asked for and engine files exist."""
    import pycuda.driver as cuda  # noqa: PLC0415 (optional, GPU machines only)
    import tensorrt as trt  # noqa: PLC0415

    cuda.init()
    device = cuda.Device(0)
    major, minor = device.compute_capability()
    return TrtPlatform(str(trt.__version__), str(device.name()), "%d.%d" % (major, minor))


def engine_path(model_dir: str, stage: str) -> str:
    return os.path.join(model_dir, stage + ENGINE_SUFFIX)


def probe_onnxruntime() -> Sequence[str]:
    """The execution providers this onnxruntime build lists (listed is not loadable:
    a GPU provider whose libraries are missing still shows; the backend checks)."""
    import onnxruntime  # noqa: PLC0415 (optional: runtime.policy imports without it)

    return tuple(onnxruntime.get_available_providers())


class EngineFileMissing(FileNotFoundError):
    """A stage has no engine file, or no metadata beside it."""


def read_engine_meta(stage: str, model_dir: str) -> EngineMeta:
    """The metadata beside ``<stage>.engine``: file checks and a strict read, no TensorRT. Raises
    EngineFileMissing or EngineMetaError, each naming the stage and file and saying how to rebuild."""
    path = engine_path(model_dir, stage)
    if not os.path.isfile(path):
        raise EngineFileMissing("stage %s: no engine file %s (%s)" % (stage, os.path.basename(path), REBUILD_HINT))
    mpath = meta_path(path)
    if not os.path.isfile(mpath):
        raise EngineFileMissing("stage %s: no engine metadata %s, so its TensorRT version and GPU are unknown (%s)"
                                % (stage, os.path.basename(mpath), REBUILD_HINT))
    try:
        return read_meta(mpath)
    except EngineMetaError as exc:
        raise EngineMetaError("stage %s: %s (%s)" % (stage, exc, REBUILD_HINT)) from None


def read_engine_metas(manifest: Manifest, model_dir: str) -> Dict[str, EngineMeta]:
    """Stage name -> read_engine_meta, for every stage (cheap: tried before TensorRT is imported)."""
    return {stage.name: read_engine_meta(stage.name, model_dir) for stage in manifest.stages}


def match_engines(manifest: Manifest, metas: Mapping[str, EngineMeta], platform: TrtPlatform) -> None:
    """Every stage's engine metadata against its ONNX hash and this TensorRT and GPU (EngineMismatch)."""
    for stage in manifest.stages:
        check_engine(metas[stage.name], stage=stage.name, onnx_sha256=stage.sha256,
                     trt_version=platform.trt_version, gpu_name=platform.gpu_name,
                     compute_capability=platform.compute_capability)


def select_ort(ort_probe: Callable[[], Sequence[str]] = probe_onnxruntime,
               gpu_providers: Sequence[str] = DEFAULT_GPU_PROVIDERS) -> Tuple[str, str]:
    """(backend, reason) for ONNX Runtime: "onnxruntime-gpu" when it lists one of
    ``gpu_providers`` (tensorrt, cuda), else "onnxruntime" on the CPU."""
    try:
        available = list(ort_probe())
    except Exception as exc:  # ImportError and the like: nothing to list
        return "onnxruntime", "onnxruntime providers unknown (%s) -> CPU" % (exc,)
    listed = ", ".join(available) or "none"
    gpu = [p for p in gpu_providers if ORT_GPU_PROVIDERS.get(p) in available]
    if gpu:
        return "onnxruntime-gpu", "onnxruntime providers: %s -> GPU (%s)" % (listed, ", ".join(gpu))
    return "onnxruntime", "onnxruntime providers: %s -> CPU" % listed


def select_backend(manifest: Manifest, model_dir: str, requested: str,
                   probe: Callable[[], Optional[TrtPlatform]] = probe_tensorrt,
                   ort_probe: Callable[[], Sequence[str]] = probe_onnxruntime,
                   gpu_providers: Sequence[str] = DEFAULT_GPU_PROVIDERS) -> Tuple[str, str]:
    """(backend name, reason). A named backend is taken as asked; "auto" takes
    "tensorrt" when every stage has ``<stage>.engine`` with metadata matching
    this stage's ONNX file and the present TensorRT and GPU (see
    engine_meta.check_engine), else ONNX Runtime with the best provider it
    lists (select_ort); the reason says each step."""
    if requested != AUTO:
        if requested not in BACKENDS:
            raise ValueError("unknown policy backend %r (available: %s)"
                             % (requested, ", ".join(sorted(BACKENDS) + [AUTO])))
        return requested, "requested"
    ok, why = _engines_match(manifest, model_dir, probe)
    if ok:
        if "tensorrt" in BACKENDS:
            return "tensorrt", why
        why += ", but no tensorrt backend is registered"
    name, ort_why = select_ort(ort_probe, gpu_providers)
    return name, "%s; %s" % (why, ort_why)


def _engines_match(manifest: Manifest, model_dir: str,
                   probe: Callable[[], Optional[TrtPlatform]]) -> Tuple[bool, str]:
    """(every stage has a matching engine, why or why not)."""
    try:  # cheap file checks first: no engines is the usual case and needs no TensorRT import
        metas = read_engine_metas(manifest, model_dir)
    except (EngineFileMissing, EngineMetaError) as exc:
        return False, str(exc)
    try:
        platform = probe()
    except Exception as exc:  # ImportError, CUDA init errors: TensorRT is not usable here
        return False, "tensorrt not importable: %s" % (exc,)
    if platform is None:
        return False, "tensorrt not available on this machine"
    try:
        match_engines(manifest, metas, platform)
    except EngineMismatch as exc:
        return False, str(exc)
    return True, "engines for all %d stages match TensorRT %s on %s (sm %s)" % (
        len(metas), platform.trt_version, platform.gpu_name, platform.compute_capability)


def load_backend(manifest: Manifest, model_dir: str, requested: str,
                 options: Optional[Mapping[str, Any]] = None,
                 probe: Callable[[], Optional[TrtPlatform]] = probe_tensorrt,
                 ort_probe: Callable[[], Sequence[str]] = probe_onnxruntime) -> Tuple[StageBackend, str]:
    """(backend, reason): select_backend, then create it with backend_options(name,
    options). A named backend's failure is raised; "auto" goes one step down
    (tensorrt -> ONNX Runtime's best provider -> ONNX Runtime on the CPU) with
    the failure added to the reason, so engines are taken when they exist AND load."""
    options = dict(options or {})
    gpu = tuple(options.get("gpu_providers", DEFAULT_GPU_PROVIDERS))
    name, reason = select_backend(manifest, model_dir, requested, probe=probe, ort_probe=ort_probe,
                                  gpu_providers=gpu)
    while True:
        try:
            return create_backend(name, manifest, model_dir, **backend_options(name, options)), reason
        except Exception as exc:
            if requested != AUTO or name == "onnxruntime":
                raise
            failed = "%s failed to load: %s" % (name, exc)
            log.warning("policy backend auto: %s", failed)
            if name == "tensorrt":
                name, why = select_ort(ort_probe, gpu)
            else:
                name, why = "onnxruntime", "-> CPU"
            reason = "%s; %s; %s" % (reason, failed, why)


__all__ = ["AUTO", "BACKENDS", "BackendUnavailable", "DEFAULT_GPU_PROVIDERS", "EngineFileMissing", "ORT_GPU_PROVIDERS",
           "StageBackend", "TrtPlatform", "backend_options", "create_backend", "engine_path", "load_backend",
           "match_engines", "probe_onnxruntime", "probe_tensorrt", "read_engine_meta", "read_engine_metas",
           "select_backend", "select_ort"]
