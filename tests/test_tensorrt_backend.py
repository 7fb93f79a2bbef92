"""The TensorRT backend, on CI through a stand-in for tensorrt/pycuda (no GPU here), and on a GPU where there is one.

The stand-in (tests/standins/trt_runtime_standin_no_gpu.py) executes each "engine" with a real ONNX Runtime CPU
session on fake device memory and records every copy and call, so these tests check what the backend asks of
TensorRT and CUDA: the metadata refusals before any TensorRT call, the IO checks, buffers bound once, the K/V kept
on the device, one stream, warm-up, CUDA graphs, and the StageBackend contract.
"""

import dataclasses
import hashlib
import importlib.util
import os
import shutil
import sys
import threading

import numpy as np
import pytest
import test_backend_conformance as conformance
from standins.trt_runtime_standin_no_gpu import Context, FakeGpu, fake_driver, install, write_engines

from runtime.policy import load_manifest
from runtime.policy.backends import EngineFileMissing, TrtPlatform, engine_path, tensorrt_backend
from runtime.policy.backends import cuda_graph as cuda_graph_module
from runtime.policy.backends.engine_meta import (
    REBUILD_HINT,
    EngineMetaError,
    EngineMismatch,
    meta_path,
    read_meta,
    write_meta,
)
from runtime.policy.backends.tensorrt_backend import CU_STREAM_NON_BLOCKING, TensorRTBackend, check_engines
from runtime.policy.manifest import is_host_source
from runtime.policy.policy import Policy

REFERENCE = conformance.REFERENCE
WARMUP = 2


@pytest.fixture
def model_dir(tmp_path):
    d = str(tmp_path / "model")
    shutil.copytree(REFERENCE, d)
    return d


@pytest.fixture
def manifest(model_dir):
    return load_manifest(model_dir)


@pytest.fixture
def gpu(monkeypatch):
    return install(monkeypatch)


@pytest.fixture
def engines(gpu, manifest, model_dir):
    write_engines(model_dir, manifest, gpu.platform)


@pytest.fixture
def backend(gpu, engines, manifest, model_dir):
    b = TensorRTBackend(manifest, model_dir, warmup_runs=WARMUP, platform=gpu.platform)
    yield b
    b.close()


def released(gpu, stack_before=()):
    """Everything the backend took from the fake device is given back, and this thread's context stack is as it
    was (the primary context stays retained: see test_close_pops_the_context_and_never_detaches_it)."""
    return (not gpu.memory and gpu.context_stack == list(stack_before) and not gpu.calls["Context.detach"]
            and all(getattr(h, "freed", False) for h in gpu.host_allocations))


# --- the StageBackend contract (the conformance suite's checks) ------------------------------

def test_contract_buffers_stable_and_writable(backend, manifest):
    conformance.test_host_buffers_stable_and_writable(backend, manifest)


def test_contract_deterministic_outputs(backend, manifest):
    conformance.test_run_fills_outputs_deterministically(backend, manifest)


def test_contract_no_python_heap_growth_over_100_runs(backend, manifest):
    conformance.test_no_allocation_growth(backend, manifest)


def test_contract_run_group(backend, manifest):
    conformance.test_run_group_equals_running_the_stages_one_by_one(backend, manifest)


def test_contract_run_group_with_cuda_graphs(gpu, engines, manifest, model_dir, monkeypatch):
    b, lib = _graph_backend(gpu, manifest, model_dir, monkeypatch)
    with b:
        launches = lib.calls["cuGraphLaunch"]
        conformance.test_run_group_equals_running_the_stages_one_by_one(b, manifest)
        conformance.test_no_allocation_growth(b, manifest)
        assert lib.calls["cuGraphLaunch"] > launches


def test_contract_providers_and_describe(backend, gpu):
    conformance.test_providers_and_describe(backend)
    assert backend.providers == ("TensorRT 10.3.0", "StandinGPU (sm 8.7)")


