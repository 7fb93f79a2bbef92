"""Policy: preprocessing, the stage sequence and the flow-matching loop.

The manifest says which stages exist and how tensors flow; the backend runs
them; this module owns everything the host computes between runs (camera and
state normalisation, noise, the sampler update, denormalisation, the finite
check). All buffers are allocated in __init__; infer() only writes into them.
"""

from __future__ import annotations

from time import perf_counter
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

from .backends import StageBackend, create_backend
from .errors import PolicyError, PolicyInputError
from .manifest import Manifest, SamplerSpec, load_manifest
from .preprocess import CameraPreprocessor, StateNormaliser
from .sampler import FlowMatchingSchedule


class Policy:
    """A loaded model ready to turn (images, state) into an action chunk.

    Not thread-safe: it owns one set of buffers, so one caller at a time."""

    def __init__(self, manifest: Manifest, backend: StageBackend, steps: Optional[int] = None,
                 shift: Optional[float] = None, seed: int = 0) -> None:
        self.manifest = manifest
        self.backend = backend
        base = manifest.sampler
        # Overrides are allowed even on distilled models (e.g. steps=4 to compare).
        self.sampler = SamplerSpec(type=base.type,
                                   steps=base.steps if steps is None else steps,
                                   shift=base.shift if shift is None else float(shift),
                                   distilled=base.distilled)
        self.schedule = FlowMatchingSchedule(self.sampler.steps, self.sampler.shift)
        self._seed = seed
        self._rng = np.random.default_rng(seed)

        self._once = tuple(s.name for s in manifest.stages if s.runs == "once")
        self._per_step = tuple(s.name for s in manifest.stages if s.runs == "per_step")
        host = self._host_buffers()
        self._cameras = tuple(CameraPreprocessor(c, host["camera:" + c.name][0])
                              for c in manifest.cameras)
        n_state = len(manifest.state.joints)
        state_bufs = host.get("state") or [np.zeros((1, n_state), np.float32)]
        self._state = StateNormaliser(manifest.state, state_bufs[0])
        self._state_mirrors = _mirrors(state_bufs)
        x_bufs = host["sampler:x"]
        self._x = x_bufs[0]
        self._x_mirrors = _mirrors(x_bufs)
        t_bufs = host.get("sampler:t") or [np.zeros((1,), np.float32)]
        self._t = t_bufs[0]
        self._t_mirrors = _mirrors(t_bufs)
        self._velocity = self._sink_buffer()

        shape = (manifest.horizon, manifest.action_dim)
        self._noise = np.zeros((1,) + shape, dtype=np.float32)
        self._actions = np.zeros(shape, dtype=np.float32)
        self._finite = np.zeros(shape, dtype=np.bool_)
        # Full (horizon, dims) stats: broadcast operands would make numpy buffer.
        self._action_mean = np.empty(shape, np.float32)
        self._action_mean[...] = np.asarray(manifest.action.mean, dtype=np.float32)
        self._action_std = np.empty(shape, np.float32)
        self._action_std[...] = np.asarray(manifest.action.std, dtype=np.float32)
        self.last_stage_ms: Dict[str, float] = {s.name: 0.0 for s in manifest.stages}
        self.last_preprocess_ms = 0.0

    def _host_buffers(self) -> Dict[str, List[np.ndarray]]:
        """Host source -> distinct backend buffers of its consumers."""
        out: Dict[str, List[np.ndarray]] = {}
        for stage in self.manifest.stages:
            for t in stage.inputs:
                src = t.source or ""
                if src in ("state", "sampler:x", "sampler:t") or src.startswith("camera:"):
                    buf = self.backend.host_input(stage.name, t.name)
                    bufs = out.setdefault(src, [])
                    if not any(b is buf for b in bufs):
                        bufs.append(buf)
        return out

    def _sink_buffer(self) -> np.ndarray:
        for stage in self.manifest.stages:
            for t in stage.outputs:
                if t.sink == "sampler:velocity":
                    return self.backend.host_output(stage.name, t.name)
        raise PolicyError("%s: no sampler:velocity sink" % self.manifest.path)  # validated

    # --- hot path ---------------------------------------------------------------

    def infer(self, images: Mapping[str, np.ndarray], state: np.ndarray) -> np.ndarray:
        """images: camera name -> HxWx3 uint8 RGB (any size); state: joint
        positions in manifest.state_joints order. Returns (horizon, action_dim)
        float32 absolute targets: a view of an internal buffer, overwritten by
        the next call. Raises PolicyError rather than return non-finite values."""
        start = perf_counter()
        if len(images) != len(self._cameras):
            self._check_camera_names(images)
        for cam in self._cameras:
            image = images.get(cam.spec.name)
            if image is None:
                self._check_camera_names(images)
            cam(image)  # type: ignore[arg-type]
        self._state(state)
        _copy_mirrors(self._state_mirrors)
        self._rng.standard_normal(out=self._noise, dtype=np.float32)
        self.last_preprocess_ms = (perf_counter() - start) * 1e3

        self._denoise()
        np.multiply(self._x[0], self._action_std, out=self._actions)
        np.add(self._actions, self._action_mean, out=self._actions)
        np.isfinite(self._actions, out=self._finite)
        if not self._finite.all():
            raise self._non_finite_error()
        return self._actions

    def _denoise(self) -> None:
        """x <- noise, run 'once' stages, then integrate the velocity field."""
        run = self.backend.run
        ms = self.last_stage_ms
        np.copyto(self._x, self._noise)
        _copy_mirrors(self._x_mirrors)
        for name in self._once:
            t0 = perf_counter()
            run(name)
            ms[name] = (perf_counter() - t0) * 1e3
        for name in self._per_step:
            ms[name] = 0.0
        times = self.schedule.times
        for i, delta in enumerate(self.schedule.deltas):
            self._t[0] = times[i]
            _copy_mirrors(self._t_mirrors)
            for name in self._per_step:
                t0 = perf_counter()
                run(name)
                ms[name] += (perf_counter() - t0) * 1e3
            # The velocity buffer is rewritten by the next run, so scale it in place.
            np.multiply(self._velocity, delta, out=self._velocity)
            np.add(self._x, self._velocity, out=self._x)
            _copy_mirrors(self._x_mirrors)

    # --- hooks and housekeeping ---------------------------------------------------

    def infer_normalised(self, camera_inputs: Mapping[str, np.ndarray], state: np.ndarray,
                         noise: np.ndarray) -> np.ndarray:
        """Run the stages on already-preprocessed inputs and given noise; returns
        the normalised actions (horizon, action_dim) (a view, like infer).

        camera_inputs: name -> (1, 3, h, w) float32 as preprocessing writes it;
        state: normalised, (1, n) or (n,); noise: (1, horizon, action_dim). Lets
        tests feed torch and the runtime bit-identical tensors."""
        for cam in self._cameras:
            _copy_exact(cam.out, camera_inputs[cam.spec.name], "camera %r input" % cam.spec.name)
        state = np.asarray(state)
        _copy_exact(self._state.out, state[None] if state.ndim == 1 else state, "state")
        _copy_mirrors(self._state_mirrors)
        _copy_exact(self._noise, noise, "noise")
        self._denoise()
        return self._x[0]

    def warmup(self, n: int = 2, frame_sizes: Optional[Mapping[str, Tuple[int, int]]] = None,
               images: Optional[Mapping[str, np.ndarray]] = None) -> None:
        """Run n inferences (first-run allocations, index arrays for the camera frames' sizes and layouts: pass a
        real frame's ``images`` to cover both, or ``frame_sizes``, default the model size), then reseed so warmup
        does not change the noise sequence."""
        if images is None:
            sizes = dict(frame_sizes or {})
            images = {c.name: np.zeros(tuple(sizes.get(c.name, (c.height, c.width))) + (3,), np.uint8)
                      for c in self.manifest.cameras}
        state = np.asarray(self.manifest.state.mean, dtype=np.float32)
        for _ in range(n):
            self.infer(images, state)
        self.reseed(self._seed)

    def reseed(self, seed: int) -> None:
        self._seed = seed
        self._rng = np.random.default_rng(seed)

    def describe(self) -> str:
        s = self.sampler
        return "%s: %d stages on %s; %s steps=%d shift=%g%s" % (
            self.manifest.name, len(self.manifest.stages), self.backend.describe(), s.type,
            s.steps, s.shift, " (distilled)" if s.distilled else "")

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "Policy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- errors (off the hot path) ----------------------------------------------------

    def _check_camera_names(self, images: Mapping[str, np.ndarray]) -> None:
        expected = self.manifest.camera_names
        for name in expected:
            if images.get(name) is None:
                raise PolicyInputError("missing image for camera %r (the model expects cameras: "
                                       "%s)" % (name, ", ".join(expected)))
        for name in images:
            if name not in expected:
                raise PolicyInputError("unknown camera %r (the model expects cameras: %s)"
                                       % (name, ", ".join(expected)))

    def _non_finite_error(self) -> PolicyError:
        bad = ~self._finite
        step, joint = (int(i) for i in np.argwhere(bad)[0])
        names = self.manifest.action.joints
        causes = []
        state = self._state.out[0]
        bad_state = [self.manifest.state.joints[i] for i in np.flatnonzero(~np.isfinite(state))]
        if bad_state:
            causes.append("state has non-finite values at joints %s" % bad_state)
        else:
            causes.append("inputs were finite, so a stage produced them")
        return PolicyError(
            "policy output has %d non-finite values of %d (first at step %d, joint %r); %s; "
            "the action chunk must not be sent" % (int(bad.sum()), bad.size, step, names[joint],
                                                    "; ".join(causes)))


