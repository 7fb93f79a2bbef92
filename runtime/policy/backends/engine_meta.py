"""Metadata written beside each TensorRT engine (``<stage>.engine.json``).

A serialized engine is tied to the TensorRT version and the GPU it was built
on; loading a mismatched one fails deep inside TensorRT ("Serialization
assertion stdVersionRead == serializationVersion") or, worse, runs stale
weights. So every engine gets a small JSON record of what it was built from
and on, checked before the engine is ever deserialized.

Pure Python: never imports TensorRT (CPU machines read and check these too).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

FORMAT_VERSION = 2  # 2: engine_sha256, so metadata vouches for one engine file only
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
VERSION_COMPATIBLE = "VERSION_COMPATIBLE"
REBUILD_HINT = "rebuild with `wam-edge build`"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# "10.3.0", "8.5.2.2" (JetPack), "8.6.1.post1" (a pip wheel)
_VERSION = re.compile(r"^(\d+)\.(\d+)\.(\d+)(?:\.\d+)*(?:\.?(?:post|dev|rc)\d*)?$")
_CAPABILITY = re.compile(r"^\d+\.\d+$")

# key -> expected JSON type (every key is required, no others are allowed)
_FIELDS: Dict[str, type] = {
    "format_version": int,
    "stage": str,
    "onnx_sha256": str,
    "engine_sha256": str,
    "trt_version": str,
    "gpu_name": str,
    "compute_capability": str,
    "precision": str,
    "builder_flags": list,
}


class EngineMetaError(ValueError):
    """An engine metadata file is unreadable or malformed; the message names file and key."""


class EngineMismatch(ValueError):
    """An engine does not fit this stage, ONNX file, TensorRT or GPU."""


@dataclass(frozen=True)
class EngineMeta:
    stage: str
    onnx_sha256: str
    trt_version: str         # e.g. "10.3.0" (a fourth build component is allowed)
    gpu_name: str            # e.g. "Orin"
    compute_capability: str  # "major.minor", e.g. "8.7"
    precision: str           # one of PRECISIONS
    builder_flags: Tuple[str, ...] = ()
    engine_sha256: str = ""  # of the engine file itself; required in files (write_meta/read_meta check it)
    format_version: int = FORMAT_VERSION
    path: str = field(default="", compare=False)  # where it was read from, for messages

    @property
    def version_compatible(self) -> bool:
        return VERSION_COMPATIBLE in self.builder_flags

    def to_json(self) -> Dict[str, Any]:
        return {
            "format_version": self.format_version,
            "stage": self.stage,
            "onnx_sha256": self.onnx_sha256,
            "engine_sha256": self.engine_sha256,
            "trt_version": self.trt_version,
            "gpu_name": self.gpu_name,
            "compute_capability": self.compute_capability,
            "precision": self.precision,
            "builder_flags": list(self.builder_flags),
        }


def meta_path(engine_path: str) -> str:
    """``world.engine`` -> ``world.engine.json``."""
    return engine_path + ".json"


def parse_version(text: str) -> Tuple[int, int, int]:
    """"10.3.0" or "10.3.0.26" -> (10, 3, 0); ValueError otherwise."""
    m = _VERSION.match(text)
    if not m:
        raise ValueError("%r is not a TensorRT version (major.minor.patch)" % (text,))
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def _validate(meta: EngineMeta, where: str) -> None:
    def bad(key: str, msg: str) -> EngineMetaError:
        return EngineMetaError("%s: %s: %s" % (where, key, msg))

    if meta.format_version != FORMAT_VERSION:
        raise bad("format_version", "unsupported version %r (this runtime reads %d)"
                  % (meta.format_version, FORMAT_VERSION))
    for key in ("stage", "trt_version", "gpu_name", "compute_capability", "precision"):
        if not getattr(meta, key):
            raise bad(key, "must not be empty")
    for key in ("onnx_sha256", "engine_sha256"):
        if not _SHA256.match(getattr(meta, key)):
            raise bad(key, "expected 64 lowercase hex digits, got %r" % (getattr(meta, key),))
    try:
        parse_version(meta.trt_version)
    except ValueError as exc:
        raise bad("trt_version", str(exc)) from None
    if not _CAPABILITY.match(meta.compute_capability):
        raise bad("compute_capability", "expected \"major.minor\" such as \"8.7\", got %r"
                  % (meta.compute_capability,))
    if meta.precision not in PRECISIONS:
        raise bad("precision", "%r is not one of %s" % (meta.precision, ", ".join(PRECISIONS)))
    for i, flag in enumerate(meta.builder_flags):
        if not isinstance(flag, str) or not flag:
            raise bad("builder_flags[%d]" % i, "expected a non-empty string, got %r" % (flag,))


def write_meta(path: str, meta: EngineMeta) -> None:
    """Validate and write ``meta`` as JSON to ``path`` (atomically: tmp + rename)."""
    _validate(meta, path)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta.to_json(), f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def read_meta(path: str) -> EngineMeta:
    """Read and strictly validate an engine metadata file: unknown or missing
    keys and wrong types are EngineMetaError naming the file and the key."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise EngineMetaError("%s: cannot read: %s" % (path, exc.strerror or exc)) from exc
    except ValueError as exc:
        raise EngineMetaError("%s: invalid JSON: %s" % (path, exc)) from exc
    if not isinstance(data, dict):
        raise EngineMetaError("%s: expected a JSON object, got %s" % (path, type(data).__name__))
    for key in data:
        if key not in _FIELDS:
            raise EngineMetaError("%s: %s: unknown key (allowed: %s)"
                                  % (path, key, ", ".join(_FIELDS)))
    for key, kind in _FIELDS.items():
        if key not in data:
            raise EngineMetaError("%s: %s: missing required key" % (path, key))
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise EngineMetaError("%s: %s: expected %s, got %s %r"
                                  % (path, key, kind.__name__, type(value).__name__, value))
    flags: List[Any] = data["builder_flags"]
    meta = EngineMeta(
        stage=data["stage"], onnx_sha256=data["onnx_sha256"], trt_version=data["trt_version"],
        gpu_name=data["gpu_name"], compute_capability=data["compute_capability"],
        precision=data["precision"], builder_flags=tuple(flags), engine_sha256=data["engine_sha256"],
        format_version=data["format_version"], path=path)
    _validate(meta, path)
    return meta


