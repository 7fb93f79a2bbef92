"""The ONNX Runtime GPU backend without a GPU: which providers it asks for and with what options, stages chained
on device OrtValues (device "cpu"), backend "auto"'s choices and fallbacks, and the config keys that reach it."""

import dataclasses
import hashlib
import logging
import os
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import yaml
from test_engine_meta import NO_ENGINE

from runtime.config import ConfigError, load_config
from runtime.policy import load_manifest, load_policy
from runtime.policy.backends import (
    BACKENDS,
    TrtPlatform,
    backend_options,
    create_backend,
    load_backend,
    onnxruntime_gpu_backend,
    select_backend,
)
from runtime.policy.backends.engine_meta import EngineMeta, write_meta
from runtime.policy.backends.onnxruntime_backend import _compare
from runtime.policy.backends.onnxruntime_gpu_backend import (
    OnnxRuntimeGpuBackend,
    ProviderUnavailable,
    fallback_warning,
    ort_version,
    profile_shape_options,
    provider_entries,
    resolve_providers,
    stage_profiles,
    trt_provider_options,
)
from runtime.policy.manifest import ManifestError, StageSpec, TensorSpec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(REPO, "exported", "reference")
TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
HAS_CUDA = CUDA in ort.get_available_providers()
IMAGE_PROFILE = ((1, 3, 64, 64), (2, 3, 64, 64), (4, 3, 64, 64))

@pytest.fixture(scope="module")
def manifest():
    return load_manifest(REFERENCE)


def _stage_with_profiles():
    inputs = (TensorSpec("image", "float32", (2, 3, 64, 64), source="camera:head", profile=IMAGE_PROFILE),
              TensorSpec("kv", "float32", (2, 8), source="world:kv", profile=((1, 8), (2, 8), (8, 8))),
              TensorSpec("t", "float32", (1,), source="sampler:t"))
    return StageSpec("expert", "expert.onnx", "0" * 64, "per_step", inputs,
                     (TensorSpec("v", "float32", (1, 4, 2), sink="sampler:velocity"),))


# --- which providers, with which options ---------------------------------------------------------------------------

def test_providers_requested_only_when_available(caplog):
    with caplog.at_level(logging.WARNING, logger="wam_edge.policy"):
        assert resolve_providers(["tensorrt", "cuda"], [CUDA, CPU]) == [CUDA]
    assert TRT in caplog.text and "not available" in caplog.text
    assert resolve_providers(["cuda", "tensorrt"], [TRT, CUDA, CPU]) == [CUDA, TRT]  # the asked order
    assert resolve_providers(["tensorrt"], [TRT, CUDA, CPU]) == [TRT]


def test_none_available_is_a_clear_error():
    with pytest.raises(ProviderUnavailable) as info:
        resolve_providers(["tensorrt", "cuda"], ["AzureExecutionProvider", CPU])
    text = str(info.value)
    assert TRT in text and CUDA in text and "available: AzureExecutionProvider, CPUExecutionProvider" in text
    assert "onnxruntime-gpu" in text


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime lists CUDAExecutionProvider")
def test_backend_on_a_machine_without_gpu_providers(manifest):
    with pytest.raises(ProviderUnavailable, match="available: .*CPUExecutionProvider"):
        OnnxRuntimeGpuBackend(manifest, REFERENCE)


@pytest.mark.parametrize("kwargs, text", [
    ({"providers": ["tensorrt", "rocm"]}, "unknown ['rocm']"),
    ({"providers": []}, "expected at least one"),
    ({"providers": ["cuda", "cuda"]}, "repeats a provider"),
    ({"device": "gpu"}, "device 'gpu' is not one of cuda, cpu"),
    ({"device_id": -1}, "device_id must be an int >= 0"),
])
def test_bad_options_name_themselves(manifest, kwargs, text):
    kwargs = dict({"device": "cpu"}, **kwargs)  # checked before any provider is asked for
    with pytest.raises(ValueError) as info:
        OnnxRuntimeGpuBackend(manifest, REFERENCE, **kwargs)
    assert text in str(info.value)


