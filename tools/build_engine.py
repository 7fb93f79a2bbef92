"""`wam-edge build`: turn each ONNX stage of a model into a TensorRT engine, on the robot.

An engine is tied to the TensorRT version and the GPU it was built on, so it is
built where it runs (JetPack ships TensorRT). Beside each ``<stage>.engine`` goes
``<stage>.engine.json`` (runtime/policy/backends/engine_meta.py): TensorRT version,
GPU name and compute capability, precision, builder flags and the ONNX sha256, which
the runtime checks before it loads the engine.

The file has two halves. The planning half (argument handling, precisions,
optimisation profiles, capability checks, metadata) is pure Python and runs
anywhere, `--dry-run` included. The TensorRT half ("TensorRT calls" below) is a
few small functions, one per builder step, each a handful of calls from NVIDIA's
documented Python API (TensorRT 8.5 through 10.x), so a reader can check them line
by line. Never imports torch; imports tensorrt only inside functions.

FP32 norms (``--fp32-norms``, on by default; ``--no-fp32-norms``): in a stage built in fp16 or bf16, the
normalisations written out as primitives (RMSNorm; layer norm on TensorRT 8.5, which has no normalisation layer)
are pinned to FP32 with precision constraints, because the square they average overflows FP16 above 256. See
find_decomposed_norms. The metadata records it ("fp32 norms: N", and OBEY_PRECISION_CONSTRAINTS when N > 0).

Precision grammar (``--precision``): comma-separated items, each either a bare
precision, the default for every stage not named, or ``<stage>=<precision>``.
``fp16`` builds all stages in FP16; ``fp32,action_expert=fp16`` builds the action
expert in FP16 and every other stage in FP32. Without a bare item, unnamed stages
get fp16 (fast on every Jetson; use fp32 or bf16 for stages that overflow in FP16).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from runtime.policy.backends import EngineFileMissing, TrtPlatform, engine_path, probe_tensorrt, read_engine_meta
from runtime.policy.backends.engine_meta import (
    VERSION_COMPATIBLE,
    EngineMeta,
    EngineMetaError,
    EngineMismatch,
    check_engine,
    check_engine_bytes,
    meta_path,
    parse_version,
    write_meta,
)
from runtime.policy.manifest import Manifest, ManifestError, StageSpec, load_manifest, sha256_file

BUILD_PRECISIONS = ("fp32", "fp16", "bf16")
DEFAULT_PRECISION = "fp16"
DEFAULT_MODEL = os.path.join("exported", "reference")
DEFAULT_WORKSPACE_MB = 1024
DEFAULT_OPT_LEVEL = 3  # TensorRT's own default
OPT_LEVELS = range(0, 6)
TIMING_CACHE_NAME = "timing.cache"

# What each build precision sets on the builder config (TensorRT BuilderFlag names).
PRECISION_FLAGS: Dict[str, Tuple[str, ...]] = {"fp32": (), "fp16": ("FP16",), "bf16": ("BF16",)}
# Precisions whose stages get their decomposed normalisations pinned to FP32 (--fp32-norms).
FP32_NORMS_PRECISIONS = ("fp16", "bf16")
# Set when a layer was pinned: TensorRT then honours the layers' precisions (8.2+; deprecated with the rest of
# weak typing, BuilderFlag.FP16 included, in 10.12, removed in 11).
OBEY_PRECISION_CONSTRAINTS = "OBEY_PRECISION_CONSTRAINTS"
# The metadata's record of --fp32-norms for a stage: how many normalisations were pinned.
FP32_NORMS_RECORD = "fp32 norms: %d"
_FP32_NORMS_PREFIX = "fp32 norms: "

# Oldest TensorRT for each feature (major, minor).
MIN_TRT = (8, 5)                 # the name-based tensor API and set_memory_pool_limit
MIN_TRT_BF16 = (9, 0)            # BuilderFlag.BF16
MIN_TRT_OPT_LEVEL = (8, 6)       # IBuilderConfig.builder_optimization_level
MIN_TRT_VERSION_COMPATIBLE = (8, 6)  # BuilderFlag.VERSION_COMPATIBLE
MIN_CC_BF16 = (8, 0)             # Ampere and later (Orin is 8.7)
NO_EXPLICIT_BATCH_FLAG_FROM = 10  # TensorRT 10: networks are always explicit batch

EXIT_OK = 0
EXIT_BUILD_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_TENSORRT = 3


class OptionError(ValueError):
    """The options do not fit the model or this TensorRT / GPU (exit 2)."""


class BuildError(RuntimeError):
    """A stage could not be built; the message names the stage and the file (exit 1)."""


class ProfileShape(NamedTuple):
    """One input's optimisation-profile shapes, as IOptimizationProfile.set_shape takes them."""
    name: str
    min: Tuple[int, ...]
    opt: Tuple[int, ...]
    max: Tuple[int, ...]


