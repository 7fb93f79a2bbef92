"""A STAND-IN for tensorrt, pycuda.driver and libcuda's graph calls, for tests on machines without a GPU.

Not TensorRT: "device memory" is numpy byte arrays keyed by fake integer
addresses, copies move bytes and are counted, and an "engine" is a stage's ONNX
file behind a small header, executed by a real ONNX Runtime CPU session that
reads and writes the fake device buffers bound with set_tensor_address. Only
the documented names the backend uses exist (no __getattr__), so a misspelt
call fails here as it would on a Jetson. CUDA's rules it keeps: context stacks
are per thread; memset_d8 is default-stream work, which work on a non-blocking
stream must follow a Context.synchronize(); Context.detach() on the retained
primary context does what pycuda's does (push unless current, release, no pop).

    gpu = install(monkeypatch)             # fake modules in sys.modules, undone after the test
    write_engines(model_dir, manifest, gpu.platform)
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import sys
import threading
import types
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnxruntime as ort

from runtime.policy.backends import TrtPlatform, engine_path, tensorrt_backend
from runtime.policy.backends.cuda_graph import CudaDriver
from runtime.policy.backends.engine_meta import EngineMeta, meta_path, write_meta

MAGIC = b"FAKE-TRT-ENGINE-STANDIN-NO-GPU\n"


class DataType(enum.Enum):  # tensorrt.DataType
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8


class TensorIOMode(enum.Enum):  # tensorrt.TensorIOMode
    NONE = 0
    INPUT = 1
    OUTPUT = 2


_ORT_TO_TRT = {"tensor(float)": DataType.FLOAT, "tensor(float16)": DataType.HALF, "tensor(int32)": DataType.INT32,
               "tensor(int64)": DataType.INT64, "tensor(uint8)": DataType.UINT8, "tensor(bool)": DataType.BOOL}
_NUMPY = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT32: np.int32,
          DataType.INT64: np.int64, DataType.UINT8: np.uint8, DataType.BOOL: np.bool_}
_BY_NAME = {"float32": DataType.FLOAT, "float16": DataType.HALF, "bfloat16": DataType.BF16, "int32": DataType.INT32,
            "int64": DataType.INT64, "uint8": DataType.UINT8, "bool": DataType.BOOL}


class FakeGpu:
    """Everything the fake device holds and records, shared by the fake modules."""

    def __init__(self, trt_version: str = "10.3.0", gpu_name: str = "StandinGPU", capability: Tuple[int, int] = (8, 7),
                 host_code_attribute: bool = True) -> None:
        self.trt_version = trt_version
        self.gpu_name = gpu_name
        self.capability = capability
        self.host_code_attribute = host_code_attribute  # Runtime.engine_host_code_allowed exists (8.6+)
        self.memory: Dict[int, np.ndarray] = {}  # address -> uint8 bytes (live allocations)
        self._next = 0x7F0000001000
        self.copies: Counter = Counter()  # ("htod" | "dtoh", device address) -> count
        self.calls: Counter = Counter()   # API name -> count
        self.context_stacks: Dict[int, List[Any]] = {}  # thread id -> its CUDA context stack (CUDA's is per thread)
        self.retained = 0                 # cuDevicePrimaryCtxRetain minus cuDevicePrimaryCtxRelease
        self.default_stream_work = 0      # legacy default stream work no synchronize has waited for (memset_d8)
        self.streams: List["Stream"] = []
        self.runtimes: List["Runtime"] = []
        self.exec_contexts: List["IExecutionContext"] = []
        self.host_allocations: List["HostAllocation"] = []
        self.capturing: Optional[int] = None  # stream handle being captured
        # captured work, replayed by a launch: engine executions and copies, in stream order
        self.graphs: Dict[int, List[Callable[[], None]]] = {}
        self.graph_execs: Dict[int, List[Callable[[], None]]] = {}

    @property
    def platform(self) -> TrtPlatform:
        return TrtPlatform(self.trt_version, self.gpu_name, "%d.%d" % self.capability)

    @property
    def context_stack(self) -> List[Any]:
        """The calling thread's context stack."""
        return self.context_stacks.setdefault(threading.get_ident(), [])

    def allocate(self, nbytes: int) -> int:
        self.require_context("mem_alloc")
        address = self._next
        self._next += (nbytes + 0xFFF) & ~0xFFF or 0x1000
        self.memory[address] = np.zeros(nbytes, np.uint8)
        return address

    def require_context(self, what: str) -> None:
        if not self.context_stack:
            raise RuntimeError("standin pycuda: %s without a current CUDA context" % what)

    def device(self, pointer: Any, nbytes: int, what: str) -> np.ndarray:
        address = int(pointer)
        if address not in self.memory:
            raise ValueError("standin: %s: %#x is not a live device allocation" % (what, address))
        mem = self.memory[address]
        if mem.nbytes != nbytes:
            raise ValueError("standin: %s: %d bytes, the allocation at %#x has %d"
                             % (what, nbytes, address, mem.nbytes))
        return mem