def policy_output(backend, manifest):
    rng = np.random.default_rng(3)
    cams = {c.name: rng.standard_normal((1, 3, c.height, c.width)).astype(np.float32) for c in manifest.cameras}
    state = rng.standard_normal(len(manifest.state.joints)).astype(np.float32)
    noise = rng.standard_normal((1, manifest.horizon, manifest.action_dim)).astype(np.float32)
    return Policy(manifest, backend).infer_normalised(cams, state, noise).copy()


def test_policy_matches_ort_cpu_reference(backend, manifest, model_dir):
    from runtime.policy.backends import create_backend

    reference = create_backend("onnxruntime", manifest, model_dir, intra_op_threads=1)
    try:
        want = policy_output(reference, manifest)
    finally:
        reference.close()
    got = policy_output(backend, manifest)
    assert np.isfinite(got).all() and np.abs(got).max() > 0
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


# --- what the backend asks of the device -------------------------------------------------------

def test_kv_stays_on_device_only_host_inputs_go_up_and_sinks_come_down(backend, gpu, manifest):
    world, expert = gpu.exec_contexts
    gpu.copies.clear()
    policy_output(backend, manifest)
    host_fed = {ctx.addresses[t.name] for ctx, stage in ((world, manifest.stages[0]), (expert, manifest.stages[1]))
                for t in stage.inputs if is_host_source(t.source)}
    kv = {world.addresses[t.name] for t in manifest.stages[0].outputs}
    assert kv == {expert.addresses[t.name] for t in manifest.stages[1].inputs if not is_host_source(t.source)}
    assert len(kv) == 4  # the producer's output buffer is the consumer's input buffer
    uploads = {address for kind, address in gpu.copies if kind == "htod"}
    downloads = {address for kind, address in gpu.copies if kind == "dtoh"}
    assert uploads == host_fed
    assert downloads == {expert.addresses["velocity"]}
    assert not kv & (uploads | downloads)


def test_bound_once_one_stream_and_warmed_up(backend, gpu, manifest):
    for _ in range(5):
        conformance.run_all(backend, manifest)
    assert len(gpu.streams) == 1 and gpu.calls["Runtime"] == 1
    # non-blocking: no implicit sync with the legacy default stream, which could invalidate a capture; the
    # stand-in refuses stream work before a synchronize has waited for the default stream's memsets
    assert CU_STREAM_NON_BLOCKING == 1 and gpu.streams[0].flags == CU_STREAM_NON_BLOCKING
    assert gpu.calls["Context.synchronize"] == 1
    for ctx, stage in zip(gpu.exec_contexts, manifest.stages):
        assert ctx.calls["set_input_shape"] == len(stage.inputs)
        assert ctx.calls["set_tensor_address"] == len(stage.inputs) + len(stage.outputs)
        assert ctx.shapes == {t.name: tuple(t.shape) for t in stage.inputs}
        assert ctx.executed == WARMUP + 5


@pytest.mark.parametrize("warmup", [0, 1, 4])
def test_warmup_runs_every_stage_before_ready(gpu, engines, manifest, model_dir, warmup):
    with TensorRTBackend(manifest, model_dir, warmup_runs=warmup, platform=gpu.platform):
        assert [ctx.executed for ctx in gpu.exec_contexts] == [warmup, warmup]


def test_primary_context_held_for_life_and_everything_freed_on_close(gpu, engines, manifest, model_dir):
    b = TensorRTBackend(manifest, model_dir, warmup_runs=1, platform=gpu.platform)
    assert len(gpu.context_stack) == 1 and gpu.retained == 1
    assert len(gpu.memory) == 3 + 3 + 4 + 1  # cameras, x/t/state, K/V, velocity: one buffer each
    b.close()
    assert released(gpu)
    b.close()  # idempotent
    with pytest.raises(RuntimeError, match="after close"):
        b.run("world")