@dataclass(frozen=True)
class BuildOptions:
    """Everything a build run needs besides the model."""
    precisions: Dict[str, str]            # stage name -> one of BUILD_PRECISIONS
    workspace_mb: int = DEFAULT_WORKSPACE_MB
    opt_level: int = DEFAULT_OPT_LEVEL
    timing_cache: Optional[str] = None    # path; None: no timing cache
    version_compatible: bool = False
    stages: Tuple[str, ...] = ()          # empty: every stage
    force: bool = False
    fp32_norms: bool = True               # pin decomposed normalisations to FP32 in fp16/bf16 stages

    def __post_init__(self) -> None:
        if isinstance(self.workspace_mb, bool) or not isinstance(self.workspace_mb, int) or self.workspace_mb <= 0:
            raise OptionError("workspace: expected a positive number of MiB, got %r" % (self.workspace_mb,))
        if isinstance(self.opt_level, bool) or self.opt_level not in OPT_LEVELS:
            raise OptionError("optimisation level: expected 0..5, got %r" % (self.opt_level,))
        if not isinstance(self.fp32_norms, bool):
            raise OptionError("fp32 norms: expected True or False, got %r" % (self.fp32_norms,))
        for stage, precision in self.precisions.items():
            if precision not in BUILD_PRECISIONS:
                raise OptionError("stage %r: precision %r is not one of %s"
                                  % (stage, precision, ", ".join(BUILD_PRECISIONS)))

    @property
    def workspace_bytes(self) -> int:
        return self.workspace_mb << 20


class StageResult(NamedTuple):
    stage: str
    precision: str
    built: bool          # False: skipped, already up to date
    seconds: float
    engine_bytes: int
    engine: str          # path
    note: str            # why it was built or skipped
    fp32_norms: Optional[int] = None  # normalisations pinned to FP32; None: not asked (fp32 stage, --no-fp32-norms)


class BuiltStage(NamedTuple):
    """What build_stage made."""
    engine_bytes: int
    fp32_norms: Optional[int]  # normalisations pinned to FP32; None: not asked


# --- planning (pure) ----------------------------------------------------------------------------------------------

def parse_precisions(text: str, stage_names: Sequence[str], default: str = DEFAULT_PRECISION) -> Dict[str, str]:
    """``fp16`` or ``world=fp32,action_expert=fp16`` or ``fp32,action_expert=fp16`` -> {stage: precision}
    for every stage (see the module docstring). Unknown stages and precisions are OptionError."""
    overrides: Dict[str, str] = {}
    bare: Optional[str] = None
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(not item for item in items):
        raise OptionError("--precision %r: expected PRECISION or STAGE=PRECISION items separated by commas" % text)
    for item in items:
        stage, sep, precision = (part.strip() for part in item.partition("="))
        if not sep:
            stage, precision = "", stage
        if precision not in BUILD_PRECISIONS:
            raise OptionError("--precision %r: %r is not one of %s" % (text, precision, ", ".join(BUILD_PRECISIONS)))
        if not stage:
            if sep:
                raise OptionError("--precision %r: %r names no stage" % (text, item))
            if bare is not None:
                raise OptionError("--precision %r: more than one default precision (%s, %s)"
                                  % (text, bare, precision))
            bare = precision
            continue
        if stage not in stage_names:
            raise OptionError("--precision %r: unknown stage %r (stages: %s)" % (text, stage, ", ".join(stage_names)))
        if stage in overrides:
            raise OptionError("--precision %r: stage %r given twice" % (text, stage))
        overrides[stage] = precision
    base = bare if bare is not None else default
    return {name: overrides.get(name, base) for name in stage_names}


def select_stages(manifest: Manifest, names: Sequence[str]) -> List[StageSpec]:
    """The stages to build, in manifest order; ``names`` empty: all of them."""
    known = [s.name for s in manifest.stages]
    for name in names:
        if name not in known:
            raise OptionError("--stage %r: unknown stage (stages: %s)" % (name, ", ".join(known)))
    return [s for s in manifest.stages if not names or s.name in names]


def plan_profiles(stage: StageSpec) -> List[ProfileShape]:
    """(name, min, opt, max) for every input the manifest gives a profile; static inputs have none."""
    out = []
    for t in stage.inputs:
        profile = getattr(t, "profile", None)  # TensorSpec.profile: optional (min, opt, max) shape triple
        if profile is None:
            continue
        lo, opt, hi = (tuple(int(d) for d in shape) for shape in profile)
        if not len(lo) == len(opt) == len(hi):
            raise OptionError("stage %r input %r: profile min/opt/max have different ranks %d/%d/%d"
                              % (stage.name, t.name, len(lo), len(opt), len(hi)))
        for axis in range(len(lo)):
            if not 1 <= lo[axis] <= opt[axis] <= hi[axis]:
                raise OptionError("stage %r input %r axis %d: profile needs 1 <= min <= opt <= max, got %d/%d/%d"
                                  % (stage.name, t.name, axis, lo[axis], opt[axis], hi[axis]))
        out.append(ProfileShape(t.name, lo, opt, hi))
    return out


