"""`wam-edge verify`: metrics, thresholds, golden data and the command, with real ONNX Runtime sessions
(through polygraphy's runner) against the PyTorch reference model and against the shipped golden data."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from runtime.policy import load_manifest
from tools import verify

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(REPO, "exported", "reference")

pytest.importorskip("polygraphy")


def test_metrics_exact_and_scaled():
    a = np.arange(1, 7, dtype=np.float32).reshape(2, 3)
    assert verify.metrics(a, a) == (0.0, 0.0, pytest.approx(1.0), True)
    max_abs, max_rel, cosine, finite = verify.metrics(a * 1.01, a)
    assert finite and max_abs == pytest.approx(0.06, rel=1e-4) and max_rel == pytest.approx(0.01, rel=1e-4)
    assert cosine == pytest.approx(1.0)  # a scale does not change the direction
    _, _, cosine, _ = verify.metrics(-a, a)
    assert cosine == pytest.approx(-1.0)


def test_metrics_non_finite_and_zero():
    a = np.ones(4, np.float32)
    bad = a.copy()
    bad[2] = np.nan
    max_abs, _, cosine, finite = verify.metrics(bad, a)
    assert not finite and max_abs == float("inf") and cosine == 0.0
    assert verify.metrics(np.zeros(3), np.zeros(3))[2] == 1.0
    assert verify.metrics(np.zeros(3), np.ones(3))[2] == 0.0
    with pytest.raises(verify.VerifyError, match="shape"):
        verify.metrics(np.zeros(3), np.zeros(4))


def test_judge_applies_the_precision_bars():
    want = np.linspace(-1, 1, 100).astype(np.float32)
    fp32, fp16 = verify.DEFAULT_THRESHOLDS["fp32"], verify.DEFAULT_THRESHOLDS["fp16"]
    assert fp32.cosine == fp16.cosine == 0.999  # NVIDIA's bar for its VLA engines
    close = want + 5e-4
    assert verify.judge("s", "o", "b", "fp32", close, want, fp32).ok
    off = want + 2e-3  # fine for the cosine, too far for fp32's absolute bar
    r = verify.judge("s", "o", "b", "fp32", off, want, fp32)
    assert not r.ok and "max abs" in r.why
    assert verify.judge("s", "o", "b", "fp16", off, want, fp16).ok
    noisy = want + np.random.default_rng(0).standard_normal(100).astype(np.float32) * 0.2
    r = verify.judge("s", "o", "b", "fp16", noisy, want, fp16)
    assert not r.ok and "cosine" in r.why
    nan = want.copy()
    nan[0] = np.nan
    assert verify.judge("s", "o", "b", "fp16", nan, want, fp16).why == "non-finite values"


def _run(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "runtime.cli", "verify", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=240)


def test_help_and_bad_arguments():
    r = _run("--help")
    assert r.returncode == 0 and "usage: wam-edge verify" in r.stdout
    r = _run("--cosine", "1.5")
    assert r.returncode == 2 and "--cosine" in r.stderr
    r = _run("--checkpoint", "x.pt")
    assert r.returncode == 2 and "--checkpoint needs --factory" in r.stderr
    r = _run("--model", "/nonexistent/model")
    assert r.returncode == 2 and "/nonexistent/model" in r.stderr


def _golden_copy(tmp_path):
    dst = tmp_path / "reference"
    shutil.copytree(REFERENCE, dst)
    return dst


def test_shipped_golden_passes_on_onnxruntime(tmp_path):
    """What the robot runs (no torch): the golden data export wrote vs ONNX Runtime, stage by stage."""
    report_path = tmp_path / "verify.json"
    r = _run("--model", REFERENCE, "--report", str(report_path))
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(report_path.read_text())
    manifest = load_manifest(REFERENCE)
    per_stage = [("onnxruntime-cpu", s.name, t.name) for s in manifest.stages for t in s.outputs]
    # end to end: the first step (context stages, then the expert), then a later step (the expert alone)
    end_to_end = [("runtime:onnxruntime", s.name + later, t.name) for later in ("", " (a later step)")
                  for s in manifest.stages for t in s.outputs if t.sink]
    assert [(x["backend"], x["stage"], x["output"]) for x in report["results"]] == per_stage + end_to_end
    for x in report["results"]:
        assert x["ok"] and x["cosine"] > 0.99999 and x["max_abs"] < 1e-4
    assert any("no engines" in s for s in report["skipped"])
    assert "verify: passed" in r.stdout


def test_a_wrong_output_fails_with_exit_1(tmp_path):
    """Golden data whose velocity was tampered with: the check must fail and name the output."""
    from tools.golden import read_golden, write_golden

    model = _golden_copy(tmp_path)
    arrays, meta = read_golden(str(model / verify.GOLDEN_FILE))
    key = "action_expert/velocity"
    arrays[key] = arrays[key] + np.float32(0.01) * np.sign(arrays[key])
    write_golden(str(model / verify.GOLDEN_FILE), arrays, meta)
    r = _run("--model", str(model))
    assert r.returncode == 1, r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if "velocity" in ln]
    assert len(lines) == 3  # the stage on its own; the runtime's backend end to end, first and later step
    assert all("FAIL" in ln and "max abs" in ln for ln in lines)
    assert "verify: FAILED" in r.stdout
    # a looser absolute bar lets it pass: the thresholds are the user's to set
    assert _run("--model", str(model), "--max-abs", "0.05").returncode == 0


def test_golden_for_other_onnx_files_is_refused(tmp_path):
    from tools.golden import read_golden, write_golden

    model = _golden_copy(tmp_path)
    arrays, meta = read_golden(str(model / verify.GOLDEN_FILE))
    meta["stages"]["world"] = "0" * 64
    write_golden(str(model / verify.GOLDEN_FILE), arrays, meta)
    r = _run("--model", str(model))
    assert r.returncode == 2 and "other ONNX files" in r.stderr and "world" in r.stderr
    os.remove(str(model / verify.GOLDEN_FILE))
    r = _run("--model", str(model))
    assert r.returncode == 2 and "--factory" in r.stderr


def test_engines_demanded_without_tensorrt_exit_3():
    pytest.importorskip("onnxruntime")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    r = _run("--model", REFERENCE, "--engines")
    assert r.returncode == 3 and "TensorRT is not usable" in r.stderr


def test_engine_candidate_loads_engines_as_bytes_for_old_polygraphy(tmp_path, monkeypatch):
    """The TrtRunner path without TensorRT: engines checked against their metadata, then each stage's runner is
    TrtRunner(EngineFromBytes(BytesFromPath(engine))) (polygraphy loads lazily: nothing runs until activated).
    EngineFromPath is removed here, as in the polygraphy of JetPack 5 (TensorRT 8.5), which lacks it."""
    import polygraphy.backend.trt as polygraphy_trt
    from polygraphy.backend.common import BytesFromPath
    from standins.trt_runtime_standin_no_gpu import write_engines

    from runtime.policy.backends import TrtPlatform, engine_path

    model = str(_golden_copy(tmp_path))
    manifest = load_manifest(model)
    platform = TrtPlatform("8.5.2", "Orin", "8.7")
    write_engines(model, manifest, platform)
    monkeypatch.setattr(verify, "probe_tensorrt", lambda: platform)
    monkeypatch.delattr(polygraphy_trt, "EngineFromPath", raising=False)
    candidate = verify.engine_candidate(manifest, model)
    assert candidate.backend == "tensorrt" and candidate.precision == {s.name: "fp16" for s in manifest.stages}
    for stage in manifest.stages:
        runner = candidate.make_runner(stage.name)
        assert isinstance(runner, polygraphy_trt.TrtRunner) and runner.name == "tensorrt:%s" % stage.name
        loader = runner._engine_or_context  # polygraphy's: the loader TrtRunner calls when activated
        assert isinstance(loader, polygraphy_trt.EngineFromBytes)
        assert isinstance(loader._serialized_engine, BytesFromPath)
        with open(engine_path(model, stage.name), "rb") as f:
            assert loader._serialized_engine() == f.read()
    monkeypatch.setattr(verify, "probe_tensorrt", lambda: TrtPlatform("10.3.0", "Orin", "8.7"))
    with pytest.raises(verify.EngineMismatch, match="TensorRT version: recorded 8.5.2, present 10.3.0"):
        verify.engine_candidate(manifest, model)


def _standin_engines(tmp_path, monkeypatch, fail=None):
    """The reference with stand-in engines (ONNX Runtime behind a fake TensorRT and pycuda: no GPU here), its
    golden reference data, and the fake libcuda the backend's CUDA graphs go through."""
    from standins.trt_runtime_standin_no_gpu import fake_driver, install, write_engines

    from runtime.policy.backends import tensorrt_backend

    gpu = install(monkeypatch)
    model = str(_golden_copy(tmp_path))
    manifest = load_manifest(model)
    write_engines(model, manifest, gpu.platform)
    driver, lib = fake_driver(gpu, fail)
    monkeypatch.setattr(tensorrt_backend, "load_driver", lambda: driver)
    monkeypatch.setattr(tensorrt_backend, "probe_tensorrt", lambda: gpu.platform)
    reference = verify.reference_from_golden(os.path.join(model, verify.GOLDEN_FILE), manifest)
    return manifest, model, reference, lib


