"""`wam-edge export`: the CLI, factories and checkpoints, dynamic axes with profiles, refusals, golden data.

The parser and golden-file tests need no torch (they run on Python 3.8 too); the export tests import it via
pytest.importorskip.
"""

import json
import os

import numpy as np
import pytest

from runtime.policy.manifest import ManifestError, load_manifest, parse_manifest
from tools import golden

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(REPO, "exported", "reference")


def _committed_manifest():
    with open(os.path.join(REFERENCE, "manifest.json")) as f:
        return json.load(f)


def _torch():
    return pytest.importorskip("torch")


def _export_main(argv):
    _torch()
    pytest.importorskip("onnx")
    from tools.export import main

    return main(argv)


# --- manifest profiles (no torch) ---------------------------------------------------------------------------

def _with_camera_profile(lo, opt, hi, shape=None):
    m = _committed_manifest()
    entry = m["stages"][0]["inputs"][0]
    if shape is not None:
        entry["shape"] = shape
    entry["profile"] = {"min": lo, "opt": opt, "max": hi}
    return m


def test_manifest_accepts_a_profile_and_keeps_it():
    m = parse_manifest(_with_camera_profile([1, 3, 32, 32], [1, 3, 64, 64], [1, 3, 128, 128]))
    spec = m.stages[0].inputs[0]
    assert spec.shape == (1, 3, 64, 64)
    assert spec.profile == ((1, 3, 32, 32), (1, 3, 64, 64), (1, 3, 128, 128))
    assert m.stages[0].inputs[1].profile is None


@pytest.mark.parametrize("lo,opt,hi,shape,key,words", [
    ([1, 3, 32, 200], [1, 3, 64, 64], [1, 3, 128, 128], None, "stages[0].inputs[0].profile.min[3]", "above max"),
    ([1, 3, 32], [1, 3, 64, 64], [1, 3, 128, 128], None, "stages[0].inputs[0].profile.min", "expected 4 entries"),
    ([1, 3, 32, 32], [1, 3, 64, 64], [1, 3, 128, 128, 1], None, "stages[0].inputs[0].profile.max",
     "expected 4 entries"),
    ([1, 3, 32, 32], [1, 3, 16, 64], [1, 3, 128, 128], None, "stages[0].inputs[0].profile.opt[2]", "min <= opt"),
    ([1, 3, 32, 32], [1, 3, 32, 32], [1, 3, 48, 48], None, "stages[0].inputs[0].shape[2]", "outside"),
    ([0, 3, 32, 32], [1, 3, 64, 64], [1, 3, 128, 128], None, "stages[0].inputs[0].profile.min[0]", ">= 1"),
    ([1, 3, "h", 32], [1, 3, 64, 64], [1, 3, 128, 128], None, "stages[0].inputs[0].profile.min[2]", "symbolic"),
])
def test_manifest_rejects_bad_profiles_naming_the_key(lo, opt, hi, shape, key, words):
    with pytest.raises(ManifestError) as err:
        parse_manifest(_with_camera_profile(lo, opt, hi, shape))
    assert key in str(err.value) and words in str(err.value)


def test_manifest_rejects_unknown_profile_keys_and_symbolic_shapes():
    m = _with_camera_profile([1, 3, 32, 32], [1, 3, 64, 64], [1, 3, 128, 128])
    m["stages"][0]["inputs"][0]["profile"]["step"] = [1, 1, 1, 1]
    with pytest.raises(ManifestError, match=r"stages\[0\]\.inputs\[0\]\.profile\.step: unknown key"):
        parse_manifest(m)
    m = _committed_manifest()
    m["stages"][0]["inputs"][0]["shape"][2] = "height"
    with pytest.raises(ManifestError, match=r"stages\[0\]\.inputs\[0\]\.shape\[2\]: symbolic dimension 'height'"):
        parse_manifest(m)


def test_manifest_rejects_a_consumer_narrower_than_its_source():
    m = _committed_manifest()
    out = m["stages"][0]["outputs"][0]  # world:kv_0_k, (1, 4, 192, 16), feeds action_expert statically
    out["profile"] = {"min": [1, 4, 96, 16], "opt": [1, 4, 192, 16], "max": [1, 4, 384, 16]}
    with pytest.raises(ManifestError, match=r"stages\[1\]\.inputs\[3\]\.shape: 'kv_0_k' axis 2 takes "
                                            r"\[192, 192\] but its source world:kv_0_k ranges over \[96, 384\]"):
        parse_manifest(m)


# --- golden files (no torch) --------------------------------------------------------------------------------

def test_random_inputs_cover_every_host_input_with_its_shape():
    manifest = parse_manifest(_committed_manifest())
    arrays = golden.random_inputs(manifest, seed=3)
    assert sorted(arrays) == ["action_expert/state", "action_expert/t", "action_expert/x_t",
                              "world/image_head", "world/image_left_wrist", "world/image_right_wrist"]
    assert arrays["action_expert/x_t"].shape == (1, 32, 17)
    assert all(a.dtype == np.float32 for a in arrays.values())
    assert 0.0 <= float(arrays["action_expert/t"][0]) < 1.0
    again = golden.random_inputs(manifest, seed=3)
    assert all(np.array_equal(arrays[k], again[k]) for k in arrays)
    other = golden.random_inputs(manifest, seed=4)
    assert not np.array_equal(arrays["world/image_head"], other["world/image_head"])


