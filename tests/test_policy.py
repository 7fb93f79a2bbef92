"""The policy runtime on the committed exported/reference model (no torch)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.policy import ManifestError, PolicyError, PolicyInputError, load_manifest, load_policy
from runtime.policy.manifest import CameraSpec
from runtime.policy.preprocess import CameraPreprocessor, nearest_indices
from runtime.policy.sampler import FlowMatchingSchedule

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(REPO, "exported", "reference")
CAMERAS = ("head", "left_wrist", "right_wrist")
NOMINAL = np.zeros(17, dtype=np.float32)
NOMINAL[[16 - 12, 18 - 12, 23 - 12, 25 - 12]] = [0.2, 0.3, -0.2, 0.3]


def frames(seed=0, height=480, width=640):
    rng = np.random.default_rng(seed)
    return {c: rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for c in CAMERAS}


def joint_state(seed=0):
    return np.random.default_rng(seed).uniform(-0.3, 0.3, 29)


@pytest.fixture(scope="module")
def policy():
    p = load_policy(REFERENCE)
    p.warmup(2, {c: (480, 640) for c in CAMERAS})
    yield p
    p.close()


# --- inference -----------------------------------------------------------------

def test_committed_manifest_describes_the_reference():
    m = load_manifest(REFERENCE)
    assert m.camera_names == CAMERAS
    assert [(c.height, c.width) for c in m.cameras] == [(64, 64)] * 3
    assert len(m.state_joints) == 29 and m.state_joints[0] == "left_hip_pitch"
    assert m.action_joints == m.state_joints[12:29]
    assert m.action_state_indices == tuple(range(12, 29))
    assert (m.horizon, m.step_s, m.action_dim) == (32, 0.02, 17)
    assert (m.sampler.type, m.sampler.steps, m.sampler.shift, m.sampler.distilled) == \
        ("flow_matching", 1, 1.0, True)
    assert np.allclose(m.action.mean, NOMINAL)
    assert [(c.channel_order, c.channel_order_stated) for c in m.cameras] == [("rgb", True)] * 3
    assert [s.name for s in m.stages] == ["world", "action_expert"]
    total = sum(os.path.getsize(os.path.join(REFERENCE, f)) for f in os.listdir(REFERENCE))
    assert total < 3 * 1024 * 1024


def test_infer_shape_range_and_timings(policy):
    actions = policy.infer(frames(), joint_state())
    assert actions.shape == (32, 17) and actions.dtype == np.float32
    assert np.isfinite(actions).all()
    assert np.abs(actions - NOMINAL).max() < 1.0
    assert set(policy.last_stage_ms) == {"world", "action_expert"}
    assert all(v > 0 for v in policy.last_stage_ms.values())
    assert policy.last_preprocess_ms > 0


def test_any_image_size_works(policy):
    for h, w in ((64, 64), (17, 23), (720, 1280)):
        assert np.isfinite(policy.infer(frames(1, h, w), joint_state())).all()


def test_same_buffer_and_no_allocation_across_calls(policy):
    from conftest import heap_peak_above_baseline, runtime_heap_growth

    images, state = frames(), joint_state()
    first = policy.infer(images, state)
    stage_ms = policy.last_stage_ms

    def step(i):
        assert policy.infer(images, state) is first

    growth = runtime_heap_growth(step, warmup=100)  # warm-up: numpy/ORT fill their small internal caches
    assert growth < 1024, "memory grew by %d bytes over 50 calls" % growth
    assert policy.last_stage_ms is stage_ms
    # No array-sized temporaries either (one 3x64x64 float32 image is 48 KiB;
    # numpy's own buffered iteration would show up as 32 KiB).
    peak = heap_peak_above_baseline(step)
    assert peak < 8 * 1024, "peak %d bytes above baseline" % peak


def test_ort_reads_and_writes_the_bound_buffers(policy):
    backend = policy.backend
    policy.infer(frames(), joint_state())
    velocity = backend.host_output("action_expert", "velocity")
    kv = backend.host_output("world", "kv_0_k")
    assert backend.bound_output_pointers("action_expert") == [velocity.ctypes.data]
    assert backend.bound_output_pointers("world")[0] == kv.ctypes.data
    # Outputs: poison our buffers; a run must overwrite them in place.
    kv.fill(np.nan)
    velocity.fill(np.nan)
    backend.run("world")
    backend.run("action_expert")
    assert np.isfinite(kv).all() and np.isfinite(velocity).all()
    # Inputs: changing our x_t buffer in place changes what the stage computes.
    x = backend.host_input("action_expert", "x_t")
    before = velocity.copy()
    x += 1.0
    backend.run("action_expert")
    assert not np.array_equal(before, velocity)


def test_same_seed_same_actions_and_warmup_does_not_shift_noise():
    a = load_policy(REFERENCE, seed=3)
    b = load_policy(REFERENCE, seed=3)
    b.warmup(3)
    images, state = frames(), joint_state()
    first = a.infer(images, state).copy()
    np.testing.assert_array_equal(first, b.infer(images, state))
    assert not np.array_equal(first, a.infer(images, state))  # fresh noise each call


def test_steps_override_runs_and_differs():
    one = load_policy(REFERENCE, seed=0)
    four = load_policy(REFERENCE, seed=0, steps=4, shift=5.0)
    assert four.sampler.steps == 4 and four.sampler.distilled
    assert one.manifest.sampler.steps == 1
    images, state = frames(), joint_state()
    a = one.infer(images, state).copy()
    b = four.infer(images, state)
    assert np.isfinite(b).all() and np.abs(b - NOMINAL).max() < 1.0
    assert not np.allclose(a, b)
    assert four.last_stage_ms["action_expert"] > 0


# --- input errors -----------------------------------------------------------------

def test_wrong_image_shape_names_camera_and_shapes(policy):
    images = frames()
    images["left_wrist"] = np.zeros((480, 640), np.uint8)
    with pytest.raises(PolicyInputError, match=r"camera 'left_wrist'.*HxWx3.*\(480, 640\)"):
        policy.infer(images, joint_state())
    images["left_wrist"] = np.zeros((480, 640, 3), np.float32)
    with pytest.raises(PolicyInputError, match="camera 'left_wrist'.*float32"):
        policy.infer(images, joint_state())


def test_missing_camera_is_named(policy):
    images = frames()
    del images["right_wrist"]
    with pytest.raises(PolicyInputError, match=r"missing image for camera 'right_wrist'.*got head, left_wrist\)$"):
        policy.infer(images, joint_state())


def test_views_the_model_does_not_take_are_never_preprocessed():
    """Unitree's image server sends every view (both head eyes, both wrists): the model takes its own and never
    reads the others. The ignored view here is no image at all, so preprocessing it would raise."""
    from conftest import heap_peak_above_baseline

    a, b = load_policy(REFERENCE, seed=5), load_policy(REFERENCE, seed=5)
    images, state = frames(), joint_state()
    expected = a.infer(images, state).copy()
    with_extra = dict(images, head_right=np.zeros((480, 640), np.float32), chest="not an image")
    np.testing.assert_array_equal(b.infer(with_extra, state), expected)
    assert [cam.spec.name for cam in b._cameras] == list(CAMERAS)  # no preprocessor, no buffer for them
    peak = heap_peak_above_baseline(lambda i: b.infer(with_extra, state))
    assert peak < 8 * 1024, "peak %d bytes above baseline" % peak
    a.close()
    b.close()


def test_wrong_state_shape_is_named(policy):
    with pytest.raises(PolicyInputError, match=r"state: expected shape \(29,\).*\(17,\)"):
        policy.infer(frames(), np.zeros(17))


def test_non_finite_output_raises(policy):
    state = joint_state()
    state[18] = np.nan  # left_elbow
    with pytest.raises(PolicyError, match="non-finite.*left_elbow.*must not be sent"):
        policy.infer(frames(), state)
    # and the policy keeps working afterwards
    assert np.isfinite(policy.infer(frames(), joint_state())).all()


def nan_model(tmp_path, stage, output):
    """A copy of the reference whose stage ``stage`` adds NaN to its output ``output`` (a real ONNX graph edit,
    its sha256 updated in the manifest): everything downstream turns non-finite, as with a broken export."""
    onnx = pytest.importorskip("onnx")
    import hashlib

    from onnx import helper, numpy_helper

    model = copy_reference(tmp_path)
    data = json.loads((model / "manifest.json").read_text())
    spec = next(s for s in data["stages"] if s["name"] == stage)
    path = str(model / spec["file"])
    graph_model = onnx.load(path)
    graph = graph_model.graph
    for node in graph.node:
        node.output[:] = [o + "_before_nan" if o == output else o for o in node.output]
    graph.initializer.append(numpy_helper.from_array(np.array(np.nan, np.float32), "nan_constant"))
    graph.node.append(helper.make_node("Add", [output + "_before_nan", "nan_constant"], [output]))
    onnx.save(graph_model, path)
    with open(path, "rb") as f:
        spec["sha256"] = hashlib.sha256(f.read()).hexdigest()
    (model / "manifest.json").write_text(json.dumps(data, indent=2))
    return model


@pytest.mark.parametrize("stage,output,size", [("world", "kv_1_v", 4 * 192 * 16), ("action_expert", "velocity", 544)])
def test_non_finite_output_names_the_stage_that_produced_it(tmp_path, stage, output, size):
    p = load_policy(str(nan_model(tmp_path, stage, output)))
    with pytest.raises(PolicyError) as info:
        p.infer(frames(), joint_state())
    text = str(info.value)
    assert "inputs were finite; stage %r produced them (output %r: %d of %d non-finite)" % (
        stage, output, size, size) in text
    assert "must not be sent" in text and text.count("stage ") == 1
    p.close()


def test_non_finite_stage_behind_device_outputs_is_not_blamed_on_the_first_one_seen(tmp_path):
    """A GPU backend keeps intermediate outputs on the device: the error says which stages it could not look at."""
    p = load_policy(str(nan_model(tmp_path, "world", "kv_1_v")))
    host_output = p.backend.host_output

    def device_only_world(stage, tensor):
        if stage == "world":
            raise KeyError("%s:%s stays on the device" % (stage, tensor))
        return host_output(stage, tensor)

    p.backend.host_output = device_only_world  # the lookup happens only on the error path
    with pytest.raises(PolicyError, match=r"the first non-finite output the host can see is stage 'action_expert' "
                       r"output 'velocity' \(544 of 544; stages \['world'\] before it keep their outputs on the "
                       r"device\)"):
        p.infer(frames(), joint_state())
    p.close()


# --- manifest validation ------------------------------------------------------------

def copy_reference(tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(REFERENCE, str(dst))
    return dst


def edit_manifest(model_dir, edit):
    path = model_dir / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def _set_kv0_shape(data, shape):
    data["stages"][0]["outputs"][0]["shape"] = shape
    data["stages"][1]["inputs"][3]["shape"] = shape


MANIFEST_ERRORS = [
    ("unknown top-level key", lambda d: d.update(extra=1), r"manifest\.json: extra: unknown key 'extra'"),
    ("unknown nested key", lambda d: d["cameras"][1].update(fps=30),
     r"cameras\[1\]\.fps: unknown key 'fps'"),
    ("bad source", lambda d: d["stages"][1]["inputs"][3].update(source="wrld:kv_0_k"),
     r"stages\[1\]\.inputs\[3\]\.source: unknown stage 'wrld'"),
    ("missing output", lambda d: d["stages"][1]["inputs"][3].update(source="world:kv_9_k"),
     r"stages\[1\]\.inputs\[3\]\.source: stage 'world' has no output 'kv_9_k'"),
    ("unknown camera", lambda d: d["stages"][0]["inputs"][0].update(source="camera:chest"),
     r"stages\[0\]\.inputs\[0\]\.source: unknown camera 'chest'"),
    ("shape mismatch", lambda d: d["stages"][1]["inputs"][3].update(shape=[1, 4, 192, 8]),
     r"stages\[1\]\.inputs\[3\]\.shape: 'kv_0_k' has shape \[1, 4, 192, 8\] but its source "
     r"world:kv_0_k has shape \[1, 4, 192, 16\]"),
    ("bad dtype", lambda d: d["stages"][1]["inputs"][1].update(dtype="float64"),
     r"stages\[1\]\.inputs\[1\]\.dtype: 'float64' is not one of"),
    ("horizon vs velocity", lambda d: d["action"].update(horizon=16),
     r"stages\[1\]\.inputs\[0\]\.shape: 'x_t' fed from sampler:x must have shape \[1, 16, 17\]"),
    ("joint count vs velocity", lambda d: d["action"].update(
        joints=d["action"]["joints"][:-1], mean=d["action"]["mean"][:-1],
        std=d["action"]["std"][:-1]), r"sampler:x must have shape \[1, 32, 16\]"),
    ("stage order", lambda d: d["stages"].reverse(),
     r"stages\[0\]\.inputs\[3\]\.source: stage 'world' must come before stage 'action_expert'"),
    ("self reference", lambda d: d["stages"][1]["inputs"][3].update(source="action_expert:velocity"),
     r"stages\[1\]\.inputs\[3\]\.source: stage 'action_expert' cannot consume its own output"),
    ("sampler tensor in a once stage", lambda d: d["stages"][0]["inputs"][0].update(
        source="sampler:t", shape=[1]),
     r"stages\[0\]\.inputs\[0\]\.source: sampler:t changes every sampler step"),
    ("dynamic axis", lambda d: d["stages"][1]["inputs"][0].update(shape=["batch", 32, 17]),
     r"stages\[1\]\.inputs\[0\]\.shape\[0\]: symbolic dimension 'batch'"),
    ("channel order", lambda d: d["cameras"][2].update(channel_order="BGR"),
     r"cameras\[2\]\.channel_order: 'BGR' is not one of rgb, bgr"),
    ("camera input name", lambda d: d["cameras"][0].update(input="image_front"),
     r"cameras\[0\]\.input: camera 'head' says it feeds 'image_front'"),
    ("negative std", lambda d: d["state"]["std"].__setitem__(3, -0.5),
     r"state\.std\[3\]: must be > 0"),
    ("wrong version", lambda d: d.update(version=2), r"version: unsupported manifest version 2"),
    ("missing key", lambda d: d.pop("sampler"), r"sampler: missing required key"),
    ("path escape", lambda d: d["stages"][0].update(file="../world.onnx"),
     r"stages\[0\]\.file: '\.\./world\.onnx' must be a plain file name"),
]


@pytest.mark.parametrize("edit,pattern", [e[1:] for e in MANIFEST_ERRORS],
                         ids=[e[0] for e in MANIFEST_ERRORS])
def test_manifest_errors_name_the_key(tmp_path, edit, pattern):
    model = copy_reference(tmp_path)
    edit_manifest(model, edit)
    with pytest.raises(ManifestError, match=pattern) as info:
        load_manifest(str(model))
    assert str(model / "manifest.json") in str(info.value)


def test_duplicate_json_key_and_nan_rejected(tmp_path):
    model = copy_reference(tmp_path)
    path = model / "manifest.json"
    text = path.read_text()
    path.write_text(text.replace('"version": 1,', '"version": 1, "version": 1,', 1))
    with pytest.raises(ManifestError, match="duplicate key 'version'"):
        load_manifest(str(model))
    path.write_text(text.replace('"step_s": 0.02', '"step_s": NaN', 1))
    with pytest.raises(ManifestError, match="NaN"):
        load_manifest(str(model))


def test_sha256_mismatch_names_file_and_says_reexport(tmp_path):
    model = copy_reference(tmp_path)
    with open(str(model / "world.onnx"), "ab") as f:
        f.write(b"\0")
    with pytest.raises(ManifestError, match=r"world\.onnx: sha256 mismatch.*re-export"):
        load_policy(str(model))
    load_manifest(str(model), verify_hashes=False)  # explicit opt-out still loads


def test_missing_stage_file(tmp_path):
    model = copy_reference(tmp_path)
    os.remove(str(model / "action_expert.onnx"))
    with pytest.raises(ManifestError, match=r"stages\[1\]\.file: .*action_expert\.onnx does not exist"):
        load_manifest(str(model))


def test_graph_disagreeing_with_manifest_is_caught_at_load(tmp_path):
    # Consistent manifest (validation passes) that does not describe the ONNX graph.
    model = copy_reference(tmp_path)
    edit_manifest(model, lambda d: _set_kv0_shape(d, [1, 4, 192, 8]))
    with pytest.raises(ManifestError, match=r"world\.onnx \(stage 'world'\): output 'kv_0_k' has "
                                            r"shape \[1, 4, 192, 16\] in the graph, manifest says "
                                            r"\[1, 4, 192, 8\]"):
        load_policy(str(model))


def test_unknown_backend(tmp_path):
    with pytest.raises(ValueError, match="unknown policy backend 'tensorrt-x'"):
        load_policy(REFERENCE, backend="tensorrt-x")


# --- preprocessing and sampler -------------------------------------------------------

def _camera_spec(h=64, w=64):
    return CameraSpec("head", h, w, "nearest", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                      "image_head")


def test_preprocess_matches_naive_reference():
    spec = _camera_spec(64, 48)
    out = np.empty((1, 3, 64, 48), np.float32)
    pre = CameraPreprocessor(spec, out)
    image = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    pre(image)
    ys = np.floor((np.arange(64) + 0.5) * 480 / 64).astype(int)
    xs = np.floor((np.arange(48) + 0.5) * 640 / 48).astype(int)
    resized = image[ys][:, xs].astype(np.float64) / 255.0
    expected = ((resized - spec.mean) / spec.std).transpose(2, 0, 1)[None]
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_preprocess_reads_strided_camera_views_in_place():
    """Cameras cut out of the image server's side-by-side canvas are strided views: same result, no copy."""
    spec = _camera_spec(64, 48)
    canvas = np.random.default_rng(2).integers(0, 256, (480, 3 * 640, 3), dtype=np.uint8)
    views = [canvas[:, 1280:1920], canvas[::-1, 640:1280], canvas[:, ::-1][:, :640]]
    for view in views:
        a, b = np.empty((1, 3, 64, 48), np.float32), np.empty((1, 3, 64, 48), np.float32)
        CameraPreprocessor(spec, a)(view)
        CameraPreprocessor(spec, b)(np.ascontiguousarray(view))
        np.testing.assert_array_equal(a, b)
    from conftest import heap_peak_above_baseline

    pre = CameraPreprocessor(spec, np.empty((1, 3, 64, 48), np.float32))
    peak = heap_peak_above_baseline(lambda i: pre(views[0]), warmup=1, runs=1)
    assert peak < 4096, "a strided view was copied (%d bytes)" % peak


