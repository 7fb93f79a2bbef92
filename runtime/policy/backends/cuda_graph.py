"""CUDA graphs through the CUDA driver API (libcuda.so.1) with ctypes.

pycuda has no graph API, so the six driver calls needed are bound here by hand;
each can be checked against the CUDA Driver API reference (section "Graph
Management" and "Stream Management"). cuGraphInstantiateWithFlags needs CUDA
11.4 or newer (JetPack 5 ships 11.4). Every CUresult is checked: a non-zero
result is a RuntimeError naming the function, the code and cuGetErrorName's text.
"""

from __future__ import annotations

import ctypes
from typing import Any, Callable, Optional

LIBCUDA = "libcuda.so.1"

# enum CUstreamCaptureMode (cuda.h)
CU_STREAM_CAPTURE_MODE_GLOBAL = 0
CU_STREAM_CAPTURE_MODE_THREAD_LOCAL = 1
CU_STREAM_CAPTURE_MODE_RELAXED = 2

# name -> (argtypes, restype is always CUresult = int). Handles (CUstream, CUgraph,
# CUgraphExec) are opaque pointers.
_SIGNATURES = {
    # CUresult cuGetErrorName(CUresult error, const char** pStr)
    "cuGetErrorName": (ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)),
    # CUresult cuStreamBeginCapture_v2(CUstream hStream, CUstreamCaptureMode mode)  (CUDA >= 10.1)
    "cuStreamBeginCapture_v2": (ctypes.c_void_p, ctypes.c_int),
    # CUresult cuStreamEndCapture(CUstream hStream, CUgraph* phGraph)
    "cuStreamEndCapture": (ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)),
    # CUresult cuGraphInstantiateWithFlags(CUgraphExec* phGraphExec, CUgraph hGraph,
    #                                      unsigned long long flags)  (CUDA >= 11.4)
    "cuGraphInstantiateWithFlags": (ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_ulonglong),
    # CUresult cuGraphLaunch(CUgraphExec hGraphExec, CUstream hStream)
    "cuGraphLaunch": (ctypes.c_void_p, ctypes.c_void_p),
    # CUresult cuGraphExecDestroy(CUgraphExec hGraphExec)
    "cuGraphExecDestroy": (ctypes.c_void_p,),
    # CUresult cuGraphDestroy(CUgraph hGraph)
    "cuGraphDestroy": (ctypes.c_void_p,),
}


class CudaGraphUnavailable(RuntimeError):
    """CUDA graphs cannot be used here: no usable driver, a driver without the graph API, or a capture that failed.
    The same work still runs without graphs (model.cuda_graph false)."""


class CudaDriver:
    """The driver functions above, bound once from a loaded library."""

    def __init__(self, lib: Any) -> None:
        for name, argtypes in _SIGNATURES.items():
            try:
                fn = getattr(lib, name)
            except AttributeError:
                raise CudaGraphUnavailable("%s has no %s: CUDA graphs need a CUDA driver >= 11.4; run without "
                                           "cuda_graph" % (LIBCUDA, name)) from None
            fn.argtypes = list(argtypes)
            fn.restype = ctypes.c_int
            setattr(self, name, fn)

    def error_name(self, code: int) -> str:
        text = ctypes.c_char_p()
        if self.cuGetErrorName(code, ctypes.byref(text)) != 0 or not text.value:
            return "unknown CUresult"
        return text.value.decode("ascii", "replace")

    def check(self, name: str, code: int) -> None:
        if code != 0:
            raise RuntimeError("%s failed: CUresult %d (%s)" % (name, code, self.error_name(code)))


def load_driver(path: str = LIBCUDA) -> CudaDriver:
    """Load the CUDA driver library; a clear RuntimeError where there is none."""
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        raise CudaGraphUnavailable("cannot load %s (the NVIDIA CUDA driver) for CUDA graphs: %s; this machine has "
                                   "no usable NVIDIA driver, or run without cuda_graph" % (path, exc)) from exc
    return CudaDriver(lib)


class CudaGraph:
    """One captured sequence of stream work, replayed with one launch.

    Shapes and device addresses are frozen at capture: bind everything first,
    run the work once outside capture (TensorRT's advice), then capture."""

    def __init__(self, driver: Optional[CudaDriver] = None) -> None:
        self._driver = driver if driver is not None else load_driver()
        self._graph: Optional[int] = None
        self._exec: Optional[int] = None

    @property
    def captured(self) -> bool:
        return self._exec is not None

    def capture(self, stream_handle: int, fn: Callable[[], None]) -> None:
        """Record what fn() enqueues on the stream (which must not be the default
        stream, and nothing in fn may synchronise). The capture is ended even if
        fn raises; fn's exception then wins."""
        if self._exec is not None:
            raise RuntimeError("CudaGraph.capture: already captured; close() it first")
        if not stream_handle:
            raise ValueError("CudaGraph.capture: the default stream (handle 0) cannot be captured")
        d = self._driver
        d.check("cuStreamBeginCapture_v2",
                d.cuStreamBeginCapture_v2(stream_handle, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL))
        graph = ctypes.c_void_p()
        try:
            fn()
        except BaseException:
            code = d.cuStreamEndCapture(stream_handle, ctypes.byref(graph))
            if code == 0 and graph.value:
                d.cuGraphDestroy(graph.value)
            raise
        d.check("cuStreamEndCapture", d.cuStreamEndCapture(stream_handle, ctypes.byref(graph)))
        if not graph.value:
            raise RuntimeError("cuStreamEndCapture returned no graph (was the capture invalidated?)")
        self._graph = graph.value
        graph_exec = ctypes.c_void_p()
        d.check("cuGraphInstantiateWithFlags", d.cuGraphInstantiateWithFlags(ctypes.byref(graph_exec),
                                                                             self._graph, 0))
        self._exec = graph_exec.value

    def launch(self, stream_handle: int) -> None:
        if self._exec is None:
            raise RuntimeError("CudaGraph.launch: nothing captured (or closed)")
        self._driver.check("cuGraphLaunch", self._driver.cuGraphLaunch(self._exec, stream_handle))

    def close(self) -> None:
        """Destroy the executable graph and the graph; idempotent."""
        d = self._driver
        graph_exec, graph = self._exec, self._graph
        self._exec = self._graph = None
        try:
            if graph_exec is not None:
                d.check("cuGraphExecDestroy", d.cuGraphExecDestroy(graph_exec))
        finally:
            if graph is not None:
                d.check("cuGraphDestroy", d.cuGraphDestroy(graph))
