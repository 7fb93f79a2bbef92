"""PolicyWrapper: a stand-in around a loaded Policy that changes ``infer`` and passes everything else through.

The test-rig and benchmark stand-ins (runtime/faults.py, runtime/policy/latency.py) derive from it, so the runner
sees one Policy interface whatever is wrapped around it.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

import numpy as np


class PolicyWrapper:
    def __init__(self, policy: Any) -> None:
        self.policy = policy

    def infer(self, images: Mapping[str, np.ndarray], state: np.ndarray) -> np.ndarray:
        return self.policy.infer(images, state)

    @property
    def manifest(self) -> Any:
        return self.policy.manifest

    @property
    def backend(self) -> Any:
        return self.policy.backend

    @property
    def last_stage_ms(self) -> Dict[str, float]:
        return self.policy.last_stage_ms

    @property
    def last_preprocess_ms(self) -> float:
        return self.policy.last_preprocess_ms

    def warmup(self, *args: Any, **kwargs: Any) -> None:
        self.policy.warmup(*args, **kwargs)

    def reseed(self, seed: int) -> None:
        self.policy.reseed(seed)

    def describe(self) -> str:
        return self.policy.describe()

    def close(self) -> None:
        self.policy.close()
