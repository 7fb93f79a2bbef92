"""Real-time chunking done inside the model: manifest "rtc", Policy.set_rtc, the runner's prefix and delay."""

import copy
import json
import math
import os
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.policy import ManifestError, PolicyError, load_policy
from runtime.policy.manifest import parse_manifest, sha256_file
from runtime.policy.policy import rtc_delay, rtc_offset, write_rtc_prefix

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(REPO, "exported", "reference")
WHERE = "/models/x/manifest.json"


def reference_data():
    with open(os.path.join(REFERENCE, "manifest.json")) as f:
        return json.load(f)


def with_rtc(data=None, declare=True, delay_dtype="float32"):
    d = copy.deepcopy(data or reference_data())
    if declare:
        d["rtc"] = {"version": 1, "prefix": True}
    expert = d["stages"][1]["inputs"]
    expert.append({"name": "rtc_prefix", "dtype": "float32", "shape": [1, 32, 17], "source": "rtc:prefix"})
    expert.append({"name": "rtc_delay", "dtype": delay_dtype, "shape": [1], "source": "rtc:delay"})
    return d


# --- manifest ---------------------------------------------------------------------------------------------------

def test_old_manifest_is_valid_and_says_no_rtc():
    m = parse_manifest(reference_data(), WHERE)
    assert m.rtc is None and not m.supports_rtc


@pytest.mark.parametrize("dtype", ["float32", "int32"])
def test_rtc_sources_accepted_with_the_declaration(dtype):
    m = parse_manifest(with_rtc(delay_dtype=dtype), WHERE)
    assert m.supports_rtc and (m.rtc.version, m.rtc.prefix) == (1, True)


def _rejects(data, pattern):
    with pytest.raises(ManifestError, match=pattern) as info:
        parse_manifest(data, WHERE)
    assert str(info.value).startswith(WHERE + ": ")
    return str(info.value)


def test_rtc_sources_rejected_without_the_declaration():
    msg = _rejects(with_rtc(declare=False), r"stages\[1\]\.inputs\[7\]\.source: stage 'action_expert' input "
                                           r"'rtc_prefix' has source 'rtc:prefix', but the manifest does not declare")
    assert '"rtc": {"version": 1, "prefix": true}' in msg
    d = with_rtc()
    d["rtc"]["prefix"] = False
    _rejects(d, r"stage 'action_expert' input 'rtc_prefix' has source 'rtc:prefix'")


def test_unknown_rtc_source_rejected():
    d = with_rtc()
    d["stages"][1]["inputs"][8]["source"] = "rtc:mask"
    _rejects(d, r"stages\[1\]\.inputs\[8\]\.source: unknown rtc source 'rtc:mask' in stage 'action_expert'")


def test_declaration_without_a_consumer_rejected():
    d = reference_data()
    d["rtc"] = {"version": 1, "prefix": True}
    _rejects(d, r"rtc\.prefix: the manifest declares rtc prefix support but no stage input has source 'rtc:prefix'")
    d["rtc"] = {"version": 1, "prefix": False}  # an explicit "no" is fine
    assert not parse_manifest(d, WHERE).supports_rtc


@pytest.mark.parametrize("edit,pattern", [
    (lambda d: d["rtc"].update(version=2), r"rtc\.version: unsupported rtc version 2"),
    (lambda d: d["rtc"].update(mask=True), r"rtc\.mask: unknown key 'mask'"),
    (lambda d: d["rtc"].pop("version"), r"rtc\.version: missing required key"),
    (lambda d: d["rtc"].update(prefix=1), r"rtc\.prefix: expected true or false"),
    (lambda d: d["stages"][1]["inputs"][7].update(shape=[1, 16, 17]),
     r"stages\[1\]\.inputs\[7\]\.shape: stage 'action_expert' input 'rtc_prefix' fed from rtc:prefix must have "
     r"shape \[1, 32, 17\]"),
    (lambda d: d["stages"][1]["inputs"][8].update(dtype="int64"),
     r"stages\[1\]\.inputs\[8\]\.dtype: stage 'action_expert' input 'rtc_delay' fed from rtc:delay must be "
     r"float32 or int32"),
    (lambda d: d["stages"][1]["inputs"][7].update(dtype="float16"), r"rtc:prefix must be float32"),
], ids=["version", "unknown key", "no version", "prefix not bool", "prefix shape", "delay dtype", "prefix dtype"])
def test_rtc_errors_name_file_path_and_stage(edit, pattern):
    d = with_rtc()
    edit(d)
    _rejects(d, pattern)


