"""The StageBackend contract, checked on every backend this machine can run.

Each case names a backend, its constructor options and its tolerance against
the ONNX Runtime CPU reference; a case whose requirements are missing (GPU
libraries, a registered class, engine files) is skipped with the reason.
On the robot (Jetson): `wam-edge build`, then `pytest tests/test_backend_conformance.py -v`.
"""

import importlib.util
import os
import tracemalloc

import numpy as np
import pytest

from runtime.policy import load_manifest
from runtime.policy.backends import BACKENDS, create_backend, engine_path
from runtime.policy.manifest import is_host_source
from runtime.policy.policy import Policy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(REPO, "exported", "reference")


def _missing_modules(*names):
    return [n for n in names if importlib.util.find_spec(n) is None]


def _ort_providers():
    import onnxruntime

    return onnxruntime.get_available_providers()


def _requirements(case):
    """None when case `case` can run here, else why not."""
    name = CASES[case][0]
    if name in ("onnxruntime", "onnxruntime-gpu"):
        if _missing_modules("onnxruntime"):
            return "missing module onnxruntime"
        if case == "onnxruntime-gpu" and "CUDAExecutionProvider" not in _ort_providers():
            return ("onnxruntime lists no CUDAExecutionProvider (providers: %s; install onnxruntime-gpu on a GPU "
                    "machine)" % ", ".join(_ort_providers()))
        return None
    if name == "tensorrt":
        missing = _missing_modules("tensorrt", "pycuda")
        if missing:
            return "missing modules: %s (no TensorRT/GPU here)" % ", ".join(missing)
        if name not in BACKENDS or _missing_modules("runtime.policy.backends.tensorrt_backend"):
            return "no tensorrt backend module/class yet"
        manifest = load_manifest(REFERENCE)
        absent = [s.name for s in manifest.stages if not os.path.isfile(engine_path(REFERENCE, s.name))]
        if absent:
            return "no engine files for stages %s (build them with `wam-edge build --model exported/reference`)" \
                % absent
        return None
    return "unknown backend %r" % name


# case -> (backend, constructor options, absolute tolerance vs the ORT CPU reference on normalised actions)
CASES = {
    "onnxruntime": ("onnxruntime", {"intra_op_threads": 1}, 0.0),
    "onnxruntime-gpu": ("onnxruntime-gpu", {"device": "cuda", "fp16": True}, 2e-2),  # TensorRT FP16 kernels
    # the GPU backend's device-chaining path (OrtValues, IO binding) on the CPU provider: runs without a GPU
    "onnxruntime-gpu-device-cpu": ("onnxruntime-gpu", {"device": "cpu", "intra_op_threads": 1}, 0.0),
    "tensorrt": ("tensorrt", {}, 2e-2),  # FP16 engines
}


@pytest.fixture(scope="module")
def manifest():
    return load_manifest(REFERENCE)


def _create(case, manifest, cache_dir):
    name, options, _ = CASES[case]
    options = dict(options)
    if name == "onnxruntime-gpu" and options["device"] == "cuda":
        options["cache_dir"] = cache_dir
    return create_backend(name, manifest, REFERENCE, **options)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    why = _requirements(request.param)
    if why:
        pytest.skip("%s: %s" % (request.param, why))
    return request.param


@pytest.fixture(scope="module")
def backend(case, manifest, tmp_path_factory):
    b = _create(case, manifest, str(tmp_path_factory.mktemp("cache")))
    yield b
    b.close()


def host_inputs(manifest):
    return [(s.name, t) for s in manifest.stages for t in s.inputs if is_host_source(t.source or "")]


def host_outputs(manifest):
    return [(s.name, t) for s in manifest.stages for t in s.outputs if t.sink]


def fill(backend, manifest, seed):
    rng = np.random.default_rng(seed)
    for stage, t in host_inputs(manifest):
        buf = backend.host_input(stage, t.name)
        buf[...] = rng.standard_normal(buf.shape).astype(buf.dtype)


def run_all(backend, manifest):
    for s in manifest.stages:
        backend.run(s.name)


def test_host_buffers_stable_and_writable(backend, manifest):
    assert host_inputs(manifest) and host_outputs(manifest)
    for stage, t in host_inputs(manifest):
        a, b = backend.host_input(stage, t.name), backend.host_input(stage, t.name)
        assert a is b and a.flags.writeable
        assert a.shape == tuple(t.shape)
    for stage, t in host_outputs(manifest):
        a, b = backend.host_output(stage, t.name), backend.host_output(stage, t.name)
        assert a is b and a.flags.writeable
        assert a.shape == tuple(t.shape)
    with pytest.raises(KeyError):
        backend.host_input(manifest.stages[0].name, "no_such_tensor")


def test_run_fills_outputs_deterministically(backend, manifest):
    fill(backend, manifest, 1)
    outs = [backend.host_output(stage, t.name) for stage, t in host_outputs(manifest)]
    for o in outs:
        o[...] = np.nan
    run_all(backend, manifest)
    first = [o.copy() for o in outs]
    for o in first:
        assert np.isfinite(o).all()
    for o in outs:
        o[...] = np.nan
    run_all(backend, manifest)
    for o, f in zip(outs, first):
        np.testing.assert_array_equal(o, f)


def test_run_group_equals_running_the_stages_one_by_one(backend, manifest):
    """The first denoising step as the policy runs it (context stages, then per-step stages) in one run_group, and
    a later step (per-step stages): the same outputs as run() stage by stage, fused or not."""
    outs = [backend.host_output(stage, t.name) for stage, t in host_outputs(manifest)]
    for group in manifest.step_groups:
        fill(backend, manifest, 4)
        run_all(backend, manifest)
        for name in group:
            backend.run(name)
        want = [o.copy() for o in outs]
        for o in outs:
            o[...] = np.nan
        backend.run_group(group)
        for o, w in zip(outs, want):
            np.testing.assert_array_equal(o, w)
    assert isinstance(backend.fuses_groups, bool)


def test_no_allocation_growth(backend, manifest):
    fill(backend, manifest, 2)
    for _ in range(5):
        run_all(backend, manifest)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for _ in range(100):
            run_all(backend, manifest)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    growth = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert growth < 64 * 1024, "python heap grew %d bytes over 100 runs" % growth


def test_providers_and_describe(backend):
    assert backend.providers and all(isinstance(p, str) and p for p in backend.providers)
    text = backend.describe()
    assert backend.name in text
    for p in backend.providers:
        assert p in text


def test_close_is_idempotent(manifest, tmp_path):
    ran = 0
    for case in sorted(CASES):
        if _requirements(case):
            continue
        b = _create(case, manifest, str(tmp_path))
        b.close()
        b.close()  # contract: a second close is a no-op
        with b:
            pass  # __exit__ closes again
        ran += 1
    assert ran >= 1


def test_policy_matches_ort_cpu_reference(case, backend, manifest):
    tol = CASES[case][2]
    rng = np.random.default_rng(3)
    cams = {c.name: rng.standard_normal((1, 3, c.height, c.width)).astype(np.float32)
            for c in manifest.cameras}
    state = rng.standard_normal(len(manifest.state.joints)).astype(np.float32)
    noise = rng.standard_normal((1, manifest.horizon, manifest.action_dim)).astype(np.float32)
    reference = create_backend("onnxruntime", manifest, REFERENCE, intra_op_threads=1)
    try:
        want = Policy(manifest, reference).infer_normalised(cams, state, noise).copy()
    finally:
        reference.close()
    got = Policy(manifest, backend).infer_normalised(cams, state, noise)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)
