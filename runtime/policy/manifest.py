"""Load and strictly validate exported/<model>/manifest.json.

The manifest is the only contract between the exporter and the runtime, so it
is checked completely at load: unknown keys, dangling references, shape or
dtype disagreements and stale ONNX files all fail here, with the JSON path of
the offending value, instead of as a wrong action on the robot.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

FORMAT = "wam-edge-manifest"
VERSION = 1

# Manifest dtype name -> numpy dtype name (numpy itself is not needed here).
DTYPES = ("float32", "float16", "int32", "int64", "uint8", "bool")
HOST_DTYPE = "float32"  # tensors fed from / read by the host are float32 for now
RESIZE_MODES = ("nearest",)
# The order of a camera input's three channels. A manifest that does not say is read as "rgb": the order this
# runtime fed every model before the key existed (exported/reference and any older export).
CHANNEL_ORDERS = ("rgb", "bgr")
DEFAULT_CHANNEL_ORDER = "rgb"
ACTION_KINDS = ("joint_position",)
SAMPLER_TYPES = ("flow_matching",)
RUNS = ("once", "per_step")
SINKS = ("sampler:velocity",)
HOST_SOURCES = ("state", "sampler:x", "sampler:t")
# Real-time chunking done inside the model: host-fed inputs allowed only when the
# manifest declares {"rtc": {"version": RTC_VERSION, "prefix": true}}.
RTC_VERSION = 1
RTC_SOURCES = ("rtc:prefix", "rtc:delay")
RTC_DELAY_DTYPES = ("float32", "int32")
RESERVED_STAGE_NAMES = ("camera", "state", "sampler")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


def is_host_source(source: str) -> bool:
    """Inputs the host writes (as opposed to another stage's output)."""
    return source in HOST_SOURCES or source in RTC_SOURCES or source.startswith("camera:")


class ManifestError(ValueError):
    """The manifest (or a file it names) is invalid; the message says where."""


@dataclass(frozen=True)
class CameraSpec:
    """One camera input. channel_order: the order of the tensor's channels ("rgb" or "bgr", as the model was
    trained: datasets recorded through Unitree's image client may be BGR); mean and std are in that order.
    channel_order_stated: False where the manifest left channel_order out (then read as DEFAULT_CHANNEL_ORDER)."""
    name: str
    height: int
    width: int
    resize: str
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    input: str  # name of the stage input this camera feeds
    channel_order: str = DEFAULT_CHANNEL_ORDER
    channel_order_stated: bool = True


@dataclass(frozen=True)
class StateSpec:
    joints: Tuple[str, ...]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]


@dataclass(frozen=True)
class ActionSpec:
    kind: str
    joints: Tuple[str, ...]
    horizon: int
    step_s: float
    mean: Tuple[float, ...]
    std: Tuple[float, ...]


@dataclass(frozen=True)
class SamplerSpec:
    type: str
    steps: int
    shift: float
    distilled: bool


@dataclass(frozen=True)
class RtcSpec:
    """``"rtc": {"version": 1, "prefix": true}``: a stage takes ``rtc:prefix``
    (1, horizon, action_dim) float32, the executing chunk's actions on the new
    chunk's timeline, normalised with action.mean/std, and optionally
    ``rtc:delay`` (1,) float32 or int32, the number of the new chunk's actions
    that will have passed when it arrives."""
    version: int
    prefix: bool


@dataclass(frozen=True)
class TensorSpec:
    """shape is what the runtime binds (for a dynamic tensor, the profile's opt shape); profile, only where the
    exporter declared dynamic axes, is (min, opt, max) full shapes: what a TensorRT optimization profile needs."""
    name: str
    dtype: str
    shape: Tuple[int, ...]
    source: Optional[str] = None  # inputs only
    sink: Optional[str] = None    # outputs only, optional
    profile: Optional[Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]] = None  # (min, opt, max)


@dataclass(frozen=True)
class DataFileSpec:
    """A stage's weights kept beside its ONNX file (ONNX external data: a model over protobuf's 2 GB). The export
    names the file after its content, and the ONNX file names it, so the ONNX file's sha256 changes with the
    weights (an engine built from other weights is stale) and this sha256 vouches for the bytes."""
    file: str
    sha256: str


