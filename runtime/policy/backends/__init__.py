"""Inference backends behind one small interface (see base.StageBackend).

Backends are imported lazily by name so that runtime.policy imports without
onnxruntime (or TensorRT) installed.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

from ..manifest import Manifest
from .base import StageBackend
from .engine_meta import EngineMetaError, EngineMismatch, check_engine, meta_path, read_meta

# name -> (module, class)
BACKENDS: Dict[str, Tuple[str, str]] = {
    "onnxruntime": (".onnxruntime_backend", "OnnxRuntimeBackend"),
}


def create_backend(name: str, manifest: Manifest, model_dir: str, **options: Any) -> StageBackend:
    """Instantiate backend `name` for this manifest; options go to its constructor."""
    if name not in BACKENDS:
        raise ValueError("unknown policy backend %r (available: %s)"
                         % (name, ", ".join(sorted(BACKENDS))))
    module_name, class_name = BACKENDS[name]
    module = importlib.import_module(module_name, __name__)
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


def select_backend(manifest: Manifest, model_dir: str, requested: str,
                   probe: Callable[[], Optional[TrtPlatform]] = probe_tensorrt) -> Tuple[str, str]:
    """(backend name, reason). A named backend is taken as asked; "auto" takes
    "tensorrt" when every stage has ``<stage>.engine`` with metadata matching
    this stage's ONNX file and the present TensorRT and GPU (see
    engine_meta.check_engine), else "onnxruntime" with the reason why not."""
    if requested != AUTO:
        if requested not in BACKENDS:
            raise ValueError("unknown policy backend %r (available: %s)"
                             % (requested, ", ".join(sorted(BACKENDS) + [AUTO])))
        return requested, "requested"
    fallback = "onnxruntime"
    # Cheap file checks first: no engines is the usual case and needs no TensorRT import.
    metas = []
    for stage in manifest.stages:
        path = engine_path(model_dir, stage.name)
        if not os.path.isfile(path):
            return fallback, "stage %s: no engine file %s" % (stage.name, os.path.basename(path))
        mpath = meta_path(path)
        if not os.path.isfile(mpath):
            return fallback, "stage %s: no engine metadata %s" % (stage.name, os.path.basename(mpath))
        try:
            metas.append((stage, read_meta(mpath)))
        except EngineMetaError as exc:
            return fallback, "stage %s: %s" % (stage.name, exc)
    try:
        platform = probe()
    except Exception as exc:  # ImportError, CUDA init errors: TensorRT is not usable here
        return fallback, "tensorrt not importable: %s" % (exc,)
    if platform is None:
        return fallback, "tensorrt not available on this machine"
    for stage, meta in metas:
        try:
            check_engine(meta, stage=stage.name, onnx_sha256=stage.sha256,
                         trt_version=platform.trt_version, gpu_name=platform.gpu_name,
                         compute_capability=platform.compute_capability)
        except EngineMismatch as exc:
            return fallback, "stage %s: %s" % (stage.name, exc)
    found = "engines for all %d stages match TensorRT %s on %s (sm %s)" % (
        len(metas), platform.trt_version, platform.gpu_name, platform.compute_capability)
    if "tensorrt" not in BACKENDS:
        return fallback, found + ", but no tensorrt backend is implemented yet"
    return "tensorrt", found


__all__ = ["AUTO", "BACKENDS", "StageBackend", "TrtPlatform", "create_backend", "engine_path",
           "probe_tensorrt", "select_backend"]