def _mirrors(bufs: List[np.ndarray]) -> Tuple[Tuple[np.ndarray, np.ndarray], ...]:
    """(dst, src) pairs keeping extra consumers of one host source in sync
    (empty for ORT-CPU, where consumers share one buffer)."""
    return tuple((b, bufs[0]) for b in bufs[1:])


def _copy_mirrors(pairs: Tuple[Tuple[np.ndarray, np.ndarray], ...]) -> None:
    for dst, src in pairs:
        np.copyto(dst, src)


def _copy_exact(dst: np.ndarray, src: np.ndarray, what: str) -> None:
    src = np.asarray(src)
    if src.shape != dst.shape:
        raise PolicyInputError("%s: expected shape %s, got %s" % (what, dst.shape, src.shape))
    np.copyto(dst, src, casting="same_kind")


def load_policy(model_dir: str, backend: str = "onnxruntime", steps: Optional[int] = None,
                shift: Optional[float] = None, seed: int = 0, intra_op_threads: int = 1,
                verify_hashes: bool = True) -> Policy:
    """Validate <model_dir>/manifest.json and its files, load the stages on the
    named backend, and bind every buffer. steps/shift override the manifest."""
    manifest = load_manifest(model_dir, verify_hashes=verify_hashes)
    engine = create_backend(backend, manifest, model_dir, intra_op_threads=intra_op_threads)
    try:
        return Policy(manifest, engine, steps=steps, shift=shift, seed=seed)
    except BaseException:
        engine.close()
        raise
