"""`wam-edge build` (tools/build_engine.py): planning without TensorRT, the missing-TensorRT exit, and the TensorRT
steps against a recording stand-in of the builder API (TensorRT 8.5 and 10.3). One test builds for real when
TensorRT and a GPU are present."""

import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest

from runtime.policy.backends.engine_meta import read_meta
from runtime.policy.manifest import load_manifest, sha256_file
from tests.standins.tensorrt_builder_standin_no_gpu import (
    make_tensorrt_standin_no_gpu,
    platform_probe_standin_no_gpu,
    read_plan_standin,
)
from tools import build_engine as be

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(REPO, "exported", "reference")
STAGES = ("world", "action_expert")
TRT_VERSIONS = ("8.5.2", "10.3.0")


def _tensorrt_importable():
    try:
        import tensorrt  # noqa: F401

        return True
    except ImportError:
        return False


@pytest.fixture
def model(tmp_path):
    """A copy of the reference model: engines are written beside the ONNX files."""
    dst = tmp_path / "reference"
    shutil.copytree(REFERENCE, str(dst))
    return str(dst)


@pytest.fixture
def standin(monkeypatch):
    """install(version, cc="8.7", free_memory_mb=4096, refuse_profiles=False) -> the stand-in tensorrt module,
    injected with its GPU probe."""
    def install(version, compute_capability="8.7", free_memory_mb=4096, refuse_profiles=False):
        trt = make_tensorrt_standin_no_gpu(version, free_memory_mb=free_memory_mb, refuse_profiles=refuse_profiles)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        monkeypatch.setattr(be, "probe_tensorrt",
                            platform_probe_standin_no_gpu(version, "Orin", compute_capability))
        return trt

    return install


def run(argv, capsys):
    code = be.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def calls_named(trt, name):
    return [c for c in trt.calls if c[0] == name]


# --- planning --------------------------------------------------------------------------------------------------------

def test_parse_precisions_default_and_overrides():
    assert be.parse_precisions("fp16", STAGES) == {"world": "fp16", "action_expert": "fp16"}
    assert be.parse_precisions("world=fp32,action_expert=bf16", STAGES) == {"world": "fp32", "action_expert": "bf16"}
    assert be.parse_precisions("world=fp32", STAGES) == {"world": "fp32", "action_expert": "fp16"}
    assert be.parse_precisions(" fp32 , action_expert = fp16 ", STAGES) == {"world": "fp32", "action_expert": "fp16"}


@pytest.mark.parametrize("text, needle", [
    ("vision=fp32", "unknown stage 'vision' (stages: world, action_expert)"),
    ("int8", "'int8' is not one of fp32, fp16, bf16"),
    ("world=fp8", "'fp8' is not one of"),
    ("fp16,fp32", "more than one default precision"),
    ("world=fp16,world=fp32", "stage 'world' given twice"),
    ("=fp16", "names no stage"),
    ("", "expected PRECISION or STAGE=PRECISION"),
    ("fp16,", "expected PRECISION or STAGE=PRECISION"),
])
def test_parse_precisions_refuses(text, needle):
    with pytest.raises(be.OptionError) as info:
        be.parse_precisions(text, STAGES)
    assert needle in str(info.value)


@pytest.mark.parametrize("kw, needle", [
    (dict(workspace_mb=0), "workspace"), (dict(opt_level=6), "0..5"), (dict(opt_level=-1), "0..5"),
    (dict(precisions={"world": "int8"}), "stage 'world': precision 'int8'"),
])
def test_build_options_refuse(kw, needle):
    args = dict(precisions={"world": "fp16"})
    args.update(kw)
    with pytest.raises(be.OptionError, match=needle):
        be.BuildOptions(**args)


def test_reference_plan_is_static_and_selects_stages():
    manifest = load_manifest(REFERENCE)
    assert [be.plan_profiles(s) for s in manifest.stages] == [[], []]
    assert [s.name for s in be.select_stages(manifest, [])] == list(STAGES)
    assert [s.name for s in be.select_stages(manifest, ["action_expert"])] == ["action_expert"]
    with pytest.raises(be.OptionError, match=r"--stage 'vision': unknown stage \(stages: world, action_expert\)"):
        be.select_stages(manifest, ["vision"])