@dataclass(frozen=True)
class StageSpec:
    name: str
    file: str
    sha256: str
    runs: str
    inputs: Tuple[TensorSpec, ...]
    outputs: Tuple[TensorSpec, ...]
    data: Optional[DataFileSpec] = None


@dataclass(frozen=True)
class Manifest:
    name: str
    description: str
    cameras: Tuple[CameraSpec, ...]
    state: StateSpec
    action: ActionSpec
    sampler: SamplerSpec
    stages: Tuple[StageSpec, ...]
    path: str  # where it was loaded from, for error messages
    rtc: Optional[RtcSpec] = None  # absent: the model does no real-time chunking itself
    #: where the policy starts, (joint, rad) for every action joint in action order; absent: the controller
    #: approaches the first chunk's current action instead (docs/safety.md, "Approaching the start pose")
    start_pose: Optional[Tuple[Tuple[str, float], ...]] = None

    @property
    def supports_rtc(self) -> bool:
        """The model inpaints its chunk itself from rtc:prefix (and rtc:delay)."""
        return self.rtc is not None and self.rtc.prefix

    @property
    def camera_names(self) -> Tuple[str, ...]:
        return tuple(c.name for c in self.cameras)

    @property
    def state_joints(self) -> Tuple[str, ...]:
        return self.state.joints

    @property
    def action_joints(self) -> Tuple[str, ...]:
        return self.action.joints

    @property
    def horizon(self) -> int:
        return self.action.horizon

    @property
    def step_s(self) -> float:
        return self.action.step_s

    @property
    def action_dim(self) -> int:
        return len(self.action.joints)

    @property
    def action_state_indices(self) -> Tuple[int, ...]:
        """Index in the state vector of each action joint (validated to exist)."""
        return tuple(self.state.joints.index(j) for j in self.action.joints)

    @property
    def step_groups(self) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
        """(first, later): the stages a denoising step runs, in order. The first step runs the context ("once")
        stages, then the per-step ones (validation keeps every "once" stage before the "per_step" stages that read
        it); each later step the per-step ones alone. The policy hands each to StageBackend.run_group, and a
        backend that fuses groups captures exactly these."""
        per_step = tuple(s.name for s in self.stages if s.runs == "per_step")
        return tuple(s.name for s in self.stages if s.runs == "once") + per_step, per_step

    def stage(self, name: str) -> StageSpec:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)


# --- small typed readers; each error carries "<file>: <json path>: ..." -------

