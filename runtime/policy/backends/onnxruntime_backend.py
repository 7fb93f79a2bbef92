"""ONNX Runtime backend: one InferenceSession per stage, IOBinding over numpy.

Every input and output is bound once, at load, to a numpy buffer by pointer, so
a run reads the host buffers in place and writes results straight into ours;
stage-to-stage tensors (the world K/V) are one buffer bound as the producer's
output and the consumer's input, never copied. The GPU variant
(onnxruntime_gpu_backend) shares the session handling here.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnxruntime as ort

from ..manifest import Manifest, ManifestError, StageSpec, TensorSpec, is_host_source
from .base import NUMPY_DTYPES, StageBackend, allocate, host_buffer

# ORT type string -> manifest dtype
_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}

#: what InferenceSession(providers=...) takes: a name, or (name, options)
ProviderEntry = Union[str, Tuple[str, Dict[str, str]]]


def _is_host_source(source: str) -> bool:
    return is_host_source(source)


def session_options(intra_op_threads: int) -> ort.SessionOptions:
    """One sequential session per stage; the stages themselves run one after another."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(intra_op_threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


class OrtStages(StageBackend):
    """What the CPU and GPU ONNX Runtime backends share: a checked session per
    stage, host-fed input buffers (one per host source), host output buffers,
    run and close. Subclasses bind the tensors in __init__."""

    def __init__(self, manifest: Manifest, model_dir: str) -> None:
        self.manifest = manifest
        self.model_dir = model_dir
        self._sessions: Dict[str, ort.InferenceSession] = {}
        self._bindings: Dict[str, Any] = {}
        self._host_inputs: Dict[Tuple[str, str], np.ndarray] = {}
        self._host_outputs: Dict[Tuple[str, str], np.ndarray] = {}
        self._source_buffers: Dict[str, np.ndarray] = {}  # host source -> its one buffer
        self._providers: Tuple[str, ...] = ()
        self._closed = False

    def _open(self, stage: StageSpec, options: ort.SessionOptions,
              providers: Sequence[ProviderEntry]) -> ort.InferenceSession:
        path = os.path.join(self.model_dir, stage.file)
        try:
            session = ort.InferenceSession(path, sess_options=options, providers=list(providers))
        except Exception as exc:
            names = [p if isinstance(p, str) else p[0] for p in providers]
            raise ManifestError("%s (stage %r): ONNX Runtime %s cannot load it with providers %s: %s"
                                % (path, stage.name, ort.__version__, names, exc)) from exc
        self._check_graph(session, stage, path)
        return session

    def _host_source_buffer(self, stage: StageSpec, t: TensorSpec) -> np.ndarray:
        """The buffer of a host-fed input; consumers of one source share it."""
        source = t.source or ""
        buf = self._source_buffers.get(source)
        if buf is None:
            buf = self._source_buffers[source] = allocate(t)
        self._host_inputs[(stage.name, t.name)] = buf
        return buf

    @staticmethod
    def _check_graph(session: ort.InferenceSession, stage: StageSpec, path: str) -> None:
        """The ONNX graph must declare exactly the manifest's tensors."""
        for kind, declared, actual in (("input", stage.inputs, session.get_inputs()),
                                       ("output", stage.outputs, session.get_outputs())):
            _compare(kind, declared, actual, stage, path)

    def host_input(self, stage: str, tensor: str) -> np.ndarray:
        return host_buffer(self._host_inputs, stage, tensor)

    def host_output(self, stage: str, tensor: str) -> np.ndarray:
        return host_buffer(self._host_outputs, stage, tensor, "host output")

    def run(self, stage: str) -> None:
        self._sessions[stage].run_with_iobinding(self._bindings[stage])

    def bound_output_pointers(self, stage: str) -> List[int]:
        """Data pointers of the outputs ORT produced in the last run (to verify it
        wrote into our buffers, not into memory of its own)."""
        return [v.data_ptr() for v in self._bindings[stage].get_outputs()]

    @property
    def providers(self) -> Tuple[str, ...]:
        return self._providers

    def close(self) -> None:
        if not self._closed:
            for binding in self._bindings.values():
                binding.clear_binding_inputs()
                binding.clear_binding_outputs()
            self._bindings.clear()
            self._sessions.clear()
            self._closed = True


