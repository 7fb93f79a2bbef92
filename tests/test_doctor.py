"""`wam-edge doctor` on this machine: the real config, the real reference model, real ONNX Runtime, real processes;
a GPU only where a test injects a TrtPlatform (engines then come from the no-GPU stand-in's write_engines)."""

import ctypes
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
from standins.trt_runtime_standin_no_gpu import write_engines

from runtime import cli, doctor
from runtime.config import load_config
from runtime.policy import load_manifest
from runtime.policy.backends import TrtPlatform, engine_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "config.yaml")
REFERENCE = os.path.join(REPO, "exported", "reference")
ORIN = TrtPlatform("10.3.0", "Orin", "8.7")
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None or importlib.util.find_spec("pycuda") is not None


def _has_libcuda():
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def rows(checks):
    names = [c.name for c in checks]
    assert len(names) == len(set(names)), names
    return {c.name: c for c in checks}


def doctor_main(*sets, **probes):
    """(exit code, rows) of doctor.main on the repository's config.yaml with these --set overrides."""
    out = io.StringIO()
    code = doctor.main(CONFIG, list(sets), as_json=True, out=out, **probes)
    report = json.loads(out.getvalue())
    assert report["ok"] is (code == 0)
    return code, {c["name"]: c for c in report["checks"]}


@pytest.fixture
def model_copy(tmp_path):
    d = str(tmp_path / "reference")
    shutil.copytree(REFERENCE, d)
    return d


def test_default_config_here_runs_on_onnxruntime_without_engines():
    out = io.StringIO()
    code = doctor.main(CONFIG, [], out=out)
    text = out.getvalue()
    assert code == 0, text
    assert text.rstrip().endswith("no check failed")
    r = rows(doctor.run_checks(load_config(CONFIG)))
    assert r["config"].status == "ok" and CONFIG in r["config"].detail
    assert r["model"].status == "ok"
    assert "reference" in r["model"].detail and "world, action_expert" in r["model"].detail
    assert "1 step" in r["model"].detail and "sha256 checked" in r["model"].detail
    assert r["onnxruntime"].status == "ok" and "CPUExecutionProvider" in r["onnxruntime"].detail
    assert r["backend"].status == "ok" and r["backend"].detail.startswith("would run on onnxruntime:")
    assert r["engines"].status == "absent" and "wam-edge build" in r["engines"].detail
    assert "cuda_graph" not in r  # model.cuda_graph is false by default
    for name in ("python", "tensorrt", "dds", "camera", "unitree_sdk2py", "jetson"):
        assert r[name].status in doctor.STATUSES and r[name].detail
    assert [n for n in r] == ["python", "config", "model", "onnxruntime", "tensorrt", "engines", "backend", "dds",
                              "camera", "unitree_sdk2py", "jetson"]


