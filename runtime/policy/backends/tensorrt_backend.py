"""TensorRT backend: one serialized engine per stage, chained on the GPU.

Every engine is checked against its ``<stage>.engine.json`` (ONNX hash,
TensorRT version, GPU) before a byte of it is read, and its IO tensors against
the manifest after it is deserialized. Every buffer is allocated once: a device
buffer plus a pinned host buffer per host source and per sink, one device
buffer per stage output that is bound as the producer's output and the
consumers' input, so the world K/V never visit the host. One CUDA stream, the
name-based tensor API (TensorRT 8.5 through 10.x).

Optional CUDA graphs (cuda_graph): each stage, and each denoising step the
Policy runs through run_group (the first step with the context stages, and
a later step), is captured once after warm-up with its host-to-device copies,
its engines and its device-to-host copies, and then replayed with one launch:
a whole step costs one graph launch and one synchronize.

The stream is non-blocking (CU_STREAM_NON_BLOCKING): a blocking stream
synchronises with the legacy default stream, so other code using the default
stream could invalidate a capture. Nothing orders our stream after work on the
default stream then, so the constructor synchronises the context once after
the buffers are zeroed (memset_d8 runs on the default stream).

CUDA context: no pycuda.autoinit. As pycuda's own autoprimaryctx does, device
0's primary context is retained once per process and never released: it is
per-process and shared (the CUDA runtime, ONNX Runtime, TensorRT use it too),
and pycuda's Context.detach() on a retained primary context pushes it and calls
cuDevicePrimaryCtxRelease, which never pops, so it would stay current on the
thread. pycuda's Context detaches itself when garbage collected, so the retained
Context is kept (_PRIMARY_CONTEXTS). Each backend pushes it on the creating
thread for its life and close() pops it; run() must be called from that thread.
close() from another thread pushes it there, frees, and pops it there (the
creating thread's stack keeps it: no thread can pop another's).

TensorRT / pycuda calls used (check against NVIDIA's and pycuda's docs):
trt.Logger, trt.Runtime, Runtime.engine_host_code_allowed (8.6+),
Runtime.deserialize_cuda_engine, ICudaEngine.num_io_tensors / get_tensor_name /
get_tensor_mode / get_tensor_dtype / get_tensor_shape / create_execution_context,
IExecutionContext.set_input_shape / get_tensor_shape / set_tensor_address /
execute_async_v3 (all 8.5+); pycuda.driver.init, Device, retain_primary_context,
Context.push / pop / synchronize, mem_alloc, memset_d8, pagelocked_empty,
Stream(flags), memcpy_htod_async, memcpy_dtoh_async.
"""

from __future__ import annotations

import hashlib
import os
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from ..manifest import Manifest, StageSpec, TensorSpec, is_host_source
from . import TrtPlatform, engine_path, match_engines, probe_tensorrt, read_engine_metas
from .base import NUMPY_DTYPES, StageBackend, host_buffer
from .cuda_graph import CudaGraph, CudaGraphUnavailable, load_driver
from .engine_meta import (
    REBUILD_HINT,
    EngineMeta,
    EngineMismatch,
    check_engine_bytes,
)

# Module-level DataType aliases of the tensorrt package, by name. Those that are
# manifest dtypes map to themselves; the rest (bfloat16, fp8, int8) are named in
# the mismatch message. Not trt.nptype: it has no numpy type for BF16/FP8.
TRT_DTYPE_NAMES = ("float32", "float16", "bfloat16", "int8", "int32", "int64", "uint8", "bool", "fp8")
#: cuda.h's CUstream_flags: work on the stream does not synchronise with the legacy default stream
CU_STREAM_NON_BLOCKING = 1
#: pycuda.driver module -> device 0's primary context, retained once and kept for the process's life
_PRIMARY_CONTEXTS: Dict[Any, Any] = {}
_PRIMARY_LOCK = threading.Lock()
_NEEDS = "install the `tensorrt` extra (tensorrt, pycuda) on a machine with an NVIDIA GPU, or use backend onnxruntime"


