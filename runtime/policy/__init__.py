"""The policy: manifest-driven execution of an exported world action model.

    policy = load_policy("exported/reference")
    actions = policy.infer({"head": rgb, ...}, joint_positions)  # (horizon, dims)

Never imports torch; backends (onnxruntime, ...) are imported only when used.
"""

from __future__ import annotations

from .errors import PolicyError, PolicyInputError
from .manifest import Manifest, ManifestError, load_manifest, parse_manifest
from .policy import Policy, load_policy

__all__ = [
    "Manifest",
    "ManifestError",
    "Policy",
    "PolicyError",
    "PolicyInputError",
    "load_manifest",
    "load_policy",
    "parse_manifest",
]