def bind_host_input(binding: Any, t: TensorSpec, buf: np.ndarray) -> None:
    """Bind a numpy buffer by pointer as a host (cpu) input: read in place on the
    CPU provider, copied to the device by ORT on a GPU provider."""
    binding.bind_input(t.name, "cpu", 0, NUMPY_DTYPES[t.dtype], list(t.shape), buf.ctypes.data)


def bind_host_output(binding: Any, t: TensorSpec, buf: np.ndarray) -> None:
    """Bind a numpy buffer by pointer as a host (cpu) output: ORT writes (or
    copies) the result into it."""
    binding.bind_output(t.name, "cpu", 0, NUMPY_DTYPES[t.dtype], list(t.shape), buf.ctypes.data)


class OnnxRuntimeBackend(OrtStages):
    """ONNX Runtime on the CPU: every tensor, stage-to-stage ones included, is a
    numpy buffer, so host_output serves every output."""

    name = "onnxruntime"

    def __init__(self, manifest: Manifest, model_dir: str,
                 providers: Sequence[str] = ("CPUExecutionProvider",),
                 intra_op_threads: int = 1) -> None:
        for p in providers:
            if p != "CPUExecutionProvider":
                # Binding numpy pointers is only valid for host memory; GPU
                # providers are the onnxruntime-gpu backend's.
                raise ValueError("OnnxRuntimeBackend binds host (numpy) buffers and supports only "
                                 "CPUExecutionProvider, got %r (use backend onnxruntime-gpu)" % (p,))
        super().__init__(manifest, model_dir)
        options = session_options(intra_op_threads)
        for stage in manifest.stages:
            session = self._open(stage, options, providers)
            binding = session.io_binding()
            for t in stage.inputs:
                source = t.source or ""
                if _is_host_source(source):
                    buf = self._host_source_buffer(stage, t)
                else:
                    producer, output = source.split(":", 1)
                    buf = self._host_outputs[(producer, output)]
                bind_host_input(binding, t, buf)
            for t in stage.outputs:
                buf = allocate(t)
                self._host_outputs[(stage.name, t.name)] = buf
                bind_host_output(binding, t, buf)
            self._sessions[stage.name] = session
            self._bindings[stage.name] = binding
        self._providers = tuple(self._sessions[manifest.stages[0].name].get_providers())


def _compare(kind: str, declared: Tuple[TensorSpec, ...], actual: List[Any],
             stage: StageSpec, path: str) -> None:
    where = "%s (stage %r)" % (path, stage.name)
    want = [t.name for t in declared]
    have = [a.name for a in actual]
    missing = [n for n in want if n not in have]
    extra = [n for n in have if n not in want]
    if missing or extra:
        raise ManifestError("%s: graph %ss %s do not match manifest %ss %s (missing in graph: %s; "
                            "not in manifest: %s)" % (where, kind, have, kind, want,
                                                      missing or "none", extra or "none"))
    by_name = {a.name: a for a in actual}
    for t in declared:
        a = by_name[t.name]
        dtype = _ORT_DTYPES.get(a.type, a.type)
        if dtype != t.dtype:
            raise ManifestError("%s: %s %r has dtype %s in the graph, manifest says %s"
                                % (where, kind, t.name, dtype, t.dtype))
        shape = list(a.shape)
        if not _shape_fits(shape, t):
            dynamic = [d for d in shape if not isinstance(d, int)]
            hint = ""
            if dynamic:
                hint = (" (dynamic axes %s need a profile (min, opt, max shapes) for %r in the manifest; "
                        "or export static shapes)" % (dynamic, t.name))
            raise ManifestError("%s: %s %r has shape %s in the graph, manifest says %s%s"
                                % (where, kind, t.name, shape, list(t.shape), hint))


def _shape_fits(graph_shape: List[Any], t: TensorSpec) -> bool:
    """Static graph dims must equal the manifest's; a symbolic one (a str or None
    in ORT's shape) is accepted only for a tensor with a declared profile."""
    if graph_shape == list(t.shape):
        return True
    profile: Optional[Any] = getattr(t, "profile", None)
    if profile is None or len(graph_shape) != len(t.shape):
        return False
    return all(not isinstance(g, int) or g == d for g, d in zip(graph_shape, t.shape))