def test_trt_options_caches_under_cache_dir_and_profile_strings():
    cache = os.path.join("robot", "cache")
    opts = trt_provider_options(1, cache, True, [("image", IMAGE_PROFILE)], max_workspace_bytes=1 << 30,
                                builder_optimization_level=3, onnxruntime_version="1.17.0")
    assert opts == {
        "device_id": "1",
        "trt_fp16_enable": "True",
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": os.path.join(cache, "ort-trt"),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": os.path.join(cache, "ort-trt"),
        "trt_max_workspace_size": str(1 << 30),
        "trt_builder_optimization_level": "3",
        "trt_profile_min_shapes": "image:1x3x64x64",
        "trt_profile_opt_shapes": "image:2x3x64x64",
        "trt_profile_max_shapes": "image:4x3x64x64",
    }
    bare = trt_provider_options(0, None, False)
    assert bare == {"device_id": "0", "trt_fp16_enable": "False"}  # no caches, no profiles: none of their keys
    with pytest.raises(ValueError, match="builder_optimization_level"):
        trt_provider_options(0, None, False, builder_optimization_level=7)


@pytest.mark.parametrize("text, version", [
    ("1.16.3", (1, 16)), ("1.17.0+cu118", (1, 17)), ("1.18.0.dev20240118001", (1, 18)), ("1.9.0", (1, 9)),
    ("2.0", (2, 0)), (" 1.17.1 ", (1, 17)), ("", None), ("unknown", None), ("1", None), ("v1.17.0", None),
])
def test_ort_version_parsing(text, version):
    assert ort_version(text) == version


@pytest.mark.parametrize("version, has_path", [
    ("1.16.3", False), ("1.9.0", False), ("1.17.0+cu118", True), ("1.18.0.dev20240118001", True), ("1.20.1", True),
    ("2.0.0", True), ("weird", False),
])
def test_timing_cache_path_only_where_onnxruntime_knows_the_key(monkeypatch, version, has_path):
    """trt_timing_cache_path is ONNX Runtime 1.17+; an older one rejects it and retries on the next provider
    without any options. The installed version is what counts by default (faked here)."""
    monkeypatch.setattr(onnxruntime_gpu_backend.ort, "__version__", version)
    stage = _stage_with_profiles()
    for opts, engines in ((trt_provider_options(0, "/c", True), os.path.join("/c", "ort-trt")),
                          (provider_entries([TRT], stage, 0, "/c", True)[0][1],
                           os.path.join("/c", "ort-trt", stage.sha256[:16]))):
        assert ("trt_timing_cache_path" in opts) is has_path
        assert opts["trt_timing_cache_enable"] == opts["trt_engine_cache_enable"] == "True"
        assert opts["trt_engine_cache_path"] == engines  # also the timing cache's home when older
        if has_path:
            assert opts["trt_timing_cache_path"] == os.path.join("/c", "ort-trt")  # shared: weights do not matter
    assert "trt_timing_cache_path" in trt_provider_options(0, "/c", True, onnxruntime_version="1.17.0")
    assert "trt_timing_cache_path" not in trt_provider_options(0, "/c", True, onnxruntime_version="1.16.3")


def test_profiles_all_three_or_none():
    assert profile_shape_options([]) == {}
    both = profile_shape_options([("image", IMAGE_PROFILE), ("kv", ((1, 8), (2, 8), (8, 8)))])
    assert both == {"trt_profile_min_shapes": "image:1x3x64x64,kv:1x8",
                    "trt_profile_opt_shapes": "image:2x3x64x64,kv:2x8",
                    "trt_profile_max_shapes": "image:4x3x64x64,kv:8x8"}


