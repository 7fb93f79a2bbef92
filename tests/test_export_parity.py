"""Torch reference vs the exported ONNX run by the runtime, same tensors in."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from runtime.policy import load_manifest, load_policy  # noqa: E402
from tools import reference_model as rm  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(REPO, "exported", "reference")


def _inputs(seed):
    """Preprocessed images, normalised state and noise, as numpy float32."""
    rng = np.random.default_rng(seed)
    images = {c: rng.standard_normal((1, 3, 64, 64)).astype(np.float32) for c in rm.CAMERAS}
    state = rng.standard_normal((1, 29)).astype(np.float32)
    noise = rng.standard_normal((1, 32, 17)).astype(np.float32)
    return images, state, noise


def _torch_step(models, images, state, noise, steps, shift):
    world, expert = models
    out = rm.reference_step(world, expert, [torch.from_numpy(images[c]) for c in rm.CAMERAS],
                            torch.from_numpy(state), torch.from_numpy(noise), steps, shift)
    return out[0].numpy()


def _max_error(model_dir, models, steps, shift, seeds=(0, 1, 2)):
    policy = load_policy(model_dir, steps=steps, shift=shift)
    worst = 0.0
    for seed in seeds:
        images, state, noise = _inputs(seed)
        expected = _torch_step(models, images, state, noise, steps, shift)
        got = policy.infer_normalised(images, state, noise)
        assert got.shape == expected.shape == (32, 17)
        worst = max(worst, float(np.abs(got - expected).max()))
    policy.close()
    return worst


@pytest.fixture(scope="module")
def models():
    return rm.build_reference()


@pytest.mark.parametrize("steps,shift", [(1, 1.0), (4, 5.0)])
def test_committed_export_matches_torch(models, steps, shift):
    assert _max_error(REFERENCE, models, steps, shift) < 1e-4


def test_reference_step_follows_the_flow_convention(models):
    # One step from t=1 to t=0: x0 = noise - v(noise, 1).
    world, expert = models
    images, state, noise = _inputs(5)
    imgs = [torch.from_numpy(images[c]) for c in rm.CAMERAS]
    kv = world(*imgs)
    v = expert(torch.from_numpy(noise), torch.ones(1), torch.from_numpy(state), *kv)
    x0 = rm.reference_step(world, expert, imgs, torch.from_numpy(state),
                           torch.from_numpy(noise), 1, 1.0)
    torch.testing.assert_close(x0, torch.from_numpy(noise) - v)


@pytest.mark.slow
def test_fresh_export_checks_loads_and_reproduces(tmp_path, models):
    from tools.make_reference import make_reference

    out = str(tmp_path / "reference")
    fresh = make_reference(out)
    for stage in fresh["stages"]:
        onnx.checker.check_model(os.path.join(out, stage["file"]), full_check=True)
    manifest = load_manifest(out)
    assert [s.name for s in manifest.stages] == ["world", "action_expert"]
    assert _max_error(out, models, 4, 5.0, seeds=(0,)) < 1e-4

    with open(os.path.join(REFERENCE, "manifest.json")) as f:
        committed = json.load(f)
    # Everything but the hashes must regenerate exactly; the hashes too when
    # torch/onnx are the versions that produced the committed files.
    def without_hashes(m):
        return dict(m, stages=[dict(s, sha256=None) for s in m["stages"]])

    assert without_hashes(fresh) == without_hashes(committed)
    if fresh != committed:
        pytest.xfail("ONNX bytes differ from the committed export (different torch/onnx "
                     "version?); rerun python -m tools.make_reference to refresh")


@pytest.mark.slow
def test_export_failure_names_stage_and_module(tmp_path):
    from tools.export import ExportError, StageExport, export_stage

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("cannot trace me")

    stage = StageExport("broken", Broken(), (torch.zeros(1, 3),), ["x"], ["y"],
                        sources={"x": "state"})
    with pytest.warns(UserWarning, match="falling back to dynamo=False"):
        with pytest.raises(ExportError, match=r"stage 'broken' \(Broken\): ONNX export failed"):
            export_stage(stage, str(tmp_path))
