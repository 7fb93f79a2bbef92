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
REFERENCE_LAYER_NORMS = {"world": 3, "action_expert": 5}  # nn.LayerNorm: LayerNormalization nodes at opset 17


def _onnx_importable():
    """The stand-in parser makes layers only with the onnx package (absent from the Python 3.8 env)."""
    try:
        import onnx  # noqa: F401

        return True
    except ImportError:
        return False


HAVE_ONNX = _onnx_importable()


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
    (dict(fp32_norms="no"), "fp32 norms: expected True or False, got 'no'"),
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
    assert "world: world.onnx -> world.engine, fp32, flags [VERSION_COMPATIBLE], fp32 norms off, static shapes" in out
    assert ("action_expert: action_expert.onnx -> action_expert.engine, fp16, flags [FP16, VERSION_COMPATIBLE], "
            "fp32 norms on, static shapes") in out
    assert "fp32 norms on: in fp16/bf16 stages, normalisations written out as primitives are pinned to FP32 " \
           "(OBEY_PRECISION_CONSTRAINTS)" in out
    assert "workspace 512 MiB, optimisation level 3, timing cache %s" % os.path.join(model, "timing.cache") in out
    assert "nothing built" in out
    assert not any(name.endswith(".engine") for name in os.listdir(model))
    code, out, err = run(["--model", model, "--dry-run", "--no-fp32-norms"], capsys)
    assert code == 0, err
    assert "fp32 norms off (--no-fp32-norms)" in out and "fp16, flags [FP16], fp32 norms off" in out


def test_fp32_norms_and_no_fp32_norms_exclude_each_other(model, capsys):
    code, _, err = run(["--model", model, "--dry-run", "--fp32-norms", "--no-fp32-norms"], capsys)
    assert code == 2 and "not allowed with argument" in err


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
    # world is fp32; action_expert's layer norms are decomposed on 8.5 only (and seen only with onnx)
    pinned = REFERENCE_LAYER_NORMS["action_expert"] if version == "8.5.2" and HAVE_ONNX else 0
    assert calls_named(trt, "set_flag") == [("set_flag", "FP16")] + (
        [("set_flag", "OBEY_PRECISION_CONSTRAINTS")] if pinned else [])
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
        assert meta.builder_flags == (() if precision == "fp32" else ("FP16",) + (
            ("OBEY_PRECISION_CONSTRAINTS",) if pinned else ()) + ("fp32 norms: %d" % pinned,))
        plan = read_plan_standin(engine)
        assert ("FP16" in plan["flags"]) == (precision == "fp16")
        assert ("TF32" in plan["flags"]) == (precision == "fp16")  # cleared for fp32
        assert "%s  %s  built in" % (stage.name.ljust(13), precision) in out
    assert out.count("fp32 norms: %d" % pinned) == 1  # the action expert's summary line; none for fp32 stages
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
    assert meta.builder_flags == ("BF16", "VERSION_COMPATIBLE", "fp32 norms: 0") and meta.version_compatible
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
    built = be.build_stage(be.open_session(be.import_tensorrt()), str(tmp_path), stage, "fp16", options, platform)
    assert built == be.BuiltStage(os.path.getsize(str(tmp_path / "s.engine")), 0)
    assert calls_named(trt, "set_shape") == [("set_shape", "x", (1, 1, 17), (1, 32, 17), (1, 64, 17))]
    assert calls_named(trt, "add_optimization_profile") == [("add_optimization_profile", 1)]
    assert read_plan_standin(str(tmp_path / "s.engine"))["profiles"] == {"x": [[1, 1, 17], [1, 32, 17], [1, 64, 17]]}
    assert read_meta(str(tmp_path / "s.engine.json")).onnx_sha256 == "b" * 64


# --- fp32 norms: decomposed normalisations pinned to FP32 in fp16/bf16 stages -----------------------------------------

NORM_SHAPE = [1, 4, 8]


def _graph_stage(tmp_path, nodes, constants):
    """A stage of one input x and one output y (static [1, 4, 8]) made of these ONNX nodes; constants: name ->
    numpy array, as initializers."""
    onnx = pytest.importorskip("onnx")
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, NORM_SHAPE)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, NORM_SHAPE)],
        [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in constants.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(tmp_path / "s.onnx"))
    return SimpleNamespace(name="s", file="s.onnx", sha256="c" * 64, inputs=(
        SimpleNamespace(name="x", shape=tuple(NORM_SHAPE), profile=None),))


