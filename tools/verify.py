"""`wam-edge verify`: the same inputs through PyTorch, ONNX Runtime and the TensorRT engines, stage by stage.

The reference is the PyTorch model: run now from its factory (`--factory module:function [--checkpoint]`, needs
torch), or, on the robot where torch is absent, the golden data `wam-edge export` wrote beside the manifest
(`golden.npz`: seeded random host inputs and every stage's PyTorch inputs and outputs). Each stage is checked in
isolation: it gets the reference's inputs, including the tensors another stage produced, so an error is pinned on
the stage that made it instead of compounding down the chain. Then the runtime's own backends (the CPU one, and
the TensorRT one when the engines were checked) run the whole chain as `wam-edge run` will, and their sinks are
compared too.

ONNX Runtime and the engines run through polygraphy's runners (OnnxrtRunner, TrtRunner): they load sessions and
engines, bind and feed them; this module adds the metadata checks, the metrics and the thresholds. Per output it
reports the max absolute error, the max relative error (|a - b| / max(|b|, 1e-6)) and the cosine similarity, and
fails below the thresholds of the backend's precision: cosine >= 0.999 (the bar NVIDIA uses for its VLA engines)
everywhere, and for fp32 also a max absolute error <= 1e-3. Non-finite outputs always fail.

Exit status: 0 all passed, 1 a check failed, 2 bad arguments or unusable inputs, 3 engines were asked for
(--engines) but TensorRT is not usable here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from runtime.policy.backends import EngineFileMissing, engine_path, match_engines, probe_tensorrt, read_engine_metas
from runtime.policy.backends.engine_meta import (
    EngineMetaError,
    EngineMismatch,
    check_engine_bytes,
)
from runtime.policy.manifest import Manifest, ManifestError, is_host_source, load_manifest, sha256_file

GOLDEN_FILE = "golden.npz"
REL_FLOOR = 1e-6


@dataclass(frozen=True)
class Thresholds:
    """Pass bars for one precision; None: not checked (still reported)."""
    cosine: float
    max_abs: Optional[float] = None
    max_rel: Optional[float] = None


#: per precision; the engine's precision comes from its metadata, ONNX Runtime is fp32
DEFAULT_THRESHOLDS: Dict[str, Thresholds] = {
    "fp32": Thresholds(cosine=0.999, max_abs=1e-3),
    "fp16": Thresholds(cosine=0.999),
    "bf16": Thresholds(cosine=0.999),
}


#: precisions from the strictest to the loosest: an end-to-end run is judged by its loosest stage
LOOSENESS = ("fp32", "fp16", "bf16")


class VerifyError(RuntimeError):
    """Inputs verify cannot work with (no reference, a golden file for other ONNX files, ...)."""


class TensorRTUnusable(RuntimeError):
    """TensorRT or pycuda cannot be imported here, or cannot reach the GPU (exit 3 when engines are demanded)."""


@dataclass
class Comparison:
    stage: str
    output: str
    backend: str
    precision: str
    max_abs: float
    max_rel: float
    cosine: float
    finite: bool
    ok: bool
    why: str = ""


def metrics(got: np.ndarray, want: np.ndarray) -> Tuple[float, float, float, bool]:
    """(max abs error, max relative error, cosine similarity, all finite) of got against want."""
    a = np.asarray(got, dtype=np.float64).ravel()
    b = np.asarray(want, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise VerifyError("shape %s, reference %s" % (np.shape(got), np.shape(want)))
    finite = bool(np.isfinite(a).all())
    if not finite or a.size == 0:
        return float("inf") if not finite else 0.0, float("inf") if not finite else 0.0, \
            (0.0 if not finite else 1.0), finite
    diff = np.abs(a - b)
    max_abs = float(diff.max())
    max_rel = float((diff / np.maximum(np.abs(b), REL_FLOOR)).max())
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        cosine = 1.0
    elif na == 0.0 or nb == 0.0:
        cosine = 0.0
    else:
        cosine = float(np.dot(a, b) / (na * nb))
    return max_abs, max_rel, cosine, finite


def judge(stage: str, output: str, backend: str, precision: str, got: np.ndarray, want: np.ndarray,
          bars: Thresholds) -> Comparison:
    max_abs, max_rel, cosine, finite = metrics(got, want)
    why = []
    if not finite:
        why.append("non-finite values")
    else:
        if cosine < bars.cosine:
            why.append("cosine %.6f < %g" % (cosine, bars.cosine))
        if bars.max_abs is not None and max_abs > bars.max_abs:
            why.append("max abs %.3g > %g" % (max_abs, bars.max_abs))
        if bars.max_rel is not None and max_rel > bars.max_rel:
            why.append("max rel %.3g > %g" % (max_rel, bars.max_rel))
    return Comparison(stage, output, backend, precision, max_abs, max_rel, cosine, finite, not why, "; ".join(why))


# ---------------------------------------------------------------- the reference


def reference_from_factory(factory: str, checkpoint: Optional[str], manifest: Manifest,
                           seed: int) -> Dict[str, np.ndarray]:
    """Run the PyTorch model now (needs torch): every stage input and output, keyed <stage>/<tensor>."""
    from tools.export import ExportError, call_factory  # noqa: PLC0415 (imports torch)
    from tools.golden import make_golden  # noqa: PLC0415

    try:
        spec = call_factory(factory, checkpoint)
    except ExportError as exc:
        raise VerifyError(str(exc)) from exc
    theirs = dict(spec.manifest.get("sampler", {}))
    ours = {"steps": manifest.sampler.steps, "distilled": manifest.sampler.distilled}
    if {k: theirs.get(k) for k in ours} != ours:
        raise VerifyError("--factory %s describes another sampler (%s) than %s's manifest (%s): the wrong factory "
                          "for this model?" % (factory, theirs, manifest.name, ours))
    return make_golden(spec.stages, manifest, seed)


def reference_from_golden(path: str, manifest: Manifest) -> Dict[str, np.ndarray]:
    """golden.npz written by `wam-edge export`; refused when it was made for other ONNX files."""
    from tools.golden import read_golden  # noqa: PLC0415 (numpy only)

    if not os.path.isfile(path):
        raise VerifyError("no golden data %s: pass --factory module:function (needs torch) or re-export with "
                          "`wam-edge export` (it writes %s)" % (path, GOLDEN_FILE))
    arrays, meta = read_golden(path)
    made_for = meta.get("stages", {})
    for stage in manifest.stages:
        if made_for.get(stage.name) != stage.sha256:
            raise VerifyError("%s was made for other ONNX files (stage %s: golden %s, manifest %s); re-export "
                              "with `wam-edge export`" % (path, stage.name, made_for.get(stage.name), stage.sha256))
    return arrays


def stage_feed(manifest: Manifest, stage_name: str, reference: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    stage = manifest.stage(stage_name)
    feed = {}
    for t in stage.inputs:
        key = "%s/%s" % (stage.name, t.name)
        if key not in reference:
            raise VerifyError("the reference has no input %s" % key)
        feed[t.name] = np.ascontiguousarray(reference[key])
    return feed


# ---------------------------------------------------------------- the candidates (polygraphy runners)


@dataclass
class Candidate:
    """One backend to compare: a polygraphy runner per stage."""
    backend: str
    precision: Dict[str, str]                # stage -> precision
    make_runner: Callable[[str], Any]        # stage name -> polygraphy runner (not yet activated)


def quiet_polygraphy(verbose: bool) -> None:
    """polygraphy logs every session it creates; keep its warnings and errors only."""
    from polygraphy.logger import G_LOGGER  # noqa: PLC0415

    G_LOGGER.module_severity = G_LOGGER.INFO if verbose else G_LOGGER.ERROR


def onnxruntime_candidate(manifest: Manifest, model_dir: str, provider: str) -> Candidate:
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx  # noqa: PLC0415

    def make(stage: str) -> Any:
        path = os.path.join(model_dir, manifest.stage(stage).file)
        return OnnxrtRunner(SessionFromOnnx(path, providers=[provider]), name="onnxruntime-%s:%s" % (provider, stage))

    return Candidate("onnxruntime-%s" % provider, {s.name: "fp32" for s in manifest.stages}, make)


def engine_candidate(manifest: Manifest, model_dir: str) -> Candidate:
    """The engines `wam-edge build` wrote; their metadata is checked against this machine before any load."""
    try:
        platform = probe_tensorrt()
    except Exception as exc:  # ImportError, or pycuda.driver.Error from cuInit (no GPU, no driver)
        raise TensorRTUnusable("%s: %s" % (type(exc).__name__, exc)) from exc
    metas = read_engine_metas(manifest, model_dir)
    match_engines(manifest, metas, platform)
    for name, meta in metas.items():
        check_engine_bytes(meta, sha256_file(engine_path(model_dir, name)))
    precision = {name: meta.precision for name, meta in metas.items()}
    # Not EngineFromPath: it is recent (TensorRT 10 era), absent from the polygraphy of JetPack 5 (TensorRT 8.5)
    from polygraphy.backend.common import BytesFromPath  # noqa: PLC0415
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner  # noqa: PLC0415

    def make(stage: str) -> Any:
        # EngineFromBytes sets engine_host_code_allowed where the runtime has it (version-compatible engines)
        return TrtRunner(EngineFromBytes(BytesFromPath(engine_path(model_dir, stage))), name="tensorrt:%s" % stage)

    return Candidate("tensorrt", precision, make)


def run_runtime_backend(name: str, manifest: Manifest, model_dir: str, reference: Dict[str, np.ndarray],
                        bars: Thresholds, precision: str, options: Optional[Dict[str, Any]] = None,
                        label: Optional[str] = None) -> List[Comparison]:
    """The runtime's own backend, as `wam-edge run` loads it, end to end: the reference's host inputs into its
    buffers, the first denoising step as the policy runs it (run_group: the context stages, then the per-step
    ones; one CUDA graph launch for tensorrt with cuda_graph) with stage-to-stage tensors kept inside the backend
    (on the GPU for tensorrt), then each sink compared with the reference. Errors compound along the chain here,
    unlike the per-stage checks above: this is the number that reaches the robot."""
    from runtime.policy.backends import create_backend  # noqa: PLC0415

    backend = create_backend(name, manifest, model_dir, **(options or {}))
    first_step, later_step = manifest.step_groups
    try:
        for stage in manifest.stages:
            for t in stage.inputs:
                if is_host_source(t.source or ""):
                    backend.host_input(stage.name, t.name)[...] = reference["%s/%s" % (stage.name, t.name)]
        results = []
        # the first step, then a later one (the per-step stages alone: another graph with cuda_graph) on the same
        # inputs and the first step's K/V, which must give the same velocity; a model without context stages has
        # one kind of step only
        steps = [(first_step, "")] + ([(later_step, " (a later step)")] if later_step != first_step else [])
        for group, suffix in steps:
            sinks = [(s.name, t.name) for s in manifest.stages if s.name in group for t in s.outputs if t.sink]
            for stage_name, tensor in sinks:
                backend.host_output(stage_name, tensor).fill(np.nan)
            backend.run_group(group)
            for stage_name, tensor in sinks:
                got = backend.host_output(stage_name, tensor)
                want = reference["%s/%s" % (stage_name, tensor)]
                results.append(judge(stage_name + suffix, tensor, "runtime:" + (label or name), precision, got,
                                     want, bars))
        return results
    finally:
        backend.close()


def run_runtime_graphs(manifest: Manifest, model_dir: str, reference: Dict[str, np.ndarray], bars: Thresholds,
                       precision: str) -> Tuple[List[Comparison], Optional[str]]:
    """The TensorRT backend as `model.cuda_graph: true` runs it (each denoising step one captured graph), or, when
    the capture fails on this machine, why: a skip line, since the robot can run without graphs."""
    from runtime.policy.backends.cuda_graph import CudaGraphUnavailable  # noqa: PLC0415

    try:
        return run_runtime_backend("tensorrt", manifest, model_dir, reference, bars, precision,
                                   options={"cuda_graph": True}, label="tensorrt+graphs"), None
    except CudaGraphUnavailable as exc:  # no usable libcuda, or the capture failed; a replay error is a failure
        return [], "runtime:tensorrt+graphs: %s (leave model.cuda_graph false on this machine)" % exc


def engines_present(manifest: Manifest, model_dir: str) -> bool:
    return any(os.path.isfile(engine_path(model_dir, s.name)) for s in manifest.stages)


def run_candidate(candidate: Candidate, manifest: Manifest, reference: Dict[str, np.ndarray],
                  thresholds: Dict[str, Thresholds]) -> List[Comparison]:
    results = []
    for stage in manifest.stages:
        feed = stage_feed(manifest, stage.name, reference)
        with candidate.make_runner(stage.name) as runner:
            outputs = runner.infer(feed)
        precision = candidate.precision[stage.name]
        bars = thresholds[precision]
        for t in stage.outputs:
            want = reference["%s/%s" % (stage.name, t.name)]
            if t.name not in outputs:
                raise VerifyError("%s: stage %s returned no output %s" % (candidate.backend, stage.name, t.name))
            got = np.asarray(outputs[t.name])
            results.append(judge(stage.name, t.name, candidate.backend, precision, got, want, bars))
    return results


# ---------------------------------------------------------------- the command


def check_data_files(manifest: Manifest, model_dir: str) -> Optional[str]:
    """Each ONNX file must read its weights from exactly the data file the manifest hashes (none when it has no
    `data` entry): ONNX Runtime and TensorRT load what the ONNX file names, so a manifest that names another file, or
    none, would leave the weights unchecked. VerifyError on a mismatch; None when checked, else why not."""
    try:
        from tools.onnx_forms import external_locations  # noqa: PLC0415 (needs the onnx package)
    except ImportError as exc:
        return "external data: not checked against the ONNX files (%s)" % exc
    for stage in manifest.stages:
        named = external_locations(os.path.join(model_dir, stage.file))
        declared = [stage.data.file] if stage.data is not None else []
        if named != declared:
            raise VerifyError("stage %s: %s reads its weights from %s, but the manifest hashes %s; re-export with "
                              "`wam-edge export` instead of editing the model" % (
                                  stage.name, stage.file, named or "nothing outside it", declared or "none"))
    return None


def verify(model_dir: str, reference: Dict[str, np.ndarray], manifest: Manifest, providers: Sequence[str],
           engines: Optional[bool], thresholds: Dict[str, Thresholds]) -> Dict[str, Any]:
    """engines: True must, None where present and usable, False never. Returns the report."""
    unchecked = check_data_files(manifest, model_dir)
    candidates = [onnxruntime_candidate(manifest, model_dir, p) for p in providers]
    skipped = [unchecked] if unchecked else []
    if engines is not False and (engines or engines_present(manifest, model_dir)):
        try:
            candidates.append(engine_candidate(manifest, model_dir))
        except TensorRTUnusable as exc:
            if engines:
                raise
            skipped.append("tensorrt: engines present but TensorRT is not usable here (%s)" % exc)
    elif engines is None:
        skipped.append("tensorrt: no engines in %s (build them on the robot with `wam-edge build`)" % model_dir)
    results = []
    for candidate in candidates:
        results.extend(run_candidate(candidate, manifest, reference, thresholds))
    # end to end through what the runtime will run: the CPU backend always, the engines when they were checked
    results.extend(run_runtime_backend("onnxruntime", manifest, model_dir, reference, thresholds["fp32"], "fp32"))
    for candidate in candidates:
        if candidate.backend == "tensorrt":
            loosest = max(candidate.precision.values(), key=LOOSENESS.index)
            results.extend(run_runtime_backend("tensorrt", manifest, model_dir, reference, thresholds[loosest],
                                               loosest))
            graphed, why_not = run_runtime_graphs(manifest, model_dir, reference, thresholds[loosest], loosest)
            results.extend(graphed)
            if why_not:
                skipped.append(why_not)
    return {
        "model": model_dir,
        "manifest": manifest.name,
        "thresholds": {k: asdict(v) for k, v in thresholds.items()},
        "results": [asdict(r) for r in results],
        "skipped": skipped,
        "ok": bool(results) and all(r.ok for r in results),
    }


def print_report(report: Dict[str, Any], out: Any = None) -> None:
    out = out or sys.stdout  # looked up per call: whatever sys.stdout is now
    out.write("%-24s %-14s %-22s %-5s %11s %11s %10s  %s\n"
              % ("backend", "stage", "output", "prec", "max abs", "max rel", "cosine", "result"))
    for r in report["results"]:
        out.write("%-24s %-14s %-22s %-5s %11.3g %11.3g %10.6f  %s\n"
                  % (r["backend"], r["stage"], r["output"], r["precision"], r["max_abs"], r["max_rel"],
                     r["cosine"], "ok" if r["ok"] else "FAIL: " + r["why"]))
    for line in report["skipped"]:
        out.write("skipped %s\n" % line)
    out.write("verify: %s (reference: %s)\n" % ("passed" if report["ok"] else "FAILED", report.get("reference", "?")))


def _thresholds(args: argparse.Namespace) -> Dict[str, Thresholds]:
    out = {}
    for precision, bars in DEFAULT_THRESHOLDS.items():
        out[precision] = Thresholds(
            cosine=bars.cosine if args.cosine is None else args.cosine,
            max_abs=bars.max_abs if args.max_abs is None else args.max_abs,
            max_rel=bars.max_rel if args.max_rel is None else args.max_rel)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's arguments, description and epilog (`wam-edge verify` and ``python -m tools.verify``)."""
    p.description = __doc__.splitlines()[0].split(": ", 1)[1]
    p.epilog = ("The reference: --factory runs PyTorch now; without it, <model>/golden.npz from `wam-edge export` "
                "(what the robot uses: no torch there).")
    p.add_argument("--model", default=os.path.join("exported", "reference"), help="the exported model directory "
                   "(manifest.json, ONNX stages, engines; default %(default)s)")
    p.add_argument("--factory", metavar="MODULE:FUNCTION", help="the PyTorch model's factory, as for `wam-edge "
                   "export` (needs torch)")
    p.add_argument("--checkpoint", metavar="PATH", help="the checkpoint the factory loads")
    p.add_argument("--golden", metavar="PATH", help="golden data (default <model>/%s)" % GOLDEN_FILE)
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs with --factory (default 0)")
    p.add_argument("--ort-provider", dest="providers", action="append", metavar="NAME",
                   help="ONNX Runtime provider to check (repeatable; polygraphy's short names: cpu, cuda, tensorrt; "
                   "default cpu)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--engines", dest="engines", action="store_true", default=None,
                   help="the TensorRT engines must be checked (fail when TensorRT is not usable)")
    g.add_argument("--no-engines", dest="engines", action="store_false", help="do not check engines")
    p.add_argument("--cosine", type=float, help="minimum cosine similarity for every precision (default 0.999)")
    p.add_argument("--max-abs", type=float, help="maximum absolute error for every precision (default: 1e-3 for "
                   "fp32, unchecked for fp16/bf16)")
    p.add_argument("--max-rel", type=float, help="maximum relative error (default: unchecked)")
    p.add_argument("--report", metavar="PATH", help="write the JSON report here")
    p.add_argument("--verbose", action="store_true", help="show polygraphy's log")


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog)
    add_arguments(p)
    return p