@pytest.mark.parametrize("outer", [False, True], ids=["empty-stack", "under-an-application-context"])
def test_close_pops_the_context_and_never_detaches_it(gpu, engines, manifest, model_dir, outer):
    """pycuda's detach() on a retained primary context pushes it and releases it without popping: close() pops
    only, and the retain is kept for the process (one retain however many backends come and go)."""
    if outer:
        Context(gpu).push()  # a context the application made current before loading the policy
    before, pushes = list(gpu.context_stack), gpu.calls["Context.push"]
    for _ in range(2):  # a second backend in the same thread reuses the retained context
        b = TensorRTBackend(manifest, model_dir, warmup_runs=1, platform=gpu.platform)
        assert gpu.context_stack[:-1] == before and len(gpu.context_stack) == len(before) + 1  # pushed on top
        b.close()
        assert released(gpu, before)
    assert gpu.retained == 1 and gpu.calls["Context.detach"] == 0
    assert gpu.calls["Context.push"] - pushes == gpu.calls["Context.pop"] == 2


def test_close_from_another_thread_pushes_frees_and_pops_there(gpu, engines, manifest, model_dir):
    b = TensorRTBackend(manifest, model_dir, warmup_runs=1, platform=gpu.platform)
    owner_stack = list(gpu.context_stack)
    seen = []

    def close_here():
        b.close()
        seen.append(list(gpu.context_stack))

    thread = threading.Thread(target=close_here)
    thread.start()
    thread.join()
    assert seen == [[]]  # pushed, freed (the stand-in refuses frees without a current context), popped
    assert not gpu.memory and all(h.freed for h in gpu.host_allocations) and gpu.calls["Context.detach"] == 0
    assert gpu.context_stack == owner_stack  # the creating thread's stack: no thread can pop another's


def test_host_output_of_a_stage_to_stage_tensor_stays_on_gpu(backend):
    with pytest.raises(KeyError, match="stays on the GPU"):
        backend.host_output("world", "kv_0_k")
    with pytest.raises(KeyError, match="no output"):
        backend.host_output("action_expert", "nope")
    with pytest.raises(KeyError, match="no stage"):
        backend.host_output("nope", "velocity")
    with pytest.raises(KeyError, match="host-fed input"):
        backend.host_input("action_expert", "kv_0_k")
    with pytest.raises(KeyError, match="no stage"):
        backend.run("nope")


def test_run_from_another_thread_is_refused(backend):
    errors = []
    t = threading.Thread(target=lambda: _catch(errors, backend.run, "world"))
    t.start()
    t.join()
    assert len(errors) == 1 and "another thread" in str(errors[0])


def _catch(errors, fn, *args):
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 (handed to the test thread)
        errors.append(exc)


# --- CUDA graphs ---------------------------------------------------------------------------

def _graph_backend(gpu, manifest, model_dir, monkeypatch, fail=None):
    driver, lib = fake_driver(gpu, fail)
    monkeypatch.setattr(tensorrt_backend, "load_driver", lambda: driver)
    return TensorRTBackend(manifest, model_dir, cuda_graph=True, warmup_runs=WARMUP, platform=gpu.platform), lib


def test_cuda_graph_captures_each_stage_and_each_step_and_replays_them(gpu, engines, manifest, model_dir,
                                                                       monkeypatch):
    with TensorRTBackend(manifest, model_dir, warmup_runs=WARMUP, platform=gpu.platform) as plain:
        assert not plain.fuses_groups
        want = policy_output(plain, manifest)
    gpu.exec_contexts.clear()
    b, lib = _graph_backend(gpu, manifest, model_dir, monkeypatch)
    with b:
        assert "CUDA graphs" in b.providers and b.fuses_groups
        # world, action_expert, and the first step world+action_expert (a later step is action_expert's graph)
        assert lib.calls["cuStreamBeginCapture_v2"] == lib.calls["cuStreamEndCapture"] == 3
        for ctx in gpu.exec_contexts:
            assert ctx.calls["execute_async_v3"] == WARMUP + 2  # warm-up, then inside its own and the step's capture
            assert ctx.executed == WARMUP + 2                   # warm-up, then the first launch of each graph
        launches = lib.calls["cuGraphLaunch"]
        got = policy_output(b, manifest)
        assert lib.calls["cuGraphLaunch"] == launches + 1  # the one-step student: one launch per inference
        assert all(ctx.calls["execute_async_v3"] == WARMUP + 2 for ctx in gpu.exec_contexts)  # graphs only
    np.testing.assert_array_equal(got, want)
    assert lib.calls["cuGraphExecDestroy"] == lib.calls["cuGraphDestroy"] == 3 and not gpu.graphs
    assert released(gpu)