# --- the fake tensorrt module ---------------------------------------------------------

class Dims(tuple):
    """tensorrt.Dims: a sequence of ints."""


class Logger:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self, min_severity: int = WARNING) -> None:
        self.min_severity = min_severity


class Runtime:
    def __init__(self, logger: Logger) -> None:
        if not isinstance(logger, Logger):
            raise TypeError("standin trt.Runtime needs a trt.Logger")
        self._gpu: FakeGpu = _GPU[0]
        self._gpu.calls["Runtime"] += 1
        self._gpu.runtimes.append(self)
        self.host_code_allowed_set = False
        if self._gpu.host_code_attribute:
            self.engine_host_code_allowed = False

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "engine_host_code_allowed":
            if not self._gpu.host_code_attribute:
                raise AttributeError("engine_host_code_allowed (TensorRT < 8.6)")
            object.__setattr__(self, "host_code_allowed_set", bool(value))
        object.__setattr__(self, name, value)

    def deserialize_cuda_engine(self, serialized_engine: bytes) -> Optional["ICudaEngine"]:
        self._gpu.calls["deserialize_cuda_engine"] += 1
        if not isinstance(serialized_engine, (bytes, bytearray)) or not serialized_engine.startswith(MAGIC):
            return None  # TensorRT logs an error and returns None
        rest = bytes(serialized_engine[len(MAGIC):])
        header, onnx_bytes = rest.split(b"\n", 1)
        return ICudaEngine(self._gpu, json.loads(header.decode()), onnx_bytes)