def test_the_runtime_tensorrt_backend_is_checked_with_and_without_cuda_graphs(tmp_path, monkeypatch):
    manifest, model, reference, lib = _standin_engines(tmp_path, monkeypatch)
    bars = verify.DEFAULT_THRESHOLDS["fp32"]
    plain = verify.run_runtime_backend("tensorrt", manifest, model, reference, bars, "fp32")
    assert [(r.backend, r.stage, r.output) for r in plain] == [
        ("runtime:tensorrt", "action_expert", "velocity"), ("runtime:tensorrt", "action_expert (a later step)",
                                                            "velocity")]
    assert lib.calls["cuGraphLaunch"] == 0
    launches = lib.calls["cuGraphLaunch"]
    graphed, why_not = verify.run_runtime_graphs(manifest, model, reference, bars, "fp32")
    assert why_not is None and [r.backend for r in graphed] == ["runtime:tensorrt+graphs"] * 2
    assert all(r.ok for r in plain + graphed) and [r.max_abs for r in graphed] == [r.max_abs for r in plain]
    assert lib.calls["cuGraphLaunch"] - launches == 3 + 2  # three graphs' first launches, then the two steps


def test_a_cuda_graph_capture_that_fails_is_a_skip_line_not_a_failure(tmp_path, monkeypatch):
    manifest, model, reference, _ = _standin_engines(tmp_path, monkeypatch, fail={"cuStreamEndCapture": 900})
    graphed, why_not = verify.run_runtime_graphs(manifest, model, reference, verify.DEFAULT_THRESHOLDS["fp16"],
                                                 "fp16")
    assert graphed == [] and "CUDA graph capture failed" in why_not and "leave model.cuda_graph false" in why_not