class _Ctx:
    def __init__(self, where: str) -> None:
        self.where = where

    def error(self, path: str, msg: str) -> ManifestError:
        return ManifestError("%s: %s: %s" % (self.where, path, msg) if path
                             else "%s: %s" % (self.where, msg))

    def obj(self, value: Any, path: str, required: Tuple[str, ...],
            optional: Tuple[str, ...] = ()) -> Dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(path, "expected an object, got %s" % _kind(value))
        for key in value:
            if key not in required and key not in optional:
                raise self.error(_join(path, key), "unknown key %r (allowed: %s)"
                                 % (key, ", ".join(required + optional)))
        for key in required:
            if key not in value:
                raise self.error(_join(path, key), "missing required key")
        return value

    def str_(self, value: Any, path: str, choices: Optional[Tuple[str, ...]] = None) -> str:
        if not isinstance(value, str) or not value:
            raise self.error(path, "expected a non-empty string, got %s" % _kind(value))
        if choices is not None and value not in choices:
            raise self.error(path, "%r is not one of %s" % (value, ", ".join(choices)))
        return value

    def name(self, value: Any, path: str) -> str:
        s = self.str_(value, path)
        if not _NAME.match(s):
            raise self.error(path, "%r is not a valid name (letters, digits, _ . -)" % s)
        return s

    def int_(self, value: Any, path: str, minimum: int = 1) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(path, "expected an integer, got %s" % _kind(value))
        if value < minimum:
            raise self.error(path, "must be >= %d, got %d" % (minimum, value))
        return value

    def float_(self, value: Any, path: str, positive: bool = False) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(path, "expected a number, got %s" % _kind(value))
        f = float(value)
        if not math.isfinite(f):
            raise self.error(path, "must be finite, got %r" % value)
        if positive and f <= 0.0:
            raise self.error(path, "must be > 0, got %r" % value)
        return f

    def bool_(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise self.error(path, "expected true or false, got %s" % _kind(value))
        return value

    def list_(self, value: Any, path: str, length: Optional[int] = None,
              nonempty: bool = True) -> List[Any]:
        if not isinstance(value, list):
            raise self.error(path, "expected a list, got %s" % _kind(value))
        if length is not None and len(value) != length:
            raise self.error(path, "expected %d entries, got %d" % (length, len(value)))
        if nonempty and not value:
            raise self.error(path, "must not be empty")
        return value

    def floats(self, value: Any, path: str, length: int, positive: bool = False) -> Tuple[float, ...]:
        items = self.list_(value, path, length)
        return tuple(self.float_(v, "%s[%d]" % (path, i), positive) for i, v in enumerate(items))

    def names(self, value: Any, path: str) -> Tuple[str, ...]:
        items = self.list_(value, path)
        out = tuple(self.name(v, "%s[%d]" % (path, i)) for i, v in enumerate(items))
        _check_unique(self, out, path, "name")
        return out


def _join(path: str, key: str) -> str:
    return "%s.%s" % (path, key) if path else key


def _kind(value: Any) -> str:
    return "%s %r" % (type(value).__name__, value) if not isinstance(value, (dict, list)) \
        else type(value).__name__


def _check_unique(ctx: _Ctx, names: Tuple[str, ...], path: str, what: str) -> None:
    seen = set()
    for i, n in enumerate(names):
        if n in seen:
            raise ctx.error("%s[%d]" % (path, i), "duplicate %s %r" % (what, n))
        seen.add(n)


# --- sections ----------------------------------------------------------------

def _camera(ctx: _Ctx, value: Any, path: str) -> CameraSpec:
    d = ctx.obj(value, path, ("name", "height", "width", "resize", "mean", "std", "input"), ("channel_order",))
    stated = "channel_order" in d
    return CameraSpec(
        name=ctx.name(d["name"], path + ".name"),
        height=ctx.int_(d["height"], path + ".height"),
        width=ctx.int_(d["width"], path + ".width"),
        resize=ctx.str_(d["resize"], path + ".resize", RESIZE_MODES),
        mean=ctx.floats(d["mean"], path + ".mean", 3),  # type: ignore[arg-type]
        std=ctx.floats(d["std"], path + ".std", 3, positive=True),  # type: ignore[arg-type]
        input=ctx.name(d["input"], path + ".input"),
        channel_order=ctx.str_(d["channel_order"], path + ".channel_order", CHANNEL_ORDERS) if stated
        else DEFAULT_CHANNEL_ORDER,
        channel_order_stated=stated,
    )


def _state(ctx: _Ctx, value: Any, path: str) -> StateSpec:
    d = ctx.obj(value, path, ("joints", "mean", "std"))
    joints = ctx.names(d["joints"], path + ".joints")
    return StateSpec(joints, ctx.floats(d["mean"], path + ".mean", len(joints)),
                     ctx.floats(d["std"], path + ".std", len(joints), positive=True))


def _action(ctx: _Ctx, value: Any, path: str) -> ActionSpec:
    d = ctx.obj(value, path, ("kind", "joints", "horizon", "step_s", "mean", "std"))
    joints = ctx.names(d["joints"], path + ".joints")
    return ActionSpec(
        kind=ctx.str_(d["kind"], path + ".kind", ACTION_KINDS),
        joints=joints,
        horizon=ctx.int_(d["horizon"], path + ".horizon"),
        step_s=ctx.float_(d["step_s"], path + ".step_s", positive=True),
        mean=ctx.floats(d["mean"], path + ".mean", len(joints)),
        std=ctx.floats(d["std"], path + ".std", len(joints), positive=True),
    )


def _sampler(ctx: _Ctx, value: Any, path: str) -> SamplerSpec:
    d = ctx.obj(value, path, ("type", "steps", "shift", "distilled"))
    return SamplerSpec(
        type=ctx.str_(d["type"], path + ".type", SAMPLER_TYPES),
        steps=ctx.int_(d["steps"], path + ".steps"),
        shift=ctx.float_(d["shift"], path + ".shift", positive=True),
        distilled=ctx.bool_(d["distilled"], path + ".distilled"),
    )


def _rtc(ctx: _Ctx, value: Any, path: str) -> RtcSpec:
    d = ctx.obj(value, path, ("version", "prefix"))
    version = ctx.int_(d["version"], path + ".version")
    if version != RTC_VERSION:
        raise ctx.error(path + ".version", "unsupported rtc version %d (this runtime reads %d)"
                        % (version, RTC_VERSION))
    return RtcSpec(version, ctx.bool_(d["prefix"], path + ".prefix"))


def _start_pose(ctx: _Ctx, value: Any, path: str, joints: Tuple[str, ...]) -> Tuple[Tuple[str, float], ...]:
    """{"<action joint>": rad, ...}: every action joint, no other, each a G1 joint within its position limits.
    The controller moves the robot there after arming, before it executes the first chunk."""
    from runtime.robot import g1  # the joint table; numpy, which the rest of this module does without

    d = ctx.obj(value, path, joints)
    out = []
    for joint in joints:
        where = _join(path, joint)
        rad = ctx.float_(d[joint], where)
        i = g1.JOINT_INDEX.get(joint)
        if i is None:
            raise ctx.error(where, "%r is not a G1 joint: the controller cannot move it" % joint)
        lo, hi = float(g1.POSITION_MIN[i]), float(g1.POSITION_MAX[i])
        if not lo <= rad <= hi:
            raise ctx.error(where, "%r rad lies outside the joint's limits [%g, %g]" % (rad, lo, hi))
        out.append((joint, rad))
    return tuple(out)


def _dims(ctx: _Ctx, value: Any, path: str, length: Optional[int] = None) -> Tuple[int, ...]:
    dims = []
    for i, dim in enumerate(ctx.list_(value, path, length, nonempty=False)):
        if isinstance(dim, str):
            raise ctx.error("%s[%d]" % (path, i), "symbolic dimension %r: write the opt size here "
                            "and the range in \"profile\" (min/opt/max)" % dim)
        dims.append(ctx.int_(dim, "%s[%d]" % (path, i)))
    return tuple(dims)


def _profile(ctx: _Ctx, value: Any, path: str,
             shape: Tuple[int, ...]) -> Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]:
    """{"min": [...], "opt": [...], "max": [...]}: full shapes, each as long as shape, dims >= 1,
    min <= opt <= max, and shape within [min, max]."""
    d = ctx.obj(value, path, ("min", "opt", "max"))
    lo, opt, hi = (_dims(ctx, d[k], "%s.%s" % (path, k), len(shape)) for k in ("min", "opt", "max"))
    for i in range(len(shape)):
        if lo[i] > hi[i]:
            raise ctx.error("%s.min[%d]" % (path, i), "min %d is above max %d" % (lo[i], hi[i]))
        if not lo[i] <= opt[i] <= hi[i]:
            raise ctx.error("%s.opt[%d]" % (path, i), "min <= opt <= max is violated: %d, %d, %d"
                            % (lo[i], opt[i], hi[i]))
        if not lo[i] <= shape[i] <= hi[i]:
            raise ctx.error("%s[%d]" % (path.rsplit(".", 1)[0] + ".shape", i), "%d lies outside the "
                            "profile's [%d, %d]" % (shape[i], lo[i], hi[i]))
    return lo, opt, hi


