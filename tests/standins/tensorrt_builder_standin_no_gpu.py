"""A recording stand-in for TensorRT's *builder* Python API, for tests on machines with no GPU.

It is not TensorRT: it builds no engine. It implements only the documented names
tools/build_engine.py uses, spelt and shaped as TensorRT 8.5 or 10.x has them
(pybind-style: unknown attributes cannot be set, enum members are typed, keyword
names match the bindings), and records every call in ``module.calls``, so that a
misspelt, mistyped or version-unsupported call fails the test instead of the
robot. Inject it as ``sys.modules["tensorrt"]`` (monkeypatch) together with
``platform_probe_standin_no_gpu`` in place of the pycuda GPU probe.

What it emulates, and why (each from NVIDIA's docs):
- BuilderFlag members by version: VERSION_COMPATIBLE from 8.6, BF16 from 9.0.
- IBuilderConfig.builder_optimization_level exists from 8.6 only.
- Before 10.0 the ONNX parser needs an explicit-batch network (creation flag).
- The parser reads the real ONNX file (with ONNX Runtime) for the input names and
  shapes (-1 on dynamic axes) and fails on a file that is not ONNX, like TensorRT.
- With the ``onnx`` package it also makes one fake layer per ONNX node (the network
  has none without it): Pow/Mul/Add/Sub/Div -> ELEMENTWISE POW/PROD/SUM/SUB/DIV,
  ReduceMean/ReduceSum/ReduceMax -> REDUCE AVG/SUM/MAX, Sqrt/Reciprocal -> UNARY SQRT/RECIP, initializers and
  Constant -> CONSTANT, LayerNormalization -> NORMALIZATION from 8.6 and, on 8.5
  (no normalisation layer), the primitives ReduceMean, Sub, Pow, ReduceMean, Add,
  Sqrt, Div, Mul, Add; any other op a SHUFFLE (a type the builder never inspects).
  Layers come back as ILayer, which has no ``op``: the builder must cast them
  (``layer.__class__ = trt.IElementWiseLayer``), as with TensorRT's bindings.
- Layer precisions are honoured only with OBEY_PRECISION_CONSTRAINTS or
  PREFER_PRECISION_CONSTRAINTS set; otherwise the build logs a warning and ignores
  them. The plan records the layers built in FP32 (``fp32_layers``).
- build_serialized_network returns None (after logging, as TensorRT does) when a
  dynamic input has no profile, a profile disagrees with the graph, or the
  workspace is larger than the stand-in's free memory ("Tactic Device request").
- Timing caches serialize to bytes tagged with the TensorRT version; one from
  another version is rejected by set_timing_cache(..., ignore_mismatch=False).
- add_optimization_profile returns the profile's index, or -1 (after logging)
  for an invalid profile: min <= opt <= max broken on an axis, or any profile
  when made with refuse_profiles=True.
"""

from __future__ import annotations

import json
import types
from typing import Any, Dict, List, Optional, Sequence, Tuple

from runtime.policy.backends import TrtPlatform

_CACHE_MAGIC = b"STANDIN-TIMING-CACHE\n"
PLAN_MAGIC = b"STANDIN-PLAN\n"


def _version_tuple(version: str) -> Tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


class _EnumValue:
    """One member of a pybind11 enum: has .name, converts with int()."""
    __slots__ = ("enum", "name", "value")

    def __init__(self, enum: str, name: str, value: int) -> None:
        self.enum, self.name, self.value = enum, name, value

    def __int__(self) -> int:
        return self.value

    __index__ = __int__

    def __repr__(self) -> str:
        return "<%s.%s: %d>" % (self.enum, self.name, self.value)


def _enum(name: str, members: Sequence[str]) -> type:
    return type(name, (), {m: _EnumValue(name, m, i) for i, m in enumerate(members)})


def _require(value: Any, enum: type, what: str) -> None:
    if not isinstance(value, _EnumValue) or value.enum != enum.__name__:
        raise TypeError("%s: incompatible function arguments: expected tensorrt.%s, got %r"
                        % (what, enum.__name__, value))


def _dims(value: Any, what: str) -> Tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise TypeError("%s: expected a sequence of int (Dims), got %r" % (what, value))
    return tuple(value)