def test_provider_entries_per_stage():
    stage = _stage_with_profiles()
    assert stage_profiles(stage) == [("image", IMAGE_PROFILE), ("kv", ((1, 8), (2, 8), (8, 8)))]
    entries = provider_entries([TRT, CUDA], stage, 0, "/c", True)
    assert [e[0] for e in entries] == [TRT, CUDA]
    trt = entries[0][1]
    assert trt["trt_profile_min_shapes"] == "image:1x3x64x64,kv:1x8"
    assert trt["trt_engine_cache_path"] == os.path.join("/c", "ort-trt", stage.sha256[:16])
    # new weights (a new ONNX hash) under the same file name: another engine cache, never the old weights' engine
    retrained = dataclasses.replace(stage, sha256="f" * 64)
    assert provider_entries([TRT], retrained, 0, "/c", True)[0][1]["trt_engine_cache_path"] == os.path.join(
        "/c", "ort-trt", "f" * 16)
    assert entries[1] == (CUDA, {"device_id": "0"})
    bad = dataclasses.replace(stage, inputs=(TensorSpec("image", "float32", (1, 3, 64, 64),
                                                          source="camera:head", profile=((1, 3, 64, 64),)),))
    with pytest.raises(ValueError, match="input 'image': profile must be three shapes"):
        stage_profiles(bad)


def test_fallback_warning_when_the_first_provider_did_not_load():
    assert fallback_warning("world", TRT, (TRT, CUDA, CPU)) is None
    text = fallback_warning("world", TRT, (CUDA, CPU))
    assert text.startswith("stage world: asked for TensorrtExecutionProvider first, but ONNX Runtime runs it on "
                           "CUDAExecutionProvider")
    assert "check its libraries (CUDA, cuDNN, TensorRT)" in text
    assert text.endswith("or a provider option this ONNX Runtime version rejects (look for 'EP Error' in the log)")


# --- stages chained on the device ------------------------------------------------------------------------------------

def test_chaining_on_ortvalues_standin_device_cpu_matches_cpu_backend(manifest):
    """device "cpu": the GPU backend's binding path (device OrtValues between stages) on the CPU provider."""
    gpu = OnnxRuntimeGpuBackend(manifest, REFERENCE, device="cpu")
    cpu = create_backend("onnxruntime", manifest, REFERENCE)
    try:
        assert gpu.providers == (CPU,) and gpu.stage_providers == {"world": (CPU,), "action_expert": (CPU,)}
        assert "world: CPUExecutionProvider" in gpu.describe()
        rng = np.random.default_rng(7)
        for stage in manifest.stages:
            for t in stage.inputs:
                if (stage.name, t.name) in gpu._host_inputs:
                    value = rng.standard_normal(t.shape).astype(np.float32)
                    gpu.host_input(stage.name, t.name)[...] = value
                    cpu.host_input(stage.name, t.name)[...] = value
        for stage in manifest.stages:
            gpu.run(stage.name)
            cpu.run(stage.name)
        world_outputs = [t.name for t in manifest.stage("world").outputs]
        assert world_outputs
        for name in world_outputs:
            value = gpu.device_output("world", name)
            assert isinstance(value, ort.OrtValue) and value.device_name().lower() == "cpu"
            np.testing.assert_array_equal(value.numpy(), cpu.host_output("world", name))
            with pytest.raises(KeyError, match="stays on the device"):
                gpu.host_output("world", name)
        # ORT wrote into our OrtValues, not into memory of its own
        assert gpu.bound_output_pointers("world") == [gpu.device_output("world", n).data_ptr() for n in world_outputs]
        sink = gpu.host_output("action_expert", "velocity")
        assert gpu.bound_output_pointers("action_expert") == [sink.ctypes.data]
        np.testing.assert_array_equal(sink, cpu.host_output("action_expert", "velocity"))
        assert np.isfinite(sink).all() and np.abs(sink).max() > 0
    finally:
        gpu.close()
        cpu.close()