def resolve_profiles(stage: StageSpec, network_inputs: Sequence[Tuple[str, Tuple[int, ...]]]) -> List[ProfileShape]:
    """The profile shapes for the parsed network's inputs (name, dims with -1 for dynamic axes).

    Checks every input against the manifest: same names, same rank, every static
    graph dimension equal to the manifest's and to every profile shape. A dynamic
    graph axis needs a manifest profile, unless the manifest gives that input a
    static shape: then the profile is pinned to it (min = opt = max)."""
    declared = {t.name: t for t in stage.inputs}
    profiles = {p.name: p for p in plan_profiles(stage)}
    graph_names = [name for name, _ in network_inputs]
    for name in declared:
        if name not in graph_names:
            raise BuildError("stage %r: the manifest input %r is not an input of the ONNX graph (graph inputs: %s)"
                             % (stage.name, name, ", ".join(graph_names)))
    out = []
    for name, dims in network_inputs:
        spec = declared.get(name)
        if spec is None:
            raise BuildError("stage %r: the ONNX graph input %r is not in the manifest (manifest inputs: %s)"
                             % (stage.name, name, ", ".join(declared)))
        dims = tuple(int(d) for d in dims)
        shape = tuple(spec.shape)
        if len(dims) != len(shape):
            raise BuildError("stage %r input %r: the ONNX graph has rank %d %s, the manifest rank %d %s"
                             % (stage.name, name, len(dims), list(dims), len(shape), list(shape)))
        profile = profiles.get(name)
        if profile is not None and len(profile.min) != len(dims):
            raise BuildError("stage %r input %r: the manifest profile has rank %d, the ONNX graph rank %d %s"
                             % (stage.name, name, len(profile.min), len(dims), list(dims)))
        for axis, (dim, want) in enumerate(zip(dims, shape)):
            if dim >= 0 and isinstance(want, int) and dim != want:
                raise BuildError("stage %r input %r axis %d: the ONNX graph says %d, the manifest %d (shape %s vs %s)"
                                 % (stage.name, name, axis, dim, want, list(dims), list(shape)))
            if dim >= 0 and profile is not None and not (
                    profile.min[axis] == profile.opt[axis] == profile.max[axis] == dim):
                raise BuildError("stage %r input %r axis %d is static (%d) in the ONNX graph, but the manifest "
                                 "profile gives min/opt/max %d/%d/%d"
                                 % (stage.name, name, axis, dim, profile.min[axis], profile.opt[axis],
                                    profile.max[axis]))
        if all(d >= 0 for d in dims):
            continue
        if profile is None:
            if not all(isinstance(d, int) for d in shape):
                raise BuildError("stage %r input %r: dynamic axes %s in the ONNX graph but no profile in the manifest"
                                 % (stage.name, name, [a for a, d in enumerate(dims) if d < 0]))
            profile = ProfileShape(name, shape, shape, shape)  # pinned to the manifest's static shape
        out.append(profile)
    return out


def flag_names(precision: str, version_compatible: bool) -> List[str]:
    """The BuilderFlag names a build sets from its options (find_decomposed_norms may add
    OBEY_PRECISION_CONSTRAINTS); the metadata records them."""
    return list(PRECISION_FLAGS[precision]) + ([VERSION_COMPATIBLE] if version_compatible else [])


def fp32_norms_apply(precision: str, options: BuildOptions) -> bool:
    """Whether a stage of this precision gets its decomposed normalisations pinned to FP32."""
    return options.fp32_norms and precision in FP32_NORMS_PRECISIONS


def recorded_flags(precision: str, options: BuildOptions, fp32_norms: Optional[int]) -> List[str]:
    """What the metadata's builder_flags say: the flags set, and for --fp32-norms how many norms were pinned."""
    flags = flag_names(precision, options.version_compatible)
    if fp32_norms is not None:
        flags += ([OBEY_PRECISION_CONSTRAINTS] if fp32_norms else []) + [FP32_NORMS_RECORD % fp32_norms]
    return flags


def fp32_norms_recorded(builder_flags: Sequence[str]) -> Optional[int]:
    """The count in recorded builder flags ("fp32 norms: N"); None when the engine was built without."""
    for flag in builder_flags:
        if flag.startswith(_FP32_NORMS_PREFIX) and flag[len(_FP32_NORMS_PREFIX):].isdigit():
            return int(flag[len(_FP32_NORMS_PREFIX):])
    return None


def _major_minor(text: str, what: str) -> Tuple[int, int]:
    parts = text.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise OptionError("%s %r is not major.minor[.patch]" % (what, text)) from None


