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


def _label(ax: Any, x: Sequence[float], labels: Sequence[str], ylabel: str, title: str, log: bool = False) -> None:
    """One latency-setting panel's axes: a tick per setting, units, title, legend."""
    ax.set_xticks(x)
    ax.set_xticklabels(labels)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_xlabel("policy.inject_latency")
    ax.set_title(title)
    ax.legend(fontsize=8)


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
    fig, axes = plt.subplots(2 + len(runs), 2, figsize=(12, 8 + 3.5 * len(runs)), squeeze=False)

    ax = axes[0][0]
    for i, (key, name) in enumerate((("inference", "inference"), ("frame_to_chunk", "frame -> chunk"))):
        ax.bar([v + (2 * i - 1.5) * w for v in x], _vals(runs, key, "p50_ms"), w, label=f"{name} p50")
        ax.bar([v + (2 * i - 0.5) * w for v in x], _vals(runs, key, "p99_ms"), w, label=f"{name} p99")
    _label(ax, x, labels, "ms", "inference and frame -> chunk latency", log=True)

    ax = axes[0][1]
    for i, key in enumerate(("overhead_per_chunk", "preprocess")):
        ax.bar([v + (2 * i - 1.5) * w for v in x], _vals(runs, key, "p50_ms"), w, label=f"{key} p50")
        ax.bar([v + (2 * i - 0.5) * w for v in x], _vals(runs, key, "p99_ms"), w, label=f"{key} p99")
    _label(ax, x, labels, "ms", "runtime's own time per chunk, and preprocess")

    ax = axes[1][0]
    seam = [r["execution"]["seam_max_step_rad"] for r in runs]
    step = [r["execution"]["max_step_rad"] or 0.0 for r in runs]
    allowed = runs[0]["execution"]["max_step_allowed_rad"]
    ax.bar([v - w / 2 for v in x], seam, w, label="largest step at a seam")
    ax.bar([v + w / 2 for v in x], step, w, label="largest step anywhere")
    ax.axhline(allowed, color="red", linestyle="--", label=f"allowed {allowed} rad/tick")
    _label(ax, x, labels, "rad per control tick", "steps vs the velocity limit")

    ax = axes[1][1]
    stalls = [r["execution"]["stalls"] for r in runs]
    overruns = [r["controller"]["overruns"] for r in runs]
    ax.bar([v - w / 2 for v in x], stalls, w, label="stalls (ticks)")
    ax.bar([v + w / 2 for v in x], overruns, w, label="controller overruns (ticks)")
    for v, r in zip(x, runs):
        ax.text(v, max(stalls + overruns + [1]) * 0.05, "OK" if r["ok"] else "FAILED", ha="center",
                color="green" if r["ok"] else "red")
    _label(ax, x, labels, "ticks", "stalls and missed control ticks")

    for i, r in enumerate(runs):
        _plot_histograms(axes[2 + i][0], r)
        _plot_seam_traces(axes[2 + i][1], r)

    fig.suptitle("wam-edge bench")
    _save(plt, fig, path)
    return None


def _plot_histograms(ax: Any, run: Dict[str, Any]) -> None:
    """Inference and frame -> chunk latency histograms of one run: step plots over the fixed log-spaced bins."""
    hists = run["latency_ms"].get("histograms") or {}
    drawn = False
    for key, name in (("inference", "inference"), ("frame_to_chunk", "frame -> chunk")):
        h = hists.get(key)
        if not h or not sum(h["counts"]):
            continue
        edges, counts = h["edges_ms"], h["counts"]
        ax.step(edges, list(counts) + [counts[-1]], where="post", label=f"{name} ({sum(counts)})")
        drawn = True
    ax.set_xscale("log")
    ax.set_xlabel("ms")
    ax.set_ylabel("samples")
    ax.set_title(f"latency histograms, inject_latency {run['latency']}", fontsize=10)
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no histograms", ha="center", va="center", transform=ax.transAxes)


def _plot_seam_traces(ax: Any, run: Dict[str, Any]) -> None:
    """The commanded position around the first seams of one run, relative to its value at the seam: one colour per
    joint, one line style per seam; the seam at 0 ms."""
    traces = run["execution"].get("seam_traces") or []
    styles = ("-", "--", ":")
    for n, tr in enumerate(traces):
        at = tr["seam_index"]
        for j, (name, q) in enumerate(zip(tr["joints"], tr["q"])):
            if not q or at >= len(q):
                continue
            t = [tr["t0_ms"] + i * tr["period_ms"] for i in range(len(q))]
            ax.plot(t, [v - q[at] for v in q], styles[n % len(styles)], color=f"C{j}", linewidth=1,
                    label=f"seam {tr['seam']}: {name}")
    ax.axvline(0.0, color="red", linestyle="--", linewidth=1)
    ax.set_xlabel("ms from the seam")
    ax.set_ylabel("q_cmd - q_cmd at the seam (rad)")
    ax.set_title(f"commanded positions around seams, inject_latency {run['latency']}", fontsize=10)
    if traces:
        ax.legend(fontsize=6, ncol=len(traces))
    else:
        ax.text(0.5, 0.5, "no seams traced", ha="center", va="center", transform=ax.transAxes)


def _point_vals(points: Sequence[Dict[str, Any]], key: str, q: str) -> List[float]:
    out = []
    for p in points:
        v = (p.get(key) or {}).get(q)
        out.append(float("nan") if v is None else float(v))
    return out


def plot_sweep(section: Dict[str, Any], path: str) -> Optional[str]:
    """`wam-edge bench --sweep`: a panel per factor, overhead and preprocess (p50, p99) against the varied value.
    Returns why it was skipped, or None when written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'wam-edge[bench]')"
    factors = section.get("factors", {})
    if not factors:
        return "no factors"
    titles = {"image": "camera frame size per camera (h x w)", "cameras": "cameras in the layout",
              "horizon": "action horizon (chunk length)"}
    fig, axes = plt.subplots(1, len(factors), figsize=(5.5 * len(factors), 4.5), squeeze=False)
    for ax, (name, entry) in zip(axes[0], factors.items()):
        points = [p for p in entry.get("points", []) if "overhead_per_chunk_ms" in p]
        ax.set_title(titles.get(name, name), fontsize=10)
        ax.set_ylabel("ms")
        if not points:
            ax.text(0.5, 0.5, "skipped: " + str(entry.get("skipped") or "no points"), ha="center", va="center",
                    wrap=True, fontsize=8, transform=ax.transAxes)
            ax.set_xticks([])
            continue
        x = list(range(len(points)))
        for key, label, colour in (("overhead_per_chunk_ms", "overhead", "tab:blue"),
                                   ("preprocess_ms", "preprocess", "tab:orange")):
            ax.plot(x, _point_vals(points, key, "p50_ms"), "o-", color=colour, label=f"{label} p50")
            ax.plot(x, _point_vals(points, key, "p99_ms"), "s--", color=colour, label=f"{label} p99")
        ax.set_xticks(x)
        ax.set_xticklabels([str(p["value"]) for p in points])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"wam-edge bench --sweep: the runtime's own time per chunk (beyond the network and decoding) and "
                 f"preprocessing, injected latency {section.get('latency')}", fontsize=10)
    _save(plt, fig, path)
    return None


def _save(plt: Any, fig: Any, path: str) -> None:
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