def test_symbolic_graph_dim_needs_a_profile(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    path = str(tmp_path / "dyn.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    session = ort.InferenceSession(path, providers=[CPU])
    static = TensorSpec("x", "float32", (2, 4), source="state")
    stage = StageSpec("s", "dyn.onnx", "0" * 64, "per_step", (static,), ())
    with pytest.raises(ManifestError, match=r"dynamic axes \['batch'\] need a profile"):
        _compare("input", (static,), session.get_inputs(), stage, path)
    profiled = TensorSpec("x", "float32", (2, 4), source="state", profile=((1, 4), (2, 4), (8, 4)))
    _compare("input", (profiled,), session.get_inputs(), stage, path)  # accepted
    wrong = TensorSpec("x", "float32", (2, 5), source="state", profile=((1, 5), (2, 5), (8, 5)))
    with pytest.raises(ManifestError, match=r"has shape \['batch', 4\] in the graph, manifest says \[2, 5\]"):
        _compare("input", (wrong,), session.get_inputs(), stage, path)


# --- backend "auto" ------------------------------------------------------------------------------------------------

@pytest.fixture()
def model(tmp_path):
    d = tmp_path / "model"
    shutil.copytree(REFERENCE, str(d))
    return str(d), load_manifest(str(d))


def _add_engines(model_dir, manifest):
    for stage in manifest.stages:
        path = os.path.join(model_dir, stage.name + ".engine")
        open(path, "wb").write(b"plan")
        plan_sha = hashlib.sha256(b"plan").hexdigest()
        write_meta(path + ".json", EngineMeta(stage=stage.name, onnx_sha256=stage.sha256, trt_version="10.3.0",
                                              gpu_name="Orin", compute_capability="8.7", precision="fp16",
                                              engine_sha256=plan_sha))


def orin():
    return TrtPlatform("10.3.0", "Orin", "8.7")


def test_auto_reasons_for_each_branch(model):
    d, m = model
    gpu_listed = lambda: (TRT, CUDA, CPU)  # noqa: E731
    cpu_listed = lambda: (CPU,)  # noqa: E731
    assert select_backend(m, d, "auto", probe=orin, ort_probe=cpu_listed) == (
        "onnxruntime", NO_ENGINE + "; onnxruntime providers: CPUExecutionProvider -> CPU")
    assert select_backend(m, d, "auto", probe=orin, ort_probe=gpu_listed) == (
        "onnxruntime-gpu", NO_ENGINE + "; onnxruntime providers: "
        "TensorrtExecutionProvider, CUDAExecutionProvider, CPUExecutionProvider -> GPU (tensorrt, cuda)")
    _add_engines(d, m)
    assert "tensorrt" in BACKENDS
    assert select_backend(m, d, "auto", probe=orin, ort_probe=gpu_listed) == (
        "tensorrt", "engines for all 2 stages match TensorRT 10.3.0 on Orin (sm 8.7)")


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime lists CUDAExecutionProvider: onnxruntime-gpu would load")
def test_auto_falls_back_when_the_chosen_backend_does_not_load(model, caplog):
    """Real failures: the tensorrt backend cannot load here, nor can onnxruntime-gpu (ORT has no CUDA here)."""
    d, m = model
    _add_engines(d, m)
    with caplog.at_level(logging.WARNING, logger="wam_edge.policy"):
        engine, reason = load_backend(m, d, "auto", {}, probe=orin, ort_probe=lambda: (CUDA, CPU))
    try:
        assert engine.name == "onnxruntime"
        assert reason.startswith("engines for all 2 stages match TensorRT 10.3.0 on Orin (sm 8.7); tensorrt failed "
                                 "to load: ")
        assert "; onnxruntime providers: CUDAExecutionProvider, CPUExecutionProvider -> GPU (cuda); " \
               "onnxruntime-gpu failed to load: " in reason
        assert reason.endswith("; -> CPU")
        assert "tensorrt failed to load" in caplog.text and "onnxruntime-gpu failed to load" in caplog.text
    finally:
        engine.close()


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime lists CUDAExecutionProvider: onnxruntime-gpu would load")
def test_named_backend_failure_is_raised_and_options_reach_it(model):
    d, _ = model
    with pytest.raises(ProviderUnavailable) as info:
        load_policy(d, backend="onnxruntime-gpu", options={"gpu_providers": ["cuda"], "path": "ignored"})
    assert "['CUDAExecutionProvider']" in str(info.value) and TRT not in str(info.value)


# --- options from the config -----------------------------------------------------------------------------------------

def test_backend_options_map_config_keys():
    model = load_config(None)["model"]
    assert backend_options("onnxruntime", model) == {"intra_op_threads": 1}
    assert backend_options("onnxruntime-gpu", dict(model, cache_dir="/abs/cache")) == {
        "intra_op_threads": 1, "cache_dir": "/abs/cache", "fp16": True, "providers": ["tensorrt", "cuda"]}
    assert backend_options("tensorrt", model) == {"cuda_graph": False}
    assert backend_options("tensorrt", dict(model, warmup_runs=1)) == {"cuda_graph": False, "warmup_runs": 1}
    with pytest.raises(ValueError, match="unknown policy backend 'auto'"):
        backend_options("auto", model)


def _write(tmp_path, tree):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


@pytest.mark.parametrize("model, needle", [
    ({"backend": "cuda"}, "model.backend: 'cuda' is not one of ['auto', 'onnxruntime', 'onnxruntime-gpu', 'tensorrt']"),
    ({"gpu_providers": ["tensorrt", "rocm"]}, "model.gpu_providers: expected a non-empty list from"),
    ({"gpu_providers": []}, "model.gpu_providers: expected a non-empty list from"),
    ({"gpu_providers": ["cuda", "cuda"]}, "model.gpu_providers: providers repeat"),
    ({"fp16": "yes"}, "model.fp16: expected bool"),
    ({"cuda_graph": 1}, "model.cuda_graph: expected bool"),
    ({"cache_dir": " "}, "model.cache_dir: must not be empty"),
    ({"warmup_runs": 3}, "unknown key model.warmup_runs"),
])
def test_config_keys_validated(tmp_path, model, needle):
    path = _write(tmp_path, {"model": model})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert needle in str(info.value) and path in str(info.value)


def test_config_keys_accepted_and_cache_dir_resolved(tmp_path):
    path = _write(tmp_path, {"model": {"backend": "auto", "gpu_providers": ["cuda"], "fp16": False,
                                       "cuda_graph": True, "cache_dir": "trt-cache"}})
    cfg = load_config(path)
    m = cfg["model"]
    assert (m["backend"], m["gpu_providers"], m["fp16"], m["cuda_graph"]) == ("auto", ["cuda"], False, True)
    assert cfg.resolve(m["cache_dir"]) == os.path.join(str(tmp_path), "trt-cache")
    assert load_config(None)["model"]["backend"] == "onnxruntime"  # laptops keep working


class _Stop(Exception):
    pass


def test_runner_passes_the_model_section(tmp_path, monkeypatch):
    import runtime.runner.policy_runtime as runner

    seen = {}

    def spy(model_dir, **kwargs):
        seen.update(kwargs, model_dir=model_dir)
        raise _Stop()

    monkeypatch.setattr(runner, "load_policy", spy)
    path = _write(tmp_path, {"model": {"backend": "onnxruntime-gpu", "cache_dir": "c", "gpu_providers": ["cuda"],
                                       "fp16": False}})
    with pytest.raises(_Stop):
        runner.PolicyRuntime(load_config(path))
    assert seen["backend"] == "onnxruntime-gpu"
    options = seen["options"]
    assert options["cache_dir"] == os.path.join(str(tmp_path), "c")
    assert (options["gpu_providers"], options["fp16"], options["cuda_graph"]) == (["cuda"], False, False)
    assert backend_options("onnxruntime-gpu", options)["providers"] == ["cuda"]


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime lists CUDAExecutionProvider")
def test_runner_with_onnxruntime_gpu_on_this_machine_says_why(tmp_path):
    import runtime.runner as runner

    path = _write(tmp_path, {"model": {"path": REFERENCE, "backend": "onnxruntime-gpu", "gpu_providers": ["cuda"],
                                       "cache_dir": str(tmp_path / "cache")}})
    with pytest.raises(ProviderUnavailable) as info:
        runner.PolicyRuntime(load_config(path))
    text = str(info.value)
    assert "['CUDAExecutionProvider']" in text and "TensorrtExecutionProvider" not in text
    assert "available: " in text