def _tensor(ctx: _Ctx, value: Any, path: str, is_input: bool) -> TensorSpec:
    d = ctx.obj(value, path, ("name", "dtype", "shape") + (("source",) if is_input else ()),
                ("profile",) if is_input else ("sink", "profile"))
    shape = _dims(ctx, d["shape"], path + ".shape")
    return TensorSpec(
        name=ctx.name(d["name"], path + ".name"),
        dtype=ctx.str_(d["dtype"], path + ".dtype", DTYPES),
        shape=shape,
        source=ctx.str_(d["source"], path + ".source") if is_input else None,
        sink=ctx.str_(d["sink"], path + ".sink", SINKS) if "sink" in d else None,
        profile=_profile(ctx, d["profile"], path + ".profile", shape) if "profile" in d else None,
    )


def _stage(ctx: _Ctx, value: Any, path: str) -> StageSpec:
    d = ctx.obj(value, path, ("name", "file", "sha256", "runs", "inputs", "outputs"), ("data",))
    name = ctx.name(d["name"], path + ".name")
    if name in RESERVED_STAGE_NAMES:
        raise ctx.error(path + ".name", "%r is reserved for sources" % name)
    file, sha = _file_and_hash(ctx, d, path)
    data = None
    if "data" in d:
        data = DataFileSpec(*_file_and_hash(ctx, ctx.obj(d["data"], path + ".data", ("file", "sha256")),
                                            path + ".data"))
        if data.file == file:
            raise ctx.error(path + ".data.file", "%r is the stage's ONNX file itself" % file)
    inputs = tuple(_tensor(ctx, v, "%s.inputs[%d]" % (path, i), True)
                   for i, v in enumerate(ctx.list_(d["inputs"], path + ".inputs")))
    outputs = tuple(_tensor(ctx, v, "%s.outputs[%d]" % (path, i), False)
                    for i, v in enumerate(ctx.list_(d["outputs"], path + ".outputs")))
    _check_unique(ctx, tuple(t.name for t in inputs), path + ".inputs", "input name")
    _check_unique(ctx, tuple(t.name for t in outputs), path + ".outputs", "output name")
    return StageSpec(name, file, sha, ctx.str_(d["runs"], path + ".runs", RUNS), inputs, outputs, data)