def test_a_step_graph_holds_its_copies_and_engines_in_order(gpu, engines, manifest, model_dir, monkeypatch):
    b, _ = _graph_backend(gpu, manifest, model_dir, monkeypatch)
    with b:
        world, expert = gpu.exec_contexts
        (step,) = [g for g in gpu.graph_execs.values() if world.execute in g and expert.execute in g]
        kinds = ["engine:" + ("world" if w == world.execute else "expert") if w in (world.execute, expert.execute)
                 else "copy" for w in step]
        host_fed = {id(buf) for buf in _host_input_buffers(b, manifest)}
        n_up = len(host_fed)  # each host source goes up once, though two stages may read it
        assert kinds == ["copy"] * n_up + ["engine:world", "engine:expert", "copy"]
        gpu.copies.clear()
        b.run_group(("world", "action_expert"))
        assert sum(n for (kind, _), n in gpu.copies.items() if kind == "htod") == n_up
        assert sum(n for (kind, _), n in gpu.copies.items() if kind == "dtoh") == 1  # the velocity only


def _host_input_buffers(backend, manifest):
    return [backend.host_input(s.name, t.name) for s in manifest.stages for t in s.inputs
            if is_host_source(t.source or "")]


def test_a_teacher_launches_one_graph_per_step_and_times_steps_as_groups(gpu, engines, manifest, model_dir,
                                                                         monkeypatch):
    with TensorRTBackend(manifest, model_dir, warmup_runs=WARMUP, platform=gpu.platform) as plain:
        reference = Policy(manifest, plain, steps=3)
        assert set(reference.last_stage_ms) == {"world", "action_expert"}
        want = reference.infer_normalised(*_policy_inputs(manifest)).copy()
    b, lib = _graph_backend(gpu, manifest, model_dir, monkeypatch)
    with b:
        policy = Policy(manifest, b, steps=3)
        assert set(policy.last_stage_ms) == {"world+action_expert", "action_expert"}
        launches = lib.calls["cuGraphLaunch"]
        got = policy.infer_normalised(*_policy_inputs(manifest)).copy()
        assert lib.calls["cuGraphLaunch"] == launches + 3
        assert policy.last_stage_ms["world+action_expert"] > 0 and policy.last_stage_ms["action_expert"] > 0
        one_step = Policy(manifest, b)  # the distilled student: no later steps to time
        assert set(one_step.last_stage_ms) == {"world+action_expert"}
    np.testing.assert_array_equal(got, want)


def _policy_inputs(manifest):
    rng = np.random.default_rng(5)
    cams = {c.name: rng.standard_normal((1, 3, c.height, c.width)).astype(np.float32) for c in manifest.cameras}
    state = rng.standard_normal(len(manifest.state.joints)).astype(np.float32)
    noise = rng.standard_normal((1, manifest.horizon, manifest.action_dim)).astype(np.float32)
    return cams, state, noise


def test_run_group_without_graphs_or_for_another_group_runs_stage_by_stage(backend, gpu):
    world, expert = gpu.exec_contexts
    before = world.executed, expert.executed
    backend.run_group(("world", "action_expert"))
    backend.run_group(("action_expert", "world"))  # not a step the policy runs: still correct, just not fused
    assert (world.executed, expert.executed) == (before[0] + 2, before[1] + 2)
    with pytest.raises(KeyError, match="no stage 'nope'"):
        backend.run_group(("nope",))


def test_step_graph_is_refused_after_close_and_from_another_thread(gpu, engines, manifest, model_dir, monkeypatch):
    b, _ = _graph_backend(gpu, manifest, model_dir, monkeypatch)
    errors = []
    thread = threading.Thread(target=_catch, args=(errors, b.run_group, ("world", "action_expert")))
    thread.start()
    thread.join()
    assert len(errors) == 1 and "from another thread" in str(errors[0])
    b.close()
    with pytest.raises(RuntimeError, match=r"run_group\(\('world', 'action_expert'\)\) after close"):
        b.run_group(("world", "action_expert"))