def check_engine(meta: EngineMeta, *, stage: str, onnx_sha256: str, trt_version: str,
                 gpu_name: str, compute_capability: str) -> None:
    """Raise EngineMismatch naming every difference (recorded vs present)
    between the engine's metadata and this stage / ONNX file / TensorRT / GPU.

    TensorRT versions must agree in major.minor.patch exactly, unless the
    engine was built with VERSION_COMPATIBLE: then the same major and a
    present version >= the recorded one suffice."""
    problems: List[str] = []
    if meta.stage != stage:
        problems.append("stage: recorded %r, present %r" % (meta.stage, stage))
    if meta.onnx_sha256 != onnx_sha256:
        problems.append("ONNX sha256: recorded %s..., present %s... (the model was re-exported)"
                        % (meta.onnx_sha256[:12], onnx_sha256[:12]))
    problems.extend(_version_problems(meta, trt_version))
    if meta.gpu_name != gpu_name:
        problems.append("GPU: recorded %r, present %r" % (meta.gpu_name, gpu_name))
    if meta.compute_capability != compute_capability:
        problems.append("compute capability: recorded %s, present %s"
                        % (meta.compute_capability, compute_capability))
    if problems:
        where = meta.path or "engine metadata"
        raise EngineMismatch("%s: engine for stage %r does not match: %s; %s"
                             % (where, meta.stage, "; ".join(problems), REBUILD_HINT))


def check_engine_bytes(meta: EngineMeta, engine_sha256: str) -> None:
    """The engine file must be the one its metadata was written for: an engine replaced after `wam-edge build`
    (by trtexec, a copy from another robot) keeps metadata that no longer describes it."""
    if meta.engine_sha256 != engine_sha256:
        raise EngineMismatch("%s: engine for stage %r is not the file this metadata was written for (sha256 recorded "
                             "%s..., present %s...): it was replaced after the build; %s"
                             % (meta.path or "engine metadata", meta.stage, meta.engine_sha256[:12],
                                engine_sha256[:12], REBUILD_HINT))


def _version_problems(meta: EngineMeta, trt_version: str) -> List[str]:
    recorded = parse_version(meta.trt_version)
    try:
        present: Optional[Tuple[int, int, int]] = parse_version(trt_version)
    except ValueError:
        present = None
    if present is None:
        return ["TensorRT version: recorded %s, present %r is not a version"
                % (meta.trt_version, trt_version)]
    if meta.version_compatible:
        if present[0] != recorded[0] or present < recorded:
            return ["TensorRT version: recorded %s (VERSION_COMPATIBLE: needs %d.x >= %s), present %s"
                    % (meta.trt_version, recorded[0], meta.trt_version, trt_version)]
        return []
    if present != recorded:
        return ["TensorRT version: recorded %s, present %s" % (meta.trt_version, trt_version)]
    return []
