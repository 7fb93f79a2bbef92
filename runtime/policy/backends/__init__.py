"""Inference backends behind one small interface (see base.StageBackend).

Backends are imported lazily by name so that runtime.policy imports without
onnxruntime (or TensorRT) installed.
"""

from __future__ import annotations

import importlib
from typing import Any, Dict, Tuple

from ..manifest import Manifest
from .base import StageBackend

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


__all__ = ["BACKENDS", "StageBackend", "create_backend"]