def channel_model(tmp_path, name, order, mean=None, std=None):
    """A copy of the reference whose head camera is declared ``order``; mean/std (default: the reference's
    reversed for bgr, as a BGR-trained model lists its stats in its own channel order)."""
    model = copy_reference(tmp_path / name)

    def edit(d):
        head = d["cameras"][0]
        flip = (lambda v: v[::-1]) if order == "bgr" else (lambda v: v)
        head.update(channel_order=order, mean=mean or flip(head["mean"]), std=std or flip(head["std"]))

    edit_manifest(model, edit)
    return str(model)


def test_bgr_camera_tensor_is_the_rgb_tensor_with_channels_swapped(tmp_path):
    """Through real ONNX Runtime sessions: the tensor bound to a bgr camera's input is the rgb model's with its
    channels swapped (other cameras untouched), and the model acts on it as on a channel-swapped frame."""
    rgb, bgr = load_policy(REFERENCE, seed=4), load_policy(channel_model(tmp_path, "bgr", "bgr"), seed=4)
    assert [c.channel_order for c in bgr.manifest.cameras] == ["bgr", "rgb", "rgb"]
    images, state = frames(7), joint_state()
    rgb_actions = rgb.infer(images, state).copy()
    bgr_actions = bgr.infer(images, state).copy()
    rgb_head = rgb.backend.host_input("world", "image_head")
    np.testing.assert_array_equal(bgr.backend.host_input("world", "image_head"), rgb_head[:, ::-1])
    for cam in ("image_left_wrist", "image_right_wrist"):
        np.testing.assert_array_equal(bgr.backend.host_input("world", cam), rgb.backend.host_input("world", cam))
    assert not np.array_equal(bgr_actions, rgb_actions)  # the model saw other pixels
    rgb.close()
    bgr.close()
    # with the same stats on every channel: a bgr model given a frame acts exactly as an rgb model given that frame
    # with its channels reversed
    same = dict(mean=[0.45] * 3, std=[0.25] * 3)
    rgb = load_policy(channel_model(tmp_path, "rgb_same", "rgb", **same), seed=4)
    bgr = load_policy(channel_model(tmp_path, "bgr_same", "bgr", **same), seed=4)
    swapped = dict(images, head=images["head"][:, :, ::-1])
    np.testing.assert_array_equal(bgr.infer(images, state), rgb.infer(swapped, state))
    rgb.close()
    bgr.close()