def _file_and_hash(ctx: _Ctx, d: Dict[str, Any], path: str) -> Tuple[str, str]:
    """A plain file name in the model directory and its sha256 (64 lowercase hex digits)."""
    file = ctx.str_(d["file"], path + ".file")
    if os.path.basename(file) != file or "/" in file or "\\" in file or file in (".", ".."):
        raise ctx.error(path + ".file", "%r must be a plain file name in the model directory" % file)
    sha = ctx.str_(d["sha256"], path + ".sha256")
    if not _SHA256.match(sha):
        raise ctx.error(path + ".sha256", "expected 64 lowercase hex digits, got %r" % sha)
    return file, sha


# --- cross-references ------------------------------------------------------------

def _check_graph(ctx: _Ctx, m: Manifest) -> None:
    """Every source resolves to something earlier, shapes/dtypes agree, the
    sampler tensors match the action space, each camera feeds its input."""
    action_shape = (1, m.horizon, m.action_dim)
    host = {
        "state": ((1, len(m.state.joints)), "state has %d joints" % len(m.state.joints)),
        "sampler:x": (action_shape, "action horizon %d x %d joints" % (m.horizon, m.action_dim)),
        "sampler:t": ((1,), "flow time is one scalar"),
    }
    for cam in m.cameras:
        host["camera:" + cam.name] = ((1, 3, cam.height, cam.width),
                                      "camera %r is 3x%dx%d" % (cam.name, cam.height, cam.width))
    _check_unique(ctx, m.camera_names, "cameras", "camera name")
    for j, joint in enumerate(m.action.joints):
        if joint not in m.state.joints:
            raise ctx.error("action.joints[%d]" % j, "%r is not among state.joints" % joint)

    rtc_dtypes: Dict[str, Tuple[str, str]] = {}  # rtc source -> (dtype, "<stage>.<input>")
    produced: Dict[str, Tuple[TensorSpec, str]] = {}  # "<stage>:<output>" -> (spec, runs)
    stage_names = set(s.name for s in m.stages)
    camera_inputs: Dict[str, str] = {}  # camera name -> "<stage>.<input>"
    consumed = set()
    seen_per_step = False
    velocity_sinks = []
    for si, stage in enumerate(m.stages):
        spath = "stages[%d]" % si
        if stage.runs == "per_step":
            seen_per_step = True
        elif seen_per_step:
            raise ctx.error(spath + ".runs", "stage %r runs once but comes after a per_step "
                            "stage; list all 'once' stages first" % stage.name)
        for ii, t in enumerate(stage.inputs):
            ipath = "%s.inputs[%d]" % (spath, ii)
            src = t.source or ""
            if src in RTC_SOURCES:
                _check_rtc_input(ctx, m, stage, t, ipath, rtc_dtypes)
                consumed.add(src)
                continue
            if src.startswith("rtc:"):
                raise ctx.error(ipath + ".source", "unknown rtc source %r in stage %r (expected %s)"
                                % (src, stage.name, " or ".join(RTC_SOURCES)))
            if src in host:
                expected, why = host[src]
                if t.dtype != HOST_DTYPE:
                    raise ctx.error(ipath + ".dtype", "%r fed from %s must be %s, got %s"
                                    % (t.name, src, HOST_DTYPE, t.dtype))
                if t.shape != expected:
                    raise ctx.error(ipath + ".shape", "%r fed from %s must have shape %s (%s), "
                                    "got %s" % (t.name, src, list(expected), why, list(t.shape)))
                if src.startswith("sampler:") and stage.runs != "per_step":
                    raise ctx.error(ipath + ".source", "%s changes every sampler step; stage %r "
                                    "must run per_step" % (src, stage.name))
                if src.startswith("camera:"):
                    cam_name = src[len("camera:"):]
                    if cam_name in camera_inputs:
                        raise ctx.error(ipath + ".source", "camera %r already feeds %s"
                                        % (cam_name, camera_inputs[cam_name]))
                    camera_inputs[cam_name] = "%s.%s" % (stage.name, t.name)
                consumed.add(src)
                continue
            if ":" not in src:
                raise ctx.error(ipath + ".source", "unknown source %r (expected camera:<name>, "
                                "state, sampler:x, sampler:t or <stage>:<output>)" % src)
            ref_stage, ref_out = src.split(":", 1)
            if ref_stage == "camera":
                raise ctx.error(ipath + ".source", "unknown camera %r (cameras: %s)"
                                % (ref_out, ", ".join(m.camera_names)))
            if ref_stage == "rtc":  # never reached: rtc:* is handled above
                raise ctx.error(ipath + ".source", "unknown rtc source %r" % src)
            if ref_stage == "sampler":
                raise ctx.error(ipath + ".source", "unknown sampler tensor %r (sampler:x or "
                                "sampler:t)" % ref_out)
            if src not in produced:
                if ref_stage not in stage_names:
                    raise ctx.error(ipath + ".source", "unknown stage %r" % ref_stage)
                if ref_stage == stage.name:
                    raise ctx.error(ipath + ".source", "stage %r cannot consume its own output"
                                    % stage.name)
                if not any(s.name == ref_stage for s in m.stages[:si]):
                    raise ctx.error(ipath + ".source", "stage %r must come before stage %r to "
                                    "feed it" % (ref_stage, stage.name))
                raise ctx.error(ipath + ".source", "stage %r has no output %r"
                                % (ref_stage, ref_out))
            spec, runs = produced[src]
            if runs == "per_step" and stage.runs == "once":
                raise ctx.error(ipath + ".source", "once stage %r cannot consume per_step "
                                "output %s" % (stage.name, src))
            if spec.dtype != t.dtype:
                raise ctx.error(ipath + ".dtype", "%r is %s but its source %s is %s"
                                % (t.name, t.dtype, src, spec.dtype))
            if spec.shape != t.shape:
                raise ctx.error(ipath + ".shape", "%r has shape %s but its source %s has shape %s"
                                % (t.name, list(t.shape), src, list(spec.shape)))
            _check_profile_covers(ctx, t, spec, ipath, src)
            consumed.add(src)
        for oi, t in enumerate(stage.outputs):
            opath = "%s.outputs[%d]" % (spath, oi)
            produced["%s:%s" % (stage.name, t.name)] = (t, stage.runs)
            if t.sink is None:
                continue
            if stage.runs != "per_step":
                raise ctx.error(opath + ".sink", "%s needs a per_step stage, %r runs once"
                                % (t.sink, stage.name))
            if t.dtype != HOST_DTYPE:
                raise ctx.error(opath + ".dtype", "%r sinks to %s and must be %s, got %s"
                                % (t.name, t.sink, HOST_DTYPE, t.dtype))
            if t.shape != action_shape:
                raise ctx.error(opath + ".shape", "%r sinks to %s and must have shape %s (action "
                                "horizon %d x %d joints), got %s"
                                % (t.name, t.sink, list(action_shape), m.horizon, m.action_dim,
                                   list(t.shape)))
            velocity_sinks.append(opath)

    if len(velocity_sinks) != 1:
        raise ctx.error("stages", "exactly one output must have sink 'sampler:velocity', found %d%s"
                        % (len(velocity_sinks), (" (%s)" % ", ".join(velocity_sinks))
                           if velocity_sinks else ""))
    if "sampler:x" not in consumed:
        raise ctx.error("stages", "no stage input has source 'sampler:x'")
    if m.supports_rtc and "rtc:prefix" not in consumed:
        raise ctx.error("rtc.prefix", "the manifest declares rtc prefix support but no stage input "
                        "has source 'rtc:prefix'")
    for ci, cam in enumerate(m.cameras):
        fed = camera_inputs.get(cam.name)
        if fed is None:
            raise ctx.error("cameras[%d]" % ci, "camera %r feeds no stage input (no source "
                            "'camera:%s')" % (cam.name, cam.name))
        if fed.split(".", 1)[1] != cam.input:
            raise ctx.error("cameras[%d].input" % ci, "camera %r says it feeds %r but the stage "
                            "input with source 'camera:%s' is %s" % (cam.name, cam.input,
                                                                     cam.name, fed))