def _stage(*inputs):
    """A stage spec whose inputs may carry TensorSpec.profile (min, opt, max), with or without that field landed."""
    return SimpleNamespace(name="s", file="s.onnx", sha256="a" * 64, inputs=tuple(
        SimpleNamespace(name=n, shape=tuple(shape), profile=profile) for n, shape, profile in inputs))


def test_plan_profiles_from_manifest_profile():
    stage = _stage(("x", (1, 8), ((1, 1), (1, 8), (1, 16))), ("y", (1, 3), None))
    assert be.plan_profiles(stage) == [be.ProfileShape("x", (1, 1), (1, 8), (1, 16))]
    with pytest.raises(be.OptionError, match="min <= opt <= max"):
        be.plan_profiles(_stage(("x", (1, 8), ((1, 9), (1, 8), (1, 16)))))
    with pytest.raises(be.OptionError, match="different ranks"):
        be.plan_profiles(_stage(("x", (1, 8), ((1,), (1, 8), (1, 16)))))


def test_resolve_profiles_checks_graph_against_manifest():
    static = _stage(("x", (1, 8), None))
    assert be.resolve_profiles(static, [("x", (1, 8))]) == []
    # dynamic in the graph, static in the manifest: pinned to the manifest shape
    assert be.resolve_profiles(static, [("x", (-1, 8))]) == [be.ProfileShape("x", (1, 8), (1, 8), (1, 8))]
    with pytest.raises(be.BuildError, match=r"input 'x' axis 1: the ONNX graph says 9, the manifest 8"):
        be.resolve_profiles(static, [("x", (1, 9))])
    with pytest.raises(be.BuildError, match="rank 3"):
        be.resolve_profiles(static, [("x", (1, 8, 1))])
    with pytest.raises(be.BuildError, match="graph input 'z' is not in the manifest"):
        be.resolve_profiles(static, [("x", (1, 8)), ("z", (1,))])
    with pytest.raises(be.BuildError, match="manifest input 'x' is not an input of the ONNX graph"):
        be.resolve_profiles(static, [("z", (1,))])
    dynamic = _stage(("x", (1, "n"), ((1, 1), (1, 8), (1, 16))))
    assert be.resolve_profiles(dynamic, [("x", (1, -1))]) == [be.ProfileShape("x", (1, 1), (1, 8), (1, 16))]
    with pytest.raises(be.BuildError, match="axis 0 is static .2. in the ONNX graph, but the manifest profile"):
        be.resolve_profiles(_stage(("x", ("b", "n"), ((1, 1), (1, 8), (1, 16)))), [("x", (2, -1))])
    with pytest.raises(be.BuildError, match="dynamic axes .1. in the ONNX graph but no profile"):
        be.resolve_profiles(_stage(("x", (1, "n"), None)), [("x", (1, -1))])


def _options(**kw):
    args = dict(precisions={"world": "fp16", "action_expert": "fp16"})
    args.update(kw)
    return be.BuildOptions(**args)


@pytest.mark.parametrize("trt, cc, kw, needle", [
    ("8.5.2", "8.7", dict(precisions={"world": "bf16"}), "stage 'world': precision bf16 needs TensorRT >= 9.0, "
                                                         "found 8.5.2"),
    ("10.3.0", "7.2", dict(precisions={"action_expert": "bf16"}), "stage 'action_expert': precision bf16 needs a GPU "
                                                                  "of compute capability >= 8.0, this one is 7.2"),
    ("8.5.2", "8.7", dict(version_compatible=True), "--version-compatible needs TensorRT >= 8.6, found 8.5.2"),
    ("8.5.2", "8.7", dict(opt_level=5), "--opt-level 5 needs TensorRT >= 8.6"),
    ("8.4.3", "8.7", {}, "TensorRT 8.4.3 is too old"),
    ("10.3", "8.7", {}, "engine metadata cannot record this TensorRT version"),
])
def test_check_capabilities_refuses(trt, cc, kw, needle):
    with pytest.raises(be.OptionError) as info:
        be.check_capabilities(trt, cc, _options(**kw))
    assert needle in str(info.value)