def test_rtc_consumers_must_agree_on_dtype():
    d = with_rtc()
    d["stages"][0]["inputs"].append({"name": "w_delay", "dtype": "int32", "shape": [1], "source": "rtc:delay"})
    _rejects(d, r"stages\[1\]\.inputs\[8\]\.dtype: stage 'action_expert' input 'rtc_delay' fed from rtc:delay is "
                r"float32 but world\.w_delay is int32")


# --- the arithmetic -----------------------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(horizon=st.integers(1, 64), dim=st.integers(1, 8), k=st.integers(1, 80), seed=st.integers(0, 2 ** 16))
def test_write_rtc_prefix_normalises_and_pads_with_the_last_action(horizon, dim, k, seed):
    rng = np.random.default_rng(seed)
    prefix = rng.uniform(-2, 2, (k, dim)).astype(np.float32)
    mean = np.empty((horizon, dim), np.float32)
    mean[...] = rng.uniform(-1, 1, dim)
    std = np.empty((horizon, dim), np.float32)
    std[...] = rng.uniform(0.01, 2, dim)
    out = np.full((horizon, dim), np.nan, np.float32)
    write_rtc_prefix(out, prefix, mean, std)
    for i in range(horizon):
        expected = (prefix[min(i, k - 1)] - mean[i]) / std[i]
        np.testing.assert_allclose(out[i], expected, rtol=1e-6, atol=1e-6)
    # denormalised, every row is an action of the executing chunk (never the dataset mean of a zero pad)
    np.testing.assert_allclose(out * std + mean, prefix[np.minimum(np.arange(horizon), k - 1)], rtol=1e-5, atol=1e-5)


@settings(max_examples=300, deadline=None)
@given(horizon=st.integers(1, 64), step_s=st.floats(0.001, 0.1), j=st.integers(-5, 80),
       frac=st.floats(-0.45, 0.45), chunk_start=st.floats(0.0, 1e5))
def test_rtc_offset_is_the_nearest_step_clipped(horizon, step_s, j, frac, chunk_start):
    new_start = chunk_start + (j + frac) * step_s
    assert rtc_offset(chunk_start, new_start, step_s, horizon) == min(max(j, 0), horizon - 1)


@settings(max_examples=300, deadline=None)
@given(horizon=st.integers(1, 64), step_s=st.floats(0.001, 0.1), n=st.integers(1, 80),
       frac=st.one_of(st.just(0.0), st.floats(1e-4, 0.999)))
def test_rtc_delay_is_latency_over_step_rounded_up(horizon, step_s, n, frac):
    latency = (n - frac) * step_s
    assert rtc_delay(latency, step_s, horizon) == min(n, horizon)
    assert rtc_delay(None, step_s, horizon) == 0
    assert rtc_delay(0.0, step_s, horizon) == 0


# --- a tiny ONNX model that returns its prefix (end to end through ONNX Runtime) ------------------------------------

H, D = 8, 17
STEP_S = 0.02