def _check_profile_covers(ctx: _Ctx, t: TensorSpec, source: TensorSpec, ipath: str, src: str) -> None:
    """Every shape the producer can emit must be one the consumer accepts."""
    lo, hi = (source.profile[0], source.profile[2]) if source.profile else (source.shape, source.shape)
    t_lo, t_hi = (t.profile[0], t.profile[2]) if t.profile else (t.shape, t.shape)
    for i in range(len(t.shape)):
        if lo[i] < t_lo[i] or hi[i] > t_hi[i]:
            raise ctx.error(ipath + (".profile" if t.profile else ".shape"), "%r axis %d takes [%d, %d] but its "
                            "source %s ranges over [%d, %d]" % (t.name, i, t_lo[i], t_hi[i], src, lo[i], hi[i]))


def _check_rtc_input(ctx: _Ctx, m: Manifest, stage: StageSpec, t: TensorSpec, ipath: str,
                     rtc_dtypes: Dict[str, Tuple[str, str]]) -> None:
    src = t.source or ""
    if not m.supports_rtc:
        raise ctx.error(ipath + ".source", "stage %r input %r has source %r, but the manifest does "
                        "not declare \"rtc\": {\"version\": %d, \"prefix\": true}"
                        % (stage.name, t.name, src, RTC_VERSION))
    if src == "rtc:prefix":
        expected: Tuple[int, ...] = (1, m.horizon, m.action_dim)
        why = "action horizon %d x %d joints" % (m.horizon, m.action_dim)
        dtypes: Tuple[str, ...] = (HOST_DTYPE,)
    else:
        expected, why, dtypes = (1,), "one scalar: actions of delay", RTC_DELAY_DTYPES
    if t.dtype not in dtypes:
        raise ctx.error(ipath + ".dtype", "stage %r input %r fed from %s must be %s, got %s"
                        % (stage.name, t.name, src, " or ".join(dtypes), t.dtype))
    if t.shape != expected:
        raise ctx.error(ipath + ".shape", "stage %r input %r fed from %s must have shape %s (%s), "
                        "got %s" % (stage.name, t.name, src, list(expected), why, list(t.shape)))
    seen = rtc_dtypes.get(src)
    if seen is not None and seen[0] != t.dtype:
        # consumers of one host source may share one buffer, so they must agree
        raise ctx.error(ipath + ".dtype", "stage %r input %r fed from %s is %s but %s is %s"
                        % (stage.name, t.name, src, t.dtype, seen[1], seen[0]))
    rtc_dtypes.setdefault(src, (t.dtype, "%s.%s" % (stage.name, t.name)))


