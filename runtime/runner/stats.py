"""RuntimeStats: the policy runtime's counters and latency recorders, and their part of its report.

Preallocated (metrics.LatencyRecorder); the loop adds one sample per event, percentiles are computed at report time.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Optional

from runtime.metrics import LatencyRecorder

COUNTERS = ("chunks_sent", "chunks_dropped", "frames_used", "skipped_no_frame", "skipped_stale_frame",
            "skipped_no_state", "skipped_stale_state", "policy_errors", "overruns", "faults")


class RuntimeStats:
    """``counters`` by name; one recorder per latency (milliseconds). ``injected`` only with injected latency."""

    def __init__(self, stage_names: Iterable[str], injected: bool) -> None:
        self.counters: Dict[str, int] = {name: 0 for name in COUNTERS}
        self.frame_to_chunk = LatencyRecorder()
        self.inference = LatencyRecorder()  # the call's start to the chunk's release, injected latency included
        self.preprocess = LatencyRecorder()
        # per chunk, the runtime's own time: the inference call minus the network's stages and any injected delay
        # (preprocessing, sampler arithmetic, checks), plus encoding and sending; camera decoding happens on the
        # camera's thread before the frame's stamp and is not in it
        self.overhead = LatencyRecorder()
        self.frame_age = LatencyRecorder()  # per chunk: the frame's age when its inference started
        # per chunk sent, keyed by seq: the model's time in it (stages + injected latency, as slept or held), for
        # `wam-edge bench`'s frame to decode less the model (the controller's frame_to_decode_ms, same seqs)
        self.model = LatencyRecorder(1024, keyed=True)
        self.stages = {name: LatencyRecorder() for name in stage_names}
        self.starts_left = LatencyRecorder()  # time left in the executing chunk when an inference started
        self.injected: Optional[LatencyRecorder] = LatencyRecorder() if injected else None

    def policy_called(self, preprocess_ms: float, stage_ms: Dict[str, float]) -> None:
        """One inference that produced a chunk: its preprocessing and each stage's time."""
        self.preprocess.add(preprocess_ms)
        for name, ms in stage_ms.items():
            self.stages[name].add(ms)

    def chunk_released(self, frame_to_chunk_ms: float, inference_ms: float, overhead_ms: float) -> None:
        self.frame_to_chunk.add(frame_to_chunk_ms)
        self.inference.add(inference_ms)
        self.overhead.add(overhead_ms)

    def latency_report(self) -> Dict[str, Any]:
        """The report's ``latency_ms``."""
        return {
            "frame_to_chunk": self.frame_to_chunk.summary(),
            "inference": self.inference.summary(),
            "preprocess": self.preprocess.summary(),
            "overhead": self.overhead.summary(),
            "frame_age": self.frame_age.summary(),
            "model": self.model.summary(keyed=True),
            "stages": {name: rec.summary() for name, rec in self.stages.items()},
            # counts over fixed log-spaced bins (metrics.HISTOGRAM_EDGES_MS), computed here, at report time
            "histograms": {"inference": self.inference.histogram(),
                           "frame_to_chunk": self.frame_to_chunk.histogram(),
                           "overhead": self.overhead.histogram()},
        }
