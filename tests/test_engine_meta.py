"""Engine metadata (<stage>.engine.json) and backend selection, without TensorRT."""

import json
import os
import shutil
import sys

import pytest

from runtime.policy import load_manifest, load_policy
from runtime.policy.backends import BACKENDS, TrtPlatform, select_backend
from runtime.policy.backends.engine_meta import (
    EngineMeta,
    EngineMetaError,
    EngineMismatch,
    check_engine,
    read_meta,
    write_meta,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(REPO, "exported", "reference")
NO_ENGINE = "stage world: no engine file world.engine (rebuild with `wam-edge build`)"
SHA = "a" * 64
ORIN = dict(trt_version="10.3.0", gpu_name="Orin", compute_capability="8.7")


def meta(**kw):
    base = dict(stage="world", onnx_sha256=SHA, trt_version="10.3.0", gpu_name="Orin",
                compute_capability="8.7", precision="fp16", builder_flags=("FP16",), engine_sha256="b" * 64)
    base.update(kw)
    return EngineMeta(**base)


def check(m, **kw):
    args = dict(stage="world", onnx_sha256=SHA, **ORIN)
    args.update(kw)
    check_engine(m, **args)


def test_no_tensorrt_import():
    assert "tensorrt" not in sys.modules and "pycuda" not in sys.modules


def test_round_trip(tmp_path):
    path = str(tmp_path / "world.engine.json")
    m = meta(builder_flags=("FP16", "VERSION_COMPATIBLE"))
    write_meta(path, m)
    back = read_meta(path)
    assert back == m and back.path == path
    assert json.load(open(path))["format_version"] == 2
    assert not os.path.exists(path + ".tmp")


@pytest.mark.parametrize("edit, key, text", [
    (lambda d: d.update(extra=1), "extra", "unknown key"),
    (lambda d: d.pop("gpu_name"), "gpu_name", "missing required key"),
    (lambda d: d.update(builder_flags="FP16"), "builder_flags", "expected list"),
    (lambda d: d.update(format_version=True), "format_version", "expected int"),
    (lambda d: d.update(format_version=1), "format_version", "unsupported version"),
    (lambda d: d.update(trt_version=10), "trt_version", "expected str"),
    (lambda d: d.update(trt_version="ten"), "trt_version", "not a TensorRT version"),
    (lambda d: d.update(onnx_sha256="abc"), "onnx_sha256", "64 lowercase hex"),
    (lambda d: d.update(compute_capability="87"), "compute_capability", "major.minor"),
    (lambda d: d.update(precision="fp64"), "precision", "not one of"),
    (lambda d: d.update(builder_flags=[1]), "builder_flags[0]", "non-empty string"),
    (lambda d: d.update(stage=""), "stage", "must not be empty"),
])
def test_strict_read(tmp_path, edit, key, text):
    path = str(tmp_path / "world.engine.json")
    data = meta().to_json()
    edit(data)
    with open(path, "w") as f:
        json.dump(data, f)
    with pytest.raises(EngineMetaError) as err:
        read_meta(path)
    assert str(err.value).startswith(path + ": " + key + ": ")
    assert text in str(err.value)


def test_read_errors(tmp_path):
    path = str(tmp_path / "x.json")
    with pytest.raises(EngineMetaError, match="cannot read"):
        read_meta(path)
    open(path, "w").write("{")
    with pytest.raises(EngineMetaError, match="invalid JSON"):
        read_meta(path)
    open(path, "w").write("[]")
    with pytest.raises(EngineMetaError, match="expected a JSON object"):
        read_meta(path)


def test_write_validates(tmp_path):
    with pytest.raises(EngineMetaError, match="precision"):
        write_meta(str(tmp_path / "m.json"), meta(precision="fp64"))


def test_check_matches():
    check(meta())
    check(meta(trt_version="10.3.0.26"), trt_version="10.3.0")  # build component ignored


@pytest.mark.parametrize("kw, text", [
    (dict(stage="action_expert"), "stage: recorded 'world', present 'action_expert'"),
    (dict(onnx_sha256="b" * 64), "ONNX sha256: recorded aaaaaaaaaaaa..., present bbbbbbbbbbbb..."),
    (dict(trt_version="10.3.1"), "TensorRT version: recorded 10.3.0, present 10.3.1"),
    (dict(trt_version="8.6.1"), "TensorRT version: recorded 10.3.0, present 8.6.1"),
    (dict(trt_version="garbage"), "present 'garbage' is not a version"),
    (dict(gpu_name="NVIDIA H100"), "GPU: recorded 'Orin', present 'NVIDIA H100'"),
    (dict(compute_capability="9.0"), "compute capability: recorded 8.7, present 9.0"),
])
def test_each_mismatch_named(kw, text):
    with pytest.raises(EngineMismatch) as err:
        check(meta(), **kw)
    msg = str(err.value)
    assert text in msg
    assert msg.endswith("rebuild with `wam-edge build`")
    assert isinstance(err.value, ValueError)


def test_all_mismatches_in_one_message():
    with pytest.raises(EngineMismatch) as err:
        check(meta(), trt_version="8.5.2", gpu_name="X", compute_capability="7.2")
    msg = str(err.value)
    assert "TensorRT version" in msg and "GPU" in msg and "compute capability" in msg


@pytest.mark.parametrize("present, ok", [
    ("10.3.0", True), ("10.3.1", True), ("10.7.0", True),
    ("10.2.9", False), ("11.0.0", False), ("9.9.9", False),
])
def test_version_compatible_rule(present, ok):
    m = meta(builder_flags=("FP16", "VERSION_COMPATIBLE"))
    if ok:
        check(m, trt_version=present)
    else:
        with pytest.raises(EngineMismatch, match="VERSION_COMPATIBLE"):
            check(m, trt_version=present)


# --- select_backend ------------------------------------------------------------


@pytest.fixture()
def model(tmp_path):
    d = tmp_path / "model"
    shutil.copytree(REFERENCE, str(d))
    return str(d), load_manifest(str(d))


def add_engines(model_dir, manifest, **kw):
    for stage in manifest.stages:
        path = os.path.join(model_dir, stage.name + ".engine")
        open(path, "wb").write(b"plan")
        write_meta(path + ".json", meta(stage=stage.name, onnx_sha256=stage.sha256, **kw))


def no_trt():
    raise ImportError("No module named 'tensorrt'")


def orin():
    return TrtPlatform(**ORIN)


def cpu_only():
    return ("CPUExecutionProvider",)


CPU = "; onnxruntime providers: CPUExecutionProvider -> CPU"


def test_named_backends(model):
    d, m = model
    for name in ("onnxruntime", "onnxruntime-gpu", "tensorrt"):
        assert select_backend(m, d, name, probe=no_trt, ort_probe=cpu_only) == (name, "requested")
    with pytest.raises(ValueError, match="unknown policy backend 'tensorrt-x'"):
        select_backend(m, d, "tensorrt-x", probe=orin)


def test_auto_without_engines(model):
    d, m = model
    assert select_backend(m, d, "auto", probe=orin, ort_probe=cpu_only) == (
        "onnxruntime", NO_ENGINE + CPU)


def test_auto_without_meta(model):
    d, m = model
    add_engines(d, m)
    os.remove(os.path.join(d, "action_expert.engine.json"))
    assert select_backend(m, d, "auto", probe=orin, ort_probe=cpu_only) == (
        "onnxruntime", "stage action_expert: no engine metadata action_expert.engine.json, so its TensorRT "
        "version and GPU are unknown (rebuild with `wam-edge build`)" + CPU)


def test_auto_bad_meta(model):
    d, m = model
    add_engines(d, m)
    open(os.path.join(d, "world.engine.json"), "w").write("{}")
    name, reason = select_backend(m, d, "auto", probe=orin, ort_probe=cpu_only)
    assert name == "onnxruntime" and reason.startswith("stage world: ") and "missing required key" in reason


def test_auto_tensorrt_not_importable(model):
    d, m = model
    add_engines(d, m)
    assert select_backend(m, d, "auto", probe=no_trt, ort_probe=cpu_only) == (
        "onnxruntime", "tensorrt not importable: No module named 'tensorrt'" + CPU)
    assert select_backend(m, d, "auto", probe=lambda: None, ort_probe=cpu_only) == (
        "onnxruntime", "tensorrt not available on this machine" + CPU)


def test_auto_default_probes_on_cpu_machine(model):
    d, m = model
    add_engines(d, m)
    name, reason = select_backend(m, d, "auto")
    assert name == "onnxruntime" and reason.startswith("tensorrt not importable: ")
    assert "; onnxruntime providers: " in reason and "CPUExecutionProvider" in reason and reason.endswith("-> CPU")


def test_auto_mismatch(model):
    d, m = model
    add_engines(d, m, trt_version="8.6.1")
    name, reason = select_backend(m, d, "auto", probe=orin, ort_probe=cpu_only)
    assert name == "onnxruntime"
    assert "engine for stage 'world' does not match" in reason
    assert "TensorRT version: recorded 8.6.1, present 10.3.0" in reason
    assert reason.endswith("rebuild with `wam-edge build`" + CPU)


def test_auto_stale_onnx(model):
    d, m = model
    add_engines(d, m)
    path = os.path.join(d, "action_expert.engine.json")
    data = json.load(open(path))
    data["onnx_sha256"] = "0" * 64
    json.dump(data, open(path, "w"))
    name, reason = select_backend(m, d, "auto", probe=orin, ort_probe=cpu_only)
    assert name == "onnxruntime" and "engine for stage 'action_expert'" in reason and "ONNX sha256" in reason


def test_auto_all_match_takes_tensorrt(model):
    d, m = model
    add_engines(d, m)
    assert "tensorrt" in BACKENDS
    name, reason = select_backend(m, d, "auto", probe=orin, ort_probe=cpu_only)
    assert (name, reason) == ("tensorrt", "engines for all 2 stages match TensorRT 10.3.0 on Orin (sm 8.7)")


def test_auto_all_match_but_no_tensorrt_class(model, monkeypatch):
    d, m = model
    add_engines(d, m)
    monkeypatch.delitem(BACKENDS, "tensorrt")
    name, reason = select_backend(m, d, "auto", probe=orin, ort_probe=cpu_only)
    assert name == "onnxruntime"
    assert "engines for all 2 stages match TensorRT 10.3.0 on Orin" in reason
    assert "but no tensorrt backend is registered" in reason and reason.endswith(CPU)


def test_auto_gpu_providers_take_onnxruntime_gpu(model):
    d, m = model
    listed = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    assert select_backend(m, d, "auto", probe=orin, ort_probe=lambda: listed) == (
        "onnxruntime-gpu", NO_ENGINE + "; onnxruntime providers: "
        "TensorrtExecutionProvider, CUDAExecutionProvider, CPUExecutionProvider -> GPU (tensorrt, cuda)")
    cuda_only = ("CUDAExecutionProvider", "CPUExecutionProvider")
    name, reason = select_backend(m, d, "auto", probe=orin, ort_probe=lambda: cuda_only)
    assert name == "onnxruntime-gpu" and reason.endswith("-> GPU (cuda)")
    # only the configured providers count: tensorrt asked for, ORT lists only CUDA -> CPU
    name, reason = select_backend(m, d, "auto", probe=orin, ort_probe=lambda: cuda_only, gpu_providers=("tensorrt",))
    assert name == "onnxruntime" and reason.endswith("-> CPU")


def test_auto_onnxruntime_probe_fails(model):
    d, m = model

    def broken():
        raise ImportError("No module named 'onnxruntime'")

    name, reason = select_backend(m, d, "auto", probe=orin, ort_probe=broken)
    assert (name, reason) == ("onnxruntime", NO_ENGINE + "; onnxruntime providers "
                                             "unknown (No module named 'onnxruntime') -> CPU")


def test_load_policy_auto_reports_reason(model, caplog):
    d, _ = model
    with caplog.at_level("INFO", logger="wam_edge.policy"):
        p = load_policy(d, backend="auto")
    try:
        assert p.backend.name == "onnxruntime"
        assert p.backend_reason.startswith(NO_ENGINE + "; onnxruntime providers: ")
        assert p.backend_reason.endswith("-> CPU")
        assert "[auto: " + NO_ENGINE + "; onnxruntime providers" in p.describe()
        assert "no engine file world.engine" in caplog.text
    finally:
        p.close()


def test_load_policy_default_unchanged():
    p = load_policy(REFERENCE)
    try:
        assert p.backend_reason == "requested" and "[auto" not in p.describe()
    finally:
        p.close()