def parse_manifest(data: Any, where: str = "manifest.json") -> Manifest:
    """Validate an already-decoded manifest; `where` prefixes every error."""
    ctx = _Ctx(where)
    d = ctx.obj(data, "", ("format", "version", "name", "cameras", "state", "action",
                           "sampler", "stages"), ("description", "rtc", "start_pose"))
    if d["format"] != FORMAT:
        raise ctx.error("format", "expected %r, got %r" % (FORMAT, d["format"]))
    version = ctx.int_(d["version"], "version")
    if version != VERSION:
        raise ctx.error("version", "unsupported manifest version %d (this runtime reads %d)"
                        % (version, VERSION))
    description = d.get("description", "")
    if not isinstance(description, str):
        raise ctx.error("description", "expected a string, got %s" % _kind(description))
    cameras = tuple(_camera(ctx, v, "cameras[%d]" % i)
                    for i, v in enumerate(ctx.list_(d["cameras"], "cameras")))
    stages = tuple(_stage(ctx, v, "stages[%d]" % i)
                   for i, v in enumerate(ctx.list_(d["stages"], "stages")))
    _check_unique(ctx, tuple(s.name for s in stages), "stages", "stage name")
    _check_unique(ctx, tuple(s.file for s in stages), "stages", "stage file")
    action = _action(ctx, d["action"], "action")
    m = Manifest(
        name=ctx.name(d["name"], "name"),
        description=description,
        cameras=cameras,
        state=_state(ctx, d["state"], "state"),
        action=action,
        sampler=_sampler(ctx, d["sampler"], "sampler"),
        stages=stages,
        path=where,
        rtc=_rtc(ctx, d["rtc"], "rtc") if "rtc" in d else None,
        start_pose=_start_pose(ctx, d["start_pose"], "start_pose", action.joints) if "start_pose" in d else None,
    )
    _check_graph(ctx, m)
    return m


