"""ONNX Runtime on the GPU: TensorRT and CUDA execution providers, stages chained on the device.

Binding, all of it once at load: a stage-to-stage tensor (the world K/V) is one
OrtValue on the device, bound as the producer's output and the consumer's
input, so it never visits the host; host-fed inputs (cameras, state, sampler)
are numpy buffers bound as cpu inputs (ORT copies them in on each run); sinks
(the velocity) are numpy buffers bound as cpu outputs (ORT copies them out).
Stages are separate sessions; a run synchronises its providers before it
returns (ORT's default run options), so the next stage reads a finished tensor.

ORT silently drops a provider that fails to load (say libnvinfer is missing),
or whose options it rejects (then retrying the next providers without any
options), and runs on the next one, so the provider each session actually got
is checked at load, logged, and reported by ``providers``.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import onnxruntime as ort

from ..manifest import Manifest, StageSpec, TensorSpec
from . import ORT_GPU_PROVIDERS
from .base import NUMPY_DTYPES, allocate
from .onnxruntime_backend import (
    OrtStages,
    ProviderEntry,
    _is_host_source,
    bind_host_input,
    bind_host_output,
    session_options,
)

log = logging.getLogger("wam_edge.policy")

#: config names (model.gpu_providers) -> ONNX Runtime execution provider names
GPU_PROVIDERS = ORT_GPU_PROVIDERS
CPU_PROVIDER = "CPUExecutionProvider"
DEVICES = ("cuda", "cpu")
#: engine and timing caches of ORT's TensorRT provider, under cache_dir
TRT_CACHE_SUBDIR = "ort-trt"
#: the TensorRT provider knows trt_timing_cache_path from ONNX Runtime 1.17 (microsoft/onnxruntime#17865); older
#: builds throw "Invalid TensorRT EP option" and InferenceSession retries on the next provider WITHOUT any options
TIMING_CACHE_PATH_FROM = (1, 17)

Shape = Tuple[int, ...]
Profile = Tuple[Shape, Shape, Shape]  # (min, opt, max)


class ProviderUnavailable(RuntimeError):
    """None of the requested GPU execution providers can be used here."""


def check_provider_names(requested: Sequence[str]) -> None:
    """The config names (model.gpu_providers): known, at least one, none twice."""
    if not requested:
        raise ValueError("providers: expected at least one of %s" % ", ".join(GPU_PROVIDERS))
    unknown = [p for p in requested if p not in GPU_PROVIDERS]
    if unknown:
        raise ValueError("providers: unknown %s (known: %s)" % (unknown, ", ".join(GPU_PROVIDERS)))
    if len(set(requested)) != len(requested):
        raise ValueError("providers: %s repeats a provider" % (list(requested),))


def resolve_providers(requested: Sequence[str], available: Sequence[str]) -> List[str]:
    """ORT provider names for the requested config names (tensorrt, cuda), in the
    requested order, keeping only those ``available`` lists; ProviderUnavailable
    naming what is available when none is left."""
    check_provider_names(requested)
    chosen = [GPU_PROVIDERS[p] for p in requested if GPU_PROVIDERS[p] in available]
    if not chosen:
        raise ProviderUnavailable(
            "onnxruntime-gpu: none of the requested providers %s is available in ONNX Runtime %s "
            "(available: %s); install onnxruntime-gpu (NVIDIA's Jetson wheel on a Jetson) or use "
            "backend onnxruntime" % ([GPU_PROVIDERS[p] for p in requested], ort.__version__,
                                     ", ".join(available) or "none"))
    skipped = [GPU_PROVIDERS[p] for p in requested if GPU_PROVIDERS[p] not in available]
    if skipped:
        log.warning("onnxruntime-gpu: requested providers %s are not available (available: %s); using %s",
                    skipped, ", ".join(available), chosen)
    return chosen


def stage_profiles(stage: StageSpec) -> List[Tuple[str, Profile]]:
    """(input name, (min, opt, max)) for each input the manifest gives a profile."""
    out = []
    for t in stage.inputs:
        profile = getattr(t, "profile", None)
        if profile is not None:
            out.append((t.name, _check_profile(t.name, profile)))
    return out


def _check_profile(name: str, profile: Any) -> Profile:
    try:
        lo, opt, hi = (tuple(int(d) for d in s) for s in profile)
    except (TypeError, ValueError):
        raise ValueError("input %r: profile must be three shapes (min, opt, max), got %r"
                         % (name, profile)) from None
    if not len(lo) == len(opt) == len(hi) or not lo:
        raise ValueError("input %r: profile shapes %r must have one equal, non-zero rank" % (name, profile))
    return lo, opt, hi


def profile_shape_options(profiles: Sequence[Tuple[str, Profile]]) -> Dict[str, str]:
    """trt_profile_min/opt/max_shapes as ORT documents them ("name:1x3x64x64,other:2x8"):
    all three for the inputs with a profile, or none at all."""
    if not profiles:
        return {}
    out = {}
    for i, key in enumerate(("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")):
        out[key] = ",".join("%s:%s" % (name, "x".join(str(d) for d in shapes[i])) for name, shapes in profiles)
    return out


def ort_version(text: str) -> Optional[Tuple[int, int]]:
    """(major, minor) of an ONNX Runtime version ("1.16.3", "1.17.0+cu118", "1.18.0.dev20240118001"); None when
    it does not start with two numbers."""
    match = re.match(r"\s*(\d+)\.(\d+)", str(text))
    return (int(match.group(1)), int(match.group(2))) if match else None


def _flag(value: bool) -> str:
    return "True" if value else "False"


def trt_provider_options(device_id: int, cache_dir: Optional[str], fp16: bool,
                         profiles: Sequence[Tuple[str, Profile]] = (),
                         max_workspace_bytes: Optional[int] = None,
                         builder_optimization_level: Optional[int] = None,
                         onnxruntime_version: Optional[str] = None,
                         engine_key: Optional[str] = None) -> Dict[str, str]:
    """TensorrtExecutionProvider options (documented keys only, values as strings, only those this ONNX Runtime
    knows: onnxruntime_version, default the installed one).
    cache_dir: the timing cache goes to <cache_dir>/ort-trt, the engine cache to <cache_dir>/ort-trt/<engine_key>
    (None: no caches; every session creation then builds the engines again, which can take minutes).
    engine_key: what the stage's engines are built from (provider_entries: its ONNX sha256). ONNX Runtime names a
    cached engine after the model file and its graph, not its weights, so a re-export with new weights under the same
    file name would otherwise load the old weights' engine, silently."""
    opts = {"device_id": str(int(device_id)), "trt_fp16_enable": _flag(fp16)}
    if cache_dir is not None:
        path = os.path.join(cache_dir, TRT_CACHE_SUBDIR)
        opts.update({
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": os.path.join(path, engine_key) if engine_key else path,
            "trt_timing_cache_enable": "True",
        })
        version = ort_version(ort.__version__ if onnxruntime_version is None else onnxruntime_version)
        if version is not None and version >= TIMING_CACHE_PATH_FROM:
            opts["trt_timing_cache_path"] = path
        # else: older ONNX Runtime keeps the timing cache beside the engines, under trt_engine_cache_path; an
        # unreadable version is treated as old: the key would fail the whole option set
    if max_workspace_bytes is not None:
        opts["trt_max_workspace_size"] = str(int(max_workspace_bytes))
    if builder_optimization_level is not None:
        if not 0 <= builder_optimization_level <= 5:
            raise ValueError("builder_optimization_level: %r is outside [0, 5]" % (builder_optimization_level,))
        opts["trt_builder_optimization_level"] = str(int(builder_optimization_level))
    opts.update(profile_shape_options(profiles))
    return opts