def test_check_capabilities_accepts():
    be.check_capabilities("8.5.2", "8.7", _options())
    be.check_capabilities("10.3.0", "8.7", _options(precisions={"world": "bf16"}, version_compatible=True,
                                                    opt_level=5))
    # a bf16 stage that is not being built does not matter
    be.check_capabilities("8.5.2", "8.7", _options(precisions={"world": "bf16", "action_expert": "fp16"},
                                                   stages=("action_expert",)))


# --- the command line without TensorRT --------------------------------------------------------------------------------

def test_dry_run_prints_the_plan_without_tensorrt(model, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # importing it would fail
    code, out, err = run(["--model", model, "--dry-run", "--precision", "fp16,world=fp32", "--workspace-mb", "512",
                          "--version-compatible"], capsys)
    assert code == 0, err
    assert "world: world.onnx -> world.engine, fp32, flags [VERSION_COMPATIBLE], static shapes" in out
    assert "action_expert: action_expert.onnx -> action_expert.engine, fp16, flags [FP16, VERSION_COMPATIBLE]" in out
    assert "workspace 512 MiB, optimisation level 3, timing cache %s" % os.path.join(model, "timing.cache") in out
    assert "nothing built" in out
    assert not any(name.endswith(".engine") for name in os.listdir(model))


@pytest.mark.parametrize("argv, needle", [
    (["--workspace-mb", "0"], "--workspace-mb: expected a positive number"),
    (["--opt-level", "6"], "--opt-level: expected 0..5"),
    (["--precision", "world=int8"], "'int8' is not one of"),
    (["--stage", "vision"], "--stage 'vision': unknown stage"),
    (["--workspace-mb", "lots"], "invalid int value"),
])
def test_argument_errors_exit_2(model, capsys, argv, needle):
    code, out, err = run(["--model", model, "--dry-run"] + argv, capsys)
    assert code == 2
    assert needle in err


def test_missing_model_exits_2(tmp_path, capsys):
    code, _, err = run(["--model", str(tmp_path / "nope"), "--dry-run"], capsys)
    assert code == 2 and "manifest.json: cannot read" in err


@pytest.mark.skipif(_tensorrt_importable(), reason="TensorRT is installed here")
def test_without_tensorrt_says_so_and_exits_3(model):
    proc = subprocess.run([sys.executable, "-m", "tools.build_engine", "--model", model], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("python -m tools.build_engine: TensorRT is not installed here (")
    assert lines[0].endswith("); engines are built on the robot (JetPack ships TensorRT; see docs/deploy.md)")


def test_never_imports_torch(model):
    code = ("import sys; from tools.build_engine import main; rc = main(['--model', %r, '--dry-run']); "
            "sys.exit(3 if 'torch' in sys.modules or 'tensorrt' in sys.modules else rc)" % model)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- the TensorRT steps against the recording stand-in ----------------------------------------------------------------

@pytest.mark.parametrize("version", TRT_VERSIONS)
def test_build_writes_engines_metadata_and_timing_cache(model, standin, capsys, version):
    trt = standin(version)
    code, out, err = run(["--model", model, "--precision", "fp16,world=fp32", "--workspace-mb", "256"], capsys)
    assert code == 0, err
    manifest = load_manifest(model)
    explicit_batch = 0 if version.startswith("10.") else 1
    assert calls_named(trt, "create_network") == [("create_network", explicit_batch)] * 2
    assert calls_named(trt, "set_memory_pool_limit") == [("set_memory_pool_limit", "WORKSPACE", 256 << 20)] * 2
    assert calls_named(trt, "set_flag") == [("set_flag", "FP16")]  # world is fp32
    assert calls_named(trt, "clear_flag") == [("clear_flag", "TF32")]
    assert calls_named(trt, "builder_optimization_level") == ([] if version == "8.5.2" else
                                                              [("builder_optimization_level", 3)] * 2)
    assert calls_named(trt, "create_optimization_profile") == []  # the reference is static
    for stage in manifest.stages:
        engine = os.path.join(model, stage.name + ".engine")
        meta = read_meta(engine + ".json")
        precision = "fp32" if stage.name == "world" else "fp16"
        assert (meta.stage, meta.onnx_sha256, meta.trt_version, meta.gpu_name, meta.compute_capability,
                meta.precision) == (stage.name, stage.sha256, version, "Orin", "8.7", precision)
        assert meta.builder_flags == (() if precision == "fp32" else ("FP16",))
        plan = read_plan_standin(engine)
        assert ("FP16" in plan["flags"]) == (precision == "fp16")
        assert ("TF32" in plan["flags"]) == (precision == "fp16")  # cleared for fp32
        assert "%s  %s  built in" % (stage.name.ljust(13), precision) in out
    # the timing cache: created empty for the first stage, reloaded from the file for the second
    cache = os.path.join(model, "timing.cache")
    assert os.path.isfile(cache)
    created = calls_named(trt, "create_timing_cache")
    assert created[0] == ("create_timing_cache", 0) and created[1][1] > 0
    assert calls_named(trt, "set_timing_cache")[1][2] is False  # ignore_mismatch=False


@pytest.mark.parametrize("version", TRT_VERSIONS)
def test_up_to_date_skips_and_force_rebuilds(model, standin, capsys, version):
    trt = standin(version)
    assert run(["--model", model], capsys)[0] == 0
    del trt.calls[:]
    code, out, _ = run(["--model", model], capsys)
    assert code == 0
    assert calls_named(trt, "build_serialized_network") == []
    assert "world: up to date (TensorRT %s, Orin, sm 8.7, fp16); skipped (--force rebuilds)" % version in out
    code, out, _ = run(["--model", model, "--force", "--stage", "world"], capsys)
    assert code == 0
    assert len(calls_named(trt, "build_serialized_network")) == 1
    assert "world: building fp16 engine (forced)" in out
    assert calls_named(trt, "create_timing_cache")[-1][1] > 0  # the cache written by the first run
    # another precision is not up to date
    code, out, _ = run(["--model", model, "--precision", "action_expert=fp32"], capsys)
    assert "action_expert: building fp32 engine (precision: recorded fp16, asked fp32)" in out
    assert read_meta(os.path.join(model, "action_expert.engine.json")).precision == "fp32"


def test_replaced_engine_is_rebuilt_and_metadata_records_the_file(model, standin, capsys):
    standin("10.3.0")
    assert run(["--model", model], capsys)[0] == 0
    engine = os.path.join(model, "world.engine")
    assert read_meta(engine + ".json").engine_sha256 == sha256_file(engine)
    with open(engine, "ab") as f:
        f.write(b"\x00")  # e.g. trtexec wrote another plan over it
    code, out, _ = run(["--model", model], capsys)
    assert code == 0 and "world: building fp16 engine" in out and "replaced after the build" in out
    assert read_meta(engine + ".json").engine_sha256 == sha256_file(engine)


def test_another_tensorrt_rebuilds(model, standin, capsys):
    standin("10.3.0")
    assert run(["--model", model], capsys)[0] == 0
    os.remove(os.path.join(model, "timing.cache"))  # made by 10.3.0: would be refused (see below)
    standin("10.4.0")
    code, out, _ = run(["--model", model], capsys)
    assert code == 0
    assert "world: building fp16 engine (" in out and "TensorRT version: recorded 10.3.0, present 10.4.0" in out


def test_timing_cache_from_another_version_is_refused(model, standin, capsys):
    standin("10.3.0")
    assert run(["--model", model, "--stage", "world"], capsys)[0] == 0
    standin("10.4.0")
    code, _, err = run(["--model", model, "--stage", "action_expert"], capsys)
    assert code == 1
    assert "timing cache %s was rejected" % os.path.join(model, "timing.cache") in err


def test_bf16_version_compatible_and_opt_level_on_10(model, standin, capsys):
    trt = standin("10.3.0")
    code, out, err = run(["--model", model, "--precision", "bf16", "--version-compatible", "--opt-level", "5",
                          "--timing-cache", os.path.join(model, "other.cache")], capsys)
    assert code == 0, err
    assert calls_named(trt, "set_flag") == [("set_flag", "BF16"), ("set_flag", "VERSION_COMPATIBLE")] * 2
    assert calls_named(trt, "builder_optimization_level") == [("builder_optimization_level", 5)] * 2
    meta = read_meta(os.path.join(model, "world.engine.json"))
    assert meta.builder_flags == ("BF16", "VERSION_COMPATIBLE") and meta.version_compatible
    assert read_plan_standin(os.path.join(model, "world.engine"))["opt_level"] == 5
    assert os.path.isfile(os.path.join(model, "other.cache"))
    assert not os.path.exists(os.path.join(model, "timing.cache"))


@pytest.mark.parametrize("argv, needle", [
    (["--precision", "world=bf16"], "stage 'world': precision bf16 needs TensorRT >= 9.0, found 8.5.2"),
    (["--version-compatible"], "--version-compatible needs TensorRT >= 8.6, found 8.5.2"),
    (["--opt-level", "4"], "--opt-level 4 needs TensorRT >= 8.6"),
])
def test_capability_refusals_on_8_5(model, standin, capsys, argv, needle):
    trt = standin("8.5.2")
    code, _, err = run(["--model", model] + argv, capsys)
    assert code == 2 and needle in err
    assert calls_named(trt, "Builder") == []


def test_bf16_refused_on_old_gpu(model, standin, capsys):
    standin("10.3.0", compute_capability="7.2")
    code, _, err = run(["--model", model, "--precision", "bf16"], capsys)
    assert code == 2 and "compute capability >= 8.0, this one is 7.2" in err


@pytest.mark.parametrize("version", TRT_VERSIONS)
def test_parse_failure_names_stage_and_file(model, standin, capsys, version):
    standin(version)
    onnx_file = os.path.join(model, "world.onnx")
    with open(onnx_file, "wb") as f:
        f.write(b"this is not an ONNX model")
    manifest_file = os.path.join(model, "manifest.json")
    with open(manifest_file) as f:
        data = json.load(f)
    data["stages"][0]["sha256"] = sha256_file(onnx_file)  # the hash matches: only the parser can object
    with open(manifest_file, "w") as f:
        json.dump(data, f)
    code, _, err = run(["--model", model], capsys)
    assert code == 1
    assert "stage 'world': TensorRT's ONNX parser rejected %s: " % onnx_file in err
    assert "Failed to parse ONNX model" in err
    assert not os.path.exists(os.path.join(model, "world.engine"))


def test_build_failure_suggests_a_smaller_workspace(model, standin, capsys):
    trt = standin("10.3.0", free_memory_mb=512)
    code, _, err = run(["--model", model, "--workspace-mb", "1024"], capsys)
    assert code == 1
    assert "stage 'world': TensorRT could not build an engine" in err and "--workspace-mb 512" in err
    assert any("Tactic Device request" in line for line in trt.log)
    assert run(["--model", model, "--workspace-mb", "512"], capsys)[0] == 0


def test_failed_rebuild_keeps_the_previous_engine(model, standin, capsys):
    standin("10.3.0")
    assert run(["--model", model, "--stage", "world"], capsys)[0] == 0
    standin("10.3.0", free_memory_mb=1)
    assert run(["--model", model, "--stage", "world", "--force"], capsys)[0] == 1
    # the failed rebuild left the old engine and its metadata as they were (nothing was replaced)
    assert read_meta(os.path.join(model, "world.engine.json")).precision == "fp16"


def _dynamic_stage(tmp_path):
    """A one-input stage whose ONNX graph has a dynamic axis, and its manifest profile."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n", 17])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "n", 17])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              str(tmp_path / "s.onnx"))
    return SimpleNamespace(name="s", file="s.onnx", sha256="b" * 64, inputs=(
        SimpleNamespace(name="x", shape=(1, "n", 17), profile=((1, 1, 17), (1, 32, 17), (1, 64, 17))),))


@pytest.mark.parametrize("version", TRT_VERSIONS)
def test_refused_profile_is_a_build_error_naming_stage_and_shapes(tmp_path, standin, version):
    """add_optimization_profile returns -1 for an invalid profile; the build must stop there, not build without."""
    stage = _dynamic_stage(tmp_path)
    trt = standin(version, refuse_profiles=True)
    options = be.BuildOptions(precisions={"s": "fp16"})
    with pytest.raises(be.BuildError) as info:
        be.build_stage(be.open_session(be.import_tensorrt()), str(tmp_path), stage, "fp16", options,
                       be.probe_tensorrt())
    assert str(info.value) == ("stage 's': TensorRT refused the optimisation profile (its log above says why): "
                               "x min [1, 1, 17] opt [1, 32, 17] max [1, 64, 17]")
    assert calls_named(trt, "build_serialized_network") == [] and not os.path.exists(str(tmp_path / "s.engine"))


@pytest.mark.parametrize("version", TRT_VERSIONS)
def test_invalid_profile_is_refused_by_add_profile(standin, version):
    """The stand-in refuses, as TensorRT does (-1), a profile without min <= opt <= max on every axis."""
    trt = standin(version)
    session = be.open_session(be.import_tensorrt())
    config = session.builder.create_builder_config()
    with pytest.raises(be.BuildError, match=r"stage 'w': .* y min \[2, 8\] opt \[1, 8\] max \[4, 8\]"):
        be.add_profile(session, config, [be.ProfileShape("y", (2, 8), (1, 8), (4, 8))], "w")
    be.add_profile(session, config, [be.ProfileShape("y", (1, 8), (2, 8), (4, 8))], "w")
    assert any("not valid" in line for line in trt.log)


@pytest.mark.parametrize("version", TRT_VERSIONS)
def test_dynamic_input_gets_its_profile(tmp_path, standin, version):
    stage = _dynamic_stage(tmp_path)
    trt = standin(version)
    options = be.BuildOptions(precisions={"s": "fp16"}, timing_cache=str(tmp_path / "t.cache"))
    platform = be.probe_tensorrt()
    size = be.build_stage(be.open_session(be.import_tensorrt()), str(tmp_path), stage, "fp16", options, platform)
    assert size == os.path.getsize(str(tmp_path / "s.engine"))
    assert calls_named(trt, "set_shape") == [("set_shape", "x", (1, 1, 17), (1, 32, 17), (1, 64, 17))]
    assert calls_named(trt, "add_optimization_profile") == [("add_optimization_profile", 1)]
    assert read_plan_standin(str(tmp_path / "s.engine"))["profiles"] == {"x": [[1, 1, 17], [1, 32, 17], [1, 64, 17]]}
    assert read_meta(str(tmp_path / "s.engine.json")).onnx_sha256 == "b" * 64


# --- the real thing ---------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not _tensorrt_importable(), reason="needs TensorRT and a GPU")
def test_builds_the_reference_for_real(model, capsys):
    code, out, err = run(["--model", model, "--workspace-mb", "512"], capsys)
    assert code == 0, err
    manifest = load_manifest(model)
    import tensorrt

    for stage in manifest.stages:
        meta = read_meta(os.path.join(model, stage.name + ".engine.json"))
        assert (meta.stage, meta.onnx_sha256, meta.trt_version, meta.precision) == (
            stage.name, stage.sha256, tensorrt.__version__, "fp16")
        assert os.path.getsize(os.path.join(model, stage.name + ".engine")) > 0
    code, out, _ = run(["--model", model, "--workspace-mb", "512"], capsys)
    assert code == 0 and out.count("skipped (--force rebuilds)") == len(manifest.stages)