def check_capabilities(trt_version: str, compute_capability: str, options: BuildOptions) -> None:
    """Refuse what this TensorRT or GPU cannot build, naming the stage or option and what was found."""
    trt = _major_minor(trt_version, "TensorRT version")
    cc = _major_minor(compute_capability, "compute capability")
    problems = []
    try:
        parse_version(trt_version)
    except ValueError as exc:
        problems.append("engine metadata cannot record this TensorRT version: %s" % exc)
    if trt < MIN_TRT:
        problems.append("TensorRT %s is too old: this builder needs TensorRT >= %d.%d" % ((trt_version,) + MIN_TRT))
    for stage, precision in sorted(options.precisions.items()):
        if precision != "bf16" or (options.stages and stage not in options.stages):
            continue
        if trt < MIN_TRT_BF16:
            problems.append("stage %r: precision bf16 needs TensorRT >= %d.%d, found %s"
                            % ((stage,) + MIN_TRT_BF16 + (trt_version,)))
        if cc < MIN_CC_BF16:
            problems.append("stage %r: precision bf16 needs a GPU of compute capability >= %d.%d, this one is %s"
                            % ((stage,) + MIN_CC_BF16 + (compute_capability,)))
    if options.version_compatible and trt < MIN_TRT_VERSION_COMPATIBLE:
        problems.append("--version-compatible needs TensorRT >= %d.%d, found %s"
                        % (MIN_TRT_VERSION_COMPATIBLE + (trt_version,)))
    if options.opt_level != DEFAULT_OPT_LEVEL and trt < MIN_TRT_OPT_LEVEL:
        problems.append("--opt-level %d needs TensorRT >= %d.%d (builder optimisation levels), found %s; leave it at %d"
                        % ((options.opt_level,) + MIN_TRT_OPT_LEVEL + (trt_version, DEFAULT_OPT_LEVEL)))
    if problems:
        raise OptionError("; ".join(problems))


def engine_meta(stage: StageSpec, precision: str, options: BuildOptions, platform: TrtPlatform,
                engine_sha256: str = "", fp32_norms: Optional[int] = None) -> EngineMeta:
    """What goes beside the engine (engine_sha256: of the engine file written; fp32_norms: how many
    normalisations were pinned to FP32, None when not asked)."""
    return EngineMeta(stage=stage.name, onnx_sha256=stage.sha256, trt_version=platform.trt_version,
                      gpu_name=platform.gpu_name, compute_capability=platform.compute_capability,
                      precision=precision, builder_flags=tuple(recorded_flags(precision, options, fp32_norms)),
                      engine_sha256=engine_sha256)


def up_to_date(model_dir: str, stage: StageSpec, precision: str, options: BuildOptions,
               platform: TrtPlatform) -> Tuple[bool, str]:
    """(True, why) when ``<stage>.engine`` and its metadata match this stage, TensorRT, GPU and options."""
    path = engine_path(model_dir, stage.name)
    if not os.path.isfile(path):
        return False, "no engine yet"
    try:
        meta = read_engine_meta(stage.name, model_dir)
        check_engine(meta, stage=stage.name, onnx_sha256=stage.sha256, trt_version=platform.trt_version,
                     gpu_name=platform.gpu_name, compute_capability=platform.compute_capability)
        check_engine_bytes(meta, sha256_file(path))
    except (EngineFileMissing, EngineMetaError, EngineMismatch) as exc:
        return False, str(exc)
    if meta.precision != precision:
        return False, "precision: recorded %s, asked %s" % (meta.precision, precision)
    pinned = fp32_norms_recorded(meta.builder_flags)
    asked = flag_names(precision, options.version_compatible)
    recorded = [f for f in meta.builder_flags
                if f != OBEY_PRECISION_CONSTRAINTS and not f.startswith(_FP32_NORMS_PREFIX)]
    if sorted(recorded) != sorted(asked):
        return False, "builder flags: recorded %s, asked %s" % (recorded, asked)
    if (pinned is not None) != fp32_norms_apply(precision, options):
        return False, "fp32 norms: recorded %s, asked %s" % ("off" if pinned is None else "on (%d)" % pinned,
                                                            "on" if fp32_norms_apply(precision, options) else "off")
    return True, "up to date (TensorRT %s, %s, sm %s, %s)" % (
        meta.trt_version, meta.gpu_name, meta.compute_capability, meta.precision)