def test_manifest_without_channel_order_reads_rgb_and_says_so(tmp_path, caplog):
    model = copy_reference(tmp_path)
    edit_manifest(model, lambda d: [c.pop("channel_order") for c in d["cameras"][1:]])
    m = load_manifest(str(model))
    assert [(c.channel_order, c.channel_order_stated) for c in m.cameras] == \
        [("rgb", True), ("rgb", False), ("rgb", False)]
    caplog.set_level("INFO", logger="wam_edge.policy")
    with load_policy(str(model)) as p:
        assert np.isfinite(p.infer(frames(), joint_state())).all()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "no channel_order for cameras left_wrist, right_wrist: read as rgb" in warnings[0]
    assert any("camera inputs of model reference: head (rgb), left_wrist (rgb), right_wrist (rgb)"
               in r.getMessage() for r in caplog.records)


def test_preprocess_bgr_swaps_channels_in_the_same_gather():
    spec = _camera_spec(32, 24)
    bgr_spec = CameraSpec("head", 32, 24, "nearest", spec.mean[::-1], spec.std[::-1], "image_head", "bgr")
    image = np.random.default_rng(3).integers(0, 256, (480, 3 * 640, 3), dtype=np.uint8)[:, 640:1280]
    a, b = np.empty((1, 3, 32, 24), np.float32), np.empty((1, 3, 32, 24), np.float32)
    CameraPreprocessor(spec, a)(image)
    pre = CameraPreprocessor(bgr_spec, b)
    pre(image)
    np.testing.assert_array_equal(b, a[:, ::-1])
    from conftest import heap_peak_above_baseline

    peak = heap_peak_above_baseline(lambda i: pre(image), warmup=1, runs=1)
    assert peak < 4096, "bgr preprocessing allocated %d bytes" % peak
    with pytest.raises(ValueError, match="channel order must be one of rgb, bgr, got 'grb'"):
        CameraPreprocessor(CameraSpec("head", 32, 24, "nearest", spec.mean, spec.std, "image_head", "grb"), b)