def engine_cache_key(stage: StageSpec) -> str:
    """The engine cache directory of a stage: its ONNX file's sha256, which changes with the weights (with external
    data too: the ONNX file names its content-named data file)."""
    return stage.sha256[:16]


def cuda_provider_options(device_id: int) -> Dict[str, str]:
    return {"device_id": str(int(device_id))}


def provider_entries(names: Sequence[str], stage: StageSpec, device_id: int, cache_dir: Optional[str],
                     fp16: bool, max_workspace_bytes: Optional[int] = None,
                     builder_optimization_level: Optional[int] = None) -> List[ProviderEntry]:
    """What InferenceSession(providers=...) gets for one stage: each ORT provider
    name with its options (the TensorRT provider's carry the stage's profiles)."""
    entries: List[ProviderEntry] = []
    for name in names:
        if name == GPU_PROVIDERS["tensorrt"]:
            entries.append((name, trt_provider_options(device_id, cache_dir, fp16, stage_profiles(stage),
                                                       max_workspace_bytes, builder_optimization_level,
                                                       engine_key=engine_cache_key(stage))))
        elif name == GPU_PROVIDERS["cuda"]:
            entries.append((name, cuda_provider_options(device_id)))
        else:
            entries.append(name)
    return entries


def fallback_warning(stage: str, requested_first: str, session_providers: Sequence[str]) -> Optional[str]:
    """The warning to log when ORT did not give a session the provider asked for
    first (it drops one that fails to load or rejects an option, and says so only in its own output)."""
    actual = session_providers[0] if session_providers else "none"
    if actual == requested_first:
        return None
    return ("stage %s: asked for %s first, but ONNX Runtime runs it on %s (session providers: %s); %s "
            "failed to load: check its libraries (CUDA, cuDNN, TensorRT) and ONNX Runtime's log, or a provider "
            "option this ONNX Runtime version rejects (look for 'EP Error' in the log)"
            % (stage, requested_first, actual, ", ".join(session_providers), requested_first))


