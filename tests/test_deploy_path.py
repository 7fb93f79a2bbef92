"""docs/deploy.md end to end on a model with declared dynamic axes: `wam-edge export` (a factory in this file),
the runtime loading it, `wam-edge verify` against its golden data, and `wam-edge build` turning the manifest's
profiles into TensorRT optimisation profiles (against the recording builder stand-in: no GPU here)."""

import os
import re
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("polygraphy")

from runtime.policy import load_manifest, load_policy  # noqa: E402
from runtime.policy.backends.engine_meta import read_meta  # noqa: E402
from tests.standins.tensorrt_builder_standin_no_gpu import (  # noqa: E402
    make_tensorrt_standin_no_gpu,
    platform_probe_standin_no_gpu,
)
from tools import build_engine, export, verify  # noqa: E402

IMAGE_PROFILE = (8, 16, 32)      # the camera's height and width may vary over this range
TOKENS_PROFILE = (64, 256, 1024)  # so the tokens between the stages do: H * W


class ToyWorld(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 3)

    def forward(self, image):
        return self.proj(image.flatten(2).transpose(1, 2)).transpose(1, 2)  # (1, 3, H*W)


class ToyExpert(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(2)
        self.lin = torch.nn.Linear(2, 2)

    def forward(self, x_t, t, state, tokens):
        context = torch.softmax(tokens, dim=-1).mean(dim=(1, 2))
        return self.lin(self.norm(x_t)) * t[:, None, None] + state[:, None, :] + context[:, None, None]


def toy_dynamic(checkpoint=None):
    """The factory `wam-edge export --factory test_deploy_path:toy_dynamic` calls."""
    torch.manual_seed(0)
    world, expert = ToyWorld(), ToyExpert()
    side = IMAGE_PROFILE[1]
    return export.ExportSpec(
        manifest={
            "format": "wam-edge-manifest", "version": 1, "name": "toy-dynamic",
            "cameras": [{"name": "head", "height": side, "width": side, "resize": "nearest", "mean": [0.0] * 3,
                         "std": [1.0] * 3, "input": "image"}],
            "state": {"joints": ["a", "b"], "mean": [0.0, 0.0], "std": [1.0, 1.0]},
            "action": {"kind": "joint_position", "joints": ["a", "b"], "horizon": 4, "step_s": 0.02,
                       "mean": [0.0, 0.0], "std": [0.1, 0.1]},
            "sampler": {"type": "flow_matching", "steps": 1, "shift": 1.0, "distilled": True},
        },
        stages=[
            export.StageExport("world", world, (torch.zeros(1, 3, side, side),), ["image"], ["tokens"],
                               sources={"image": "camera:head"},
                               dynamic={"image": {2: IMAGE_PROFILE, 3: IMAGE_PROFILE}}),
            export.StageExport("expert", expert, (torch.zeros(1, 4, 2), torch.ones(1), torch.zeros(1, 2),
                                                  torch.zeros(1, 3, side * side)),
                               ["x_t", "t", "state", "tokens"], ["velocity"], runs="per_step",
                               sources={"x_t": "sampler:x", "t": "sampler:t", "state": "state",
                                        "tokens": "world:tokens"},
                               sinks={"velocity": "sampler:velocity"}, dynamic={"tokens": {2: TOKENS_PROFILE}}),
        ])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("deploy") / "toy")
    assert export.main(["--factory", "test_deploy_path:toy_dynamic", "--out", out]) == 0
    return out


@pytest.mark.slow
def test_export_writes_profiles_the_runtime_binds_at_opt(exported):
    manifest = load_manifest(exported)
    image = manifest.stage("world").inputs[0]
    assert image.shape == (1, 3, 16, 16)
    assert image.profile == ((1, 3, 8, 8), (1, 3, 16, 16), (1, 3, 32, 32))
    assert manifest.stage("expert").inputs[3].profile == ((1, 3, 64), (1, 3, 256), (1, 3, 1024))
    assert os.path.isfile(os.path.join(exported, verify.GOLDEN_FILE))
    # the runtime binds the opt shapes (symbolic axes accepted only where a profile is declared)
    policy = load_policy(exported)
    rgb = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    actions = policy.infer({"head": rgb}, np.zeros(2, np.float32))
    assert actions.shape == (4, 2) and np.isfinite(actions).all()
    policy.close()


@pytest.mark.slow
def test_verify_passes_on_the_golden_data(exported, capsys):
    assert verify.main(["--model", exported]) == 0
    out = capsys.readouterr().out
    assert re.search(r"runtime:onnxruntime +expert", out) and "verify: passed" in out


@pytest.mark.slow
@pytest.mark.parametrize("version", ["8.5.2", "10.3.0"])
def test_build_turns_manifest_profiles_into_optimisation_profiles(exported, tmp_path, monkeypatch, capsys, version):
    import shutil

    model = str(tmp_path / "toy")
    shutil.copytree(exported, model)
    trt = make_tensorrt_standin_no_gpu(version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(build_engine, "probe_tensorrt", platform_probe_standin_no_gpu(version, "Orin", "8.7"))
    assert build_engine.main(["--model", model, "--precision", "fp16,world=fp32"]) == 0, capsys.readouterr()
    shapes = [c[1:] for c in trt.calls if c[0] == "set_shape"]
    assert shapes == [("image", (1, 3, 8, 8), (1, 3, 16, 16), (1, 3, 32, 32)),
                      ("tokens", (1, 3, 64), (1, 3, 256), (1, 3, 1024))]
    assert len([c for c in trt.calls if c[0] == "add_optimization_profile"]) == 2
    manifest = load_manifest(model)
    for stage in manifest.stages:
        meta = read_meta(os.path.join(model, stage.name + ".engine.json"))
        assert meta.onnx_sha256 == stage.sha256 and meta.precision == ("fp32" if stage.name == "world" else "fp16")