def _rms_norm(tmp_path, square="pow", scale="rsqrt"):
    """x * rsqrt(mean(x^2) + eps) * w as torch's exporter writes it (Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul);
    square="mul": x * x; scale="div": x / sqrt(...). Node names say what each is."""
    helper = pytest.importorskip("onnx").helper

    sq = (helper.make_node("Pow", ["x", "two"], ["sq"], name="square") if square == "pow" else
          helper.make_node("Mul", ["x", "x"], ["sq"], name="square"))
    nodes = [sq, helper.make_node("ReduceMean", ["sq"], ["mean"], name="mean", axes=[-1], keepdims=1),
             helper.make_node("Add", ["mean", "eps"], ["var_eps"], name="add_eps"),
             helper.make_node("Sqrt", ["var_eps"], ["std"], name="sqrt")]
    if scale == "rsqrt":
        nodes += [helper.make_node("Reciprocal", ["std"], ["inv"], name="scale"),
                  helper.make_node("Mul", ["x", "inv"], ["normed"], name="apply")]
    else:
        nodes += [helper.make_node("Div", ["x", "std"], ["normed"], name="scale")]
    nodes += [helper.make_node("Mul", ["normed", "w"], ["y"], name="weight")]
    return _graph_stage(tmp_path, nodes, {"two": 2.0, "eps": 1e-6, "w": [1.0] * NORM_SHAPE[-1]})


def _build(tmp_path, stage, precision, **kw):
    """build_all on one stage: (results, report lines, the stand-in plan, the metadata)."""
    options = be.BuildOptions(precisions={stage.name: precision}, **kw)
    lines = []
    results = be.build_all(be.open_session(be.import_tensorrt()), SimpleNamespace(stages=[stage]), str(tmp_path),
                           options, be.probe_tensorrt(), report=lines.append)
    engine = str(tmp_path / (stage.name + ".engine"))
    return results, lines + be.summary_lines(results), read_plan_standin(engine), read_meta(engine + ".json")


def _pinned(trt):
    """Layer name -> what was set on it: the precision, and the type of each output."""
    out = {}
    for call in trt.calls:
        if call[0] == "layer.precision":
            out.setdefault(call[1], []).append(call[2])
        elif call[0] == "set_output_type":
            out.setdefault(call[1], []).append("out%d:%s" % (call[2], call[3]))
    return out


@pytest.mark.parametrize("version", TRT_VERSIONS)
@pytest.mark.parametrize("square, scale", [("pow", "rsqrt"), ("mul", "div")])
def test_rms_norm_is_pinned_to_fp32_in_fp16(tmp_path, standin, version, square, scale):
    stage = _rms_norm(tmp_path, square, scale)
    trt = standin(version)
    results, lines, plan, meta = _build(tmp_path, stage, "fp16")
    chain = ["square", "mean", "add_eps", "sqrt", "scale"]  # not "apply" nor "weight": they follow the scale
    assert _pinned(trt) == {name: ["FLOAT", "out0:FLOAT"] for name in chain}
    assert plan["fp32_layers"] == chain  # the builder honoured them: the constraints flag is set
    assert "OBEY_PRECISION_CONSTRAINTS" in plan["flags"]
    assert calls_named(trt, "set_flag") == [("set_flag", "FP16"), ("set_flag", "OBEY_PRECISION_CONSTRAINTS")]
    assert meta.builder_flags == ("FP16", "OBEY_PRECISION_CONSTRAINTS", "fp32 norms: 1")
    assert results[0].fp32_norms == 1
    assert lines[-1].endswith("  fp32 norms: 1 (OBEY_PRECISION_CONSTRAINTS)")
    assert not trt.log


@pytest.mark.parametrize("version", TRT_VERSIONS)
def test_no_fp32_norms_pins_nothing(tmp_path, standin, version):
    stage = _rms_norm(tmp_path)
    trt = standin(version)
    results, lines, plan, meta = _build(tmp_path, stage, "fp16", fp32_norms=False)
    assert _pinned(trt) == {} and plan["fp32_layers"] == []
    assert calls_named(trt, "set_flag") == [("set_flag", "FP16")]
    assert meta.builder_flags == ("FP16",) and results[0].fp32_norms is None and "fp32 norms" not in lines[-1]


