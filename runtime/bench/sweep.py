"""`wam-edge bench --sweep`: how the runtime's own overhead grows with the camera image size, the number of cameras
and the chunk length. Short loop runs (the same as the latency runs) at one small injected latency, one factor
varied at a time; per point the overhead per chunk and the preprocessing time (p50, p99).

Chunk length and camera count need model variants: the policy never preprocesses views the model does not take (a
layout may name more), so a camera that costs preprocessing and inference needs a model that takes it. The variants are
built once, by ``tools.make_reference --horizon H --cameras N`` in a subprocess (torch is needed there, never
here), into a cache directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from runtime.bench import OWN_TIME
from runtime.config import Config
from runtime.policy.manifest import load_manifest

FACTORS = ("image", "cameras", "horizon")
#: per camera: height x width
IMAGE_SIZES: Tuple[Tuple[int, int], ...] = ((240, 320), (480, 640), (720, 1280))
CAMERA_COUNTS: Tuple[int, ...] = (3, 4, 5, 6)
HORIZONS: Tuple[int, ...] = (16, 32, 64)
#: the sweep's inference trigger: a fixed grid at this rate, so a short run still gives enough chunks
SWEEP_TRIGGER_RATE_HZ = 20.0
#: the tools' sources a cached model variant depends on (the cache key hashes them)
TOOL_SOURCES = ("tools/make_reference.py", "tools/reference_model.py", "tools/export.py", "tools/onnx_forms.py")


def parse_factors(text: Optional[str]) -> List[str]:
    """``image,cameras`` -> ["image", "cameras"]; "" or "all" -> every factor. Unknown names raise ValueError."""
    if text is None or text.strip() in ("", "all"):
        return list(FACTORS)
    out: List[str] = []
    for part in text.split(","):
        name = part.strip()
        if name not in FACTORS:
            raise ValueError(f"unknown sweep factor {name!r} (known: {', '.join(FACTORS)})")
        if name not in out:
            out.append(name)
    return out


def layout_for(count: int, width: int, model_cameras: Sequence[str]) -> List[Dict[str, Any]]:
    """A camera.layout of ``count`` cameras, each ``width`` wide: the model's cameras first, then extra_1,
    extra_2, ... (the names the model variants of tools.make_reference --cameras give them)."""
    if count < len(model_cameras):
        raise ValueError(f"the model needs its {len(model_cameras)} cameras {list(model_cameras)}; {count} is fewer")
    names = list(model_cameras) + [f"extra_{i}" for i in range(1, count - len(model_cameras) + 1)]
    return [{"name": n, "width": int(width)} for n in names]


def camera_overrides(height: int, layout: Sequence[Dict[str, Any]]) -> List[str]:
    # JSON is YAML: the override parser reads the list as it is
    return [f"camera.height={int(height)}", "camera.layout=" + json.dumps(list(layout), separators=(",", ":"))]


Variant = Optional[Tuple[int, int]]  # (horizon, cameras) of a reference-model variant, or None: the configured model


def sweep_points(factors: Sequence[str], model_cameras: Sequence[str], base_height: int, base_width: int,
                 horizon: int, limit: Optional[int] = None) -> List[Tuple[str, Any, List[str], Variant]]:
    """(factor, value, camera overrides, model variant) per point; ``limit`` keeps the first points of each
    factor (tests)."""
    n_model = len(model_cameras)
    out: List[Tuple[str, Any, List[str], Variant]] = []
    for factor in factors:
        pts: List[Tuple[str, Any, List[str], Variant]] = []
        if factor == "image":
            for h, w in IMAGE_SIZES:
                pts.append((factor, f"{h}x{w}", camera_overrides(h, layout_for(n_model, w, model_cameras)), None))
        elif factor == "cameras":
            for n in sorted(set(max(n_model, c) for c in CAMERA_COUNTS)):
                pts.append((factor, n, camera_overrides(base_height, layout_for(n, base_width, model_cameras)),
                            (horizon, n)))
        elif factor == "horizon":
            for hz in HORIZONS:
                pts.append((factor, hz, [], (hz, n_model)))
        else:
            raise ValueError(f"unknown sweep factor {factor!r}")
        out.extend(pts[:limit] if limit else pts)
    return out


# -- model variants (horizon) ----------------------------------------------------------------------------------------

def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tools_available(root: str) -> Optional[str]:
    """Why model variants cannot be built here, or None. Looks for torch without importing it."""
    if not os.path.isfile(os.path.join(root, "tools", "make_reference.py")):
        return "tools/make_reference.py is not here (not a source checkout)"
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed (pip install 'wam-edge[export]' or the dev environment)"
    return None


def variant_cache_key(root: str) -> str:
    h = hashlib.sha256()
    for rel in TOOL_SOURCES:
        with open(os.path.join(root, rel), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:12]


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "wam-edge", "bench-models")


def ensure_variant(horizon: int, cameras: int, cache_dir: str, root: str, timeout_s: float = 600.0) -> str:
    """The directory of the reference model with this horizon and camera count, built once
    (``python -m tools.make_reference --horizon H --cameras N`` in a subprocess)."""
    out = os.path.join(cache_dir, variant_cache_key(root), f"h{horizon}-c{cameras}")
    if os.path.isfile(os.path.join(out, "manifest.json")):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f"h{horizon}.", dir=os.path.dirname(out))
    try:
        cmd = [sys.executable, "-m", "tools.make_reference", "--out", tmp, "--horizon", str(horizon),
               "--cameras", str(cameras)]
        r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout_s, check=False)
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"{' '.join(cmd[1:])} failed: {' | '.join(tail)}")
        try:
            os.rename(tmp, out)
        except OSError:  # another bench built it meanwhile
            if not os.path.isfile(os.path.join(out, "manifest.json")):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# -- running -----------------------------------------------------------------------------------------------------------

def point_summary(factor: str, value: Any, overrides: Sequence[str], run: Dict[str, Any]) -> Dict[str, Any]:
    lat = run["latency_ms"]
    return {
        "value": value,
        "overrides": list(overrides),
        "loop_ok": not run["errors"],
        "errors": run["errors"],
        "chunks_sent": run["chunks"]["sent"],
        "overhead_per_chunk_ms": lat["overhead_per_chunk"],
        "preprocess_ms": lat["preprocess"],
        "inference_ms": lat["inference"],
        "frame_to_chunk_ms": lat["frame_to_chunk"],
        "stages_ms": lat["stages"],
        "rss": run["rss"],
    }


def run_sweep(cfg: Config, overrides: Sequence[str], factors: Sequence[str], latency: str, seconds: float,
              run_one: Callable[[Optional[str], Sequence[str], str, float], Dict[str, Any]],
              cache_dir: Optional[str] = None, limit: Optional[int] = None,
              progress: Optional[Callable[[str, Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """The report's "sweep" section. ``run_one`` is harness.run_one (one loop run, summarized)."""
    manifest = load_manifest(cfg.resolve(cfg["model"]["path"]), verify_hashes=False)
    model_cams = list(manifest.camera_names)
    c = cfg["camera"]
    base_width = c["layout"][0]["width"] if c["layout"] else 640
    common = ["policy.trigger=fixed", f"policy.rate_hz={SWEEP_TRIGGER_RATE_HZ:g}"]
    section: Dict[str, Any] = {
        "latency": latency,
        "seconds_per_point_s": seconds,
        "camera_source": c["source"],
        "model_cameras": model_cams,
        "factors": {},
        "notes": [
            f"one factor at a time, the rest as configured (camera.height {c['height']}, {len(c['layout'])} cameras "
            f"{base_width} wide, the model's horizon {manifest.horizon}); injected latency {latency}; "
            f"policy.trigger=fixed at {SWEEP_TRIGGER_RATE_HZ:g} Hz so that each short run yields many chunks",
            "overhead_per_chunk_ms: " + OWN_TIME + "; preprocess_ms (resizing and normalizing the frames to the "
            "model's inputs) is part of it, also reported apart",
            f"image: per-camera height x width of the camera frame ({len(model_cams)} cameras); the model's input "
            "size is unchanged, preprocessing resizes",
            f"cameras: the layout's camera count, from the model's {len(model_cams)}; the policy skips views the "
            "model does not take, so each point runs a reference-model variant with "
            "that many cameras (extra_1, ... after the model's; tools.make_reference --cameras): the model uses "
            "them all, so inference and preprocess grow with them too; the overhead is measured apart from both",
            "horizon: reference-model variants with that action horizon (tools.make_reference --horizon); the "
            "chunk's duration is horizon x step_s",
            "model variants (cameras, horizon) are built once into a cache directory (--sweep-cache) by a "
            "subprocess that needs torch; their weights are random like the reference's; without torch those "
            "factors are skipped",
            f"camera.source is {c['source']}: with synthetic frames there is no JPEG decoding at all; set "
            "camera.source=image_server beside `wam-edge image-server-sim` to include decoding (it happens before "
            "the frame's stamp, so it is not in the overhead either way)",
        ],
    }
    points = sweep_points(factors, model_cams, c["height"], base_width, manifest.horizon, limit)
    cache = cache_dir or default_cache_dir()
    no_variants: Optional[str] = None
    if "horizon" in factors or "cameras" in factors:
        no_variants = tools_available(repo_root())
    for factor in factors:
        entry: Dict[str, Any] = {"points": [], "skipped": None}
        section["factors"][factor] = entry
        if factor in ("horizon", "cameras") and no_variants:
            entry["skipped"] = f"needs model variants: {no_variants}"
            continue
        for f, value, cam, variant in points:
            if f != factor:
                continue
            extra = list(cam)
            if variant is not None:
                try:
                    path = ensure_variant(variant[0], variant[1], cache, repo_root())
                except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
                    entry["points"].append({"value": value, "overrides": extra, "loop_ok": False,
                                            "errors": [str(exc)]})
                    continue
                extra.append(f"model.path={path}")
            all_overrides = list(overrides) + common + extra
            run = run_one(cfg.path, all_overrides, latency, seconds)
            point = point_summary(factor, value, extra, run)
            entry["points"].append(point)
            if progress is not None:
                progress(factor, point)
    section["ok"] = all(p.get("loop_ok") and (p.get("overhead_per_chunk_ms") or {}).get("count", 0) > 0
                        for e in section["factors"].values() for p in e["points"])
    return section


def _f(v: Any) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def print_point(factor: str, p: Dict[str, Any], out=sys.stdout) -> None:
    o, pre = p.get("overhead_per_chunk_ms", {}), p.get("preprocess_ms", {})
    out.write(f"sweep {factor} {p['value']}: overhead p50/p99 {_f(o.get('p50_ms'))}/{_f(o.get('p99_ms'))} ms, "
              f"preprocess p50/p99 {_f(pre.get('p50_ms'))}/{_f(pre.get('p99_ms'))} ms, "
              f"{p.get('chunks_sent', 0)} chunks{'' if p.get('loop_ok') else ' FAILED: ' + '; '.join(p['errors'])}\n")
    out.flush()