def describe_plan(manifest: Manifest, model_dir: str, options: BuildOptions) -> List[str]:
    """The dry-run text: what would be built, with which options; needs no TensorRT."""
    stages = select_stages(manifest, options.stages)
    lines = ["model %s (%s): %d of %d stages" % (model_dir, manifest.name, len(stages), len(manifest.stages)),
             "workspace %d MiB, optimisation level %d, timing cache %s, version-compatible %s, force %s"
             % (options.workspace_mb, options.opt_level, options.timing_cache or "none",
                "yes" if options.version_compatible else "no", "yes" if options.force else "no"),
             "fp32 norms %s" % ("on: in fp16/bf16 stages, normalisations written out as primitives are pinned to "
                                "FP32 (%s)" % OBEY_PRECISION_CONSTRAINTS if options.fp32_norms
                                else "off (--no-fp32-norms)")]
    for stage in stages:
        precision = options.precisions[stage.name]
        engine = engine_path(model_dir, stage.name)
        profiles = plan_profiles(stage)
        shapes = "; ".join("%s min %s opt %s max %s" % (p.name, list(p.min), list(p.opt), list(p.max))
                           for p in profiles) or "static shapes"
        lines.append("%s: %s -> %s, %s, flags [%s], fp32 norms %s, %s%s" % (
            stage.name, stage.file, os.path.basename(engine), precision,
            ", ".join(flag_names(precision, options.version_compatible)),
            "on" if fp32_norms_apply(precision, options) else "off", shapes,
            " (engine exists: checked against TensorRT and the GPU when built)" if os.path.isfile(engine) else ""))
    return lines