def test_bf16_stage_is_pinned_too(tmp_path, standin):
    trt = standin("10.3.0")
    _, _, plan, meta = _build(tmp_path, _rms_norm(tmp_path), "bf16")
    assert plan["fp32_layers"] == ["square", "mean", "add_eps", "sqrt", "scale"] and len(_pinned(trt)) == 5
    assert meta.builder_flags == ("BF16", "OBEY_PRECISION_CONSTRAINTS", "fp32 norms: 1")


@pytest.mark.parametrize("version", TRT_VERSIONS)
def test_fp32_stage_pins_nothing(tmp_path, standin, version):
    trt = standin(version)
    results, lines, plan, meta = _build(tmp_path, _rms_norm(tmp_path), "fp32")
    assert _pinned(trt) == {} and calls_named(trt, "set_flag") == []
    assert "OBEY_PRECISION_CONSTRAINTS" not in plan["flags"]
    assert meta.builder_flags == () and results[0].fp32_norms is None and "fp32 norms" not in lines[-1]


def test_what_is_no_norm_is_not_pinned_and_chains_stop_at_the_rest(tmp_path, standin):
    """x**2 used elsewhere (its mean is of a sum), a mean of a product of two tensors, a max of a square: not norms.
    A chain stops at what is not a norm's next step: a max after the mean, a root used twice, a root followed by
    something other than a reciprocal, division or product."""
    helper = pytest.importorskip("onnx").helper

    nodes = [helper.make_node("Pow", ["x", "two"], ["sq"], name="pow_elsewhere"),
             helper.make_node("Add", ["sq", "x"], ["sum"], name="add"),
             helper.make_node("ReduceMean", ["sum"], ["m1"], name="mean_of_sum", axes=[-1], keepdims=1),
             helper.make_node("Mul", ["x", "w"], ["xw"], name="product"),
             helper.make_node("ReduceMean", ["xw"], ["m2"], name="mean_of_product", axes=[-1], keepdims=1),
             helper.make_node("Mul", ["x", "x"], ["sq2"], name="square"),
             helper.make_node("ReduceMean", ["sq2"], ["m3"], name="mean_of_square", axes=[-1], keepdims=1),
             helper.make_node("Max", ["m3", "m1"], ["mx"], name="max"),
             helper.make_node("Sqrt", ["mx"], ["r"], name="sqrt_after_max"),
             helper.make_node("Pow", ["x", "two"], ["sq3"], name="pow_for_max"),
             helper.make_node("ReduceMax", ["sq3"], ["m4"], name="max_of_square", axes=[-1], keepdims=1),
             helper.make_node("Add", ["m2", "r"], ["m5"], name="join"),
             helper.make_node("Add", ["m5", "m4"], ["m6"], name="join_max"),
             # a norm whose root is used twice: the chain ends at the root
             helper.make_node("Pow", ["x", "two"], ["b_sq"], name="b_square"),
             helper.make_node("ReduceMean", ["b_sq"], ["b_mean"], name="b_mean", axes=[-1], keepdims=1),
             helper.make_node("Add", ["b_mean", "eps"], ["b_var"], name="b_add_eps"),
             helper.make_node("Sqrt", ["b_var"], ["b_std"], name="b_sqrt"),
             helper.make_node("Div", ["x", "b_std"], ["b_normed"], name="b_div"),
             helper.make_node("Add", ["b_normed", "b_std"], ["b_out"], name="b_other_use_of_the_root"),
             # a norm whose root feeds something that applies no scale: the chain ends at the root
             helper.make_node("Pow", ["x", "two"], ["c_sq"], name="c_square"),
             helper.make_node("ReduceMean", ["c_sq"], ["c_mean"], name="c_mean", axes=[-1], keepdims=1),
             helper.make_node("Add", ["c_mean", "eps"], ["c_var"], name="c_add_eps"),
             helper.make_node("Sqrt", ["c_var"], ["c_std"], name="c_sqrt"),
             helper.make_node("Neg", ["c_std"], ["c_neg"], name="c_neg"),
             helper.make_node("Add", ["m6", "b_out"], ["m7"], name="join_b"),
             helper.make_node("Add", ["m7", "c_neg"], ["m"], name="join_c"),
             helper.make_node("Mul", ["x", "m"], ["y"], name="out")]
    stage = _graph_stage(tmp_path, nodes, {"two": 2.0, "eps": 1e-6, "w": [1.0] * NORM_SHAPE[-1]})
    trt = standin("10.3.0")
    _, _, plan, meta = _build(tmp_path, stage, "fp16")
    pinned = ["square", "mean_of_square", "b_square", "b_mean", "b_add_eps", "b_sqrt", "c_square", "c_mean",
              "c_add_eps", "c_sqrt"]
    assert plan["fp32_layers"] == pinned and set(_pinned(trt)) == set(pinned)
    assert meta.builder_flags == ("FP16", "OBEY_PRECISION_CONSTRAINTS", "fp32 norms: 3")


