"""The bench's PNG: latencies per setting and what the robot felt. matplotlib is optional (the "bench" extra)."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence


def _vals(runs: Sequence[Dict[str, Any]], key: str, q: str) -> List[float]:
    out = []
    for r in runs:
        v = r["latency_ms"][key][q]
        out.append(float("nan") if v is None else float(v))
    return out


def plot_runs(runs: Sequence[Dict[str, Any]], path: str) -> Optional[str]:
    """Write the PNG; returns why it was skipped, or None when written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'wam-edge[bench]')"
    if not runs:
        return "no runs"
    labels = [r["latency"] for r in runs]
    x = list(range(len(runs)))
    w = 0.2
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))

    ax = axes[0][0]
    for i, (key, name) in enumerate((("inference", "inference"), ("frame_to_chunk", "frame -> chunk"))):
        ax.bar([v + (2 * i - 1.5) * w for v in x], _vals(runs, key, "p50_ms"), w, label=f"{name} p50")
        ax.bar([v + (2 * i - 0.5) * w for v in x], _vals(runs, key, "p99_ms"), w, label=f"{name} p99")
    ax.set_xticks(x)
    ax.set_xticklabels(labels)
    ax.set_yscale("log")
    ax.set_ylabel("ms")
    ax.set_xlabel("policy.inject_latency")
    ax.set_title("inference and frame -> chunk latency")
    ax.legend(fontsize=8)

    ax = axes[0][1]
    for i, key in enumerate(("overhead_per_chunk", "preprocess")):
        ax.bar([v + (2 * i - 1.5) * w for v in x], _vals(runs, key, "p50_ms"), w, label=f"{key} p50")
        ax.bar([v + (2 * i - 0.5) * w for v in x], _vals(runs, key, "p99_ms"), w, label=f"{key} p99")
    ax.set_xticks(x)
    ax.set_xticklabels(labels)
    ax.set_ylabel("ms")
    ax.set_xlabel("policy.inject_latency")
    ax.set_title("overhead (frame -> chunk minus inference), preprocess")
    ax.legend(fontsize=8)

    ax = axes[1][0]
    seam = [r["execution"]["seam_max_step_rad"] for r in runs]
    step = [r["execution"]["max_step_rad"] or 0.0 for r in runs]
    allowed = runs[0]["execution"]["max_step_allowed_rad"]
    ax.bar([v - w / 2 for v in x], seam, w, label="largest step at a seam")
    ax.bar([v + w / 2 for v in x], step, w, label="largest step anywhere")
    ax.axhline(allowed, color="red", linestyle="--", label=f"allowed {allowed} rad/tick")
    ax.set_xticks(x)
    ax.set_xticklabels(labels)
    ax.set_ylabel("rad per control tick")
    ax.set_xlabel("policy.inject_latency")
    ax.set_title("steps vs the velocity limit")
    ax.legend(fontsize=8)

    ax = axes[1][1]
    stalls = [r["execution"]["stalls"] for r in runs]
    overruns = [r["controller"]["overruns"] for r in runs]
    ax.bar([v - w / 2 for v in x], stalls, w, label="stalls (ticks)")
    ax.bar([v + w / 2 for v in x], overruns, w, label="controller overruns (ticks)")
    for v, r in zip(x, runs):
        ax.text(v, max(stalls + overruns + [1]) * 0.05, "OK" if r["ok"] else "FAILED", ha="center",
                color="green" if r["ok"] else "red")
    ax.set_xticks(x)
    ax.set_xticklabels(labels)
    ax.set_ylabel("ticks")
    ax.set_xlabel("policy.inject_latency")
    ax.set_title("stalls and missed control ticks")
    ax.legend(fontsize=8)

    fig.suptitle("wam-edge bench")
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None