def test_nan_fault_injection_reaches_a_fused_step(gpu, engines, manifest, model_dir, monkeypatch):
    from runtime.faults import FaultInjectingBackend, FaultInjector
    from runtime.policy.errors import PolicyError

    b, lib = _graph_backend(gpu, manifest, model_dir, monkeypatch)
    with b:
        policy = Policy(manifest, b)
        injector = FaultInjector()
        wrapped = FaultInjectingBackend.install(policy, injector)
        assert wrapped.fuses_groups
        images = {c.name: np.zeros((c.height, c.width, 3), np.uint8) for c in manifest.cameras}
        state = np.zeros(len(manifest.state.joints), np.float32)
        assert np.isfinite(policy.infer(images, state)).all()
        injector.inject("nan")
        launches = lib.calls["cuGraphLaunch"]
        with pytest.raises(PolicyError, match="non-finite"):
            policy.infer(images, state)
        assert lib.calls["cuGraphLaunch"] == launches + 1  # still the step's graph, then the sink filled with NaN


def test_cuda_graph_needs_a_warmup_run(gpu, engines, manifest, model_dir):
    with pytest.raises(ValueError, match="warmup_runs >= 1"):
        TensorRTBackend(manifest, model_dir, cuda_graph=True, warmup_runs=0, platform=gpu.platform)


def test_cuda_graph_capture_failure_names_the_stage_and_frees_everything(gpu, engines, manifest, model_dir,
                                                                         monkeypatch):
    driver, _ = fake_driver(gpu, fail={"cuStreamEndCapture": 900})
    monkeypatch.setattr(tensorrt_backend, "load_driver", lambda: driver)
    with pytest.raises(RuntimeError, match=r"stage 'world': CUDA graph capture failed: cuStreamEndCapture failed: "
                                           r"CUresult 900 \(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED\)"):
        TensorRTBackend(manifest, model_dir, cuda_graph=True, warmup_runs=1, platform=gpu.platform)
    assert released(gpu)


# --- refusal of mismatched engines, before any TensorRT call ---------------------------------

def other(platform: TrtPlatform, **changes) -> TrtPlatform:
    return dataclasses.replace(platform, **changes)


def edit_meta(model_dir, stage, **changes):
    path = meta_path(engine_path(model_dir, stage))
    write_meta(path, dataclasses.replace(read_meta(path), **changes))


@pytest.mark.parametrize("mutate, error, text", [
    (lambda d, p: (edit_meta(d, "world", onnx_sha256="b" * 64), p)[1], EngineMismatch, "ONNX sha256"),
    (lambda d, p: other(p, trt_version="10.4.0"), EngineMismatch, "TensorRT version: recorded 10.3.0, present 10.4.0"),
    (lambda d, p: other(p, gpu_name="Orin"), EngineMismatch, "GPU: recorded 'StandinGPU', present 'Orin'"),
    (lambda d, p: other(p, compute_capability="8.6"), EngineMismatch, "compute capability: recorded 8.7, present 8.6"),
    (lambda d, p: (os.remove(engine_path(d, "action_expert")), p)[1], EngineFileMissing,
     "no engine file action_expert.engine"),
    (lambda d, p: (os.remove(meta_path(engine_path(d, "world"))), p)[1], EngineFileMissing, "no engine metadata"),
    (lambda d, p: (open(meta_path(engine_path(d, "world")), "w").write("{"), p)[1], EngineMetaError, "invalid JSON"),
])
def test_mismatched_engine_refused_before_any_tensorrt_call(gpu, engines, manifest, model_dir, mutate, error, text):
    platform = mutate(model_dir, gpu.platform)
    with pytest.raises(error) as info:
        TensorRTBackend(manifest, model_dir, platform=platform)
    assert text in str(info.value) and "rebuild with `wam-edge build`" in str(info.value)
    assert REBUILD_HINT == "rebuild with `wam-edge build`"
    assert not gpu.calls and not gpu.runtimes and not gpu.context_stack and not gpu.memory