def _gpu_modules_error(module: str, exc: BaseException) -> RuntimeError:
    return RuntimeError("the tensorrt backend needs the Python module %s (%s); %s" % (module, exc, _NEEDS))


def check_engines(manifest: Manifest, model_dir: str, platform: Optional[TrtPlatform] = None,
                  probe: Callable[[], Optional[TrtPlatform]] = probe_tensorrt) -> Dict[str, EngineMeta]:
    """Stage name -> its engine metadata, checked against the stage's ONNX hash and
    the platform (probed when not given). Reads no engine bytes; raises
    EngineFileMissing, EngineMetaError or EngineMismatch, each saying how to rebuild."""
    metas = read_engine_metas(manifest, model_dir)
    if platform is None:
        try:
            platform = probe()
        except ImportError as exc:
            raise _gpu_modules_error(getattr(exc, "name", None) or "tensorrt/pycuda", exc) from exc
        except Exception as exc:  # pycuda.driver.Error (LogicError, RuntimeError from cuInit, ...), TensorRT's
            raise RuntimeError("the tensorrt backend cannot use the GPU: %s: %s; %s"
                               % (type(exc).__name__, exc, _NEEDS)) from exc
        if platform is None:
            raise RuntimeError("no TensorRT platform found on this machine; %s" % _NEEDS)
    match_engines(manifest, metas, platform)
    return metas


def import_gpu_modules() -> Tuple[Any, Any]:
    """(tensorrt, pycuda.driver), imported only when the backend is created."""
    try:
        import tensorrt as trt  # noqa: PLC0415 (optional, GPU machines only)
    except ImportError as exc:
        raise _gpu_modules_error("tensorrt", exc) from exc
    try:
        import pycuda.driver as cuda  # noqa: PLC0415
    except ImportError as exc:
        raise _gpu_modules_error("pycuda", exc) from exc
    return trt, cuda


def primary_context(cuda: Any) -> Any:
    """Device 0's primary context, retained on the first call and then the same Context for the process's life
    (never detached: see the module's "CUDA context")."""
    with _PRIMARY_LOCK:
        context = _PRIMARY_CONTEXTS.get(cuda)
        if context is None:
            cuda.init()
            context = _PRIMARY_CONTEXTS[cuda] = cuda.Device(0).retain_primary_context()
        return context


def dtype_names(trt: Any) -> Dict[Any, str]:
    """trt.DataType value -> name, for the aliases this TensorRT has (int64 is 10.0+, bfloat16 9.0+)."""
    return {getattr(trt, n): n for n in TRT_DTYPE_NAMES if hasattr(trt, n)}


def check_io(engine: Any, trt: Any, stage: StageSpec, path: str) -> None:
    """The engine's IO tensors must be exactly the manifest's: names, direction,
    dtype and shape (-1 only where the manifest declares a profile)."""
    where = "%s (stage %r)" % (path, stage.name)

    def mismatch(msg: str) -> EngineMismatch:
        return EngineMismatch("%s: %s; the engine does not fit the manifest, %s" % (where, msg, REBUILD_HINT))

    have = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    want = [t.name for t in stage.inputs + stage.outputs]
    missing = [n for n in want if n not in have]
    extra = [n for n in have if n not in want]
    if missing or extra:
        raise mismatch("engine tensors %s, manifest tensors %s (missing in engine: %s; not in manifest: %s)"
                       % (have, want, missing or "none", extra or "none"))
    dtypes = dtype_names(trt)
    any_profile = any(getattr(t, "profile", None) is not None for t in stage.inputs)
    for kind, specs, mode in (("input", stage.inputs, trt.TensorIOMode.INPUT),
                              ("output", stage.outputs, trt.TensorIOMode.OUTPUT)):
        for t in specs:
            actual_mode = engine.get_tensor_mode(t.name)
            if actual_mode != mode:
                raise mismatch("%r is %s in the engine, the manifest says %s" % (t.name, actual_mode, kind))
            dtype = engine.get_tensor_dtype(t.name)
            name = dtypes.get(dtype, str(dtype))
            if name != t.dtype:
                raise mismatch("%s %r has dtype %s in the engine, the manifest says %s" % (kind, t.name, name, t.dtype))
            shape = tuple(engine.get_tensor_shape(t.name))
            dynamic_ok = getattr(t, "profile", None) is not None if kind == "input" else any_profile
            if len(shape) != len(t.shape) or any(
                    d != w and not (d == -1 and dynamic_ok) for d, w in zip(shape, t.shape)):
                hint = " (-1 is allowed only for an input with a profile in the manifest)" if -1 in shape else ""
                raise mismatch("%s %r has shape %s in the engine, the manifest says %s%s"
                               % (kind, t.name, list(shape), list(t.shape), hint))