def build_model(model_dir, delay_dtype="float32"):
    """velocity = x_t - prefix - delay * E (E: one at the last step's last joint); one flow step (delta -1) from
    noise x gives x + (-1) * velocity = prefix + delay * E: the actions are the prefix, plus the delay in one cell."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    ref = reference_data()
    state_joints, action = ref["state"]["joints"], ref["action"]
    elem = {"float32": TensorProto.FLOAT, "int32": TensorProto.INT32}
    onehot = np.zeros((1, H, D), np.float32)
    onehot[0, H - 1, D - 1] = 1.0
    nodes = [helper.make_node("Sub", ["x_t", "rtc_prefix"], ["diff"])]
    delay = "rtc_delay"
    if delay_dtype == "int32":
        nodes.append(helper.make_node("Cast", ["rtc_delay"], ["delay_f"], to=TensorProto.FLOAT))
        delay = "delay_f"
    nodes += [helper.make_node("Mul", [delay, "onehot"], ["bump"]),
              helper.make_node("Sub", ["diff", "bump"], ["velocity"])]
    inputs = [("image_head", [1, 3, 8, 8], "float32"), ("x_t", [1, H, D], "float32"), ("t", [1], "float32"),
              ("state", [1, len(state_joints)], "float32"), ("rtc_prefix", [1, H, D], "float32"),
              ("rtc_delay", [1], delay_dtype)]
    graph = helper.make_graph(nodes, "rtc_echo",
                              [helper.make_tensor_value_info(n, elem[dt], s) for n, s, dt in inputs],
                              [helper.make_tensor_value_info("velocity", TensorProto.FLOAT, [1, H, D])],
                              initializer=[numpy_helper.from_array(onehot, "onehot")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    os.makedirs(model_dir, exist_ok=True)
    path = os.path.join(model_dir, "expert.onnx")
    onnx.save(model, path)
    sources = {"image_head": "camera:head", "x_t": "sampler:x", "t": "sampler:t", "state": "state",
               "rtc_prefix": "rtc:prefix", "rtc_delay": "rtc:delay"}
    manifest = {
        "format": "wam-edge-manifest", "version": 1, "name": "rtc_echo",
        "cameras": [{"name": "head", "height": 8, "width": 8, "resize": "nearest", "mean": [0.5] * 3,
                     "std": [0.25] * 3, "input": "image_head"}],
        "state": ref["state"],
        "action": {"kind": "joint_position", "joints": action["joints"], "horizon": H, "step_s": STEP_S,
                   "mean": action["mean"], "std": [0.05 + 0.01 * i for i in range(D)]},
        "sampler": {"type": "flow_matching", "steps": 1, "shift": 1.0, "distilled": True},
        "rtc": {"version": 1, "prefix": True},
        "stages": [{"name": "expert", "file": "expert.onnx", "sha256": sha256_file(path), "runs": "per_step",
                    "inputs": [{"name": n, "dtype": dt, "shape": s, "source": sources[n]} for n, s, dt in inputs],
                    "outputs": [{"name": "velocity", "dtype": "float32", "shape": [1, H, D],
                                 "sink": "sampler:velocity"}]}],
    }
    with open(os.path.join(model_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return str(model_dir)


def _images():
    return {"head": np.zeros((16, 16, 3), np.uint8)}


def _expected(prefix_abs, delay, std):
    """What the echo model returns for set_rtc(prefix_abs, delay): the padded prefix, + delay * std in one cell."""
    k = prefix_abs.shape[0]
    out = prefix_abs[np.minimum(np.arange(H), k - 1)].astype(np.float64)
    out[H - 1, D - 1] += delay * std[D - 1]
    return out


@pytest.mark.parametrize("delay_dtype", ["float32", "int32"])
def test_policy_hands_prefix_and_delay_to_the_model(tmp_path, delay_dtype):
    policy = load_policy(build_model(tmp_path / "m", delay_dtype))
    try:
        m = policy.manifest
        std = np.asarray(m.action.std)
        assert policy.supports_rtc and policy.rtc_delay.dtype == np.dtype(delay_dtype)
        rng = np.random.default_rng(0)
        state = rng.uniform(-0.3, 0.3, len(m.state_joints))
        # first inference: nothing executing -> the current joint positions, every row, delay 0
        actions = policy.infer(_images(), state)
        np.testing.assert_allclose(actions, np.tile(state[list(m.action_state_indices)], (H, 1)), atol=1e-5)
        policy.set_rtc(None, 5)
        assert policy.last_rtc_delay == 0
        # an executing chunk shorter than the horizon: padded with its last action, delay in the model
        prefix = rng.uniform(-0.5, 0.5, (3, D)).astype(np.float32)
        policy.set_rtc(prefix, 2)
        actions = policy.infer(_images(), state)
        np.testing.assert_allclose(actions, _expected(prefix, 2, std), atol=1e-5)
        np.testing.assert_allclose(policy.rtc_prefix[0, 5], (prefix[2] - m.action.mean) / std, rtol=1e-5)
        # longer than the horizon: the first H rows; the delay is clipped to the horizon
        long = rng.uniform(-0.5, 0.5, (H + 4, D)).astype(np.float32)
        policy.set_rtc(long, 99)
        assert policy.last_rtc_delay == H
        np.testing.assert_allclose(policy.infer(_images(), state), _expected(long[:H], H, std), atol=1e-5)
        with pytest.raises(ValueError, match=r"rtc prefix: expected shape \(k >= 1, 17\)"):
            policy.set_rtc(np.zeros((0, D), np.float32), 0)
    finally:
        policy.close()


def test_set_rtc_on_a_model_without_rtc_is_an_error():
    policy = load_policy(REFERENCE)
    try:
        assert not policy.supports_rtc
        with pytest.raises(PolicyError, match="does not declare rtc prefix support"):
            policy.set_rtc(None, 0)
    finally:
        policy.close()


def test_runner_hands_the_last_chunk_on_the_new_timeline_and_the_delay(tmp_path, runtime_rig):
    pytest.importorskip("zmq")
    from conftest import publish_state, read_chunks

    from runtime.robot import g1

    model = build_model(tmp_path / "m")
    rt, pull, pub, _ = runtime_rig(f"model.path={model}", "policy.max_inference_s=5", "policy.trigger=fixed",
                                   'camera.layout=[{"name": "head", "width": 64}]', "camera.height=48")
    q = g1.NOMINAL_POSE.astype(np.float32) + np.linspace(-0.1, 0.1, g1.NUM_JOINTS, dtype=np.float32)

    def publish(stamp):
        publish_state(pub, rt, stamp, q)

    def chunks():
        return read_chunks(pull)

    manifest = rt.policy.manifest
    std = np.asarray(manifest.action.std)
    assert rt.report()["rtc"] is True
    # first chunk: nothing executing -> the model sees the current state's action joints
    publish(1.0)
    assert rt._infer_and_send(time.monotonic())
    (first,) = chunks()
    np.testing.assert_allclose(first.actions, np.tile(q[g1.indices(manifest.action_joints)], (H, 1)), atol=1e-5)
    np.testing.assert_array_equal(rt._rtc_last, first.actions)
    assert rt._rtc_last_start == rt.chunk_start
    # pretend the executing chunk is a ramp that started 3.4 steps before the new state arrived
    publish(2.0)
    ramp = (np.arange(H)[:, None] * 0.01 + np.arange(D)[None, :] * 0.001).astype(np.float32)
    rt._rtc_last[...] = ramp
    rt._rtc_last_start = rt.robot_state_at - 3.4 * STEP_S
    for _ in range(4):
        rt.latency.add(0.05)  # 2.5 steps: delay 3
    delay = rtc_delay(rt.latency.value, STEP_S, H)
    assert delay == math.ceil(rt.latency.value / STEP_S - 1e-9) >= 3
    assert rt._infer_and_send(time.monotonic())
    (second,) = chunks()
    np.testing.assert_allclose(second.actions, _expected(ramp[3:], delay, std), atol=1e-5)
    # past the executing chunk's end: its last action everywhere
    publish(3.0)
    rt._rtc_last[...] = ramp
    rt._rtc_last_start = rt.robot_state_at - 100 * STEP_S
    assert rt._infer_and_send(time.monotonic())
    (third,) = chunks()
    delay = rtc_delay(rt.latency.value, STEP_S, H)
    np.testing.assert_allclose(third.actions, _expected(ramp[-1:], delay, std), atol=1e-5)


def test_runner_reports_rtc_false_for_the_reference(tmp_path):
    pytest.importorskip("zmq")
    from runtime.config import load_config
    from runtime.runner import PolicyRuntime

    cfg = load_config(None, [f"transport.chunks=ipc://{tmp_path}/chunks", f"transport.state=ipc://{tmp_path}/state"])
    import zmq
    ctx = zmq.Context()
    rt = PolicyRuntime(cfg, ctx)
    try:
        assert rt.report()["rtc"] is False and rt._rtc_policy is None
    finally:
        rt.close()
        ctx.term()


def test_set_rtc_and_infer_do_not_grow_memory(tmp_path):
    from conftest import runtime_heap_growth

    policy = load_policy(build_model(tmp_path / "m"))
    try:
        last = np.zeros((H, D), np.float32)
        images, state = _images(), np.zeros(len(policy.manifest.state_joints), np.float32)

        def step(i):
            policy.set_rtc(last[i % H:], 3)
            policy.infer(images, state)

        assert runtime_heap_growth(step) < 1024
    finally:
        policy.close()