def test_refusal_needs_no_tensorrt_at_all(gpu, engines, manifest, model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt would now fail
    with pytest.raises(EngineMismatch, match="rebuild with `wam-edge build`"):
        TensorRTBackend(manifest, model_dir, platform=other(gpu.platform, gpu_name="Orin"))


def test_platform_probed_when_not_given(gpu, engines, manifest, model_dir):
    with TensorRTBackend(manifest, model_dir, warmup_runs=0) as b:
        assert b.providers[0] == "TensorRT 10.3.0"
    gpu.gpu_name = "Thor"
    with pytest.raises(EngineMismatch, match="GPU: recorded 'StandinGPU', present 'Thor'"):
        TensorRTBackend(manifest, model_dir)


class LogicError(Exception):
    """Named like pycuda.driver.LogicError (a pycuda.driver.Error), which cuInit's failures raise."""


@pytest.mark.parametrize("error, text", [
    (LogicError("cuInit failed: no CUDA-capable device is detected"),
     "cannot use the GPU: LogicError: cuInit failed: no CUDA-capable device is detected"),
    (RuntimeError("cuInit failed: unknown error"), "cannot use the GPU: RuntimeError: cuInit failed: unknown error"),
    (ImportError("No module named 'pycuda'", name="pycuda"), "needs the Python module pycuda (No module named"),
])
def test_probe_failure_is_a_clear_error(manifest, model_dir, error, text):
    def probe():
        raise error

    write_engines(model_dir, manifest, TrtPlatform("10.3.0", "Orin", "8.7"))
    with pytest.raises(RuntimeError) as info:
        check_engines(manifest, model_dir, probe=probe)
    assert text in str(info.value) and "backend onnxruntime" in str(info.value)
    assert info.value.__cause__ is error


@pytest.mark.parametrize("module", ["tensorrt", "pycuda.driver"])
def test_missing_gpu_module_is_a_clear_error(gpu, engines, manifest, model_dir, monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(RuntimeError) as info:
        TensorRTBackend(manifest, model_dir, platform=gpu.platform)
    message = str(info.value)
    assert module.split(".")[0] in message and "backend onnxruntime" in message


def test_engine_replaced_after_the_build_is_refused(gpu, engines, manifest, model_dir):
    """Metadata vouches for one engine file: a plan copied over it (trtexec, another robot) is refused."""
    with open(engine_path(model_dir, "action_expert"), "ab") as f:
        f.write(b"\x00")
    with pytest.raises(EngineMismatch, match="replaced after the build; rebuild with `wam-edge build`"):
        TensorRTBackend(manifest, model_dir, platform=gpu.platform)
    assert released(gpu)


def test_undeserializable_engine_names_the_file(gpu, engines, manifest, model_dir):
    path = engine_path(model_dir, "action_expert")
    plan = b"\x00 a plan from another TensorRT"
    with open(path, "wb") as f:
        f.write(plan)
    meta = read_meta(meta_path(path))
    write_meta(meta_path(path), dataclasses.replace(meta, engine_sha256=hashlib.sha256(plan).hexdigest()))
    with pytest.raises(RuntimeError, match=r"action_expert\.engine \(stage 'action_expert'\): TensorRT could not "
                                           r"deserialize"):
        TensorRTBackend(manifest, model_dir, platform=gpu.platform)
    assert released(gpu)


@pytest.mark.parametrize("header, text", [
    ({"world": {"shapes": {"kv_0_k": [1, 4, 191, 16]}}},
     "output 'kv_0_k' has shape [1, 4, 191, 16] in the engine, the manifest says [1, 4, 192, 16]"),
    ({"action_expert": {"shapes": {"state": [-1, 29]}}}, "-1 is allowed only for an input with a profile"),
    ({"action_expert": {"dtypes": {"velocity": "bfloat16"}}},
     "output 'velocity' has dtype bfloat16 in the engine, the manifest says float32"),
    ({"world": {"drop": ["kv_1_v"]}}, "missing in engine: ['kv_1_v']"),
])
def test_engine_io_differing_from_manifest_is_refused(gpu, manifest, model_dir, header, text):
    write_engines(model_dir, manifest, gpu.platform, header=header)
    with pytest.raises(EngineMismatch) as info:
        TensorRTBackend(manifest, model_dir, platform=gpu.platform)
    assert text in str(info.value) and "rebuild with `wam-edge build`" in str(info.value)
    assert released(gpu)


def test_dynamic_axis_allowed_where_the_manifest_declares_a_profile(gpu, manifest, model_dir):
    write_engines(model_dir, manifest, gpu.platform, header={"action_expert": {"shapes": {"state": [-1, 29]}}})
    stage = manifest.stages[1]
    inputs = tuple(dataclasses.replace(t, profile=((1, 29), (1, 29), (4, 29)))
                   if t.name == "state" else t for t in stage.inputs)
    profiled = dataclasses.replace(manifest, stages=(manifest.stages[0], dataclasses.replace(stage, inputs=inputs)))
    with TensorRTBackend(profiled, model_dir, warmup_runs=1, platform=gpu.platform) as b:
        assert gpu.exec_contexts[1].shapes["state"] == (1, 29)
        conformance.test_run_fills_outputs_deterministically(b, profiled)


def test_version_compatible_engines_allow_host_code(gpu, manifest, model_dir):
    write_engines(model_dir, manifest, gpu.platform, builder_flags=("FP16", "VERSION_COMPATIBLE"))
    with TensorRTBackend(manifest, model_dir, warmup_runs=0, platform=gpu.platform):
        assert gpu.runtimes[-1].host_code_allowed_set


def test_plain_engines_do_not_allow_host_code(backend, gpu):
    assert not gpu.runtimes[-1].host_code_allowed_set


def test_version_compatible_engine_on_tensorrt_without_host_code_attribute(monkeypatch, manifest, model_dir):
    gpu = install(monkeypatch, FakeGpu(trt_version="8.6.1", host_code_attribute=False))
    write_engines(model_dir, manifest, TrtPlatform("8.6.0", gpu.gpu_name, "8.7"),
                  builder_flags=("VERSION_COMPATIBLE",))
    with pytest.raises(RuntimeError, match="VERSION_COMPATIBLE but TensorRT 8.6.1 cannot load"):
        TensorRTBackend(manifest, model_dir, platform=gpu.platform)
    assert released(gpu)


@pytest.mark.parametrize("kwargs, error, text", [
    ({"warmup_runs": -1}, ValueError, "warmup_runs must be an integer >= 0"),
    ({"warmup_runs": True}, ValueError, "warmup_runs must be an integer >= 0"),
    ({"warmup_runs": "3"}, ValueError, "warmup_runs must be an integer >= 0"),
    ({"cuda_graph": "yes"}, TypeError, "cuda_graph must be true or false"),
    ({"platform": ("10.3.0", "Orin", "8.7")}, TypeError, "platform must be a TrtPlatform"),
])
def test_bad_arguments(manifest, model_dir, kwargs, error, text):
    with pytest.raises(error, match=text):
        TensorRTBackend(manifest, model_dir, **kwargs)


def test_missing_model_dir(manifest, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TensorRTBackend(manifest, str(tmp_path / "nowhere"))


def test_fake_modules_are_gone_after_a_test():
    assert "tensorrt" not in sys.modules and "pycuda" not in sys.modules


# --- cuda_graph.py on its own ----------------------------------------------------------------

def test_libcuda_missing_is_a_clear_error():
    with pytest.raises(RuntimeError, match=r"cannot load libcuda-absent\.so\.1 \(the NVIDIA CUDA driver\) for CUDA "
                                           r"graphs: .*run without cuda_graph"):
        cuda_graph_module.load_driver("libcuda-absent.so.1")


def test_libcuda_on_this_machine_loads_or_fails_clearly():
    try:
        driver = cuda_graph_module.load_driver()
    except RuntimeError as exc:
        assert "cannot load libcuda.so.1" in str(exc)
    else:
        assert driver.error_name(1) == "CUDA_ERROR_INVALID_VALUE"


def test_graph_capture_ends_even_if_the_work_raises():
    gpu = FakeGpu()
    driver, lib = fake_driver(gpu)
    graph = cuda_graph_module.CudaGraph(driver)

    def boom():
        raise ValueError("enqueue failed")

    with pytest.raises(ValueError, match="enqueue failed"):
        graph.capture(0x5001, boom)
    assert lib.calls["cuStreamEndCapture"] == 1 and gpu.capturing is None
    assert lib.calls["cuGraphDestroy"] == 1 and not gpu.graphs and not graph.captured


def test_graph_calls_are_checked():
    gpu = FakeGpu()
    driver, lib = fake_driver(gpu, fail={"cuStreamBeginCapture_v2": 1})
    graph = cuda_graph_module.CudaGraph(driver)
    with pytest.raises(RuntimeError, match=r"cuStreamBeginCapture_v2 failed: CUresult 1 \(CUDA_ERROR_INVALID_VALUE\)"):
        graph.capture(0x5001, lambda: None)
    with pytest.raises(ValueError, match="default stream"):
        graph.capture(0, lambda: None)
    with pytest.raises(RuntimeError, match="nothing captured"):
        graph.launch(0x5001)
    graph.close()
    graph.close()


def test_graph_lifecycle():
    gpu = FakeGpu()
    driver, lib = fake_driver(gpu)
    graph = cuda_graph_module.CudaGraph(driver)
    graph.capture(0x5001, lambda: None)
    assert graph.captured
    with pytest.raises(RuntimeError, match="already captured"):
        graph.capture(0x5001, lambda: None)
    graph.launch(0x5001)
    graph.close()
    graph.close()
    assert not graph.captured and not gpu.graphs and not gpu.graph_execs
    assert lib.calls["cuGraphLaunch"] == 1 and lib.calls["cuGraphInstantiateWithFlags"] == 1


def test_driver_without_graph_api_is_refused():
    _, lib = fake_driver(FakeGpu())
    del lib.cuGraphInstantiateWithFlags  # CUDA 11.3 and older
    with pytest.raises(RuntimeError, match="no cuGraphInstantiateWithFlags: CUDA graphs need a CUDA driver >= 11.4"):
        cuda_graph_module.CudaDriver(lib)


# --- on a real GPU ---------------------------------------------------------------------------

def _real_gpu_missing():
    missing = [n for n in ("tensorrt", "pycuda") if importlib.util.find_spec(n) is None]
    if missing:
        return "needs TensorRT, pycuda and a GPU (missing: %s)" % ", ".join(missing)
    manifest = load_manifest(REFERENCE)
    absent = [s.name for s in manifest.stages if not os.path.isfile(engine_path(REFERENCE, s.name))]
    if absent:
        return "needs TensorRT, pycuda and a GPU, and engines for %s (`wam-edge build`)" % absent
    return None


@pytest.mark.skipif(_real_gpu_missing() is not None, reason=str(_real_gpu_missing()))
class TestOnRealGpu:
    @pytest.fixture(scope="class", params=[False, True], ids=["stream", "cuda_graph"])
    def real(self, request):
        manifest = load_manifest(REFERENCE)
        b = TensorRTBackend(manifest, REFERENCE, cuda_graph=request.param, warmup_runs=3)
        yield b, manifest
        b.close()

    def test_contract(self, real):
        backend, manifest = real
        conformance.test_host_buffers_stable_and_writable(backend, manifest)
        conformance.test_run_fills_outputs_deterministically(backend, manifest)
        conformance.test_no_allocation_growth(backend, manifest)
        conformance.test_run_group_equals_running_the_stages_one_by_one(backend, manifest)
        conformance.test_providers_and_describe(backend)

    def test_policy_close_to_ort_cpu(self, real):
        from runtime.policy.backends import create_backend

        backend, manifest = real
        reference = create_backend("onnxruntime", manifest, REFERENCE, intra_op_threads=1)
        try:
            want = policy_output(reference, manifest)
        finally:
            reference.close()
        tolerance = conformance.CASES["tensorrt"][1]  # FP16 engines
        np.testing.assert_allclose(policy_output(backend, manifest), want, rtol=0, atol=tolerance)