def _reject_duplicates(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError("duplicate key %r" % key)
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError("%s is not valid JSON" % name)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_files(manifest: Manifest, model_dir: str, check_hashes: bool = True) -> None:
    """Every stage file (and external data file) exists and (optionally) matches its recorded sha256."""
    for i, stage in enumerate(manifest.stages):
        files = [("stages[%d]" % i, stage.file, stage.sha256)]
        if stage.data is not None:
            files.append(("stages[%d].data" % i, stage.data.file, stage.data.sha256))
        for key, file, sha in files:
            path = os.path.join(model_dir, file)
            if not os.path.isfile(path):
                raise ManifestError("%s: %s.file: %s does not exist" % (manifest.path, key, path))
            if check_hashes:
                actual = sha256_file(path)
                if actual != sha:
                    raise ManifestError(
                        "%s: sha256 mismatch (manifest %s.sha256 %s..., file %s...): the file "
                        "changed after export; re-export the model (`wam-edge export`; the reference: `make "
                        "reference`) instead of editing it" % (path, key, sha[:12], actual[:12]))


def load_manifest(model_dir: str, verify_hashes: bool = True) -> Manifest:
    """Read <model_dir>/manifest.json, validate it, check the stage files."""
    manifest = read_manifest(model_dir)
    verify_files(manifest, model_dir, check_hashes=verify_hashes)
    return manifest


def read_manifest(model_dir: str) -> Manifest:
    """Read and validate <model_dir>/manifest.json alone, without its stage files (the controller reads the start
    pose this way)."""
    path = os.path.join(model_dir, "manifest.json")
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f, object_pairs_hook=_reject_duplicates,
                             parse_constant=_reject_constant)
    except OSError as exc:
        raise ManifestError("%s: cannot read: %s" % (path, exc.strerror or exc)) from exc
    except ValueError as exc:  # JSONDecodeError included
        raise ManifestError("%s: invalid JSON: %s" % (path, exc)) from exc
    return parse_manifest(data, path)
