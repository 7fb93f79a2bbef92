"""Errors the policy raises at run time (manifest problems are ManifestError)."""

from __future__ import annotations


class PolicyError(RuntimeError):
    """The policy could not produce a safe action chunk; nothing must be sent."""


class PolicyInputError(PolicyError, ValueError):
    """An image or state handed to the policy has the wrong shape/dtype/name."""
