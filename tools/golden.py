"""Golden data: the torch model's inputs and outputs per stage, for verifying an exported model elsewhere.

`wam-edge export` writes <out>/golden.npz; a later check on the robot (where torch is absent) feeds the same
inputs to an engine and compares. So this module imports torch only inside make_golden. Arrays are keyed
"<stage>/<tensor>"; "__meta__" holds a JSON string: {"seed", "torch", "stages": {name: onnx sha256}}.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any, Dict, Sequence, Tuple

import numpy as np

from runtime.policy.backends.base import NUMPY_DTYPES
from runtime.policy.manifest import Manifest, is_host_source

META_KEY = "__meta__"
META_KEYS = ("seed", "torch", "stages")
SMALL_INT_HIGH = 4  # int inputs and rtc:delay draw from [0, 4): small, valid as counts and indices


def _draw(rng: np.random.Generator, source: str, dtype: str, shape: Tuple[int, ...], horizon: int) -> np.ndarray:
    np_dtype = NUMPY_DTYPES[dtype]
    if source == "sampler:t":
        return rng.uniform(0.0, 1.0, size=shape).astype(np_dtype)
    if source == "rtc:delay":
        return rng.integers(0, min(SMALL_INT_HIGH, horizon), size=shape).astype(np_dtype)
    if dtype == "bool":
        return rng.integers(0, 2, size=shape).astype(np_dtype)
    if np.issubdtype(np_dtype, np.integer):
        return rng.integers(0, SMALL_INT_HIGH, size=shape).astype(np_dtype)
    return rng.standard_normal(shape).astype(np_dtype)  # camera:*, state, sampler:x, rtc:prefix


def random_inputs(manifest: Manifest, seed: int) -> Dict[str, np.ndarray]:
    """Every host-fed stage input, keyed "<stage>/<tensor>", at its manifest shape. Inputs with the same source
    get the same array (the runtime feeds them from one buffer)."""
    rng = np.random.default_rng(seed)
    by_source: Dict[str, np.ndarray] = {}
    out: Dict[str, np.ndarray] = {}
    for stage in manifest.stages:
        for t in stage.inputs:
            src = t.source or ""
            if not is_host_source(src):
                continue
            if src not in by_source:
                by_source[src] = _draw(rng, src, t.dtype, t.shape, manifest.horizon)
            out["%s/%s" % (stage.name, t.name)] = by_source[src]
    return out


def make_golden(stages: Sequence[Any], manifest: Manifest, seed: int) -> Dict[str, np.ndarray]:
    """Run the torch modules (tools.export.StageExport) in manifest order on random_inputs; inputs from other
    stages come from the torch producer's outputs. Returns every stage input and output, "<stage>/<tensor>"."""
    import torch

    by_name = {s.name: s for s in stages}
    arrays = random_inputs(manifest, seed)
    for spec in manifest.stages:
        stage = by_name.get(spec.name)
        if stage is None:
            raise ValueError("make_golden: the manifest's stage %r has no torch module among %s"
                             % (spec.name, ", ".join(sorted(by_name))))
        feeds = []
        for t in spec.inputs:
            src = t.source or ""
            key = ("%s/%s" % (spec.name, t.name)) if is_host_source(src) else src.replace(":", "/", 1)
            arrays["%s/%s" % (spec.name, t.name)] = arrays[key]
            feeds.append(torch.from_numpy(np.ascontiguousarray(arrays[key])))
        stage.module.eval()
        with torch.no_grad():
            result = stage.module(*feeds)
        if isinstance(result, torch.Tensor):
            result = (result,)
        if len(result) != len(spec.outputs):
            raise ValueError("make_golden: stage %r (%s) returned %d tensors, the manifest lists %d outputs"
                             % (spec.name, type(stage.module).__name__, len(result), len(spec.outputs)))
        for t, value in zip(spec.outputs, result):
            arrays["%s/%s" % (spec.name, t.name)] = value.detach().cpu().numpy()
    return arrays


def write_golden(path: str, arrays: Dict[str, np.ndarray], meta: Dict[str, Any]) -> None:
    """Write arrays and meta to one .npz (plain arrays only: np.load(allow_pickle=False) reads it)."""
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise ValueError("golden meta lacks %s" % ", ".join(missing))
    if META_KEY in arrays:
        raise ValueError("golden arrays must not use the key %r" % META_KEY)
    for key, value in arrays.items():
        if not isinstance(value, np.ndarray) or value.dtype == object:
            raise ValueError("golden array %r is not a plain numpy array" % key)
    payload = dict(arrays)
    payload[META_KEY] = np.array(json.dumps(meta, sort_keys=True))
    with open(path, "wb") as f:
        np.savez(f, **payload)


def read_golden(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
    """(arrays, meta) from a file write_golden wrote; ValueError naming the file for anything else."""
    if not os.path.isfile(path):
        raise ValueError("golden file %s does not exist" % path)
    try:
        data = np.load(path, allow_pickle=False)
        if not hasattr(data, "files"):
            raise ValueError("it holds one array, not an archive")
        with data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise ValueError("golden file %s is not a valid .npz: %s" % (path, exc)) from exc
    raw = arrays.pop(META_KEY, None)
    if raw is None:
        raise ValueError("golden file %s has no %r entry" % (path, META_KEY))
    try:
        meta = json.loads(str(raw[()]))
    except (ValueError, TypeError, IndexError) as exc:
        raise ValueError("golden file %s: %s is not a JSON string: %s" % (path, META_KEY, exc)) from exc
    if not isinstance(meta, dict) or any(k not in meta for k in META_KEYS) or not isinstance(meta["stages"], dict):
        raise ValueError("golden file %s: %s must be an object with %s (stages an object)"
                         % (path, META_KEY, ", ".join(META_KEYS)))
    return arrays, meta