def _atomic_write(path: str, data: Any) -> None:
    """Write bytes (or any buffer, e.g. TensorRT's IHostMemory) to path via tmp + os.replace."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# --- TensorRT calls: each step a few lines of NVIDIA's documented Python API (8.5 .. 10.x) ------------------------

class TrtSession(NamedTuple):
    trt: Any       # the tensorrt module
    logger: Any    # trt.Logger
    builder: Any   # trt.Builder, shared by every stage of a run


def import_tensorrt() -> Any:
    import tensorrt  # noqa: PLC0415 (only on machines with TensorRT)

    return tensorrt


def open_session(trt: Any) -> TrtSession:
    logger = trt.Logger(trt.Logger.WARNING)
    return TrtSession(trt, logger, trt.Builder(logger))


def create_network(s: TrtSession) -> Any:
    """Explicit batch: a creation flag before TensorRT 10, always so (flag deprecated) from 10 on."""
    if _major_minor(s.trt.__version__, "TensorRT version")[0] >= NO_EXPLICIT_BATCH_FLAG_FROM:
        flags = 0
    else:
        flags = 1 << int(s.trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    return s.builder.create_network(flags)


def parse_onnx(s: TrtSession, network: Any, stage: str, onnx_file: str) -> Any:
    """Returns the parser, which owns the weights: keep it alive until the build is done."""
    parser = s.trt.OnnxParser(network, s.logger)
    if not parser.parse_from_file(onnx_file):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildError("stage %r: TensorRT's ONNX parser rejected %s: %s"
                         % (stage, onnx_file, "; ".join(errors) or "(it reported no error)"))
    return parser


def network_inputs(network: Any) -> List[Tuple[str, Tuple[int, ...]]]:
    """(name, dims) of every network input; -1 marks a dynamic axis."""
    out = []
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tensor.shape
        out.append((tensor.name, tuple(int(shape[j]) for j in range(len(shape)))))
    return out


def _typed(trt: Any, layer: Any) -> Tuple[Any, Any]:
    """(type, op) of a layer; op only for the three layer kinds a norm is made of, else None. TensorRT's Python
    API returns every layer as ILayer: the concrete class (which has ``op``) is set by hand, as polygraphy does."""
    classes = {trt.LayerType.ELEMENTWISE: trt.IElementWiseLayer, trt.LayerType.REDUCE: trt.IReduceLayer,
               trt.LayerType.UNARY: trt.IUnaryLayer}
    kind = layer.type
    if kind not in classes:
        return kind, None
    layer.__class__ = classes[kind]
    return kind, layer.op


def find_decomposed_norms(trt: Any, network: Any) -> List[List[Any]]:
    """The layers of each normalisation written out as primitives (RMSNorm; layer norm where the parser has no
    normalisation layer, TensorRT 8.5), one list per norm, in network order. The rules:

    - the anchor: a REDUCE layer with op AVG whose input 0 is made by a square: an ELEMENTWISE POW (any exponent;
      norms use 2) or an ELEMENTWISE PROD whose two inputs are one tensor;
    - then, each the only consumer of the previous layer's output: an optional ELEMENTWISE SUM (the epsilon), a
      UNARY SQRT, and the first layer after the SQRT when it is a UNARY RECIP or an ELEMENTWISE DIV or PROD (what
      applies the scale). Anything else ends the chain: what was matched so far is the norm.

    A square's overflow needs the square and the mean in FP32; the rest of the chain keeps the tiny variance
    and its root out of FP16 too. TensorRT's normalisation layer (INormalizationLayer, 8.6+) computes in FP32
    itself and is never matched."""
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    producer: Dict[str, Any] = {}
    consumers: Dict[str, List[Any]] = {}
    for layer in layers:
        for i in range(layer.num_outputs):
            producer[layer.get_output(i).name] = layer
        for i in range(layer.num_inputs):
            tensor = layer.get_input(i)
            if tensor is not None:  # optional inputs left out are None
                consumers.setdefault(tensor.name, []).append(layer)
    E, U = trt.ElementWiseOperation, trt.UnaryOperation

    def is_(layer: Any, kind: Any, *ops: Any) -> bool:
        if layer is None:
            return False
        found, op = _typed(trt, layer)
        return found == kind and op in ops

    def next_of(layer: Any) -> Any:
        users = consumers.get(layer.get_output(0).name, [])
        return users[0] if len(users) == 1 else None

    def is_square(layer: Any) -> bool:
        if is_(layer, trt.LayerType.ELEMENTWISE, E.POW):
            return True
        return is_(layer, trt.LayerType.ELEMENTWISE, E.PROD) and layer.get_input(0).name == layer.get_input(1).name

    norms = []
    for layer in layers:
        if not is_(layer, trt.LayerType.REDUCE, trt.ReduceOperation.AVG):
            continue
        square = producer.get(layer.get_input(0).name)
        if not is_square(square):
            continue
        chain = [square, layer]
        step = next_of(layer)
        if is_(step, trt.LayerType.ELEMENTWISE, E.SUM):
            chain.append(step)
            step = next_of(step)
        if is_(step, trt.LayerType.UNARY, U.SQRT):
            chain.append(step)
            step = next_of(step)
            if is_(step, trt.LayerType.UNARY, U.RECIP) or is_(step, trt.LayerType.ELEMENTWISE, E.DIV, E.PROD):
                chain.append(step)
        norms.append(chain)
    return norms


def pin_to_fp32(trt: Any, config: Any, layers: Sequence[Any], stage: str) -> None:
    """Run these layers in FP32 (precision and every output type) and make TensorRT obey it: without
    OBEY_PRECISION_CONSTRAINTS the builder treats layer precisions as hints it may ignore."""
    if not layers:
        return
    if not hasattr(trt.BuilderFlag, OBEY_PRECISION_CONSTRAINTS):
        raise BuildError("stage %r: TensorRT %s has no BuilderFlag.%s (weak typing was removed in TensorRT 11), so "
                         "normalisations cannot be pinned to FP32; build with --no-fp32-norms"
                         % (stage, trt.__version__, OBEY_PRECISION_CONSTRAINTS))
    for layer in layers:
        layer.precision = trt.float32
        for i in range(layer.num_outputs):
            layer.set_output_type(i, trt.float32)
    config.set_flag(getattr(trt.BuilderFlag, OBEY_PRECISION_CONSTRAINTS))


def create_config(s: TrtSession, precision: str, options: BuildOptions) -> Any:
    config = s.builder.create_builder_config()
    config.set_memory_pool_limit(s.trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    for name in flag_names(precision, options.version_compatible):
        config.set_flag(getattr(s.trt.BuilderFlag, name))
    if precision == "fp32":
        config.clear_flag(s.trt.BuilderFlag.TF32)  # on by default from Ampere; fp32 means fp32
    if _major_minor(s.trt.__version__, "TensorRT version") >= MIN_TRT_OPT_LEVEL:
        config.builder_optimization_level = options.opt_level
    return config


def add_profile(s: TrtSession, config: Any, profiles: Sequence[ProfileShape], stage: str) -> None:
    """One optimisation profile covering every dynamic input; none when all inputs are static."""
    if not profiles:
        return
    profile = s.builder.create_optimization_profile()
    for p in profiles:
        profile.set_shape(p.name, p.min, p.opt, p.max)
    if config.add_optimization_profile(profile) < 0:  # TensorRT returns -1 for an invalid profile
        raise BuildError("stage %r: TensorRT refused the optimisation profile (its log above says why): %s"
                         % (stage, "; ".join("%s min %s opt %s max %s" % (p.name, list(p.min), list(p.opt),
                                                                          list(p.max)) for p in profiles)))


def attach_timing_cache(config: Any, path: str) -> None:
    """Load the timing cache file (an empty cache when there is none) into the config."""
    data = b""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            data = f.read()
    cache = config.create_timing_cache(data)
    if cache is None:
        raise BuildError("timing cache %s: TensorRT cannot read it; delete it to start a new one" % path)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise BuildError("timing cache %s was rejected: it was made by another TensorRT version or GPU; "
                         "delete it (or pass another --timing-cache) to start a new one" % path)


def save_timing_cache(config: Any, path: str) -> None:
    _atomic_write(path, config.get_timing_cache().serialize())


def build_plan(s: TrtSession, network: Any, config: Any, stage: str, workspace_mb: int) -> Any:
    plan = s.builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildError("stage %r: TensorRT could not build an engine (its log above says why). A 'Tactic Device "
                         "request ... Available' failure on a Jetson means the workspace (%d MiB) does not fit in "
                         "free memory: try --workspace-mb %d" % (stage, workspace_mb, max(1, workspace_mb // 2)))
    return plan


def build_stage(s: TrtSession, model_dir: str, stage: StageSpec, precision: str, options: BuildOptions,
                platform: TrtPlatform) -> BuiltStage:
    """ONNX -> ``<stage>.engine`` (+ metadata, + timing cache); returns its size and the norms pinned to FP32."""
    onnx_file = os.path.join(model_dir, stage.file)
    network = create_network(s)
    parser = parse_onnx(s, network, stage.name, onnx_file)
    config = create_config(s, precision, options)
    fp32_norms = None
    if fp32_norms_apply(precision, options):
        norms = find_decomposed_norms(s.trt, network)
        pin_to_fp32(s.trt, config, [layer for norm in norms for layer in norm], stage.name)
        fp32_norms = len(norms)
    add_profile(s, config, resolve_profiles(stage, network_inputs(network)), stage.name)
    if options.timing_cache:
        attach_timing_cache(config, options.timing_cache)
    plan = build_plan(s, network, config, stage.name, options.workspace_mb)
    del parser  # the network's weights were needed until here
    if options.timing_cache:
        save_timing_cache(config, options.timing_cache)
    engine = engine_path(model_dir, stage.name)
    if os.path.exists(meta_path(engine)):
        os.remove(meta_path(engine))  # never leave old metadata vouching for a new engine
    _atomic_write(engine, plan)
    try:
        write_meta(meta_path(engine), engine_meta(stage, precision, options, platform, sha256_file(engine),
                                                  fp32_norms))
    except EngineMetaError as exc:
        raise BuildError("stage %r: engine written, but its metadata is invalid: %s" % (stage.name, exc)) from exc
    return BuiltStage(os.path.getsize(engine), fp32_norms)


# --- a run ----------------------------------------------------------------------------------------------------------

def build_all(s: TrtSession, manifest: Manifest, model_dir: str, options: BuildOptions, platform: TrtPlatform,
              report: Callable[[str], None] = print,
              results: Optional[List[StageResult]] = None) -> List[StageResult]:
    """Build (or skip, when up to date and not forced) every selected stage; stops at the first failure
    (BuildError). Each stage's result is appended to ``results`` as soon as it is done."""
    results = [] if results is None else results
    for stage in select_stages(manifest, options.stages):
        precision = options.precisions[stage.name]
        engine = engine_path(model_dir, stage.name)
        current, why = up_to_date(model_dir, stage, precision, options, platform)
        if current and not options.force:
            report("%s: %s; skipped (--force rebuilds)" % (stage.name, why))
            results.append(StageResult(stage.name, precision, False, 0.0, os.path.getsize(engine), engine, why,
                                       fp32_norms_recorded(read_engine_meta(stage.name, model_dir).builder_flags)))
            continue
        note = "forced" if current else why
        report("%s: building %s engine (%s)" % (stage.name, precision, note))
        start = time.monotonic()
        built = build_stage(s, model_dir, stage, precision, options, platform)
        results.append(StageResult(stage.name, precision, True, time.monotonic() - start, built.engine_bytes,
                                   engine, note, built.fp32_norms))
    return results


