"""ONNX Runtime backend: one InferenceSession per stage, IOBinding over numpy.

Every input and output is bound once, at load, to a numpy buffer by pointer, so
a run reads the host buffers in place and writes results straight into ours;
stage-to-stage tensors (the world K/V) are one buffer bound as the producer's
output and the consumer's input, never copied.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Sequence, Set, Tuple

import numpy as np
import onnxruntime as ort

from ..manifest import Manifest, ManifestError, StageSpec, TensorSpec, is_host_source
from .base import NUMPY_DTYPES, StageBackend, allocate

# ORT type string -> manifest dtype
_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


def _is_host_source(source: str) -> bool:
    return is_host_source(source)


class OnnxRuntimeBackend(StageBackend):
    name = "onnxruntime"

    def __init__(self, manifest: Manifest, model_dir: str,
                 providers: Sequence[str] = ("CPUExecutionProvider",),
                 intra_op_threads: int = 1) -> None:
        for p in providers:
            if p != "CPUExecutionProvider":
                # Binding numpy pointers is only valid for host memory; a GPU
                # provider needs device buffers (a later backend/issue).
                raise ValueError("OnnxRuntimeBackend binds host (numpy) buffers and supports "
                                 "only CPUExecutionProvider for now, got %r" % (p,))
        self.manifest = manifest
        self.model_dir = model_dir
        self._sessions: Dict[str, ort.InferenceSession] = {}
        self._bindings: Dict[str, Any] = {}
        self._inputs: Dict[Tuple[str, str], np.ndarray] = {}
        self._outputs: Dict[Tuple[str, str], np.ndarray] = {}
        self._host_inputs: Set[Tuple[str, str]] = set()  # fed from the host
        self._closed = False

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(intra_op_threads)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3

        host_buffers: Dict[str, np.ndarray] = {}  # one buffer per host source
        for stage in manifest.stages:
            path = os.path.join(model_dir, stage.file)
            try:
                session = ort.InferenceSession(path, sess_options=options,
                                               providers=list(providers))
            except Exception as exc:
                raise ManifestError("%s (stage %r): ONNX Runtime cannot load it: %s"
                                    % (path, stage.name, exc)) from exc
            self._check_graph(session, stage, path)
            binding = session.io_binding()
            for t in stage.inputs:
                source = t.source or ""
                if _is_host_source(source):
                    buf = host_buffers.get(source)
                    if buf is None:
                        buf = host_buffers[source] = allocate(t)
                    self._host_inputs.add((stage.name, t.name))
                else:
                    producer, output = source.split(":", 1)
                    buf = self._outputs[(producer, output)]
                self._inputs[(stage.name, t.name)] = buf
                binding.bind_input(t.name, "cpu", 0, NUMPY_DTYPES[t.dtype], list(t.shape),
                                   buf.ctypes.data)
            for t in stage.outputs:
                buf = allocate(t)
                self._outputs[(stage.name, t.name)] = buf
                binding.bind_output(t.name, "cpu", 0, NUMPY_DTYPES[t.dtype], list(t.shape),
                                    buf.ctypes.data)
            self._sessions[stage.name] = session
            self._bindings[stage.name] = binding
        self._providers = tuple(self._sessions[manifest.stages[0].name].get_providers())

    @staticmethod
    def _check_graph(session: ort.InferenceSession, stage: StageSpec, path: str) -> None:
        """The ONNX graph must declare exactly the manifest's tensors."""
        for kind, declared, actual in (("input", stage.inputs, session.get_inputs()),
                                       ("output", stage.outputs, session.get_outputs())):
            _compare(kind, declared, actual, stage, path)

    def host_input(self, stage: str, tensor: str) -> np.ndarray:
        key = (stage, tensor)
        if key not in self._host_inputs:
            raise KeyError("stage %r has no host-fed input %r" % (stage, tensor))
        return self._inputs[key]

    def host_output(self, stage: str, tensor: str) -> np.ndarray:
        # Every output lives on the host here; other backends may only expose sinks.
        try:
            return self._outputs[(stage, tensor)]
        except KeyError:
            raise KeyError("stage %r has no output %r" % (stage, tensor)) from None

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
        if shape != list(t.shape):
            dynamic = [d for d in shape if not isinstance(d, int)]
            hint = " (dynamic axes %s are not supported yet; export static shapes)" % dynamic \
                if dynamic else ""
            raise ManifestError("%s: %s %r has shape %s in the graph, manifest says %s%s"
                                % (where, kind, t.name, shape, list(t.shape), hint))