class OnnxRuntimeGpuBackend(OrtStages):
    """ONNX Runtime with the TensorRT and/or CUDA execution providers.

    device "cuda" (the real one): providers from ``providers`` in priority
    order, those ORT lists; device "cpu" exists ONLY so CI without a GPU can
    exercise this backend's device-chaining code path (OrtValues, binding) on
    the CPU provider; it is not a way to run a model.
    """

    name = "onnxruntime-gpu"

    def __init__(self, manifest: Manifest, model_dir: str, device: str = "cuda", device_id: int = 0,
                 providers: Sequence[str] = ("tensorrt", "cuda"), cache_dir: Optional[str] = None,
                 fp16: bool = True, intra_op_threads: int = 1, max_workspace_bytes: Optional[int] = None,
                 builder_optimization_level: Optional[int] = None) -> None:
        if device not in DEVICES:
            raise ValueError("onnxruntime-gpu: device %r is not one of %s" % (device, ", ".join(DEVICES)))
        if type(device_id) is not int or device_id < 0:
            raise ValueError("onnxruntime-gpu: device_id must be an int >= 0, got %r" % (device_id,))
        super().__init__(manifest, model_dir)
        self.device = device
        self.device_id = device_id if device == "cuda" else 0
        if device == "cuda":
            names = resolve_providers(providers, ort.get_available_providers())
            if cache_dir is not None and GPU_PROVIDERS["tensorrt"] in names:
                for stage in manifest.stages:
                    _make_cache_dir(os.path.join(cache_dir, TRT_CACHE_SUBDIR, engine_cache_key(stage)))
        else:
            check_provider_names(providers)
            names = [CPU_PROVIDER]
        self._device_values: Dict[Tuple[str, str], ort.OrtValue] = {}
        #: stage -> the providers its session registered, first = the one in charge
        self.stage_providers: Dict[str, Tuple[str, ...]] = {}
        options = session_options(intra_op_threads)
        for stage in manifest.stages:
            entries = provider_entries(names, stage, self.device_id, cache_dir, fp16, max_workspace_bytes,
                                       builder_optimization_level)
            session = self._open(stage, options, entries)
            self._sessions[stage.name] = session
            self._check_providers(stage.name, names, tuple(session.get_providers()))
            self._bindings[stage.name] = self._bind(stage, session)
        firsts = [self.stage_providers[s.name][0] for s in manifest.stages]
        self._providers = tuple(sorted(set(firsts), key=firsts.index))
        log.info("onnxruntime-gpu on %s:%d: %s", device, self.device_id,
                 "; ".join("%s on %s" % (s, ", ".join(p)) for s, p in self.stage_providers.items()))

    def _check_providers(self, stage: str, requested: Sequence[str], actual: Tuple[str, ...]) -> None:
        self.stage_providers[stage] = actual
        if self.device == "cuda" and not any(p in actual for p in GPU_PROVIDERS.values()):
            raise RuntimeError("onnxruntime-gpu: stage %s got none of %s from ONNX Runtime %s (session providers: "
                               "%s): they are listed but failed to load; check CUDA, cuDNN and TensorRT "
                               "libraries and ONNX Runtime's log" % (stage, list(requested), ort.__version__,
                                                                     ", ".join(actual)))
        warning = fallback_warning(stage, requested[0], actual)
        if warning:
            log.warning("%s", warning)

    def _bind(self, stage: StageSpec, session: ort.InferenceSession) -> Any:
        binding = session.io_binding()
        for t in stage.inputs:
            source = t.source or ""
            if _is_host_source(source):
                bind_host_input(binding, t, self._host_source_buffer(stage, t))
                continue
            producer, output = source.split(":", 1)
            host = self._host_outputs.get((producer, output))
            if host is not None:  # a sink another stage also reads: ORT copies it back in
                bind_host_input(binding, t, host)
            else:
                binding.bind_ortvalue_input(t.name, self._device_values[(producer, output)])
        for t in stage.outputs:
            if t.sink:
                buf = allocate(t)
                self._host_outputs[(stage.name, t.name)] = buf
                bind_host_output(binding, t, buf)
            else:
                value = self._device_value(stage, t)
                self._device_values[(stage.name, t.name)] = value
                binding.bind_ortvalue_output(t.name, value)
        return binding

    def _device_value(self, stage: StageSpec, t: TensorSpec) -> ort.OrtValue:
        try:
            return ort.OrtValue.ortvalue_from_shape_and_type(list(t.shape), NUMPY_DTYPES[t.dtype],
                                                             self.device, self.device_id)
        except Exception as exc:
            raise RuntimeError("onnxruntime-gpu: cannot allocate %s:%s (%s %s) on %s:%d: %s"
                               % (stage.name, t.name, t.dtype, list(t.shape), self.device, self.device_id,
                                  exc)) from exc

    def device_output(self, stage: str, tensor: str) -> ort.OrtValue:
        """The device OrtValue of a stage-to-stage output (it never visits the host)."""
        try:
            return self._device_values[(stage, tensor)]
        except KeyError:
            raise KeyError("stage %r has no device output %r" % (stage, tensor)) from None

    def host_output(self, stage: str, tensor: str) -> Any:
        if (stage, tensor) in self._device_values:
            raise KeyError("%s:%s stays on the device (%s); only sinks are host outputs"
                           % (stage, tensor, self.device))
        return super().host_output(stage, tensor)

    def describe(self) -> str:
        per_stage = ", ".join("%s: %s" % (s, p[0]) for s, p in self.stage_providers.items())
        return "%s (%s on %s:%d; %s)" % (self.name, ", ".join(self.providers), self.device, self.device_id,
                                          per_stage)

    def close(self) -> None:
        super().close()
        self._device_values.clear()


def _make_cache_dir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise RuntimeError("onnxruntime-gpu: cannot create the TensorRT cache directory %s (model.cache_dir): %s"
                           % (path, exc.strerror or exc)) from exc