def summary_lines(results: Sequence[StageResult]) -> List[str]:
    width = max([len(r.stage) for r in results] + [5])
    lines = []
    for r in results:
        what = "built in %.1f s" % r.seconds if r.built else "up to date"
        norms = "" if r.fp32_norms is None else "  fp32 norms: %d%s" % (
            r.fp32_norms, " (%s)" % OBEY_PRECISION_CONSTRAINTS if r.fp32_norms else "")
        lines.append("%-*s  %-4s  %-16s  %12d bytes  %s%s" % (width, r.stage, r.precision, what, r.engine_bytes,
                                                           r.engine, norms))
    return lines


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's arguments and description (`wam-edge build` and ``python -m tools.build_engine``)."""
    p.description = ("Build a TensorRT engine for each ONNX stage of a model, with its metadata beside it. Runs on "
                     "the robot (JetPack ships TensorRT).")
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="DIR",
                   help="model directory with manifest.json (default: %(default)s)")
    p.add_argument("--precision", default=DEFAULT_PRECISION, metavar="SPEC",
                   help="fp32, fp16 or bf16 for all stages, and/or STAGE=PRECISION overrides, comma-separated, "
                   "e.g. fp16,world=fp32 (default: %(default)s)")
    p.add_argument("--workspace-mb", type=int, default=DEFAULT_WORKSPACE_MB, metavar="N",
                   help="builder workspace limit in MiB (default: %(default)s; lower it if a Jetson build fails "
                   "with 'Tactic Device request')")
    p.add_argument("--opt-level", type=int, default=DEFAULT_OPT_LEVEL, metavar="N",
                   help="builder optimisation level 0..5 (TensorRT >= 8.6; default: %(default)s)")
    p.add_argument("--timing-cache", metavar="PATH", help="persistent timing cache (default: <model>/%s)"
                   % TIMING_CACHE_NAME)
    p.add_argument("--version-compatible", action="store_true",
                   help="version-compatible engines (TensorRT >= 8.6; the runtime must allow engine host code)")
    norms = p.add_mutually_exclusive_group()  # argparse.BooleanOptionalAction is Python 3.9+; JetPack 5 has 3.8
    norms.add_argument("--fp32-norms", dest="fp32_norms", action="store_true", default=True,
                       help="in fp16/bf16 stages, pin normalisations written out as primitives (RMSNorm; layer norm "
                       "on TensorRT 8.5) to FP32, where their squares cannot overflow (the default)")
    norms.add_argument("--no-fp32-norms", dest="fp32_norms", action="store_false",
                       help="leave those normalisations to the stage's precision")
    p.add_argument("--stage", dest="stages", action="append", default=[], metavar="NAME",
                   help="build only this stage (repeatable; default: all)")
    p.add_argument("--force", action="store_true", help="rebuild engines that are already up to date")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit; needs no TensorRT")