def test_golden_round_trip_loads_without_pickle(tmp_path):
    arrays = {"world/image_head": np.arange(12, dtype=np.float32).reshape(1, 3, 2, 2),
              "action_expert/delay": np.array([2], dtype=np.int32)}
    meta = {"seed": 7, "torch": "x", "stages": {"world": "ab" * 32}}
    path = str(tmp_path / "golden.npz")
    golden.write_golden(path, arrays, meta)
    with np.load(path, allow_pickle=False) as data:
        assert sorted(data.files) == sorted(list(arrays) + ["__meta__"])
    got, got_meta = golden.read_golden(path)
    assert got_meta == meta
    assert sorted(got) == sorted(arrays)
    for key, value in arrays.items():
        assert got[key].dtype == value.dtype and np.array_equal(got[key], value)


def test_corrupted_or_missing_golden_files_are_refused(tmp_path):
    path = str(tmp_path / "golden.npz")
    with pytest.raises(ValueError, match="does not exist"):
        golden.read_golden(path)
    golden.write_golden(path, {"a/b": np.zeros(3, np.float32)}, {"seed": 0, "torch": "x", "stages": {}})
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="is not a valid .npz"):
        golden.read_golden(path)
    np.savez(path, **{"a/b": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="has no '__meta__' entry"):
        golden.read_golden(path)
    np.savez(path, __meta__=np.array("{not json"))
    with pytest.raises(ValueError, match="__meta__ is not a JSON string"):
        golden.read_golden(path)
    np.savez(path, __meta__=np.array(json.dumps({"seed": 0})))
    with pytest.raises(ValueError, match="must be an object with seed, torch, stages"):
        golden.read_golden(path)


# --- the CLI: reference student (from a checkpoint) and teacher ---------------------------------------------

def _ort_vs_torch(model_dir, steps, shift, seed=0):
    """Largest |ORT - torch| of one policy step of the seed-0 reference on random preprocessed inputs."""
    torch = _torch()
    from runtime.policy import load_policy
    from tools import reference_model as rm

    world, expert = rm.build_reference()
    rng = np.random.default_rng(seed)
    images = {c: rng.standard_normal((1, 3, 64, 64)).astype(np.float32) for c in rm.CAMERAS}
    state = rng.standard_normal((1, 29)).astype(np.float32)
    noise = rng.standard_normal((1, 32, 17)).astype(np.float32)
    expected = rm.reference_step(world, expert, [torch.from_numpy(images[c]) for c in rm.CAMERAS],
                                 torch.from_numpy(state), torch.from_numpy(noise), steps, shift)[0].numpy()
    policy = load_policy(model_dir)  # the manifest's own steps and shift
    try:
        got = policy.infer_normalised(images, state, noise)
    finally:
        policy.close()
    return float(np.abs(got - expected).max())


@pytest.fixture(scope="module")
def student_export(tmp_path_factory):
    """`wam-edge export` of tools.make_reference:student with a checkpoint written from the seed-0 reference."""
    _torch()
    from tools.make_reference import write_checkpoint

    root = tmp_path_factory.mktemp("student")
    ckpt = str(root / "reference.pt")
    write_checkpoint(ckpt)
    out = str(root / "out")
    assert _export_main(["--factory", "tools.make_reference:student", "--checkpoint", ckpt, "--out", out]) == 0
    return out


@pytest.mark.slow
def test_student_export_checks_loads_and_matches_torch(student_export, capsys):
    onnx = pytest.importorskip("onnx")
    from runtime.policy.manifest import sha256_file

    out = student_export
    manifest = load_manifest(out)  # hashes verified
    assert (manifest.sampler.steps, manifest.sampler.distilled) == (1, True)
    for stage in manifest.stages:
        path = os.path.join(out, stage.file)
        onnx.checker.check_model(path, full_check=True)
        assert sha256_file(path) == stage.sha256
        assert [o.version for o in onnx.load(path).opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert _ort_vs_torch(out, 1, 1.0) < 1e-4


@pytest.mark.slow
def test_checkpoint_round_trip_is_byte_identical_to_the_committed_reference(student_export):
    for name in ("manifest.json", "world.onnx", "action_expert.onnx"):
        with open(os.path.join(student_export, name), "rb") as a, open(os.path.join(REFERENCE, name), "rb") as b:
            assert a.read() == b.read(), "%s differs from exported/reference (rerun python -m tools.make_reference " \
                                         "if torch/onnx changed)" % name


@pytest.mark.slow
def test_golden_holds_torch_inputs_and_outputs_that_onnx_runtime_reproduces(student_export):
    ort = pytest.importorskip("onnxruntime")
    arrays, meta = golden.read_golden(os.path.join(student_export, "golden.npz"))
    manifest = load_manifest(student_export)
    assert meta["seed"] == 0 and meta["stages"] == {s.name: s.sha256 for s in manifest.stages}
    assert meta["torch"] == _torch().__version__
    for stage in manifest.stages:
        session = ort.InferenceSession(os.path.join(student_export, stage.file), providers=["CPUExecutionProvider"])
        feeds = {t.name: arrays["%s/%s" % (stage.name, t.name)] for t in stage.inputs}
        for t, value in zip(stage.outputs, session.run([t.name for t in stage.outputs], feeds)):
            np.testing.assert_allclose(value, arrays["%s/%s" % (stage.name, t.name)], atol=1e-4, rtol=0)
    # inputs fed from another stage are that stage's torch outputs
    assert np.array_equal(arrays["action_expert/kv_1_v"], arrays["world/kv_1_v"])


@pytest.mark.slow
def test_teacher_export_runs_k_steps_like_torch(tmp_path, capsys):
    out = str(tmp_path / "teacher")
    assert _export_main(["--factory", "tools.make_reference:teacher", "--out", out, "--no-golden"]) == 0
    printed = capsys.readouterr().out
    assert "sampler: teacher: 10 Euler steps, shift 5" in printed
    assert "LayerNormalization" in printed and "Softmax" in printed
    assert not os.path.exists(os.path.join(out, "golden.npz"))
    manifest = load_manifest(out)
    assert manifest.name == "reference-teacher"
    assert (manifest.sampler.steps, manifest.sampler.shift, manifest.sampler.distilled) == (10, 5.0, False)
    assert _ort_vs_torch(out, 10, 5.0) < 1e-4


# --- CLI refusals -------------------------------------------------------------------------------------------

def test_opset_below_17_is_refused(tmp_path, capsys):
    assert _export_main(["--factory", "tools.make_reference:student", "--out", str(tmp_path), "--opset", "16"]) == 2
    err = capsys.readouterr().err
    assert "--opset 16 refused" in err and "LayerNormalization" in err and "TensorRT" in err
    assert os.listdir(str(tmp_path)) == []


@pytest.mark.parametrize("factory,words", [
    ("tools.make_reference", "expected MODULE:FUNCTION"),
    (":student", "expected MODULE:FUNCTION"),
    ("tools.make_reference:", "expected MODULE:FUNCTION"),
    ("no_such_module_xyz:student", "cannot import module 'no_such_module_xyz'"),
    ("tools.make_reference:no_such_factory", "has no attribute 'no_such_factory'"),
    ("tools.make_reference:DEFAULT_OUT", "is a str, not a function"),
    ("tools.make_reference:manifest_base", "raised TypeError"),
    ("wam_export_toys:returns_dict", "returned a dict; it must return tools.export.ExportSpec"),
    ("wam_export_toys:returns_no_stages", "ExportSpec.stages must be a non-empty list"),
    ("wam_export_broken:f", "cannot import module 'wam_export_broken': ImportError: no weights here"),
])
def test_bad_factories_exit_2_with_one_clear_line(tmp_path, monkeypatch, capsys, factory, words):
    (tmp_path / "wam_export_toys.py").write_text(
        "from tools.export import ExportSpec\n"
        "def returns_dict(checkpoint):\n    return {}\n"
        "def returns_no_stages(checkpoint):\n    return ExportSpec({}, [])\n")
    (tmp_path / "wam_export_broken.py").write_text("raise ImportError('no weights here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _export_main(["--factory", factory, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("wam-edge export: ") and words in err, err


def test_every_camera_states_its_channel_order():
    """The exporter records each camera's channel order: an option over the factory's word, rgb where neither says."""
    _torch()
    from tools.export import ExportError, parse_channel_orders, record_channel_orders

    def cameras(*stated):
        return {"cameras": [dict({"name": n}, **({"channel_order": o} if o else {})) for n, o in stated]}

    m = cameras(("head", None), ("left_wrist", "bgr"), ("right_wrist", None))
    record_channel_orders(m)
    assert [c["channel_order"] for c in m["cameras"]] == ["rgb", "bgr", "rgb"]
    m = cameras(("head", None), ("left_wrist", "bgr"), ("right_wrist", "rgb"))
    record_channel_orders(m, parse_channel_orders(["bgr", "right_wrist=rgb"]))
    assert [c["channel_order"] for c in m["cameras"]] == ["bgr", "bgr", "rgb"]
    assert [c["channel_order"] for c in _committed_manifest()["cameras"]] == ["rgb"] * 3
    with pytest.raises(ExportError, match=r"camera 'chest': the manifest has no such camera \(cameras: head\)"):
        record_channel_orders(cameras(("head", None)), {"chest": "bgr"})
    with pytest.raises(ExportError, match="channel order 'BGR' for camera 'head' is not one of rgb, bgr"):
        record_channel_orders(cameras(("head", None)), parse_channel_orders(["head=BGR"]))
    with pytest.raises(ExportError, match="expected CAMERA=ORDER or ORDER"):
        parse_channel_orders(["=bgr"])


@pytest.mark.slow
def test_channel_order_option_is_written_and_read(tmp_path, capsys):
    out = str(tmp_path / "bgr")
    assert _export_main(["--factory", "tools.make_reference:student", "--out", out, "--no-golden",
                         "--channel-order", "left_wrist=bgr"]) == 0
    assert "cameras: head (rgb), left_wrist (bgr), right_wrist (rgb)" in capsys.readouterr().out
    assert [(c.channel_order, c.channel_order_stated) for c in load_manifest(out).cameras] == \
        [("rgb", True), ("bgr", True), ("rgb", True)]
    assert _export_main(["--factory", "tools.make_reference:student", "--out", str(tmp_path / "no"),
                         "--channel-order", "chest=bgr"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "camera 'chest': the manifest has no such camera" in err, err
    assert not os.path.exists(str(tmp_path / "no"))  # refused before anything was exported


def test_checkpoint_that_does_not_fit_names_the_module_and_keys(tmp_path):
    torch = _torch()
    from tools.export import ExportError, load_checkpoint
    from tools.reference_model import WorldModel

    world = WorldModel()
    state = dict(world.state_dict())
    state.pop("pos")
    state["extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, str(tmp_path / "w.pt"))
    with pytest.raises(ExportError, match=r"does not fit WorldModel: missing keys: pos; unexpected keys: extra.weight"):
        load_checkpoint(world, str(tmp_path / "w.pt"))
    state = dict(world.state_dict(), pos=torch.zeros(1, 2, 3))
    torch.save({"model": state}, str(tmp_path / "w.pt"))
    with pytest.raises(ExportError, match=r"does not fit WorldModel: .*size mismatch for pos"):
        load_checkpoint(world, str(tmp_path / "w.pt"))
    torch.save({"world": WorldModel().state_dict()}, str(tmp_path / "w.pt"))
    load_checkpoint(world, str(tmp_path / "w.pt"), key="world")
    with pytest.raises(ExportError, match=r"has no state dict under 'action_expert' for WorldModel"):
        load_checkpoint(world, str(tmp_path / "w.pt"), key="action_expert")
    with pytest.raises(ExportError, match="does not exist"):
        load_checkpoint(world, str(tmp_path / "missing.pt"))


# --- dynamic axes, refusals of modules ----------------------------------------------------------------------

def _toy_modules():
    torch = _torch()

    class ToyWorld(torch.nn.Module):
        def forward(self, image):
            return image.flatten(2)  # (1, 3, H*W): its length follows the declared H and W

    class ToyExpert(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, x_t, t, state, tokens):
            return self.lin(x_t) * t[:, None, None] + state[:, None, :] + tokens.mean(dim=(1, 2))[:, None, None]

    return ToyWorld(), ToyExpert()


def _toy_manifest():
    return {
        "format": "wam-edge-manifest", "version": 1, "name": "toy-dynamic",
        "cameras": [{"name": "head", "height": 16, "width": 16, "resize": "nearest", "mean": [0.0] * 3,
                     "std": [1.0] * 3, "input": "image"}],
        "state": {"joints": ["a", "b"], "mean": [0.0, 0.0], "std": [1.0, 1.0]},
        "action": {"kind": "joint_position", "joints": ["a", "b"], "horizon": 4, "step_s": 0.02,
                   "mean": [0.0, 0.0], "std": [1.0, 1.0]},
        "sampler": {"type": "flow_matching", "steps": 1, "shift": 1.0, "distilled": True},
    }


@pytest.mark.slow
def test_declared_dynamic_axes_export_with_profiles(tmp_path):
    torch = _torch()
    from tools.export import StageExport, export_model

    world, expert = _toy_modules()
    stages = [
        StageExport("world", world, (torch.zeros(1, 3, 16, 16),), ["image"], ["tokens"],
                    sources={"image": "camera:head"}, dynamic={"image": {2: (8, 16, 32), 3: (8, 16, 32)}}),
        StageExport("expert", expert, (torch.zeros(1, 4, 2), torch.ones(1), torch.zeros(1, 2),
                                       torch.zeros(1, 3, 256)),
                    ["x_t", "t", "state", "tokens"], ["velocity"], runs="per_step",
                    sources={"x_t": "sampler:x", "t": "sampler:t", "state": "state", "tokens": "world:tokens"},
                    sinks={"velocity": "sampler:velocity"}, dynamic={"tokens": {2: (64, 256, 1024)}}),
    ]
    out = str(tmp_path / "toy")
    written, reports = export_model(stages, out, _toy_manifest())
    image = written["stages"][0]["inputs"][0]
    assert image["shape"] == [1, 3, 16, 16]
    assert image["profile"] == {"min": [1, 3, 8, 8], "opt": [1, 3, 16, 16], "max": [1, 3, 32, 32]}
    tokens_out = written["stages"][0]["outputs"][0]  # derived from the symbolic H*W
    assert tokens_out["profile"] == {"min": [1, 3, 64], "opt": [1, 3, 256], "max": [1, 3, 1024]}
    assert tokens_out["shape"] == [1, 3, 256]
    assert "profile" not in written["stages"][1]["inputs"][0]  # x_t: static, as not declared
    manifest = load_manifest(out)  # the runtime's parser accepts it (hashes too)
    assert manifest.stage("expert").inputs[3].profile == ((1, 3, 64), (1, 3, 256), (1, 3, 1024))
    assert [r.op_counts for r in reports] == [{"LayerNormalization": 0, "Softmax": 0, "decomposed norm": 0}] * 2

    # the axes really vary: ONNX Runtime at the profile's min and max agrees with torch
    ort = pytest.importorskip("onnxruntime")
    sessions = [ort.InferenceSession(os.path.join(out, s["file"]), providers=["CPUExecutionProvider"])
                for s in written["stages"]]
    for side in (8, 32):
        image = np.random.default_rng(side).standard_normal((1, 3, side, side)).astype(np.float32)
        (tokens,) = sessions[0].run(None, {"image": image})
        assert tokens.shape == (1, 3, side * side)
        feeds = {"x_t": np.ones((1, 4, 2), np.float32), "t": np.full(1, 0.5, np.float32),
                 "state": np.ones((1, 2), np.float32), "tokens": tokens}
        (velocity,) = sessions[1].run(None, feeds)
        with torch.no_grad():
            expected = expert(*(torch.from_numpy(feeds[k]) for k in ("x_t", "t", "state", "tokens"))).numpy()
        np.testing.assert_allclose(velocity, expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_data_dependent_shapes_fail_naming_the_module(tmp_path):
    torch = _torch()
    from tools.export import ExportError, StageExport, export_stage

    class NonZeroPicker(torch.nn.Module):
        def forward(self, x):
            return torch.nonzero(x > 0)

    stage = StageExport("picker", NonZeroPicker(), (torch.ones(1, 29),), ["x"], ["y"], sources={"x": "state"})
    with pytest.raises(ExportError, match=r"stage 'picker' \(NonZeroPicker\): .*data-dependent"):
        export_stage(stage, str(tmp_path))


@pytest.mark.slow
def test_undeclared_or_mismatched_dynamic_declarations_fail(tmp_path):
    torch = _torch()
    from tools.export import ExportError, StageExport, export_stage

    world, _ = _toy_modules()
    stage = StageExport("world", world, (torch.zeros(1, 3, 16, 16),), ["image"], ["tokens"],
                        sources={"image": "camera:head"}, dynamic={"image": {2: (8, 12, 32)}})
    with pytest.raises(ExportError, match=r"stage 'world' \(ToyWorld\): input 'image' axis 2: the example input "
                                          r"has 16 there; export at the opt size 12"):
        export_stage(stage, str(tmp_path))
    stage = stage._replace(dynamic={"picture": {2: (8, 16, 32)}})
    with pytest.raises(ExportError, match=r"dynamic axes declared for 'picture', which is not an input"):
        export_stage(stage, str(tmp_path))


@pytest.mark.slow
def test_an_op_both_exporters_refuse_fails_naming_the_module(tmp_path):
    torch = _torch()
    from tools.export import ExportError, StageExport, export_stage

    class SingularValues(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.svd(x)[1]

    stage = StageExport("svd", SingularValues(), (torch.ones(1, 3, 3),), ["x"], ["y"], sources={"x": "state"})
    with pytest.warns(UserWarning, match="falling back to dynamo=False"):
        with pytest.raises(ExportError, match=r"stage 'svd' \(SingularValues\): ONNX export failed with both "
                                              r"exporters: .*linalg_svd"):
            export_stage(stage, str(tmp_path))


@pytest.mark.slow
def test_opset_17_rewrite_of_split_reduce_pad_resize_matches_torch(tmp_path):
    torch = _torch()
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from tools.export import StageExport, export_stage

    class Mixed(torch.nn.Module):
        def forward(self, x):
            a, b, c = x.chunk(3, dim=1)  # Split (num_outputs in 18)
            up = torch.nn.functional.interpolate(a, scale_factor=2.0, mode="nearest")  # Resize
            padded = torch.nn.functional.pad(b, (1, 1, 2, 0))  # Pad
            return up.amax(dim=(2, 3)) + padded.mean(dim=(2, 3)) + c.sum(dim=-1).mean(dim=-1)  # Reduce*

    module = Mixed().eval()
    x = torch.randn(1, 6, 4, 4)
    entry = export_stage(StageExport("mixed", module, (x,), ["x"], ["y"], sources={"x": "state"}), str(tmp_path))
    path = str(tmp_path / entry["file"])
    model = onnx.load(path)
    assert [o.version for o in model.opset_import if o.domain == ""] == [17]
    assert {"Split", "Resize", "Pad", "ReduceMax", "ReduceMean"} <= {n.op_type for n in model.graph.node}
    (got,) = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, module(x).numpy(), atol=1e-5, rtol=0)


def test_opset_17_rewrite_refuses_what_only_opset_18_has():
    _torch()
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from tools.export import ExportError, downgrade_18_to_17

    def model(node):
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])

    with pytest.raises(ExportError, match=r"stage 's' \(M\): Mish node 'm': this use of Mish needs opset 18"):
        downgrade_18_to_17(model(helper.make_node("Mish", ["x"], ["y"], name="m")), "stage 's' (M)")
    reduce_all = model(helper.make_node("ReduceMean", ["x"], ["y"], name="r", noop_with_empty_axes=1))
    with pytest.raises(ExportError, match="noop_with_empty_axes=1 has no opset-17 form"):
        downgrade_18_to_17(reduce_all, "stage 's' (M)")
    fine = model(helper.make_node("ReduceMean", ["x"], ["y"], name="r", noop_with_empty_axes=0))
    downgrade_18_to_17(fine, "stage 's' (M)")
    assert [a.name for a in fine.graph.node[0].attribute] == [] and fine.opset_import[0].version == 17
    onnx.checker.check_model(fine, full_check=True)


def test_form_check_refuses_old_opsets_custom_domains_and_sequences():
    _torch()
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from tools.export import ExportError, check_trt_friendly

    def model(nodes, opsets, out_type=None):
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                                  [out_type or helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])

    ok = model([helper.make_node("Softmax", ["x"], ["y"], name="sm")], [("", 17)])
    assert check_trt_friendly(ok, "s", "Mod") == {"LayerNormalization": 0, "Softmax": 1, "decomposed norm": 0}
    unused = helper.make_model(helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("x", "k")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]), opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ExportError, match=r"stage 's' \(Mod\): input \['k'\] is not used by the exported graph"):
        check_trt_friendly(unused, "s", "Mod")
    with pytest.raises(ExportError, match=r"stage 's' \(Mod\): default-domain opset is 16; it must be >= 17"):
        check_trt_friendly(model([helper.make_node("Relu", ["x"], ["y"])], [("", 16)]), "s", "Mod")
    custom = model([helper.make_node("FusedThing", ["x"], ["y"], name="f0", domain="com.example")],
                   [("", 17), ("com.example", 1)])
    with pytest.raises(ExportError, match=r"stage 's' \(Mod\): node 'f0' is com.example:FusedThing, a custom-domain"):
        check_trt_friendly(custom, "s", "Mod")
    seq = model([helper.make_node("SequenceConstruct", ["x"], ["y"], name="sq")], [("", 17)],
                helper.make_tensor_sequence_value_info("y", TensorProto.FLOAT, [2]))
    with pytest.raises(ExportError, match=r"node 'sq' is SequenceConstruct, which TensorRT cannot parse"):
        check_trt_friendly(seq, "s", "Mod")
    assert onnx is not None


@pytest.mark.slow
def test_hand_written_norms_are_counted_and_warned_about(tmp_path, capsys):
    """An RMSNorm exports as ReduceMean(Pow(x, 2)): its square overflows in FP16, so the export says which stage to
    keep in fp32 or bf16; nn.LayerNorm (one LayerNormalization node at opset 17) draws no warning."""
    torch = _torch()
    from tools.export import DECOMPOSED_NORM, StageExport, export_model, norm_warning

    class RmsExpert(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(2))

        def forward(self, image, x_t, t, state):
            h = x_t + state[:, None, :] * t[:, None, None] + image.mean()
            return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight

    examples = (torch.zeros(1, 3, 16, 16), torch.zeros(1, 4, 2), torch.ones(1), torch.zeros(1, 2))
    stage = StageExport("expert", RmsExpert(), examples, ["image", "x_t", "t", "state"], ["velocity"],
                        runs="per_step", sinks={"velocity": "sampler:velocity"},
                        sources={"image": "camera:head", "x_t": "sampler:x", "t": "sampler:t", "state": "state"})
    _, reports = export_model([stage], str(tmp_path / "rms"), _toy_manifest())
    assert reports[0].op_counts[DECOMPOSED_NORM] == 1
    warning = norm_warning("expert", reports[0].op_counts)
    assert "--precision expert=fp32" in warning and "(--fp32-norms, on by default)" in warning
    from tools.make_reference import student

    reference = student()
    for r in export_model(reference.stages, str(tmp_path / "ref"), reference.manifest)[1]:
        assert r.op_counts[DECOMPOSED_NORM] == 0 and norm_warning(r.name, r.op_counts) is None


# --- attention as user models write it ---------------------------------------------------------------------

GQA_HEADS, GQA_KV_HEADS, GQA_DIM, GQA_TOKENS = 6, 2, 8, 256  # ImageWAM's expert: 24 query / 8 KV heads, smaller


def gqa_sdpa(checkpoint=None):
    """`--factory test_export:gqa_sdpa`: an action expert written with F.scaled_dot_product_attention over
    grouped-query heads (enable_gqa) and nn.RMSNorm, attending to the world stage's K/V."""
    import torch
    import torch.nn.functional as F

    from tools.export import ExportSpec, StageExport

    h, kvh, d, n = GQA_HEADS, GQA_KV_HEADS, GQA_DIM, GQA_TOKENS

    class World(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.kv = torch.nn.Linear(3, 2 * kvh * d)

        def forward(self, image):
            kv = self.kv(image.flatten(2).transpose(1, 2)).reshape(1, n, 2, kvh, d).permute(2, 0, 3, 1, 4)
            return kv[0], kv[1]

    class Expert(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = torch.nn.Linear(2, h * d)
            self.norm = torch.nn.RMSNorm(h * d)
            self.q = torch.nn.Linear(h * d, h * d)
            self.out = torch.nn.Linear(h * d, 2)

        def forward(self, x_t, t, state, k, v):
            q = self.q(self.norm(self.inp(x_t) * t[:, None, None])).reshape(1, 4, h, d).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            return self.out(a.transpose(1, 2).reshape(1, 4, h * d)) + state[:, None, :]

    torch.manual_seed(0)
    kv_example = torch.zeros(1, kvh, n, d)
    return ExportSpec(manifest=_toy_manifest(), stages=[
        StageExport("world", World(), (torch.zeros(1, 3, 16, 16),), ["image"], ["k", "v"],
                    sources={"image": "camera:head"}),
        StageExport("expert", Expert(), (torch.zeros(1, 4, 2), torch.ones(1), torch.zeros(1, 2), kv_example,
                                         kv_example), ["x_t", "t", "state", "k", "v"], ["velocity"],
                    runs="per_step", sinks={"velocity": "sampler:velocity"},
                    sources={"x_t": "sampler:x", "t": "sampler:t", "state": "state", "k": "world:k",
                             "v": "world:v"}),
    ])


#: what the SDPA expert may become at opset 17: plain ops TensorRT 8.5's ONNX parser takes (no fused Attention)
PLAIN_ATTENTION_OPS = {"MatMul", "Softmax", "Add", "Mul", "Div", "Reshape", "Transpose", "Unsqueeze", "Expand",
                       "Pow", "ReduceMean", "Sqrt", "Reciprocal", "Gather", "Slice", "Concat", "Cast", "Shape",
                       "Where", "Sub", "Neg", "Squeeze", "Constant"}


@pytest.mark.slow
def test_grouped_query_sdpa_and_rmsnorm_export_to_plain_ops_that_match_torch(tmp_path, capsys):
    out = str(tmp_path / "gqa")
    assert _export_main(["--factory", "test_export:gqa_sdpa", "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "--precision expert=fp32" in printed  # the RMSNorm's square, named
    import onnx

    model = onnx.load(os.path.join(out, "expert.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert {"MatMul", "Softmax"} <= ops and ops <= PLAIN_ATTENTION_OPS, ops - PLAIN_ATTENTION_OPS
    from tools import verify

    assert verify.main(["--model", out]) == 0  # ONNX Runtime and the runtime's backend vs PyTorch's golden data
    assert "verify: passed" in capsys.readouterr().out


@pytest.mark.slow
def test_an_input_the_model_ignores_fails_naming_it(tmp_path):
    torch = _torch()
    from tools.export import ExportError, StageExport, export_model

    class IgnoresT(torch.nn.Module):
        def forward(self, image, x_t, t, state):
            return x_t + state[:, None, :] + image.mean()

    stage = StageExport("expert", IgnoresT(), (torch.zeros(1, 3, 16, 16), torch.zeros(1, 4, 2), torch.ones(1),
                                              torch.zeros(1, 2)), ["image", "x_t", "t", "state"], ["velocity"],
                        runs="per_step", sinks={"velocity": "sampler:velocity"},
                        sources={"image": "camera:head", "x_t": "sampler:x", "t": "sampler:t", "state": "state"})
    with pytest.raises(ExportError, match=r"stage 'expert' \(IgnoresT\): input \['t'\] is not used by the exported "
                                          r"graph.*remove it from the stage's inputs"):
        export_model([stage], str(tmp_path / "m"), _toy_manifest())


def test_one_tensor_passed_for_two_inputs_is_cloned_for_the_exporter():
    torch = _torch()
    pytest.importorskip("onnx")
    from tools.export import _distinct_examples

    kv = torch.zeros(1, 2, 8, 4)
    both = torch.zeros(2, 3)
    other = torch.ones(3)
    out = _distinct_examples((kv, kv, both[0], both[1], other, 1.0))
    assert out[0] is kv and out[4] is other and out[5] == 1.0
    assert out[1] is not kv and torch.equal(out[1], kv)
    assert out[1].untyped_storage().data_ptr() != kv.untyped_storage().data_ptr()
    assert out[2].untyped_storage().data_ptr() == both.untyped_storage().data_ptr()  # the first is kept
    assert out[3].untyped_storage().data_ptr() != both.untyped_storage().data_ptr()  # a view of the same memory


# --- weights beside the ONNX file (external data) --------------------------------------------------------

@pytest.mark.slow
def test_external_data_export_loads_verifies_and_is_checked(tmp_path, capsys):
    out = str(tmp_path / "ext")
    assert _export_main(["--factory", "test_export:gqa_sdpa", "--out", out, "--external-data", "always"]) == 0
    assert "weights in expert." in capsys.readouterr().out
    with open(os.path.join(out, "manifest.json")) as f:
        stages = {s["name"]: s for s in json.load(f)["stages"]}
    for name, stage in stages.items():  # each stage's weights in one file, named after its content
        assert stage["data"]["file"] == "%s.%s.onnx.data" % (name, stage["data"]["sha256"][:16])
    data = stages["expert"]["data"]
    assert sorted(f for f in os.listdir(out) if f.endswith(".data")) == sorted(s["data"]["file"]
                                                                               for s in stages.values())
    onnx = pytest.importorskip("onnx")
    graph = onnx.load(os.path.join(out, "expert.onnx"), load_external_data=False)
    assert {e.value for t in graph.graph.initializer for e in t.external_data if e.key == "location"} == {data["file"]}
    from tools import verify

    assert verify.main(["--model", out]) == 0  # ONNX Runtime and the runtime's backend read the weights beside it
    from runtime.policy import load_policy

    policy = load_policy(out)
    actions = policy.infer({"head": np.zeros((16, 16, 3), np.uint8)}, np.zeros(2, np.float32))
    assert actions.shape == (4, 2) and np.isfinite(actions).all()
    policy.close()

    with open(os.path.join(out, data["file"]), "r+b") as f:  # one weight byte changed after the export
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ManifestError, match=r"sha256 mismatch \(manifest stages\[1\]\.data\.sha256"):
        load_manifest(out)
    os.remove(os.path.join(out, data["file"]))
    with pytest.raises(ManifestError, match=r"stages\[1\]\.data\.file: .*does not exist"):
        load_manifest(out, verify_hashes=False)


@pytest.mark.slow
def test_new_weights_change_the_onnx_hash_and_replace_the_old_data_file(tmp_path, monkeypatch):
    torch = _torch()
    from tools import export

    monkeypatch.setattr(export, "EXTERNAL_DATA_AUTO_BYTES", 1024)  # "auto" moves even these small weights out
    out = str(tmp_path / "m")
    spec = gqa_sdpa()
    first, _ = export.export_model(spec.stages, out, spec.manifest)
    with torch.no_grad():
        spec.stages[1].module.q.weight.add_(0.5)  # "retrained" (a tensor big enough to live in the data file)
    second, _ = export.export_model(spec.stages, out, spec.manifest)
    old, new = first["stages"][1], second["stages"][1]
    assert old["data"]["sha256"] != new["data"]["sha256"]
    assert old["sha256"] != new["sha256"]  # the ONNX file names its weights: engines built from the old ones are stale
    assert sorted(f for f in os.listdir(out) if f.endswith(".data")) == [new["data"]["file"]]
    assert first["stages"][0] == second["stages"][0]
    load_manifest(out)


def test_manifest_data_entries_are_checked_like_stage_files():
    def with_data(data):
        m = _committed_manifest()
        m["stages"][1]["data"] = data
        return m

    good = {"file": "action_expert.0123456789abcdef.onnx.data", "sha256": "ab" * 32}
    stage = parse_manifest(with_data(good), "/m/manifest.json").stages[1]
    assert (stage.data.file, stage.data.sha256) == (good["file"], good["sha256"])
    assert parse_manifest(_committed_manifest(), "/m/manifest.json").stages[1].data is None
    for data, words in [({"file": "../w.data", "sha256": "ab" * 32}, r"stages\[1\]\.data\.file: .*plain file name"),
                        ({"file": "w.data", "sha256": "AB" * 32}, r"stages\[1\]\.data\.sha256: expected 64"),
                        ({"file": "w.data"}, r"stages\[1\]\.data\.sha256: missing required key"),
                        ({"file": "w.data", "sha256": "ab" * 32, "size": 3}, r"stages\[1\]\.data\.size: unknown key"),
                        ({"file": "action_expert.onnx", "sha256": "ab" * 32}, r"is the stage's ONNX file itself")]:
        with pytest.raises(ManifestError, match=words):
            parse_manifest(with_data(data), "/m/manifest.json")


def test_save_gathers_weights_from_any_layout_into_one_content_named_file(tmp_path):
    _torch()
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from tools.export import _save, external_tensors

    weights = [numpy_helper.from_array(np.full((32, 32), i, np.float32), "w%d" % i) for i in range(2)]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"]), helper.make_node("MatMul", ["h", "w1"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = str(tmp_path / "s.onnx")
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    scattered = sorted(os.listdir(tmp_path))  # one file per tensor, as the TorchScript exporter writes them
    assert len(scattered) == 3
    data = _save(onnx.load(path, load_external_data=False), path, "s", external=True)
    assert sorted(os.listdir(tmp_path)) == sorted(["s.onnx", data["file"]])
    assert {t.external_data[0].value for t in external_tensors(onnx.load(path, load_external_data=False))} \
        == {data["file"]}
    loaded = onnx.load(path)
    assert [float(numpy_helper.to_array(t)[0, 0]) for t in loaded.graph.initializer] == [0.0, 1.0]
    assert _save(onnx.load(path), path, "s", external=False) is None  # back inside the file, the data file gone
    assert sorted(os.listdir(tmp_path)) == ["s.onnx"]


def test_saving_one_stage_never_touches_another_stages_weights(tmp_path):
    _torch()
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from tools.export import _save

    def model(value):
        weight = numpy_helper.from_array(np.full((32, 32), value, np.float32), "w")
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])], [weight])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    other = _save(model(2.0), str(tmp_path / "world.v2.onnx"), "world.v2", external=True)  # a stage named "world.v2"
    (tmp_path / "world.onnx.data.partial").write_bytes(b"left by an interrupted export")
    (tmp_path / "world.0123456789abcdef.onnx.data").write_bytes(b"an earlier export's weights")
    mine = _save(model(1.0), str(tmp_path / "world.onnx"), "world", external=True)
    assert sorted(os.listdir(tmp_path)) == sorted(["world.onnx", mine["file"], "world.v2.onnx", other["file"]])
    assert float(numpy_helper.to_array(onnx.load(str(tmp_path / "world.v2.onnx")).graph.initializer[0])[0, 0]) == 2.0
    clean = tmp_path / "clean"
    clean.mkdir()
    assert _save(model(1.0), str(clean / "world.onnx"), "world", external=True) == mine  # no old bytes in it


@pytest.mark.slow
def test_verify_refuses_a_manifest_whose_data_entry_is_not_what_the_onnx_file_reads(tmp_path):
    out = str(tmp_path / "ext")
    assert _export_main(["--factory", "test_export:gqa_sdpa", "--out", out, "--external-data", "always",
                         "--no-golden"]) == 0
    from tools import verify

    manifest = load_manifest(out)
    assert verify.check_data_files(manifest, out) is None
    path = os.path.join(out, "manifest.json")
    with open(path) as f:
        data = json.load(f)
    del data["stages"][1]["data"]  # a hand-edited manifest: the weights beside expert.onnx would go unhashed
    with open(path, "w") as f:
        json.dump(data, f)
    with pytest.raises(verify.VerifyError, match=r"stage expert: expert.onnx reads its weights from "
                                                 r"\['expert\.[0-9a-f]{16}\.onnx\.data'\], but the manifest hashes "
                                                 r"none"):
        verify.check_data_files(load_manifest(out), out)