def main(argv: Optional[Sequence[str]] = None, prog: str = "wam-edge verify") -> int:
    return run(build_parser(prog).parse_args(argv), prog)


def run(args: argparse.Namespace, prog: str = "wam-edge verify") -> int:
    def fail(code: int, msg: str) -> int:
        sys.stderr.write("%s: %s\n" % (prog, msg))
        return code

    if args.cosine is not None and not 0.0 < args.cosine <= 1.0:
        return fail(2, "--cosine must be in (0, 1]")
    for name in ("max_abs", "max_rel"):
        value = getattr(args, name)
        if value is not None and not value >= 0.0:
            return fail(2, "--%s must be >= 0" % name.replace("_", "-"))
    if args.checkpoint and not args.factory:
        return fail(2, "--checkpoint needs --factory")
    quiet_polygraphy(args.verbose)
    try:
        manifest = load_manifest(args.model)
    except (ManifestError, OSError) as exc:
        return fail(2, str(exc))
    try:
        if args.factory:
            reference = reference_from_factory(args.factory, args.checkpoint, manifest, args.seed)
            source = "PyTorch via %s" % args.factory
        else:
            golden = args.golden or os.path.join(args.model, GOLDEN_FILE)
            reference = reference_from_golden(golden, manifest)
            source = "PyTorch golden data %s" % golden
    except (VerifyError, ValueError, ImportError) as exc:
        return fail(2, "%s: %s" % (type(exc).__name__, exc) if isinstance(exc, ImportError) else str(exc))
    try:
        report = verify(args.model, reference, manifest, args.providers or ["cpu"], args.engines, _thresholds(args))
    except (TensorRTUnusable, ImportError) as exc:
        return fail(3, "TensorRT is not usable here (%s); engines are checked on the robot" % exc)
    except (VerifyError, EngineMismatch, EngineMetaError, EngineFileMissing) as exc:
        return fail(2, str(exc))
    report["reference"] = source
    print_report(report)
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