def build_parser(prog: str = "wam-edge build") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog)
    add_arguments(p)
    return p


def options_from_args(args: argparse.Namespace, manifest: Manifest) -> BuildOptions:
    names = [s.name for s in manifest.stages]
    select_stages(manifest, args.stages)  # unknown names -> OptionError
    if args.workspace_mb <= 0:
        raise OptionError("--workspace-mb: expected a positive number of MiB, got %d" % args.workspace_mb)
    if args.opt_level not in OPT_LEVELS:
        raise OptionError("--opt-level: expected 0..5, got %d" % args.opt_level)
    return BuildOptions(precisions=parse_precisions(args.precision, names), workspace_mb=args.workspace_mb,
                        opt_level=args.opt_level,
                        timing_cache=args.timing_cache or os.path.join(args.model, TIMING_CACHE_NAME),
                        version_compatible=args.version_compatible, stages=tuple(args.stages), force=args.force,
                        fp32_norms=args.fp32_norms)


def main(argv: Optional[Sequence[str]] = None, prog: str = "wam-edge build") -> int:
    """The command line; returns the exit status (0 built or up to date, 1 a build failed, 2 bad arguments,
    model or capability, 3 no TensorRT or GPU here)."""
    try:
        args = build_parser(prog).parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    return run(args, prog)


def run(args: argparse.Namespace, prog: str = "wam-edge build") -> int:
    """Build what ``args`` asks for; the exit status as for main()."""
    def fail(code: int, message: str) -> int:
        sys.stderr.write("%s: %s\n" % (prog, message))
        return code

    try:
        manifest = load_manifest(args.model)
        options = options_from_args(args, manifest)
    except (ManifestError, OptionError) as exc:
        return fail(EXIT_USAGE, str(exc))
    if args.dry_run:
        for line in describe_plan(manifest, args.model, options):
            print(line)
        print("dry run: nothing built (TensorRT is not needed for this)")
        return EXIT_OK
    try:
        trt = import_tensorrt()
    except ImportError as exc:
        return fail(EXIT_NO_TENSORRT, "TensorRT is not installed here (%s); engines are built on the robot "
                    "(JetPack ships TensorRT; see docs/deploy.md)" % (exc,))
    try:
        platform = probe_tensorrt()
    except Exception as exc:  # ImportError (no pycuda), CUDA init errors: no usable GPU
        return fail(EXIT_NO_TENSORRT, "cannot read the GPU's name and compute capability (%s: %s); the build needs "
                    "a GPU and pycuda (pip install 'wam-edge[tensorrt]')" % (type(exc).__name__, exc))
    if platform is None:
        return fail(EXIT_NO_TENSORRT, "no GPU found")
    try:
        check_capabilities(platform.trt_version, platform.compute_capability, options)
    except OptionError as exc:
        return fail(EXIT_USAGE, "%s (GPU %s, sm %s)" % (exc, platform.gpu_name, platform.compute_capability))
    print("TensorRT %s on %s (sm %s)" % (platform.trt_version, platform.gpu_name, platform.compute_capability))
    results: List[StageResult] = []
    try:
        build_all(open_session(trt), manifest, args.model, options, platform, results=results)
    except BuildError as exc:
        for line in summary_lines(results):
            print(line)
        return fail(EXIT_BUILD_FAILED, str(exc))
    for line in summary_lines(results):
        print(line)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main(prog="python -m tools.build_engine"))