def _nbytes(t: TensorSpec) -> int:
    return int(np.prod(t.shape, dtype=np.int64)) * np.dtype(NUMPY_DTYPES[t.dtype]).itemsize


class _Plan:
    """What run(stage) or run_group(stages) does, precomputed: copies in, the engines in order, copies out."""
    __slots__ = ("name", "contexts", "uploads", "downloads", "graph")

    def __init__(self, name: str, contexts: Tuple[Any, ...]) -> None:
        self.name = name
        self.contexts = contexts
        self.uploads: List[Tuple[Any, np.ndarray]] = []    # (device, pinned host) for host-fed inputs
        self.downloads: List[Tuple[np.ndarray, Any]] = []  # (pinned host, device) for sinks
        self.graph: Optional[CudaGraph] = None

    @classmethod
    def merged(cls, plans: List["_Plan"]) -> "_Plan":
        """One plan for stages run back to back: every upload first (a host source two stages share goes up
        once), then the engines, then every download."""
        group = cls("+".join(p.name for p in plans), tuple(c for p in plans for c in p.contexts))
        for p in plans:
            group.uploads += [u for u in p.uploads if all(u[0] is not v[0] for v in group.uploads)]
            group.downloads += p.downloads
        return group


class TensorRTBackend(StageBackend):
    """host_input / host_output return pinned (page-locked) arrays that close() frees: do not touch them, or views
    of them, after close() (copy out what must outlive the backend)."""

    name = "tensorrt"

    def __init__(self, manifest: Manifest, model_dir: str, cuda_graph: bool = False, warmup_runs: int = 1,
                 platform: Optional[TrtPlatform] = None, intra_op_threads: int = 1) -> None:
        """intra_op_threads is accepted for load_policy's sake and unused (the GPU runs the stages).
        warmup_runs: runs of every stage before the constructor returns; one is what CUDA graph capture needs
        (TensorRT must run once before capture). The policy's own warm-up (policy.warmup_runs) follows."""
        if not isinstance(cuda_graph, bool):
            raise TypeError("cuda_graph must be true or false, got %r" % (cuda_graph,))
        if isinstance(warmup_runs, bool) or not isinstance(warmup_runs, int) or warmup_runs < 0:
            raise ValueError("warmup_runs must be an integer >= 0, got %r" % (warmup_runs,))
        if cuda_graph and warmup_runs < 1:
            raise ValueError("cuda_graph needs warmup_runs >= 1: TensorRT must run once before capture")
        if platform is not None and not isinstance(platform, TrtPlatform):
            raise TypeError("platform must be a TrtPlatform or None, got %s" % type(platform).__name__)
        if not os.path.isdir(model_dir):
            raise FileNotFoundError("model directory %s does not exist" % model_dir)
        self.manifest = manifest
        self.model_dir = model_dir
        self._closed = False
        self._owner = threading.get_ident()
        self._cuda_context: Any = None
        self._providers: Tuple[str, ...] = ()
        self._stream: Any = None
        self._runtime: Any = None
        self._engines: List[Any] = []
        self._plans: Dict[str, _Plan] = {}                # stage -> its plan, for run()
        self._groups: Dict[Tuple[str, ...], _Plan] = {}   # the policy's steps, for run_group()
        self.fuses_groups = cuda_graph
        self._device_buffers: List[Any] = []
        self._pinned_buffers: List[np.ndarray] = []
        self._host_inputs: Dict[Tuple[str, str], np.ndarray] = {}
        self._host_outputs: Dict[Tuple[str, str], np.ndarray] = {}

        metas = check_engines(manifest, model_dir, platform)  # (a) before any engine byte is read
        self._trt, self._cuda = import_gpu_modules()           # (b)
        try:
            self._load(metas, cuda_graph, warmup_runs)
        except BaseException:
            self.close()
            raise

    def _load(self, metas: Dict[str, EngineMeta], cuda_graph: bool, warmup_runs: int) -> None:
        trt, cuda = self._trt, self._cuda
        context = primary_context(cuda)
        context.push()
        self._cuda_context = context
        device = cuda.Device(0)
        major, minor = device.compute_capability()
        self._providers = ("TensorRT %s" % trt.__version__,
                           "%s (sm %d.%d)" % (device.name(), major, minor))

        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        if any(m.version_compatible for m in metas.values()):
            if not hasattr(self._runtime, "engine_host_code_allowed"):  # TensorRT >= 8.6
                raise RuntimeError("an engine was built VERSION_COMPATIBLE but TensorRT %s cannot load such "
                                   "engines (8.6+ can); %s" % (trt.__version__, REBUILD_HINT))
            self._runtime.engine_host_code_allowed = True  # the engine embeds its lean runtime
        contexts: Dict[str, Any] = {}
        for stage in self.manifest.stages:
            path = engine_path(self.model_dir, stage.name)
            with open(path, "rb") as f:
                plan = f.read()
            check_engine_bytes(metas[stage.name], hashlib.sha256(plan).hexdigest())
            engine = self._runtime.deserialize_cuda_engine(plan)
            del plan
            if engine is None:
                raise RuntimeError("%s (stage %r): TensorRT could not deserialize the engine (see its log "
                                   "above); %s" % (path, stage.name, REBUILD_HINT))
            self._engines.append(engine)
            check_io(engine, trt, stage, path)
            ctx = engine.create_execution_context()
            if ctx is None:
                raise RuntimeError("%s (stage %r): create_execution_context failed (out of GPU memory?)"
                                   % (path, stage.name))
            contexts[stage.name] = ctx

        self._bind(contexts)
        cuda.Context.synchronize()  # the memsets ran on the default stream, which a non-blocking one does not wait for
        self._stream = cuda.Stream(flags=CU_STREAM_NON_BLOCKING)
        for _ in range(warmup_runs):
            self._run_all()
        if cuda_graph:
            self._groups = self._step_groups()
            driver = load_driver()
            stage_plans = list(self._plans.values())
            graphed = stage_plans + [g for g in self._groups.values() if g not in stage_plans]
            for plan in graphed:
                plan.graph = CudaGraph(driver)
                try:
                    plan.graph.capture(self._stream.handle, lambda p=plan: self._enqueue(p, in_graph=True))
                except RuntimeError as exc:
                    what = "stage %r" % plan.name if len(plan.contexts) == 1 else "stages %s" % plan.name
                    raise CudaGraphUnavailable("%s: CUDA graph capture failed: %s; run without cuda_graph"
                                               % (what, exc)) from exc
            self._providers += ("CUDA graphs",)
            for plan in graphed:
                self._run_plan(plan)  # the first launch of each graph, before reporting ready

    def _bind(self, contexts: Dict[str, Any]) -> None:
        """Allocate every buffer once and bind it: set_input_shape and set_tensor_address per tensor."""
        host_sources: Dict[str, Tuple[np.ndarray, Any]] = {}  # source -> (pinned host, device)
        produced: Dict[str, Any] = {}                          # "<stage>:<output>" -> device
        for stage in self.manifest.stages:
            ctx = contexts[stage.name]
            plan = _Plan(stage.name, (ctx,))
            where = "%s (stage %r)" % (engine_path(self.model_dir, stage.name), stage.name)
            for t in stage.inputs:
                source = t.source or ""
                if is_host_source(source):
                    pair = host_sources.get(source)
                    if pair is None:
                        pair = host_sources[source] = (self._pinned(t), self._device(t))
                    self._host_inputs[(stage.name, t.name)] = pair[0]
                    plan.uploads.append((pair[1], pair[0]))
                    device = pair[1]
                else:
                    device = produced[source]  # stage-to-stage: the producer's output buffer
                if not ctx.set_input_shape(t.name, tuple(t.shape)):
                    raise EngineMismatch("%s: input %r: the engine refuses shape %s (outside its optimization "
                                         "profile); %s" % (where, t.name, list(t.shape), REBUILD_HINT))
                self._set_address(ctx, where, t.name, device)
            for t in stage.outputs:
                shape = tuple(ctx.get_tensor_shape(t.name))
                if shape != tuple(t.shape):
                    raise EngineMismatch("%s: output %r has shape %s for the bound inputs, the manifest says "
                                         "%s; %s" % (where, t.name, list(shape), list(t.shape), REBUILD_HINT))
                device = produced["%s:%s" % (stage.name, t.name)] = self._device(t)
                if t.sink:
                    host = self._pinned(t)
                    self._host_outputs[(stage.name, t.name)] = host
                    plan.downloads.append((host, device))
                self._set_address(ctx, where, t.name, device)
            self._plans[stage.name] = plan

    def _step_groups(self) -> Dict[Tuple[str, ...], _Plan]:
        """The groups the policy runs (Policy._denoise): the context ('once') stages with the per-step stages for
        the first denoising step, the per-step stages alone for every later one."""
        groups: Dict[Tuple[str, ...], _Plan] = {}
        for names in self.manifest.step_groups:
            if names and names not in groups:
                plans = [self._plans[n] for n in names]
                groups[names] = plans[0] if len(plans) == 1 else _Plan.merged(plans)
        return groups

    @staticmethod
    def _set_address(ctx: Any, where: str, name: str, device: Any) -> None:
        if not ctx.set_tensor_address(name, int(device)):
            raise RuntimeError("%s: set_tensor_address(%r) failed" % (where, name))

    def _device(self, t: TensorSpec) -> Any:
        nbytes = _nbytes(t)
        device = self._cuda.mem_alloc(nbytes)
        self._device_buffers.append(device)
        self._cuda.memset_d8(device, 0, nbytes)  # defined contents, like allocate()
        return device

    def _pinned(self, t: TensorSpec) -> np.ndarray:
        host = self._cuda.pagelocked_empty(tuple(t.shape), NUMPY_DTYPES[t.dtype])
        host.fill(0)
        self._pinned_buffers.append(host)
        return host

    # --- hot path ---------------------------------------------------------------------

    def _enqueue(self, plan: _Plan, in_graph: bool = False) -> None:
        """Put the plan's work on the stream: the copies too when it is being captured (from pinned host buffers,
        which a capture allows), else only the engines, the copies being _run_plan's."""
        cuda, stream = self._cuda, self._stream
        if in_graph:
            for device, host in plan.uploads:
                cuda.memcpy_htod_async(device, host, stream)
        for context in plan.contexts:
            if not context.execute_async_v3(stream.handle):
                raise RuntimeError("stage(s) %s: TensorRT execute_async_v3 failed (see its log above)" % plan.name)
        if in_graph:
            for host, device in plan.downloads:
                cuda.memcpy_dtoh_async(host, device, stream)

    def _run_plan(self, plan: _Plan) -> None:
        cuda, stream = self._cuda, self._stream
        if plan.graph is not None:  # copies and engines in one launch
            plan.graph.launch(stream.handle)
        else:
            for device, host in plan.uploads:
                cuda.memcpy_htod_async(device, host, stream)
            self._enqueue(plan)
            for host, device in plan.downloads:
                cuda.memcpy_dtoh_async(host, device, stream)
        stream.synchronize()

    def _run_all(self) -> None:
        for stage in self.manifest.stages:
            self._run_plan(self._plans[stage.name])

    def _check_caller(self, what: str) -> None:
        if self._closed:
            raise RuntimeError("tensorrt backend: %s after close()" % what)
        if threading.get_ident() != self._owner:
            raise RuntimeError("tensorrt backend: %s from another thread than the one that created it (its CUDA "
                               "context is current there only)" % what)

    def run(self, stage: str) -> None:
        if self._closed or threading.get_ident() != self._owner:
            self._check_caller("run(%r)" % (stage,))
        plan = self._plans.get(stage)
        if plan is None:
            raise KeyError("no stage %r (stages: %s)" % (stage, ", ".join(self._plans)))
        self._run_plan(plan)

    def run_group(self, stages: Tuple[str, ...]) -> None:
        """A step the policy runs: one graph launch with cuda_graph, else (or for a group it does not run) one
        run() per stage."""
        if self._closed or threading.get_ident() != self._owner:
            self._check_caller("run_group(%r)" % (stages,))
        group = self._groups.get(stages)
        if group is None:
            for stage in stages:
                self.run(stage)
        else:
            self._run_plan(group)

    # --- the rest of the interface ----------------------------------------------------

    def host_input(self, stage: str, tensor: str) -> np.ndarray:
        """The pinned buffer to fill before run(); freed by close()."""
        return host_buffer(self._host_inputs, stage, tensor)

    def host_output(self, stage: str, tensor: str) -> np.ndarray:
        """The pinned buffer run() fills (sinks only); freed by close()."""
        if (stage, tensor) in self._host_outputs:
            return self._host_outputs[(stage, tensor)]
        try:
            spec = self.manifest.stage(stage)
        except KeyError:
            raise KeyError("no stage %r" % (stage,)) from None
        if any(t.name == tensor for t in spec.outputs):
            raise KeyError("stage %r output %r stays on the GPU: only sink outputs are copied to the host"
                           % (stage, tensor))
        raise KeyError("stage %r has no output %r" % (stage, tensor))

    @property
    def providers(self) -> Tuple[str, ...]:
        return self._providers

    def close(self) -> None:
        """Free graphs, TensorRT objects and buffers (host_input/host_output arrays too), then pop the context,
        which stays retained (see the module's "CUDA context"); idempotent."""
        if self._closed:
            return
        self._closed = True
        context = self._cuda_context
        foreign = context is not None and threading.get_ident() != self._owner
        if foreign:
            context.push()  # freeing needs the context current on this thread
        try:
            if self._stream is not None:
                self._stream.synchronize()
            for plan in list(self._plans.values()) + list(self._groups.values()):
                if plan.graph is not None:
                    plan.graph.close()
            # TensorRT objects: execution contexts before their engines, engines before the runtime.
            self._plans.clear()
            self._groups.clear()
            self._engines.clear()
            self._runtime = None
            for device in self._device_buffers:
                device.free()
            for host in self._pinned_buffers:
                free = getattr(host.base, "free", None)  # pagelocked_empty's .base: a pycuda HostAllocation
                if free is not None:
                    free()  # now, while the context is current, not at garbage collection
            self._device_buffers.clear()
            self._pinned_buffers.clear()
            self._host_inputs.clear()
            self._host_outputs.clear()
            self._stream = None
        finally:
            if context is not None:
                self._cuda_context = None
                context.pop()  # pushed at load (or above, on another thread); no detach: see "CUDA context"