def test_a_graph_that_captures_but_fails_to_run_is_an_error_not_a_skip(tmp_path, monkeypatch):
    manifest, model, reference, _ = _standin_engines(tmp_path, monkeypatch, fail={"cuGraphLaunch": 1})
    with pytest.raises(RuntimeError, match="cuGraphLaunch failed") as info:
        verify.run_runtime_graphs(manifest, model, reference, verify.DEFAULT_THRESHOLDS["fp16"], "fp16")
    from runtime.policy.backends.cuda_graph import CudaGraphUnavailable

    assert not isinstance(info.value, CudaGraphUnavailable)


class LogicError(Exception):
    """Named like pycuda.driver.LogicError, which cuInit raises on a machine without a usable GPU."""


def test_gpu_probe_failure_is_tensorrt_unusable_not_a_traceback(tmp_path, monkeypatch, capsys):
    from standins.trt_runtime_standin_no_gpu import write_engines

    from runtime.policy.backends import TrtPlatform

    model = str(_golden_copy(tmp_path))
    write_engines(model, load_manifest(model), TrtPlatform("8.5.2", "Orin", "8.7"))

    def probe():
        raise LogicError("cuInit failed: no CUDA-capable device is detected")

    monkeypatch.setattr(verify, "probe_tensorrt", probe)
    assert verify.main(["--model", model, "--engines"]) == 3
    err = capsys.readouterr().err
    assert "TensorRT is not usable here (LogicError: cuInit failed: no CUDA-capable device is detected)" in err
    assert verify.main(["--model", model]) == 0  # engines present but not demanded: skipped, said why
    out = capsys.readouterr().out
    assert "skipped tensorrt: engines present but TensorRT is not usable here (LogicError: cuInit failed" in out


@pytest.mark.slow
def test_against_pytorch_now(tmp_path):
    """--factory: the reference model run in PyTorch now, same seeded inputs, through ONNX Runtime."""
    pytest.importorskip("torch")
    report_path = tmp_path / "verify.json"
    r = _run("--model", REFERENCE, "--factory", "tools.make_reference:student", "--seed", "3",
             "--report", str(report_path))
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(report_path.read_text())
    assert report["reference"].startswith("PyTorch via tools.make_reference:student")
    assert all(x["ok"] and x["max_abs"] < 1e-4 for x in report["results"])
    r = _run("--model", REFERENCE, "--factory", "tools.no_such_module:student")
    assert r.returncode == 2 and "tools.no_such_module" in r.stderr
    r = _run("--model", REFERENCE, "--factory", "tools.make_reference:teacher")
    assert r.returncode == 2 and "another sampler" in r.stderr


@pytest.mark.slow
def test_teacher_export_then_verify(tmp_path):
    """The documented path on a teacher: export (with its golden data), then verify from the golden data alone and
    against PyTorch run now."""
    pytest.importorskip("torch")
    out = tmp_path / "teacher"
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "export", "--factory", "tools.make_reference:teacher",
                        "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "teacher" in r.stdout and (out / verify.GOLDEN_FILE).is_file()
    assert _run("--model", str(out)).returncode == 0
    r = _run("--model", str(out), "--factory", "tools.make_reference:teacher", "--seed", "7")
    assert r.returncode == 0, r.stdout + r.stderr