class ICudaEngine:
    def __init__(self, gpu: FakeGpu, header: Dict[str, Any], onnx_bytes: bytes) -> None:
        self._gpu = gpu
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self._session = ort.InferenceSession(onnx_bytes, sess_options=options, providers=["CPUExecutionProvider"])
        self._io: Dict[str, Tuple[TensorIOMode, DataType, Tuple[int, ...]]] = {}
        for mode, args in ((TensorIOMode.INPUT, self._session.get_inputs()),
                           (TensorIOMode.OUTPUT, self._session.get_outputs())):
            for a in args:
                self._io[a.name] = (mode, _ORT_TO_TRT[a.type], tuple(a.shape))
        for name, shape in header.get("shapes", {}).items():
            mode, dtype, _ = self._io[name]
            self._io[name] = (mode, dtype, tuple(shape))
        for name, dtype_name in header.get("dtypes", {}).items():
            mode, _, shape = self._io[name]
            self._io[name] = (mode, _BY_NAME[dtype_name], shape)
        for name in header.get("drop", []):
            del self._io[name]
        self._names = list(self._io)

    @property
    def num_io_tensors(self) -> int:
        return len(self._names)

    def get_tensor_name(self, index: int) -> str:
        return self._names[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self._io[name][0] if name in self._io else TensorIOMode.NONE

    def get_tensor_dtype(self, name: str) -> DataType:
        return self._io[name][1]

    def get_tensor_shape(self, name: str) -> Dims:
        return Dims(self._io[name][2])

    def create_execution_context(self) -> "IExecutionContext":
        return IExecutionContext(self)


class IExecutionContext:
    def __init__(self, engine: ICudaEngine) -> None:
        self._engine = engine
        self._gpu = engine._gpu
        self._gpu.exec_contexts.append(self)
        self.shapes: Dict[str, Tuple[int, ...]] = {}
        self.addresses: Dict[str, int] = {}
        self.calls: Counter = Counter()  # API name -> count, per context
        self.executed = 0

    def set_input_shape(self, name: str, shape: Sequence[int]) -> bool:
        self.calls["set_input_shape"] += 1
        mode, _, declared = self._engine._io[name]
        shape = tuple(int(d) for d in shape)
        if mode != TensorIOMode.INPUT or len(shape) != len(declared) or any(
                d != s and d != -1 for d, s in zip(declared, shape)):
            return False
        self.shapes[name] = shape
        return True

    def get_tensor_shape(self, name: str) -> Dims:
        return Dims(self.shapes.get(name, self._engine._io[name][2]))

    def set_tensor_address(self, name: str, memory: int) -> bool:
        self.calls["set_tensor_address"] += 1
        if name not in self._engine._io or not isinstance(memory, int):
            return False
        self.addresses[name] = memory
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        gpu = self._gpu
        self.calls["execute_async_v3"] += 1
        streams = [s for s in gpu.streams if s.handle == stream_handle]
        if not streams or set(self.addresses) != set(self._engine._io):
            return False
        streams[0].check_ordered("execute_async_v3")
        if gpu.capturing == stream_handle:
            gpu.graphs.setdefault(-1, []).append(self.execute)  # recorded into the graph being captured
            return True
        self.execute()
        return True

    def execute(self) -> None:
        """What the engine computes: the stage's ONNX graph on the bound device bytes."""
        gpu, io = self._gpu, self._engine._io

        def view(name: str) -> np.ndarray:
            _, dtype, _ = io[name]
            shape = self.get_tensor_shape(name)
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(_NUMPY[dtype]).itemsize
            return gpu.device(self.addresses[name], nbytes, name).view(_NUMPY[dtype]).reshape(shape)

        session = self._engine._session
        feeds = {a.name: view(a.name) for a in session.get_inputs()}
        outputs = session.run(None, feeds)
        for a, value in zip(session.get_outputs(), outputs):
            np.copyto(view(a.name), value)
        self.executed += 1


def _trt_module(gpu: FakeGpu) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = gpu.trt_version
    trt.Logger, trt.Runtime, trt.ICudaEngine, trt.IExecutionContext = Logger, Runtime, ICudaEngine, IExecutionContext
    trt.DataType, trt.TensorIOMode, trt.Dims = DataType, TensorIOMode, Dims
    trt.float32, trt.float16, trt.int8, trt.int32 = DataType.FLOAT, DataType.HALF, DataType.INT8, DataType.INT32
    trt.bool, trt.uint8, trt.fp8, trt.bfloat16, trt.int64 = (DataType.BOOL, DataType.UINT8, DataType.FP8,
                                                             DataType.BF16, DataType.INT64)
    return trt


# --- the fake pycuda.driver module ----------------------------------------------------

class DeviceAllocation:
    def __init__(self, gpu: FakeGpu, nbytes: int) -> None:
        self._gpu = gpu
        self.address = gpu.allocate(nbytes)

    def __int__(self) -> int:
        return self.address

    def free(self) -> None:
        self._gpu.require_context("DeviceAllocation.free")
        self._gpu.memory.pop(self.address, None)


class HostAllocation(bytearray):
    """The .base of a pagelocked_empty array."""

    def free(self) -> None:
        self.freed = True


_CU_STREAM_NON_BLOCKING = 1  # cuda.h CUstream_flags


class Stream:
    def __init__(self, flags: int = 0) -> None:
        gpu = _GPU[0]
        gpu.require_context("Stream")
        if isinstance(flags, bool) or not isinstance(flags, int) or flags not in (0, _CU_STREAM_NON_BLOCKING):
            raise TypeError("standin pycuda: Stream(flags=...) takes CUstream_flags (0 or 1), got %r" % (flags,))
        gpu.streams.append(self)
        self.flags = flags
        self.handle = 0x5000 + len(gpu.streams)

    def check_ordered(self, what: str) -> None:
        """A non-blocking stream does not wait for the legacy default stream: its work must come after a
        synchronize that did."""
        if self.flags & _CU_STREAM_NON_BLOCKING and _GPU[0].default_stream_work:
            raise RuntimeError("standin: %s on a non-blocking stream while default-stream work (memset_d8) is not "
                               "synchronised: it may run before that work" % what)

    def synchronize(self) -> None:
        if _GPU[0].capturing == self.handle:
            raise RuntimeError("standin: synchronize inside a stream capture")


class Context:
    """A retained primary context (pycuda's primary_context)."""

    def __init__(self, gpu: FakeGpu) -> None:
        self._gpu = gpu
        self.thread = threading.get_ident()  # pycuda's m_thread: detach() cleans up from this thread only

    def push(self) -> None:
        self._gpu.calls["Context.push"] += 1
        self._gpu.context_stack.append(self)

    @staticmethod
    def pop() -> None:
        gpu = _GPU[0]
        gpu.calls["Context.pop"] += 1
        if not gpu.context_stack:
            raise RuntimeError("standin pycuda: context::pop: cannot pop non-current context")
        gpu.context_stack.pop()

    @staticmethod
    def synchronize() -> None:
        gpu = _GPU[0]
        gpu.require_context("Context.synchronize")
        gpu.calls["Context.synchronize"] += 1
        gpu.default_stream_work = 0

    def detach(self) -> None:
        """As pycuda does for a primary context: unless current, push it (from its own thread; from another it
        does nothing), then cuDevicePrimaryCtxRelease, which does not pop, so it stays current."""
        gpu = self._gpu
        gpu.calls["Context.detach"] += 1
        if not gpu.context_stack or gpu.context_stack[-1] is not self:
            if threading.get_ident() != self.thread:
                return
            gpu.context_stack.append(self)
        gpu.retained -= 1


class Device:
    def __init__(self, number: int) -> None:
        if number != 0:
            raise RuntimeError("standin: one device only")
        self._gpu = _GPU[0]

    def name(self) -> str:
        return self._gpu.gpu_name

    def compute_capability(self) -> Tuple[int, int]:
        return self._gpu.capability

    def retain_primary_context(self) -> Context:
        self._gpu.retained += 1
        return Context(self._gpu)


def _check_pinned(array: np.ndarray, what: str) -> None:
    if not isinstance(array.base, HostAllocation):
        raise ValueError("standin: %s from/to host memory that is not pagelocked" % what)


def _driver_module(gpu: FakeGpu) -> types.ModuleType:
    cuda = types.ModuleType("pycuda.driver")

    def init(flags: int = 0) -> None:
        gpu.calls["init"] += 1

    def mem_alloc(nbytes: int) -> DeviceAllocation:
        return DeviceAllocation(gpu, nbytes)

    def memset_d8(dest: Any, data: int, size: int) -> None:
        gpu.device(dest, size, "memset_d8")[...] = data
        gpu.default_stream_work += 1  # cuMemsetD8 is asynchronous, on the legacy default stream

    def pagelocked_empty(shape: Any, dtype: Any, order: str = "C", mem_flags: int = 0) -> np.ndarray:
        gpu.require_context("pagelocked_empty")
        shape = tuple(shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        host = HostAllocation(nbytes)
        gpu.host_allocations.append(host)
        return np.ndarray(shape, dtype, buffer=host, order=order)

    def on_stream(stream: Optional[Stream], work: Callable[[], None]) -> None:
        """Do the copy now, or record it into the graph being captured on this stream."""
        assert isinstance(stream, Stream), "standin: copies must go on the backend's stream"
        stream.check_ordered("a copy")
        if gpu.capturing == stream.handle:
            gpu.graphs[-1].append(work)
        else:
            work()

    def memcpy_htod_async(dest: Any, src: np.ndarray, stream: Optional[Stream] = None) -> None:
        _check_pinned(src, "memcpy_htod_async")  # a capture refuses pageable memory
        target = gpu.device(dest, src.nbytes, "memcpy_htod_async")

        def copy() -> None:
            target[...] = src.reshape(-1).view(np.uint8)
            gpu.copies[("htod", int(dest))] += 1
        on_stream(stream, copy)

    def memcpy_dtoh_async(dest: np.ndarray, src: Any, stream: Optional[Stream] = None) -> None:
        _check_pinned(dest, "memcpy_dtoh_async")
        source = gpu.device(src, dest.nbytes, "memcpy_dtoh_async")

        def copy() -> None:
            dest.reshape(-1).view(np.uint8)[...] = source
            gpu.copies[("dtoh", int(src))] += 1
        on_stream(stream, copy)

    for fn in (init, mem_alloc, memset_d8, pagelocked_empty, memcpy_htod_async, memcpy_dtoh_async):
        setattr(cuda, fn.__name__, fn)
    cuda.Device, cuda.Context, cuda.Stream = Device, Context, Stream
    cuda.DeviceAllocation, cuda.HostAllocation = DeviceAllocation, HostAllocation
    return cuda


# --- a fake libcuda for cuda_graph.CudaDriver -----------------------------------------

class _Fn:
    """A callable that, like a ctypes function, takes argtypes/restype attributes."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __call__(self, *args: Any) -> int:
        return self.fn(*args)


def _out(ref: Any, value: Any) -> None:
    ref._obj.value = value  # ctypes.byref(...) keeps the referenced object in ._obj


class FakeLibcuda:
    """libcuda's graph calls over FakeGpu: a captured graph replays its executions."""

    def __init__(self, gpu: FakeGpu, fail: Optional[Dict[str, int]] = None) -> None:
        self._gpu = gpu
        self.fail = dict(fail or {})  # function name -> CUresult to return
        self.calls: Counter = Counter()
        for name in ("cuGetErrorName", "cuStreamBeginCapture_v2", "cuStreamEndCapture",
                     "cuGraphInstantiateWithFlags", "cuGraphLaunch", "cuGraphExecDestroy", "cuGraphDestroy"):
            setattr(self, name, _Fn(self._wrap(name, getattr(self, "_" + name))))

    def _wrap(self, name: str, fn: Any) -> Any:
        def call(*args: Any) -> int:
            self.calls[name] += 1
            if name in self.fail:
                if name == "cuStreamEndCapture":  # an invalidated capture still ends, with no graph
                    self._gpu.capturing = None
                    self._gpu.graphs.pop(-1, None)
                return self.fail[name]
            return fn(*args)
        return call

    def _cuGetErrorName(self, code: int, text: Any) -> int:
        names = {1: b"CUDA_ERROR_INVALID_VALUE", 900: b"CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED"}
        _out(text, names.get(code, b"CUDA_ERROR_UNKNOWN"))
        return 0

    def _cuStreamBeginCapture_v2(self, stream: int, mode: int) -> int:
        if self._gpu.capturing is not None:
            return 1
        self._gpu.capturing = stream
        self._gpu.graphs[-1] = []
        return 0

    def _cuStreamEndCapture(self, stream: int, graph: Any) -> int:
        if self._gpu.capturing != stream:
            return 1
        self._gpu.capturing = None
        handle = 0x9000 + len(self._gpu.graphs)
        self._gpu.graphs[handle] = self._gpu.graphs.pop(-1)
        _out(graph, handle)
        return 0

    def _cuGraphInstantiateWithFlags(self, graph_exec: Any, graph: int, flags: int) -> int:
        handle = 0xA000 + len(self._gpu.graph_execs)
        self._gpu.graph_execs[handle] = list(self._gpu.graphs[graph])
        _out(graph_exec, handle)
        return 0

    def _cuGraphLaunch(self, graph_exec: int, stream: int) -> int:
        for work in self._gpu.graph_execs[graph_exec]:
            work()
        return 0

    def _cuGraphExecDestroy(self, graph_exec: int) -> int:
        return 0 if self._gpu.graph_execs.pop(graph_exec, None) is not None else 1

    def _cuGraphDestroy(self, graph: int) -> int:
        return 0 if self._gpu.graphs.pop(graph, None) is not None else 1


def fake_driver(gpu: FakeGpu, fail: Optional[Dict[str, int]] = None) -> Tuple[CudaDriver, FakeLibcuda]:
    lib = FakeLibcuda(gpu, fail)
    return CudaDriver(lib), lib


# --- installing, and writing engines ----------------------------------------------------

_GPU: List[FakeGpu] = []


def install(monkeypatch: Any, gpu: Optional[FakeGpu] = None) -> FakeGpu:
    """Put the fake tensorrt and pycuda.driver into sys.modules for this test, and give the backend a fresh
    process-wide primary-context cache (as in a new process)."""
    gpu = gpu or FakeGpu()
    monkeypatch.setattr(sys.modules[__name__], "_GPU", [gpu])
    monkeypatch.setattr(tensorrt_backend, "_PRIMARY_CONTEXTS", {})
    pycuda = types.ModuleType("pycuda")
    driver = _driver_module(gpu)
    pycuda.driver = driver
    monkeypatch.setitem(sys.modules, "tensorrt", _trt_module(gpu))
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    return gpu


def write_engines(model_dir: str, manifest: Any, platform: TrtPlatform, builder_flags: Tuple[str, ...] = ("FP16",),
                  header: Optional[Dict[str, Dict[str, Any]]] = None) -> None:
    """<stage>.engine (the stage's ONNX behind MAGIC and a JSON header) and matching
    <stage>.engine.json for every stage. header: stage -> {"shapes": {tensor: shape},
    "dtypes": {tensor: name}, "drop": [tensor]} to make an engine that differs from the manifest."""
    for stage in manifest.stages:
        with open(os.path.join(model_dir, stage.file), "rb") as f:
            onnx_bytes = f.read()
        path = engine_path(model_dir, stage.name)
        extra = json.dumps((header or {}).get(stage.name, {})).encode()
        plan = MAGIC + extra + b"\n" + onnx_bytes
        with open(path, "wb") as f:
            f.write(plan)
        write_meta(meta_path(path), EngineMeta(engine_sha256=hashlib.sha256(plan).hexdigest(),
            stage=stage.name, onnx_sha256=stage.sha256, trt_version=platform.trt_version,
            gpu_name=platform.gpu_name, compute_capability=platform.compute_capability, precision="fp16",
            builder_flags=tuple(builder_flags)))


__all__ = ["FakeGpu", "FakeLibcuda", "MAGIC", "fake_driver", "install", "write_engines"]