@pytest.mark.parametrize("version, pinned", [("10.3.0", False), ("8.5.2", True)])
def test_reference_layer_norms_are_pinned_only_where_decomposed(model, standin, capsys, version, pinned):
    """nn.LayerNorm (opset 17): TensorRT >= 8.6 parses it into its normalisation layer (FP32 inside, nothing to
    pin); 8.5's parser writes it out as primitives, whose square, mean, epsilon add, root and division are pinned."""
    onnx = pytest.importorskip("onnx")
    trt = standin(version)
    code, out, err = run(["--model", model, "--precision", "fp16"], capsys)
    assert code == 0, err
    everywhere = set()
    for stage in STAGES:
        norms = [n.name for n in onnx.load(os.path.join(model, stage + ".onnx"), load_external_data=False).graph.node
                 if n.op_type == "LayerNormalization"]
        assert len(norms) == REFERENCE_LAYER_NORMS[stage]
        chain = ["%s/%s" % (n, step) for n in norms for step in ("pow", "var", "add_eps", "sqrt", "div")]
        everywhere.update(chain if pinned else [])
        plan = read_plan_standin(os.path.join(model, stage + ".engine"))
        assert plan["fp32_layers"] == (chain if pinned else [])
        assert ("OBEY_PRECISION_CONSTRAINTS" in plan["flags"]) == pinned
        count = len(norms) if pinned else 0
        flags = read_meta(os.path.join(model, stage + ".engine.json")).builder_flags
        assert flags == ("FP16",) + (("OBEY_PRECISION_CONSTRAINTS",) if pinned else ()) + ("fp32 norms: %d" % count,)
        assert "fp32 norms: %d" % count in [line for line in out.splitlines() if line.startswith(stage + " ")][-1]
    assert set(_pinned(trt)) == everywhere


@pytest.mark.parametrize("version", TRT_VERSIONS)
def test_changing_fp32_norms_makes_the_stage_out_of_date(model, standin, capsys, version):
    trt = standin(version)
    assert run(["--model", model, "--precision", "fp16,world=fp32"], capsys)[0] == 0
    code, out, _ = run(["--model", model, "--precision", "fp16,world=fp32", "--no-fp32-norms"], capsys)
    assert code == 0
    assert "action_expert: building fp16 engine (fp32 norms: recorded on (" in out and "), asked off)" in out
    assert "world: up to date" in out  # fp32: the option does not apply
    assert read_meta(os.path.join(model, "action_expert.engine.json")).builder_flags == ("FP16",)
    del trt.calls[:]
    code, out, _ = run(["--model", model, "--precision", "fp16,world=fp32", "--no-fp32-norms"], capsys)
    assert "action_expert: up to date" in out and calls_named(trt, "build_serialized_network") == []
    code, out, _ = run(["--model", model, "--precision", "fp16,world=fp32"], capsys)
    assert "action_expert: building fp16 engine (fp32 norms: recorded off, asked on)" in out


def test_pin_to_fp32_refuses_a_tensorrt_without_precision_constraints(standin):
    """TensorRT 11 removed weak typing (BuilderFlag.OBEY_PRECISION_CONSTRAINTS with it): a clear error, not an
    AttributeError from deep inside the build."""
    trt = standin("10.3.0")
    del trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS
    config = be.open_session(trt).builder.create_builder_config()
    with pytest.raises(be.BuildError, match=r"stage 's': TensorRT 10.3.0 has no BuilderFlag.OBEY_PRECISION_"
                                            r"CONSTRAINTS .* build with --no-fp32-norms"):
        be.pin_to_fp32(trt, config, ["a layer"], "s")
    be.pin_to_fp32(trt, config, [], "s")  # nothing to pin: nothing asked of TensorRT


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