class _HostMemory(bytes):
    """IHostMemory: a buffer with nbytes."""

    @property
    def nbytes(self) -> int:
        return len(self)


def make_tensorrt_standin_no_gpu(version: str = "10.3.0", free_memory_mb: int = 4096,
                                 refuse_profiles: bool = False) -> types.ModuleType:
    """A module object standing in for ``tensorrt`` version ``version`` (8.5 .. 10.x); refuse_profiles:
    add_optimization_profile returns -1 for every profile."""
    vt = _version_tuple(version)
    calls: List[Tuple[Any, ...]] = []
    mod = types.ModuleType("tensorrt")
    mod.__version__ = version
    mod.calls = calls  # type: ignore[attr-defined]
    mod.log = []  # type: ignore[attr-defined]  # what TensorRT would print through the Logger

    builder_flags = ["FP16", "INT8", "DEBUG", "GPU_FALLBACK", "REFIT", "DISABLE_TIMING_CACHE", "TF32",
                     "SPARSE_WEIGHTS", "SAFETY_SCOPE", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS",
                     "DIRECT_IO", "REJECT_EMPTY_ALGORITHMS"]
    if vt < (10, 0):
        builder_flags += ["STRICT_TYPES", "ENABLE_TACTIC_HEURISTIC"]
    if vt >= (8, 6):
        builder_flags += ["VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME", "FP8"]
    if vt >= (9, 0):
        builder_flags += ["ERROR_ON_TIMING_CACHE_MISS", "BF16"]
    BuilderFlag = _enum("BuilderFlag", builder_flags)
    MemoryPoolType = _enum("MemoryPoolType", ["WORKSPACE", "DLA_MANAGED_SRAM", "DLA_LOCAL_DRAM",
                                              "DLA_GLOBAL_DRAM", "TACTIC_DRAM"])
    creation_flags = ["EXPLICIT_BATCH"] + (["EXPLICIT_PRECISION"] if vt < (10, 0) else []) + \
        (["STRONGLY_TYPED"] if vt >= (9, 0) else [])
    NetworkDefinitionCreationFlag = _enum("NetworkDefinitionCreationFlag", creation_flags)
    Severity = _enum("Severity", ["INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"])
    data_types = ["FLOAT", "HALF", "INT8", "INT32", "BOOL", "UINT8"] + (["FP8"] if vt >= (8, 6) else []) + \
        (["BF16", "INT64"] if vt >= (9, 0) else [])
    DataType = _enum("DataType", data_types)
    layer_types = ["CONVOLUTION", "ACTIVATION", "POOLING", "SCALE", "SOFTMAX", "CONCATENATION", "ELEMENTWISE",
                   "UNARY", "SHUFFLE", "REDUCE", "GATHER", "MATRIX_MULTIPLY", "CONSTANT", "IDENTITY", "SLICE",
                   "SHAPE", "SELECT", "CAST"] + (["NORMALIZATION"] if vt >= (8, 6) else [])
    LayerType = _enum("LayerType", layer_types)
    ElementWiseOperation = _enum("ElementWiseOperation", ["SUM", "PROD", "MAX", "MIN", "SUB", "DIV", "POW",
                                                          "FLOOR_DIV", "AND", "OR", "XOR", "EQUAL", "GREATER",
                                                          "LESS"])
    ReduceOperation = _enum("ReduceOperation", ["SUM", "PROD", "MAX", "MIN", "AVG"])
    UnaryOperation = _enum("UnaryOperation", ["EXP", "LOG", "SQRT", "RECIP", "ABS", "NEG", "SIN", "COS", "ERF"])

    class Logger:
        __slots__ = ("min_severity",)
        INTERNAL_ERROR = Severity.INTERNAL_ERROR
        ERROR = Severity.ERROR
        WARNING = Severity.WARNING
        INFO = Severity.INFO
        VERBOSE = Severity.VERBOSE

        def __init__(self, min_severity: Any = Severity.WARNING) -> None:
            _require(min_severity, Severity, "Logger()")
            calls.append(("Logger", min_severity.name))
            self.min_severity = min_severity

    def _log(severity: str, message: str) -> None:
        mod.log.append("[%s] %s" % (severity, message))

    class ITensor:
        __slots__ = ("name", "shape")

        def __init__(self, name: str, shape: Tuple[int, ...]) -> None:
            self.name, self.shape = name, shape

    class ILayer:
        """Only what the builder may use: name, type, inputs/outputs, precision, output types."""
        __slots__ = ("name", "_type", "_op", "_inputs", "_outputs", "_precision", "_output_types")

        def __init__(self, name: str, kind: Any, op: Any, inputs: Sequence[str], outputs: Sequence[str]) -> None:
            self.name, self._type, self._op = name, kind, op
            self._inputs = [ITensor(n, ()) if n else None for n in inputs]
            self._outputs = [ITensor(n, ()) for n in outputs]
            self._precision: Optional[Any] = None
            self._output_types: Dict[int, Any] = {}

        @property
        def type(self) -> Any:
            return self._type

        @property
        def num_inputs(self) -> int:
            return len(self._inputs)

        def get_input(self, index: int) -> Optional[ITensor]:
            return self._inputs[index]

        @property
        def num_outputs(self) -> int:
            return len(self._outputs)

        def get_output(self, index: int) -> ITensor:
            return self._outputs[index]

        @property
        def precision(self) -> Any:
            return DataType.FLOAT if self._precision is None else self._precision

        @precision.setter
        def precision(self, value: Any) -> None:
            _require(value, DataType, "ILayer.precision")
            calls.append(("layer.precision", self.name, value.name))
            self._precision = value

        @property
        def precision_is_set(self) -> bool:
            return self._precision is not None

        def set_output_type(self, index: int, dtype: Any) -> None:
            _require(dtype, DataType, "set_output_type")
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self._outputs):
                raise IndexError("set_output_type: layer %s has no output %r" % (self.name, index))
            calls.append(("set_output_type", self.name, index, dtype.name))
            self._output_types[index] = dtype

    def _typed_layer(kind_name: str) -> type:
        """The concrete layer class for ``layer.__class__ = ...``: adds ``op``, valid only for its own type."""
        def op(self: ILayer) -> Any:
            if self._type is not getattr(LayerType, kind_name):
                raise TypeError("%s cast to the class of %s layers" % (self._type, kind_name))
            return self._op

        name = {"ELEMENTWISE": "IElementWiseLayer", "REDUCE": "IReduceLayer", "UNARY": "IUnaryLayer"}[kind_name]
        return type(name, (ILayer,), {"__slots__": (), "op": property(op)})

    IElementWiseLayer, IReduceLayer, IUnaryLayer = (_typed_layer(k) for k in ("ELEMENTWISE", "REDUCE", "UNARY"))

    class INetworkDefinition:
        __slots__ = ("flags", "_inputs", "_layers")

        def __init__(self, flags: int) -> None:
            self.flags = flags
            self._inputs: List[ITensor] = []
            self._layers: List[ILayer] = []

        @property
        def num_inputs(self) -> int:
            return len(self._inputs)

        def get_input(self, index: int) -> ITensor:
            return self._inputs[index]

        @property
        def num_layers(self) -> int:
            return len(self._layers)

        def get_layer(self, index: int) -> ILayer:
            return self._layers[index]

    E, R, U, L = ElementWiseOperation, ReduceOperation, UnaryOperation, LayerType
    onnx_layers = {"Pow": (L.ELEMENTWISE, E.POW), "Mul": (L.ELEMENTWISE, E.PROD), "Add": (L.ELEMENTWISE, E.SUM),
                   "Sub": (L.ELEMENTWISE, E.SUB), "Div": (L.ELEMENTWISE, E.DIV), "ReduceMean": (L.REDUCE, R.AVG),
                   "ReduceSum": (L.REDUCE, R.SUM), "ReduceMax": (L.REDUCE, R.MAX),
                   "Sqrt": (L.UNARY, U.SQRT), "Reciprocal": (L.UNARY, U.RECIP), "Constant": (L.CONSTANT, None)}

    def _layers_from_onnx(model: str) -> List[ILayer]:
        """One layer per ONNX node as described in the module docstring; the graph only, never the weights."""
        import onnx  # noqa: PLC0415

        graph = onnx.load(model, load_external_data=False).graph
        layers = [ILayer(init.name, L.CONSTANT, None, [], [init.name]) for init in graph.initializer]
        for i, node in enumerate(graph.node):
            name = node.name or "%s_%d" % (node.op_type, i)
            if node.op_type == "LayerNormalization" and vt < (8, 6):
                x, scale = node.input[0], node.input[1]
                bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
                t = ["%s/%s" % (name, n) for n in ("mean", "centred", "two", "square", "var", "eps", "var_eps",
                                                   "std", "normed", "scaled")]
                steps = [("mean", L.REDUCE, R.AVG, [x], t[0]), ("sub", L.ELEMENTWISE, E.SUB, [x, t[0]], t[1]),
                         ("two", L.CONSTANT, None, [], t[2]), ("pow", L.ELEMENTWISE, E.POW, [t[1], t[2]], t[3]),
                         ("var", L.REDUCE, R.AVG, [t[3]], t[4]), ("eps", L.CONSTANT, None, [], t[5]),
                         ("add_eps", L.ELEMENTWISE, E.SUM, [t[4], t[5]], t[6]), ("sqrt", L.UNARY, U.SQRT, [t[6]], t[7]),
                         ("div", L.ELEMENTWISE, E.DIV, [t[1], t[7]], t[8]),
                         ("scale", L.ELEMENTWISE, E.PROD, [t[8], scale], t[9] if bias else node.output[0])]
                if bias:
                    steps.append(("bias", L.ELEMENTWISE, E.SUM, [t[9], bias], node.output[0]))
                layers += [ILayer("%s/%s" % (name, step), kind, op, ins, [out]) for step, kind, op, ins, out in steps]
                continue
            if node.op_type == "LayerNormalization":
                kind, op = L.NORMALIZATION, None
            else:
                kind, op = onnx_layers.get(node.op_type, (L.SHUFFLE, None))
            layers.append(ILayer(name, kind, op, list(node.input), list(node.output)))
        return layers

    class ParserError:
        __slots__ = ("_desc",)

        def __init__(self, desc: str) -> None:
            self._desc = desc

        def desc(self) -> str:
            return self._desc

        def __str__(self) -> str:
            return "In node -1 (parseGraph): INVALID_GRAPH: %s" % self._desc

    class OnnxParser:
        __slots__ = ("network", "logger", "_errors")

        def __init__(self, network: INetworkDefinition, logger: Logger) -> None:
            if not isinstance(network, INetworkDefinition) or not isinstance(logger, Logger):
                raise TypeError("OnnxParser(): incompatible constructor arguments")
            calls.append(("OnnxParser",))
            self.network, self.logger, self._errors = network, logger, []

        @property
        def num_errors(self) -> int:
            return len(self._errors)

        def get_error(self, index: int) -> ParserError:
            return self._errors[index]

        def parse_from_file(self, model: str) -> bool:
            calls.append(("parse_from_file", model))
            explicit = 1 << int(NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
            if vt < (10, 0) and not self.network.flags & explicit:
                self._errors.append(ParserError("Network must have explicit batch dimension (EXPLICIT_BATCH)"))
                return False
            try:
                import onnxruntime  # noqa: PLC0415 (reads the real graph's inputs)

                session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
            except Exception as exc:  # not ONNX, unreadable: TensorRT's parser fails too
                self._errors.append(ParserError("Failed to parse ONNX model %s: %s" % (model, exc)))
                return False
            for arg in session.get_inputs():
                shape = tuple(d if isinstance(d, int) else -1 for d in arg.shape)
                self.network._inputs.append(ITensor(arg.name, shape))
            try:
                import onnx  # noqa: F401, PLC0415 (the layers need it; without it the network has none)
            except ImportError:
                return True
            self.network._layers.extend(_layers_from_onnx(model))
            return True

    class IOptimizationProfile:
        __slots__ = ("shapes",)

        def __init__(self) -> None:
            self.shapes: Dict[str, Tuple[Tuple[int, ...], ...]] = {}

        def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:  # noqa: A002 (binding names)
            lo, mid, hi = (_dims(d, "set_shape(%s)" % input) for d in (min, opt, max))
            calls.append(("set_shape", input, lo, mid, hi))
            self.shapes[input] = (lo, mid, hi)

    class ITimingCache:
        __slots__ = ("version", "entries")

        def __init__(self, version: str, entries: int) -> None:
            self.version, self.entries = version, entries

        def serialize(self) -> _HostMemory:
            calls.append(("ITimingCache.serialize",))
            body = json.dumps({"trt": self.version, "entries": self.entries}).encode()
            return _HostMemory(_CACHE_MAGIC + body)

    config_slots = ["flags", "pools", "profiles", "timing_cache"]
    if vt >= (8, 6):
        config_slots.append("_opt_level")

    class IBuilderConfig:
        __slots__ = tuple(config_slots)

        def __init__(self) -> None:
            self.flags = {BuilderFlag.TF32.name}  # TensorRT enables TF32 by default
            self.pools: Dict[str, int] = {}
            self.profiles: List[IOptimizationProfile] = []
            self.timing_cache: Optional[ITimingCache] = None
            if vt >= (8, 6):
                self._opt_level = 3

        def set_memory_pool_limit(self, pool: Any, pool_size: int) -> None:
            _require(pool, MemoryPoolType, "set_memory_pool_limit")
            if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 0:
                raise TypeError("set_memory_pool_limit: pool_size must be an int >= 0, got %r" % (pool_size,))
            calls.append(("set_memory_pool_limit", pool.name, pool_size))
            self.pools[pool.name] = pool_size

        def set_flag(self, flag: Any) -> None:
            _require(flag, BuilderFlag, "set_flag")
            calls.append(("set_flag", flag.name))
            self.flags.add(flag.name)

        def clear_flag(self, flag: Any) -> None:
            _require(flag, BuilderFlag, "clear_flag")
            calls.append(("clear_flag", flag.name))
            self.flags.discard(flag.name)

        def get_flag(self, flag: Any) -> bool:
            _require(flag, BuilderFlag, "get_flag")
            return flag.name in self.flags

        def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
            if not isinstance(profile, IOptimizationProfile):
                raise TypeError("add_optimization_profile: expected IOptimizationProfile")
            calls.append(("add_optimization_profile", len(profile.shapes)))
            ordered = all(a <= b <= c for lo, mid, hi in profile.shapes.values() for a, b, c in zip(lo, mid, hi))
            if refuse_profiles or not ordered:
                _log("ERROR", "IOptimizationProfile is not valid")
                return -1
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, serialized_timing_cache: Any) -> Optional[ITimingCache]:
            data = bytes(memoryview(serialized_timing_cache))
            calls.append(("create_timing_cache", len(data)))
            if not data:
                return ITimingCache(version, 0)
            if not data.startswith(_CACHE_MAGIC):
                _log("ERROR", "timing cache: invalid serialized data")
                return None
            body = json.loads(data[len(_CACHE_MAGIC):].decode())
            return ITimingCache(body["trt"], body["entries"])

        def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
            if not isinstance(cache, ITimingCache) or not isinstance(ignore_mismatch, bool):
                raise TypeError("set_timing_cache(cache: ITimingCache, ignore_mismatch: bool)")
            calls.append(("set_timing_cache", cache.entries, ignore_mismatch))
            if cache.version != version and not ignore_mismatch:
                _log("ERROR", "timing cache was created by TensorRT %s, this is %s" % (cache.version, version))
                return False
            self.timing_cache = cache
            return True

        def get_timing_cache(self) -> Optional[ITimingCache]:
            calls.append(("get_timing_cache",))
            return self.timing_cache

    if vt >= (8, 6):
        def _get_opt(self: IBuilderConfig) -> int:
            return self._opt_level

        def _set_opt(self: IBuilderConfig, level: int) -> None:
            if isinstance(level, bool) or not isinstance(level, int):
                raise TypeError("builder_optimization_level: expected int, got %r" % (level,))
            calls.append(("builder_optimization_level", level))
            self._opt_level = level

        IBuilderConfig.builder_optimization_level = property(_get_opt, _set_opt)  # type: ignore[attr-defined]

    class Builder:
        __slots__ = ("logger",)

        def __init__(self, logger: Logger) -> None:
            if not isinstance(logger, Logger):
                raise TypeError("Builder(logger: ILogger)")
            calls.append(("Builder",))
            self.logger = logger

        @property
        def platform_has_fast_fp16(self) -> bool:
            return True

        def create_network(self, flags: int = 0) -> INetworkDefinition:
            if isinstance(flags, bool) or not isinstance(flags, int):
                raise TypeError("create_network(flags: int)")
            calls.append(("create_network", flags))
            return INetworkDefinition(flags)

        def create_builder_config(self) -> IBuilderConfig:
            calls.append(("create_builder_config",))
            return IBuilderConfig()

        def create_optimization_profile(self) -> IOptimizationProfile:
            calls.append(("create_optimization_profile",))
            return IOptimizationProfile()

        def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> Optional[Any]:
            calls.append(("build_serialized_network",))
            if not network._inputs:
                _log("ERROR", "Network must have at least one input")
                return None
            shapes: Dict[str, Tuple[Tuple[int, ...], ...]] = {}
            for profile in config.profiles:
                shapes.update(profile.shapes)
            for t in network._inputs:
                if t.name not in shapes:
                    if any(d < 0 for d in t.shape):
                        _log("ERROR", "Network has dynamic or shape inputs, but no optimization profile has "
                             "been defined (input %s)" % t.name)
                        return None
                    continue
                for s in shapes[t.name]:
                    if len(s) != len(t.shape) or any(d >= 0 and d != v for d, v in zip(t.shape, s)):
                        _log("ERROR", "profile shape %s for %s disagrees with %s" % (list(s), t.name, list(t.shape)))
                        return None
            workspace = config.pools.get("WORKSPACE", 0)
            if workspace > free_memory_mb << 20:
                _log("ERROR", "Tactic Device request: %dMB Available: %dMB" % (workspace >> 20, free_memory_mb))
                return None
            if config.timing_cache is not None:
                config.timing_cache.entries += len(network._inputs)
            constrained = [layer for layer in network._layers
                           if layer.precision_is_set or layer._output_types]
            if constrained and not config.flags & {"OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS"}:
                _log("WARNING", "layer precisions were set but no precision constraints flag: they are ignored")
                constrained = []
            fp32 = [layer.name for layer in constrained if layer.precision is DataType.FLOAT
                    and all(layer._output_types.get(i) is DataType.FLOAT for i in range(layer.num_outputs))]
            record = {"trt": version, "flags": sorted(config.flags), "pools": config.pools, "fp32_layers": fp32,
                      "opt_level": getattr(config, "_opt_level", None),
                      "profiles": {k: [list(s) for s in v] for k, v in shapes.items()},
                      "inputs": {t.name: list(t.shape) for t in network._inputs}}
            return _HostMemory(PLAN_MAGIC + json.dumps(record, sort_keys=True).encode())

    for name, value in (("Logger", Logger), ("Builder", Builder), ("OnnxParser", OnnxParser),
                        ("BuilderFlag", BuilderFlag), ("MemoryPoolType", MemoryPoolType),
                        ("NetworkDefinitionCreationFlag", NetworkDefinitionCreationFlag),
                        ("IBuilderConfig", IBuilderConfig), ("ITimingCache", ITimingCache),
                        ("IOptimizationProfile", IOptimizationProfile), ("INetworkDefinition", INetworkDefinition),
                        ("ITensor", ITensor), ("ParserError", ParserError), ("DataType", DataType),
                        ("LayerType", LayerType), ("ElementWiseOperation", ElementWiseOperation),
                        ("ReduceOperation", ReduceOperation), ("UnaryOperation", UnaryOperation),
                        ("ILayer", ILayer), ("IElementWiseLayer", IElementWiseLayer), ("IReduceLayer", IReduceLayer),
                        ("IUnaryLayer", IUnaryLayer), ("float32", DataType.FLOAT), ("float16", DataType.HALF)):
        setattr(mod, name, value)
    return mod


def read_plan_standin(path: str) -> Dict[str, Any]:
    """What the stand-in recorded in an 'engine' it wrote (flags, pools, profiles, ...)."""
    with open(path, "rb") as f:
        data = f.read()
    assert data.startswith(PLAN_MAGIC), "%s is not a stand-in plan" % path
    return json.loads(data[len(PLAN_MAGIC):].decode())


def platform_probe_standin_no_gpu(trt_version: str, gpu_name: str = "Orin", compute_capability: str = "8.7"):
    """In place of runtime.policy.backends.probe_tensorrt (pycuda): a fixed GPU."""
    def probe() -> TrtPlatform:
        return TrtPlatform(trt_version, gpu_name, compute_capability)

    return probe