def test_cli_json_in_a_process_and_no_torch_or_tensorrt_imported():
    proc = subprocess.run([sys.executable, "-m", "runtime.cli", "doctor", "--json"], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
    report = json.loads(proc.stdout.decode())
    assert report["ok"] is True
    assert {"model", "backend", "engines"} <= {c["name"] for c in report["checks"]}
    assert all(set(c) == {"name", "status", "detail"} for c in report["checks"])
    probe = ("import sys, io\nfrom runtime import doctor\ndoctor.main(%r, [], out=io.StringIO())\n"
             "print(sorted(m for m in ('torch', 'tensorrt', 'pycuda') if m in sys.modules))" % CONFIG)
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().strip() == "[]"


def test_bad_arguments_exit_2():
    with pytest.raises(SystemExit) as exc:
        cli.main(["doctor", "--no-such-option"])
    assert exc.value.code == 2


def test_tampered_onnx_file_fails_the_model_row(model_copy):
    with open(os.path.join(model_copy, "world.onnx"), "ab") as f:
        f.write(b"\0")
    code, r = doctor_main("model.path=" + model_copy)
    assert code == 1
    assert r["model"]["status"] == "fail"
    assert "world.onnx" in r["model"]["detail"] and "sha256 mismatch" in r["model"]["detail"]
    assert "backend" not in r and "engines" not in r  # nothing to judge without a manifest
    # the config's hash setting reaches load_manifest
    code, r = doctor_main("model.path=" + model_copy, "model.verify_hashes=false")
    assert code == 0 and r["model"]["status"] == "ok" and "NOT checked" in r["model"]["detail"]


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT or pycuda is installed here: this checks a machine without")
def test_backend_tensorrt_here_fails_and_says_build():
    code, r = doctor_main("model.backend=tensorrt")
    assert code == 1
    assert r["tensorrt"]["status"] == "absent" and r["tensorrt"]["detail"].startswith("not installed")
    assert r["engines"]["status"] == "fail" and "no engines" in r["engines"]["detail"]
    backend = r["backend"]
    assert backend["status"] == "fail"
    assert "TensorRT is not installed" in backend["detail"] and "no engines" in backend["detail"]
    assert "wam-edge build --model %s" % REFERENCE in backend["detail"]


def test_injected_platform_with_matching_engines_runs_tensorrt(model_copy):
    write_engines(model_copy, load_manifest(model_copy), ORIN)
    code, r = doctor_main("model.path=" + model_copy, "model.backend=auto", trt_probe=lambda: ORIN)
    assert code == 0
    assert r["tensorrt"] == {"name": "tensorrt", "status": "ok", "detail": "TensorRT 10.3.0 on Orin (sm 8.7)"}
    for stage in ("world", "action_expert"):
        assert r["engine " + stage]["status"] == "ok"
        assert r["engine " + stage]["detail"] == "matches: fp16, TensorRT 10.3.0 on Orin (sm 8.7)"
    assert r["backend"]["status"] == "ok"
    assert r["backend"]["detail"].startswith("would run on tensorrt: engines for all 2 stages match TensorRT 10.3.0")
    code, r = doctor_main("model.path=" + model_copy, "model.backend=tensorrt", trt_probe=lambda: ORIN)
    assert code == 0 and r["backend"]["detail"].startswith("would run on tensorrt:")


def test_engines_for_another_tensorrt_are_a_mismatch_and_auto_falls_to_onnxruntime(model_copy):
    write_engines(model_copy, load_manifest(model_copy), TrtPlatform("8.6.2", "Orin", "8.7"))
    code, r = doctor_main("model.path=" + model_copy, "model.backend=auto", trt_probe=lambda: ORIN)
    assert code == 0  # auto still runs: on ONNX Runtime
    for stage in ("world", "action_expert"):
        row = r["engine " + stage]
        assert row["status"] == "warn"
        assert "TensorRT version: recorded 8.6.2, present 10.3.0" in row["detail"]
        assert "rebuild with `wam-edge build`" in row["detail"]
    assert r["backend"]["status"] == "ok" and r["backend"]["detail"].startswith("would run on onnxruntime:")
    assert "recorded 8.6.2, present 10.3.0" in r["backend"]["detail"]
    code, r = doctor_main("model.path=" + model_copy, "model.backend=tensorrt", trt_probe=lambda: ORIN)
    assert code == 1
    assert r["engine world"]["status"] == "fail" and r["backend"]["status"] == "fail"
    assert "recorded 8.6.2, present 10.3.0" in r["backend"]["detail"] and "wam-edge build" in r["backend"]["detail"]


def test_an_engine_replaced_after_the_build_is_not_taken(model_copy):
    write_engines(model_copy, load_manifest(model_copy), ORIN)
    with open(engine_path(model_copy, "world"), "ab") as f:
        f.write(b"trtexec")
    code, r = doctor_main("model.path=" + model_copy, "model.backend=auto", trt_probe=lambda: ORIN)
    assert r["engine world"]["status"] == "warn" and "replaced after the build" in r["engine world"]["detail"]
    assert r["engine action_expert"]["status"] == "ok"
    assert r["backend"]["detail"].startswith("would run on onnxruntime:")


def test_cuda_init_error_warns_unless_tensorrt_is_asked_for():
    def broken():
        raise RuntimeError("cuInit failed: CUDA_ERROR_NO_DEVICE")

    code, r = doctor_main("model.backend=auto", trt_probe=broken)
    assert code == 0 and r["tensorrt"]["status"] == "warn" and "CUDA_ERROR_NO_DEVICE" in r["tensorrt"]["detail"]
    code, r = doctor_main("model.backend=tensorrt", trt_probe=broken)
    assert code == 1 and r["tensorrt"]["status"] == "fail" and r["backend"]["status"] == "fail"


def test_onnxruntime_gpu_without_a_gpu_provider_fails():
    code, r = doctor_main("model.backend=onnxruntime-gpu", ort_probe=lambda: ["CPUExecutionProvider"])
    assert code == 1 and r["backend"]["status"] == "fail"
    assert "CPUExecutionProvider -> CPU" in r["backend"]["detail"]
    code, r = doctor_main("model.backend=onnxruntime-gpu",
                          ort_probe=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert code == 0 and r["backend"]["detail"].startswith("would run on onnxruntime-gpu:")


def test_unknown_config_key_is_a_failed_row_naming_it():
    out = io.StringIO()
    code = doctor.main(CONFIG, ["model.no_such_key=1"], out=out)
    assert code == 1
    assert "model.no_such_key" in out.getvalue()
    code, r = doctor_main("model.no_such_key=1")
    assert r["config"]["status"] == "fail" and "unknown key model.no_such_key" in r["config"]["detail"]
    assert "model" not in r and "python" in r and "jetson" in r  # the machine's checks still run


@pytest.mark.skipif(_has_libcuda(), reason="this machine has libcuda.so.1; the test checks one without")
def test_cuda_graph_without_libcuda_fails_naming_it():
    code, r = doctor_main("model.cuda_graph=true")
    assert code == 1
    assert r["cuda_graph"]["status"] == "fail" and "libcuda.so.1" in r["cuda_graph"]["detail"]


def test_dds_is_a_failure_only_when_the_controller_drives_dds():
    def no_cyclonedds(name):
        if name == "cyclonedds":
            raise ImportError("No module named 'cyclonedds'")
        return importlib.import_module(name)

    code, r = doctor_main(import_module=no_cyclonedds, environ={"CYCLONEDDS_HOME": "/opt/cyclonedds"})
    assert code == 0 and r["dds"]["status"] == "warn"
    assert "tools/install_dds.sh" in r["dds"]["detail"] and "CYCLONEDDS_HOME=/opt/cyclonedds" in r["dds"]["detail"]
    code, r = doctor_main("controller.driver=dds", import_module=no_cyclonedds)
    assert code == 1 and r["dds"]["status"] == "fail"


def test_camera_sources_name_what_they_lack(tmp_path):
    code, r = doctor_main("camera.source=v4l2", "camera.v4l2_device=%s/video9" % tmp_path)
    assert code == 1 and r["camera"]["status"] == "fail" and "%s/video9" % tmp_path in r["camera"]["detail"]
    code, r = doctor_main("camera.source=replay")
    assert code == 1 and "camera.replay_path is empty" in r["camera"]["detail"]

    def no_jpeg(name):
        if name == "simplejpeg":
            raise ImportError("No module named 'simplejpeg'")
        return importlib.import_module(name)

    code, r = doctor_main("camera.source=image_server", import_module=no_jpeg)
    assert code == 1 and "pip install simplejpeg" in r["camera"]["detail"]
    code, r = doctor_main("camera.layout=[{name: head, width: 640}]")
    assert code == 1 and "left_wrist" in r["camera"]["detail"]


def test_jetson_row_reads_the_l4t_release(tmp_path):
    release = tmp_path / "nv_tegra_release"
    release.write_text("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64\nmore\n")
    code, r = doctor_main(tegra_release=str(release))
    assert r["jetson"]["status"] == "ok" and r["jetson"]["detail"].startswith("L4T R35 (release), REVISION: 4.1")
    code, r = doctor_main(tegra_release=str(tmp_path / "missing"))
    assert r["jetson"]["status"] == "absent" and "not a Jetson" in r["jetson"]["detail"]


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT or pycuda is installed here: this checks a machine without")
def test_engines_without_tensorrt_here_are_not_taken(model_copy):
    write_engines(model_copy, load_manifest(model_copy), ORIN)
    os.remove(engine_path(model_copy, "action_expert") + ".json")
    code, r = doctor_main("model.path=" + model_copy, "model.backend=auto")
    assert code == 0
    world = r["engine world"]
    assert world["status"] == "warn" and "built fp16, TensorRT 10.3.0 on Orin (sm 8.7)" in world["detail"]
    assert "not checked against this machine: TensorRT is not installed" in world["detail"]
    assert r["engine action_expert"]["status"] == "warn"
    assert "no engine metadata action_expert.engine.json" in r["engine action_expert"]["detail"]
    assert r["backend"]["detail"].startswith("would run on onnxruntime:")


def test_unitree_sdk_absent_is_fine_unless_lowcmd_asks_for_the_motion_switcher():
    def no_sdk(name):
        if name == "unitree_sdk2py":
            raise ImportError("No module named 'unitree_sdk2py'")
        return importlib.import_module(name)

    code, r = doctor_main(import_module=no_sdk)
    assert r["unitree_sdk2py"]["status"] == "absent"
    code, r = doctor_main("controller.driver=dds", "controller.mode=lowcmd", "controller.release_motion_control=true",
                          import_module=no_sdk)
    assert r["unitree_sdk2py"]["status"] == "warn" and "L2+R2" in r["unitree_sdk2py"]["detail"]


def test_load_runs_the_policy_as_the_runtime_would_and_only_when_asked(model_copy):
    code, r = doctor_main()
    assert code == 0 and "load" not in r  # nothing is loaded without --load
    code, r = doctor_main(load=True)
    assert code == 0 and r["load"]["status"] == "ok", r["load"]
    assert "on onnxruntime (CPUExecutionProvider)" in r["load"]["detail"] and "inference median" in r["load"]["detail"]
    code, r = doctor_main("policy.steps=3", load=True)  # the config's sampler override reaches the loaded policy
    assert code == 0 and "steps=3" in r["load"]["detail"]
    with open(os.path.join(model_copy, "world.onnx"), "ab") as f:
        f.write(b"\0")
    code, r = doctor_main("model.path=" + model_copy, "model.verify_hashes=false", load=True)
    assert code == 1 and r["load"]["status"] == "fail"  # the model row passed unhashed; the runtime cannot load it
    assert "could not load or run the policy" in r["load"]["detail"] and "world.onnx" in r["load"]["detail"]
    code, r = doctor_main("model.path=" + model_copy, load=True)
    assert code == 1 and r["model"]["status"] == "fail" and "load" not in r  # no model, nothing to load


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_load_fails_with_the_runtimes_own_message_when_the_backend_cannot_start():
    code, r = doctor_main("model.backend=tensorrt", load=True)
    assert code == 1 and r["load"]["status"] == "fail"
    assert "the runtime could not load or run the policy" in r["load"]["detail"] and "build" in r["load"]["detail"]