def test_preprocess_same_size_is_identity_resize():
    out = np.empty((1, 3, 64, 64), np.float32)
    image = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    CameraPreprocessor(_camera_spec(), out)(image)
    back = out[0].transpose(1, 2, 0) * np.float32((0.229, 0.224, 0.225)) + \
        np.float32((0.485, 0.456, 0.406))
    np.testing.assert_allclose(back * 255.0, image, atol=1e-3)


@settings(max_examples=200, deadline=None)
@given(src=st.integers(1, 4000), dst=st.integers(1, 512))
def test_nearest_indices_in_range_and_monotone(src, dst):
    idx = nearest_indices(src, dst)
    assert idx.shape == (dst,)
    assert idx.min() >= 0 and idx.max() < src
    assert (np.diff(idx) >= 0).all()
    if src == dst:
        assert (idx == np.arange(dst)).all()


def test_schedule_distilled_one_step():
    s = FlowMatchingSchedule(1, 1.0)
    assert s.times.tolist() == [1.0] and s.deltas == (-1.0,)


@settings(max_examples=100, deadline=None)
@given(steps=st.integers(1, 50), shift=st.floats(0.1, 20.0))
def test_schedule_runs_from_noise_to_data(steps, shift):
    s = FlowMatchingSchedule(steps, shift)
    assert s.times.dtype == np.float32 and s.times[0] == 1.0
    assert len(s.times) == len(s.deltas) == steps
    assert abs(sum(s.deltas) + 1.0) < 1e-9
    assert all(d < 0 for d in s.deltas)


def test_schedule_shift_spends_steps_near_noise():
    s = FlowMatchingSchedule(4, 5.0)
    expected = [5 * t / (1 + 4 * t) for t in (1.0, 0.75, 0.5, 0.25)]
    np.testing.assert_allclose(s.times, expected, rtol=1e-6)
    with pytest.raises(ValueError, match="steps"):
        FlowMatchingSchedule(0, 1.0)


def test_runtime_never_imports_torch():
    code = ("import sys, numpy as np\n"
            "from runtime.policy import load_policy\n"
            "p = load_policy(%r)\n"
            "p.infer({c: np.zeros((48, 64, 3), np.uint8) for c in p.manifest.camera_names},"
            " np.zeros(29))\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n" % REFERENCE)
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
