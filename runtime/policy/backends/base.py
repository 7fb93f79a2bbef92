"""The backend interface: what the policy needs from an inference engine.

Deliberately small so ONNX Runtime (CPU or GPU) and TensorRT can serve it. The
host only touches tensors it produces (camera, state, sampler x/t) or consumes
(the velocity sink); stage-to-stage tensors such as the world K/V stay inside
the backend (for TensorRT: on the GPU, never copied back).
"""

from __future__ import annotations

import abc
from typing import Dict, Tuple

import numpy as np

from ..manifest import TensorSpec

# manifest dtype -> numpy dtype
NUMPY_DTYPES = {
    "float32": np.float32,
    "float16": np.float16,
    "int32": np.int32,
    "int64": np.int64,
    "uint8": np.uint8,
    "bool": np.bool_,
}


def host_buffer(buffers: Dict[Tuple[str, str], np.ndarray], stage: str, tensor: str,
                what: str = "host-fed input") -> np.ndarray:
    """A backend's host_input / host_output: its (stage, tensor) -> buffer table, or a KeyError naming what the
    stage does not have."""
    try:
        return buffers[(stage, tensor)]
    except KeyError:
        raise KeyError("stage %r has no %s %r" % (stage, what, tensor)) from None


def allocate(spec: TensorSpec) -> np.ndarray:
    """Host buffer for one tensor; zeroed so an unused one is still defined."""
    return np.zeros(spec.shape, dtype=NUMPY_DTYPES[spec.dtype])


class StageBackend(abc.ABC):
    """Runs manifest stages on preallocated buffers, bound once at load.

    Contract: host_input/host_output return the same writable array on every
    call, valid until close(); run(stage) reads the current contents of the
    stage's host inputs and, when it returns, its host outputs are complete.
    Consumers of the same host source may share one buffer; callers dedupe by
    identity.
    """

    name = "base"

    @abc.abstractmethod
    def host_input(self, stage: str, tensor: str) -> np.ndarray:
        """Buffer for an input fed from the host (camera:*, state, sampler:*)."""

    @abc.abstractmethod
    def host_output(self, stage: str, tensor: str) -> np.ndarray:
        """Buffer for an output the host reads (a sink such as sampler:velocity)."""

    @abc.abstractmethod
    def run(self, stage: str) -> None:
        """Run one stage synchronously. Must not allocate per call."""

    #: True when run_group replays a group as one unit (TensorRT with CUDA graphs): the policy then times the
    #: group as a whole, since the stages in it cannot be timed one by one.
    fuses_groups = False

    def run_group(self, stages: Tuple[str, ...]) -> None:
        """Run stages in order, synchronously, as one denoising step. The host inputs of all of them are written
        before the call and their host outputs are complete when it returns. Default: run() each; a backend may
        replay the whole group at once (fuses_groups). Must not allocate per call."""
        for stage in stages:
            self.run(stage)

    @abc.abstractmethod
    def close(self) -> None:
        """Release sessions/engines; buffers must not be used afterwards."""

    @property
    @abc.abstractmethod
    def providers(self) -> Tuple[str, ...]:
        """What actually executes the stages (e.g. ORT execution providers)."""

    def describe(self) -> str:
        return "%s (%s)" % (self.name, ", ".join(self.providers))

    def __enter__(self) -> "StageBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
