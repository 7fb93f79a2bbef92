"""Policy: preprocessing, the stage sequence and the flow-matching loop.

The manifest says which stages exist and how tensors flow; the backend runs
them; this module owns everything the host computes between runs (camera and
state normalisation, noise, the sampler update, denormalisation, the finite
check). All buffers are allocated in __init__; infer() only writes into them.
"""

from __future__ import annotations

import logging
import math
from time import perf_counter
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from .backends import StageBackend, load_backend
from .errors import PolicyError, PolicyInputError
from .manifest import DEFAULT_CHANNEL_ORDER, Manifest, SamplerSpec, is_host_source, load_manifest
from .preprocess import CameraPreprocessor, StateNormaliser
from .sampler import FlowMatchingSchedule

log = logging.getLogger("wam_edge.policy")


class Policy:
    """A loaded model ready to turn (images, state) into an action chunk.

    Not thread-safe: it owns one set of buffers, so one caller at a time."""

    def __init__(self, manifest: Manifest, backend: StageBackend, steps: Optional[int] = None,
                 shift: Optional[float] = None, seed: int = 0) -> None:
        self.manifest = manifest
        self.backend = backend
        #: why this backend runs the stages ("requested", or what backend "auto" found)
        self.backend_reason = "requested"
        base = manifest.sampler
        # Overrides are allowed even on distilled models (e.g. steps=4 to compare).
        self.sampler = SamplerSpec(type=base.type,
                                   steps=base.steps if steps is None else steps,
                                   shift=base.shift if shift is None else float(shift),
                                   distilled=base.distilled)
        self.schedule = FlowMatchingSchedule(self.sampler.steps, self.sampler.shift)
        self._seed = seed
        self._rng = np.random.default_rng(seed)

        self._first_group, self._later_group = manifest.step_groups
        host = self._host_buffers()
        self._cameras = tuple(CameraPreprocessor(c, host["camera:" + c.name][0])
                              for c in manifest.cameras)
        _log_channel_orders(manifest)
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
        # Real-time chunking inside the model (manifest "rtc"): bound once, like the rest.
        self.supports_rtc = manifest.supports_rtc
        prefix_bufs = host.get("rtc:prefix") or [np.zeros((1,) + shape, np.float32)]
        self._rtc_prefix = prefix_bufs[0]
        self._rtc_prefix_mirrors = _mirrors(prefix_bufs)
        delay_bufs = host.get("rtc:delay") or [np.zeros((1,), np.float32)]
        self._rtc_delay = delay_bufs[0]
        self._rtc_delay_mirrors = _mirrors(delay_bufs)
        self._rtc_from_state = True  # until set_rtc gives an executing chunk: hold the current state
        self._rtc_state_idx = np.asarray(manifest.action_state_indices, dtype=np.intp)
        self._rtc_row = np.zeros((1, manifest.action_dim), np.float32)
        self.last_rtc_delay = 0
        # A backend that fuses groups (TensorRT with CUDA graphs) runs each denoising step as one group (the first
        # with the context stages): timed as a whole, under its stages' names joined by "+". Otherwise every stage
        # is timed on its own.
        self._fused = bool(backend.fuses_groups)
        self._first_key = "+".join(self._first_group)
        self._later_key = "+".join(self._later_group)
        if self._fused:
            keys = [self._first_key] + ([self._later_key] if self.sampler.steps > 1 else [])
        else:
            keys = [s.name for s in manifest.stages]
        self.last_stage_ms: Dict[str, float] = {k: 0.0 for k in keys}
        self.last_preprocess_ms = 0.0

    def _host_buffers(self) -> Dict[str, List[np.ndarray]]:
        """Host source -> distinct backend buffers of its consumers."""
        out: Dict[str, List[np.ndarray]] = {}
        for stage in self.manifest.stages:
            for t in stage.inputs:
                src = t.source or ""
                if is_host_source(src):
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
        """images: camera name -> HxWx3 uint8 RGB (any size), at least the
        manifest's cameras; other views (a camera layout names every view in
        the frame) are never read. state: joint positions in
        manifest.state_joints order. Returns (horizon, action_dim) float32
        absolute targets: a view of an internal buffer, overwritten by the next
        call. Raises PolicyError rather than return non-finite values."""
        start = perf_counter()
        for cam in self._cameras:
            image = images.get(cam.spec.name)
            if image is None:
                self._check_camera_names(images)
            cam(image)  # type: ignore[arg-type]
        self._state(state)
        _copy_mirrors(self._state_mirrors)
        if self._rtc_from_state and self.supports_rtc:
            self._rtc_prefix_from_state(state)
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
        """x <- noise, then integrate the velocity field: each step sets t and runs its stage group (the first
        step's includes the context stages)."""
        run = self.backend.run
        ms = self.last_stage_ms
        for key in ms:
            ms[key] = 0.0
        np.copyto(self._x, self._noise)
        _copy_mirrors(self._x_mirrors)
        times = self.schedule.times
        for i, delta in enumerate(self.schedule.deltas):
            self._t[0] = times[i]
            _copy_mirrors(self._t_mirrors)
            group = self._first_group if i == 0 else self._later_group
            if self._fused:  # one launch for the whole step
                t0 = perf_counter()
                self.backend.run_group(group)
                ms[self._first_key if i == 0 else self._later_key] += (perf_counter() - t0) * 1e3
            else:
                for name in group:
                    t0 = perf_counter()
                    run(name)
                    ms[name] += (perf_counter() - t0) * 1e3
            # The velocity buffer is rewritten by the next run, so scale it in place.
            np.multiply(self._velocity, delta, out=self._velocity)
            np.add(self._x, self._velocity, out=self._x)
            _copy_mirrors(self._x_mirrors)

    # --- real-time chunking inside the model ------------------------------------------

    def set_rtc(self, prefix_actions_absolute: Optional[np.ndarray], delay_steps: int) -> None:
        """Hand the model the executing chunk before the next infer() (manifest "rtc").

        prefix_actions_absolute: (k, action_dim), k >= 1, absolute targets of the
        executing chunk from the new chunk's start time on (row 0 = the action
        due when the new chunk's first action is due; if the executing chunk has
        already ended, pass its last action, k = 1). They are normalised with the
        action mean/std into rtc:prefix (1, horizon, action_dim); rows past
        the executing chunk's end (k < horizon) repeat its LAST action, never
        zeros (zero in normalised space is the dataset mean: a jump).
        None: nothing is executing (first inference, or after a reset): the
        prefix is the robot's current joint positions (from the state infer()
        gets; action joints are validated to be among the state joints), every
        row, and the delay is 0 whatever delay_steps says.
        delay_steps: how many of the new chunk's actions will have passed when
        it arrives; clipped to [0, horizon]; written to rtc:delay.
        The values stay until the next set_rtc. No allocation beyond views."""
        if not self.supports_rtc:
            raise PolicyError("%s: the model does not declare rtc prefix support; set_rtc has "
                              "nowhere to go" % self.manifest.path)
        if prefix_actions_absolute is None:
            self._rtc_from_state = True
            delay = 0
        else:
            prefix = prefix_actions_absolute
            if prefix.ndim != 2 or prefix.shape[1] != self.manifest.action_dim or prefix.shape[0] < 1:
                raise PolicyInputError("rtc prefix: expected shape (k >= 1, %d), got %s"
                                       % (self.manifest.action_dim, prefix.shape))
            write_rtc_prefix(self._rtc_prefix[0], prefix, self._action_mean, self._action_std)
            _copy_mirrors(self._rtc_prefix_mirrors)
            self._rtc_from_state = False
            delay = min(max(int(delay_steps), 0), self.manifest.horizon)
        self._rtc_delay[0] = delay
        _copy_mirrors(self._rtc_delay_mirrors)
        self.last_rtc_delay = delay

    def _rtc_prefix_from_state(self, state: np.ndarray) -> None:
        np.take(state, self._rtc_state_idx, out=self._rtc_row[0])
        write_rtc_prefix(self._rtc_prefix[0], self._rtc_row, self._action_mean, self._action_std)
        _copy_mirrors(self._rtc_prefix_mirrors)

    @property
    def rtc_prefix(self) -> np.ndarray:
        """The normalised rtc:prefix buffer (1, horizon, action_dim) as the model sees it."""
        return self._rtc_prefix

    @property
    def rtc_delay(self) -> np.ndarray:
        """The rtc:delay buffer (1,) as the model sees it."""
        return self._rtc_delay

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
        chosen = "" if self.backend_reason == "requested" else " [auto: %s]" % self.backend_reason
        return "%s: %d stages on %s%s; %s steps=%d shift=%g%s" % (
            self.manifest.name, len(self.manifest.stages), self.backend.describe(), chosen, s.type,
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
                raise PolicyInputError("missing image for camera %r (the model expects cameras: %s; got %s)"
                                       % (name, ", ".join(expected), ", ".join(images) or "none"))

    def _non_finite_error(self) -> PolicyError:
        bad = ~self._finite
        step, joint = (int(i) for i in np.argwhere(bad)[0])
        names = self.manifest.action.joints
        state = self._state.out[0]
        bad_state = [self.manifest.state.joints[i] for i in np.flatnonzero(~np.isfinite(state))]
        if bad_state:
            cause = "state has non-finite values at joints %s" % bad_state
        else:
            cause = self._non_finite_stage()
        return PolicyError(
            "policy output has %d non-finite values of %d (first at step %d, joint %r); %s; "
            "the action chunk must not be sent" % (int(bad.sum()), bad.size, step, names[joint], cause))

    def _non_finite_stage(self) -> str:
        """With finite inputs: the first stage, in the order the first step runs them, with a non-finite output in
        the buffers the backend already holds on the host (the last run's; outputs a GPU backend keeps on the
        device cannot be looked at). Only on the error path: the hot path checks the final actions alone."""
        unseen: List[str] = []  # stages with an output on the device, in run order
        for name in self._first_group:
            for t in self.manifest.stage(name).outputs:
                try:
                    buf = self.backend.host_output(name, t.name)
                except KeyError:  # stays on the device
                    if name not in unseen:
                        unseen.append(name)
                    continue
                n = int(buf.size - np.count_nonzero(np.isfinite(buf)))
                if not n:
                    continue
                earlier = [u for u in unseen if u != name]
                if earlier:  # they may have started it: say so rather than blame the first one we can see
                    return ("inputs were finite; the first non-finite output the host can see is stage %r output %r "
                            "(%d of %d; stages %s before it keep their outputs on the device)"
                            % (name, t.name, n, buf.size, earlier))
                return "inputs were finite; stage %r produced them (output %r: %d of %d non-finite)" % (
                    name, t.name, n, buf.size)
        if unseen:
            return "inputs were finite; one of the stages %s produced them (their outputs stay on the device)" % (
                unseen,)
        return "inputs and every stage output were finite: the sampler's update or the action scaling overflowed"


def _log_channel_orders(manifest: Manifest) -> None:
    """Which channel order each camera input gets; a warning where the manifest does not say (an older export)."""
    log.info("camera inputs of model %s: %s", manifest.name,
             ", ".join("%s (%s)" % (c.name, c.channel_order) for c in manifest.cameras))
    unstated = [c.name for c in manifest.cameras if not c.channel_order_stated]
    if unstated:
        log.warning("%s states no channel_order for camera%s %s: read as %s, the order this runtime always fed; if "
                    "the model was trained on BGR frames, re-export it with --channel-order NAME=bgr",
                    manifest.path, "s" if len(unstated) > 1 else "", ", ".join(unstated), DEFAULT_CHANNEL_ORDER)


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


def write_rtc_prefix(out: np.ndarray, prefix: np.ndarray, mean: np.ndarray, std: np.ndarray) -> None:
    """out (H, D) <- (prefix - mean) / std for the first min(k, H) rows of prefix
    (k, D), k >= 1; rows after that repeat the last normalised row of prefix
    (the executing chunk's last action), never zeros. mean/std: (H, D)."""
    n = min(prefix.shape[0], out.shape[0])
    head = out[:n]
    np.subtract(prefix[:n], mean[:n], out=head)
    np.divide(head, std[:n], out=head)
    if n < out.shape[0]:
        # the padding is the last action normalised with each row's own stats
        # (identical per-row stats today, but stay exact if they ever differ)
        tail = out[n:]
        np.subtract(prefix[n - 1], mean[n:], out=tail)
        np.divide(tail, std[n:], out=tail)


def rtc_offset(chunk_start: float, new_start: float, step_s: float, horizon: int) -> int:
    """Index in the executing chunk (action i due at chunk_start + i * step_s)
    of the action due when the new chunk (starting at new_start) starts: the
    nearest step, clipped to [0, horizon - 1] (past the end: the last action)."""
    i = int(math.floor((new_start - chunk_start) / step_s + 0.5))
    return min(max(i, 0), horizon - 1)


def rtc_delay(latency_s: Optional[float], step_s: float, horizon: int) -> int:
    """Actions of the new chunk that pass while it is computed: latency / step_s
    rounded up (a 1e-9 tolerance keeps exact multiples exact), clipped to
    [0, horizon]; 0 while there is no latency estimate yet."""
    if latency_s is None or not latency_s > 0.0:
        return 0
    return min(max(int(math.ceil(latency_s / step_s - 1e-9)), 0), horizon)


def load_policy(model_dir: str, backend: str = "onnxruntime", steps: Optional[int] = None,
                shift: Optional[float] = None, seed: int = 0, intra_op_threads: int = 1,
                verify_hashes: bool = True, options: Optional[Mapping[str, Any]] = None) -> Policy:
    """Validate <model_dir>/manifest.json and its files, load the stages on the
    named backend, and bind every buffer. steps/shift override the manifest.
    backend "auto" picks one (see backends.select_backend; one that fails to load
    gives way to the next); the choice and its reason are logged and kept in
    Policy.backend_reason. options: the model config section (cache_dir resolved),
    mapped to the backend's constructor by backends.backend_options; its
    intra_op_threads wins over the keyword."""
    manifest = load_manifest(model_dir, verify_hashes=verify_hashes)
    merged: Dict[str, Any] = {"intra_op_threads": intra_op_threads}
    merged.update(options or {})
    engine, reason = load_backend(manifest, model_dir, backend, merged)
    log.info("policy backend %s for %s (asked: %s): %s; running on %s", engine.name, model_dir, backend, reason,
             engine.describe())
    try:
        policy = Policy(manifest, engine, steps=steps, shift=shift, seed=seed)
        policy.backend_reason = reason
        return policy
    except BaseException:
        engine.close()
        raise
