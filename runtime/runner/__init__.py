"""`wam-edge run`: the policy runtime (newest frame + newest robot state -> policy -> action chunk).

The design (freshness, the trigger, in flight, RTC) is described in docs/runtime.md.
"""

from __future__ import annotations

from .policy_runtime import PolicyRuntime, main, policy_from_config

__all__ = ["PolicyRuntime", "main", "policy_from_config"]
