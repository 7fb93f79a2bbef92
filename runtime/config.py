"""config.yaml: one file, one schema. Unknown keys, wrong types and out-of-range values stop start-up.

The schema below holds every key with its type, range and default; config.yaml at the repository root is the embedded
default written out with a comment per key (a test keeps the two identical). A user's file may set any subset; the
rest comes from the schema. ``--set section.key=value`` overrides any key after the file, checked the same way.
"""

from __future__ import annotations

import copy
import ipaddress
import os
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import yaml

from runtime.robot.remote import BUTTONS as REMOTE_BUTTONS
from runtime.service import paths


class ConfigError(ValueError):
    """A configuration problem; the message names the file (or --set) and the key."""


class Key:
    """One leaf of the schema."""

    def __init__(self, default: Any, kind: type, doc: str, lo: Optional[float] = None, hi: Optional[float] = None,
                 choices: Optional[Sequence[Any]] = None, check: Optional[Callable[[Any], Any]] = None,
                 dirs: bool = False) -> None:
        self.default = default
        self.kind = kind
        self.doc = doc
        self.lo = lo
        self.hi = hi
        self.choices = tuple(choices) if choices else None
        self.check = check
        self.dirs = dirs  # may hold {runtime_dir} / {state_dir}, expanded at load

    def validate(self, value: Any, where: str) -> Any:
        kind = self.kind
        if kind is float and type(value) is int:
            value = float(value)
        if kind is not bool and type(value) is bool or not isinstance(value, kind):
            raise ConfigError(f"{where}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(self.choices)}")
        if self.lo is not None and value < self.lo or self.hi is not None and value > self.hi:
            raise ConfigError(f"{where}: {value!r} is outside [{self.lo}, {self.hi}]")
        if self.check is not None:
            try:
                value = self.check(value)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{where}: {exc}") from None
        return value


def _layout(value: Any) -> List[Dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise ValueError("expected a non-empty list of {name, width}")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or set(item) != {"name", "width"}:
            raise ValueError(f"item {i}: expected exactly the keys name and width, got {item!r}")
        name, width = item["name"], item["width"]
        if not isinstance(name, str) or not name or type(width) is not int or not 8 <= width <= 8192:
            raise ValueError(f"item {i}: name must be a string and width an int in [8, 8192], got {item!r}")
        out.append({"name": name, "width": width})
    names = [c["name"] for c in out]
    if len(set(names)) != len(names):
        raise ValueError(f"camera names repeat: {names}")
    return out


def _ipc(value: str) -> str:
    """An ipc:// endpoint whose socket is a file: abstract sockets (``ipc://@name``) have no permissions at all."""
    path = value[len("ipc://"):]
    if not path:
        raise ValueError(f"{value!r}: no path after ipc://")
    if path.startswith("@"):
        raise ValueError(f"{value!r} is an abstract socket: any local user can connect to it (it has no file "
                         "permissions); use a path in a private directory, e.g. ipc://{runtime_dir}/name")
    if not paths.expand(path, {paths.RUNTIME_DIR: "/", paths.STATE_DIR: "/"}).startswith("/"):
        raise ValueError(f"{value!r}: the socket's path must be absolute (each process would resolve a relative one "
                         "against its own working directory)")
    return value


def _endpoint(value: str) -> str:
    """What wam-edge's own processes bind (the robot's links and control sockets): ipc:// with a path only. tcp has
    no authentication: any local user could connect, send chunks or operator commands, and a peer could pose as a
    controller that is down; an ipc socket's directory is private (mode 0700) instead, checked when it is bound."""
    if value.startswith("ipc://"):
        return _ipc(value)
    if value.startswith("tcp://"):
        raise ValueError(f"{value!r}: no authentication on tcp (any local user could connect, and a link across "
                         "machines even more so); use ipc in a protected directory, e.g. ipc://{runtime_dir}/name")
    raise ValueError(f"{value!r} is not an ipc:// endpoint")


def _loopback_endpoint(value: str) -> str:
    """What a stand-in publisher binds (the image server simulation: pictures only, it commands nothing): ipc with a
    path, or tcp on a loopback address; never a network interface."""
    if value.startswith("ipc://"):
        return _ipc(value)
    if value.startswith("tcp://"):
        host = value[6:].rsplit(":", 1)[0].strip("[]")
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if loopback:
            return value
        raise ValueError(f"{value!r} leaves this machine: bind to a loopback address (127.0.0.1) or ipc")
    raise ValueError(f"{value!r} is not an ipc:// or tcp:// endpoint")


#: Wireless remote button names, in bit order (runtime/robot/remote.py holds the bits).
BUTTONS = tuple(sorted(REMOTE_BUTTONS, key=REMOTE_BUTTONS.__getitem__))


def _combo(value: Any) -> List[str]:
    if not isinstance(value, list) or not 1 <= len(value) <= 4 or not all(b in BUTTONS for b in value):
        raise ValueError(f"expected a list of 1-4 buttons from {list(BUTTONS)}, got {value!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"buttons repeat in {value!r}")
    return list(value)


def _tasks(value: Any) -> List[str]:
    if not isinstance(value, list) or not value or not all(isinstance(t, str) and 0 < len(t) <= 256 for t in value):
        raise ValueError("expected a non-empty list of instructions (strings of 1-256 characters)")
    return list(value)


def _latency_text(value: Any) -> str:
    """A number (seconds) or a string in policy.inject_latency's grammar (checked in full where it is used)."""
    if type(value) in (int, float):
        return repr(float(value))
    if not isinstance(value, str):
        raise ValueError(f"expected seconds, a percentage or a distribution, got {type(value).__name__} {value!r}")
    from runtime.policy.latency import parse_latency

    try:  # the grammar, at load (a percentage is resolved against the model's chunk later)
        parse_latency(value, 1.0)
    except ValueError as exc:
        raise ValueError(str(exc).replace("policy.inject_latency: ", "", 1)) from None
    return value


def _nonempty(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


#: model.gpu_providers: ONNX Runtime's GPU execution providers by their short names
GPU_PROVIDERS = ("tensorrt", "cuda")


def _gpu_providers(value: Any) -> List[str]:
    if not value or not all(isinstance(p, str) and p in GPU_PROVIDERS for p in value):
        raise ValueError(f"expected a non-empty list from {list(GPU_PROVIDERS)}, got {value!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"providers repeat in {value!r}")
    return list(value)


def _any_endpoint(value: str) -> str:
    """A peer we only subscribe to (a camera on the robot's network): any tcp address, or ipc with a path."""
    if value.startswith("ipc://"):
        return _ipc(value)
    if value.startswith("tcp://") and len(value) > 6:
        return value
    raise ValueError(f"{value!r} is not an ipc:// or tcp:// endpoint")


SCHEMA: Dict[str, Dict[str, Key]] = {
    "model": {
        "path": Key("exported/reference", str, "model directory holding manifest.json (relative to this file)"),
        "backend": Key("onnxruntime", str, "inference backend: onnxruntime (CPU; laptops) | onnxruntime-gpu (ONNX "
                       "Runtime's TensorRT and CUDA providers, model.gpu_providers) | tensorrt (the engines `wam-edge "
                       "build` wrote beside the model) | auto: tensorrt when every stage has a matching "
                       "<stage>.engine that loads, else onnxruntime-gpu when ONNX Runtime lists a GPU provider, else "
                       "onnxruntime; the choice and why are logged",
                       choices=("auto", "onnxruntime", "onnxruntime-gpu", "tensorrt")),
        "intra_op_threads": Key(1, int, "threads ONNX Runtime may use inside one operator", lo=1, hi=64),
        "verify_hashes": Key(True, bool, "check each stage file's sha256 against the manifest at load"),
        "cache_dir": Key("cache", str, "onnxruntime-gpu: TensorRT engine and timing caches go to <cache_dir>/ort-trt "
                         "(relative to this file; engines per stage and ONNX hash, so new weights never reuse an "
                         "old engine); without them each start builds the engines again (minutes). Delete it when "
                         "ONNX Runtime, TensorRT or the GPU change", check=_nonempty),
        "fp16": Key(True, bool, "onnxruntime-gpu: let ONNX Runtime's TensorRT provider build FP16 kernels"),
        "gpu_providers": Key(["tensorrt", "cuda"], list, "onnxruntime-gpu: execution providers in priority order, "
                             "from tensorrt, cuda (those ONNX Runtime does not list are skipped; nodes a provider "
                             "cannot run fall to the next, then to the CPU)", check=_gpu_providers),
        "cuda_graph": Key(False, bool, "tensorrt: replay each denoising step (its copies in, "
                          "its engines, the velocity out) as one captured CUDA graph launch (fixed shapes and "
                          "buffers; less launch overhead; stages are then timed per step)"),
    },
    "policy": {
        "steps": Key(0, int, "sampler steps; 0 takes the manifest's (1 for a distilled model)", lo=0, hi=100),
        "shift": Key(0.0, float, "flow-matching schedule shift; 0 takes the manifest's", lo=0.0, hi=100.0),
        "seed": Key(0, int, "seed of the sampler's noise", lo=0, hi=2**31 - 1),
        "rate_hz": Key(5.0, float, "how often a new action chunk is computed", lo=0.1, hi=100.0),
        "frame_max_age_s": Key(0.5, float, "a frame older than this is not used; the runtime waits for a newer one",
                               lo=0.01, hi=10.0),
        "state_max_age_s": Key(0.2, float, "robot state older than this is not used", lo=0.005, hi=10.0),
        "warmup_runs": Key(2, int, "inferences run before the loop starts (first runs are slow)", lo=0, hi=100),
        "frame_fault_s": Key(1.0, float, "no fresh frame for this long: the runtime reports a fault", lo=0.05,
                             hi=30.0),
        "trigger": Key("latency", str, "when to compute the next chunk: latency = when the executing chunk's "
                       "remaining actions last no longer than the measured inference latency (running percentile) "
                       "plus policy.trigger_margin_s, at most policy.rate_hz | fixed = at policy.rate_hz",
                       choices=("latency", "fixed")),
        "trigger_margin_s": Key(0.05, float, "trigger = latency: extra time left in the executing chunk when the next "
                                "inference starts", lo=0.0, hi=10.0),
        "latency_percentile": Key(95.0, float, "trigger = latency: the percentile of recent inference latencies "
                                  "taken as the latency", lo=50.0, hi=100.0),
        "latency_window": Key(50, int, "trigger = latency: how many recent inferences the percentile covers",
                              lo=1, hi=10000),
        "cold_runs": Key(2, int, "trigger = latency: the first inferences after start-up, left out of the percentile "
                         "(cold caches, lazy allocation)", lo=0, hi=100),
        "inject_latency": Key("", object, "benchmarks and rigs only: extra inference latency, e.g. 0.35 (s), 80% (of "
                              "a chunk's duration), uniform(0.1,0.35), normal(0.3,0.05); empty = none",
                              check=_latency_text),
        "max_in_flight": Key(1, int, "inferences whose chunks may be pending at once; > 1 only overlaps injected "
                             "latency (policy.inject_latency): the model itself still runs one inference at a time",
                             lo=1, hi=16),
        "max_inference_s": Key(1.0, float, "an inference longer than this is an overrun: its chunk is not sent "
                               "and the runtime reports a fault", lo=0.001, hi=30.0),
    },
    "camera": {
        "source": Key("synthetic", str, "synthetic | replay | image_server (Unitree's JPEG server) | raw_zmq | v4l2",
                      choices=("synthetic", "replay", "image_server", "raw_zmq", "v4l2")),
        "fps": Key(30.0, float, "frame rate of the synthetic and replay sources; requested rate for v4l2",
                   lo=0.1, hi=240.0),
        "height": Key(480, int, "image height of every camera in the layout", lo=8, hi=4096),
        "layout": Key([{"name": "head", "width": 640}, {"name": "left_wrist", "width": 640},
                       {"name": "right_wrist", "width": 640}], list,
                      "every view in the frame, left to right, as Unitree's image server sends them; the model "
                      "takes those its manifest names, the rest are ignored", check=_layout),
        "endpoint": Key("tcp://127.0.0.1:5555", str, "image_server / raw_zmq publisher to subscribe to",
                        check=_any_endpoint),
        "header": Key("auto", str, "image server test-mode header: auto (one iff a JPEG starts at byte 12) | none "
                      "| timestamp_id (12 bytes)",
                      choices=("auto", "none", "timestamp_id")),
        "replay_path": Key("", str, "replay: directory of side-by-side JPEG frames (relative to this file)"),
        "replay_loop": Key(True, bool, "replay: start again at the end"),
        "v4l2_device": Key("/dev/video0", str, "v4l2: device(s), comma-separated, one per layout camera"),
        "seed": Key(0, int, "synthetic: seed of the moving scene", lo=0, hi=2**31 - 1),
    },
    "transport": {
        "chunks": Key("ipc://{runtime_dir}/chunks", str,
                      "controller binds, runtime connects: action chunks and heartbeats (ipc only: the socket's "
                      "directory must be private)", check=_endpoint, dirs=True),
        "state": Key("ipc://{runtime_dir}/state", str,
                     "controller binds, runtime subscribes: robot state (newest wins)", check=_endpoint, dirs=True),
        "control": Key("ipc://{runtime_dir}/control", str,
                       "controller binds: operator commands (wam-edge arm / stop / estop / clear-estop / status)",
                       check=_endpoint, dirs=True),
        "send_hwm": Key(2, int, "messages queued toward a slow or absent peer before new ones are dropped",
                        lo=1, hi=100),
        "heartbeat_hz": Key(10.0, float, "runtime heartbeat rate", lo=0.5, hi=200.0),
        "max_message_bytes": Key(1 << 20, int, "larger messages are dropped unread", lo=1024, hi=1 << 26),
    },
    "controller": {
        "driver": Key("sim", str, "sim: the simulated G1 inside this process | dds: a G1 (or `wam-edge sim`) over DDS",
                      choices=("sim", "dds")),
        "mode": Key("arm_sdk", str, "arm_sdk: waist + arms, Unitree's controller balances the legs | lowcmd: full "
                    "body, robot in debug mode", choices=("arm_sdk", "lowcmd")),
        "rate_hz": Key(500.0, float, "control rate: targets interpolated between action steps at this rate",
                       lo=10.0, hi=2000.0),
        "state_publish_hz": Key(100.0, float, "how often the robot state is published to the runtime",
                                lo=1.0, hi=1000.0),
        "max_velocity": Key(2.0, float, "rad/s: no commanded joint moves faster than this", lo=0.01, hi=10.0),
        "seam": Key("crossfade", str, "how a new chunk takes over from the executing one: replace (at once; the "
                    "limiter bounds the step) | crossfade (over controller.crossfade_s) | ensemble (ACT: weighted mean "
                    "of every live chunk's action for now, weights exp(-m i), i = 0 the oldest)",
                    choices=("replace", "crossfade", "ensemble")),
        "crossfade_s": Key(0.1, float, "seam = crossfade: how long the executing chunk hands over to the new one",
                           lo=0.0, hi=5.0),
        "ensemble_m": Key(0.01, float, "seam = ensemble: ACT's weight decay m in exp(-m i)", lo=0.0, hi=10.0),
        "ensemble_chunks": Key(4, int, "seam = ensemble: at most this many chunks take part", lo=1, hi=16),
        "position_margin": Key(0.05, float, "rad kept inside each joint's position limits", lo=0.0, hi=0.5),
        "arm_ramp_s": Key(1.0, float, "arming: arm_sdk weight (or lowcmd gains) ramp from 0 to 1 over this long",
                          lo=0.0, hi=30.0),
        "chunk_timeout_s": Key(0.5, float, "no valid chunk for this long while running: hold the last targets",
                               lo=0.01, hi=10.0),
        "hold_s": Key(0.5, float, "how long to hold before stopping when chunks do not resume", lo=0.0, hi=30.0),
        "stop_ramp_s": Key(2.0, float, "arm_sdk stop: the weight ramps from 1 to 0 over this long (the robot keeps "
                           "standing)", lo=0.05, hi=30.0),
        "estop_ramp_s": Key(0.3, float, "arm_sdk e-stop or lost robot state: the faster weight ramp to 0",
                            lo=0.0, hi=5.0),
        "hold_before_damp_s": Key(0.5, float, "lowcmd stop: hold the current pose this long, then damp",
                                  lo=0.0, hi=30.0),
        "damping_kd": Key(8.0, float, "lowcmd damping after a stop: kp 0, this kd, re-sent continuously",
                          lo=0.0, hi=50.0),
        "max_chunk_age_s": Key(1.0, float, "a chunk answering a robot state older than this is rejected",
                               lo=0.01, hi=10.0),
        "max_first_step": Key(0.3, float, "rad: a chunk whose current action is farther than this from the "
                              "commanded pose is rejected (the first chunk after arming is approached instead)",
                              lo=0.01, hi=3.0),
        "approach_velocity": Key(0.5, float, "rad/s: after arming, each joint moves to the pose the policy starts "
                                 "from (the manifest's start_pose, else the first chunk's current action) at most "
                                 "this fast (and never above max_velocity)", lo=0.01, hi=10.0),
        "approach_tolerance": Key(0.1, float, "rad: the approach is done once the commanded pose is at the start "
                                  "pose and every measured joint it moves is within this of it", lo=0.005, hi=1.0),
        "approach_timeout_s": Key(10.0, float, "an approach not done within this long stops the robot (allow the "
                                  "farthest joint's distance / approach_velocity, and more)", lo=0.5, hi=120.0),
        "max_rejections": Key(3, int, "this many rejected chunks in a row stop the robot", lo=1, hi=1000),
        "state_timeout_s": Key(0.1, float, "robot state older than this stops the robot at once (never command "
                               "on stale state)", lo=0.005, hi=5.0),
        "heartbeat_timeout_s": Key(1.0, float, "no policy heartbeat for this long while running: hold",
                                   lo=0.05, hi=30.0),
        "max_joint_velocity": Key(6.0, float, "rad/s measured on any joint: stop", lo=0.1, hi=30.0),
        "max_tilt": Key(0.8, float, "rad of IMU roll or pitch: stop at once (the robot is falling)", lo=0.05,
                        hi=1.5),
        "max_temperature": Key(100.0, float, "deg C winding temperature on any joint: stop", lo=20.0, hi=150.0),
        "max_missed_ticks": Key(10, int, "this many late control ticks in a row stop the robot", lo=1, hi=10000),
        "max_tick_gap_s": Key(0.25, float, "the control loop stalled this long between two ticks (a paused or "
                              "starved process): stop at once when it runs again", lo=0.005, hi=5.0),
        "latch_file": Key("{state_dir}/estop.latched", str, "an e-stop is written here (synced to disk) and "
                          "survives restarts and reboots until a person clears it; the controller refuses to start "
                          "when it cannot write it", check=_nonempty, dirs=True),
        "command_record": Key("{state_dir}/controller.record", str, "the last command, memory-mapped and "
                              "updated every tick: a controller restarted after a crash ramps the robot out from "
                              "there instead of leaving it on its last command, and one whose last state was an "
                              "e-stop comes up e-stopped; empty disables", dirs=True),
        "release_motion_control": Key(False, bool, "lowcmd over DDS: release Unitree's motion controller at start "
                                      "through unitree_sdk2py's motion switcher, where it is installed (else the "
                                      "operator does it with the remote: zero-torque mode, then L2+R2)"),
        "tasks": Key(["pick up the cup"], list, "task instructions the remote cycles through", check=_tasks),
    },
    "remote": {
        "arm": Key(["L1", "A"], list, "buttons held together to arm (held for remote.hold_s)", check=_combo),
        "stop": Key(["B"], list, "buttons that stop (not latched)", check=_combo),
        "estop": Key(["select"], list, "buttons that e-stop (latched until cleared)", check=_combo),
        "clear_estop": Key(["L1", "R1", "X"], list, "buttons held to clear a latched e-stop (held for "
                           "remote.hold_s)", check=_combo),
        "next_task": Key(["right"], list, "buttons that select the next task instruction", check=_combo),
        "prev_task": Key(["left"], list, "buttons that select the previous task instruction", check=_combo),
        "hold_s": Key(0.5, float, "how long arm and clear_estop must be held", lo=0.0, hi=5.0),
    },
    "dds": {
        "domain_id": Key(0, int, "DDS domain: 0 on the robot, 1 for unitree_mujoco", lo=0, hi=232),
        "interface": Key("", str, "network interface to the robot (e.g. eth0); empty lets CycloneDDS choose; "
                         "lo for a simulation on this machine"),
        "lowstate_crc": Key("check", str, "check: a robot state (LowState) whose CRC does not match is refused, as "
                            "Unitree's C++ SDK does (it counts as missing state: controller.state_timeout_s stops "
                            "the robot) | ignore: used unchecked, for simulators that leave the crc 0 "
                            "(unitree_mujoco); logged as a warning at start", choices=("check", "ignore")),
    },
    "sim": {
        "time_constant_s": Key(0.03, float, "simulated G1: first-order response time of each joint", lo=0.001,
                               hi=5.0),
        "initial_pose": Key("nominal", str, "simulated G1 starts at: nominal (arms slightly bent) | zero",
                            choices=("nominal", "zero")),
        "rate_hz": Key(500.0, float, "`wam-edge sim`: rt/lowstate publishing rate", lo=10.0, hi=2000.0),
        "mode_machine": Key(5, int, "`wam-edge sim`: the robot variant id it reports (controllers echo it)",
                            lo=0, hi=255),
        "control": Key("ipc://{runtime_dir}/sim", str, "`wam-edge sim`: fault-injection socket (press buttons, "
                       "tilt, heat, freeze the state stream)", check=_endpoint, dirs=True),
    },
    "faults": {
        "enabled": Key(False, bool, "test rigs only: the policy runtime obeys fault-injection requests from "
                       "`wam-edge hil` on faults.endpoint (frozen camera, NaN or out-of-limit actions, overruns)"),
        "endpoint": Key("ipc://{runtime_dir}/faults", str, "where the policy runtime binds its fault-injection "
                        "socket when faults.enabled", check=_endpoint, dirs=True),
    },
    "hil": {
        "robot": Key("sim", str, "sim: `wam-edge hil` starts `wam-edge sim` and injects robot faults through it | "
                     "stand: a real G1 on a stand (or a simulator started elsewhere): scenarios that need the "
                     "simulated robot are skipped", choices=("sim", "stand")),
        "settle_s": Key(1.0, float, "each trial runs the policy this long after arming before the fault",
                        lo=0.1, hi=60.0),
        "observe_s": Key(1.0, float, "after the robot is safe, watch the wire this long more: nothing may move",
                         lo=0.1, hi=60.0),
        "restart_bound_s": Key(10.0, float, "a killed controller restarted by the harness must command the robot "
                               "safe within this long of the kill", lo=0.5, hi=120.0),
        "rerun_starved": Key(3, int, "a trial during which the rig itself starved (the simulated G1 or the harness's "
                             "wire monitor late by more than the bound it threatens, docs/hil.md) is reported invalid "
                             "and rerun, at most this many times; then the run fails as a rig fault", lo=0, hi=100),
        "stall_s": Key(0.5, float, "stall_controller: how long the controller is paused (SIGSTOP .. SIGCONT); "
                       "longer than controller.max_tick_gap_s", lo=0.05, hi=30.0),
    },
    "demo": {
        "seconds": Key(10.0, float, "how long `wam-edge demo` runs the loop", lo=1.0, hi=3600.0),
        "startup_timeout_s": Key(60.0, float, "how long to wait for both processes to be ready", lo=1.0, hi=600.0),
        "scheduling": Key("units", str, "`wam-edge demo`, `bench` and `hil` start the controller, the simulated G1 and "
                          "the runtime with the scheduling of their systemd units where the OS permits (units: "
                          "controller SCHED_FIFO 80 on its own core, memory locked; simulated G1 SCHED_FIFO 70; "
                          "runtime nice -5) and report what each got | none: as started",
                          choices=("units", "none")),
    },
}


def defaults() -> Dict[str, Dict[str, Any]]:
    return {s: {k: copy.deepcopy(key.default) for k, key in keys.items()} for s, keys in SCHEMA.items()}


class Config:
    """The validated configuration: ``cfg["policy"]["steps"]``; paths resolve against the file's directory."""

    def __init__(self, data: Dict[str, Dict[str, Any]], path: Optional[str],
                 dirs: Optional[Dict[str, Tuple[str, str]]] = None,
                 templates: Optional[Dict[Tuple[str, str], str]] = None) -> None:
        self.data = data
        self.path = path
        self.base_dir = os.path.dirname(os.path.abspath(path)) if path else os.getcwd()
        self.dirs = dirs or {}  # {"{runtime_dir}": (directory, why)}: the placeholders expanded at load
        self.templates = templates or {}  # {(section, key): the value as written, placeholders and all}

    def __getitem__(self, section: str) -> Dict[str, Any]:
        return self.data[section]

    def resolve(self, path: str) -> str:
        return path if os.path.isabs(path) else os.path.normpath(os.path.join(self.base_dir, path))

    def to_yaml(self) -> str:
        """The effective configuration; a comment per placeholder says what it became and why."""
        head = "".join(f"# {token} = {directory}: {why}\n" for token, (directory, why) in self.dirs.items())
        return head + yaml.safe_dump(self.data, sort_keys=False)


def _merge(data: Dict[str, Dict[str, Any]], tree: Any, where: str) -> None:
    if tree is None:
        return
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: expected a mapping of sections, got {type(tree).__name__}")
    for section, values in tree.items():
        if section not in SCHEMA:
            raise ConfigError(f"{where}: unknown section {section!r} (known: {', '.join(SCHEMA)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: {section}: expected a mapping, got {type(values).__name__}")
        for key, value in values.items():
            _set(data, section, key, value, where)


def _set(data: Dict[str, Dict[str, Any]], section: str, key: str, value: Any, where: str) -> None:
    keys = SCHEMA[section]
    if key not in keys:
        raise ConfigError(f"{where}: unknown key {section}.{key} (known in {section}: {', '.join(keys)})")
    data[section][key] = keys[key].validate(value, f"{where}: {section}.{key}")


class DuplicateKeyError(ValueError):
    """A key given twice in one YAML mapping; the message names the key's path and both lines."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping, at every level (sections, keys, the maps in a
    list such as camera.layout). YAML itself lets the last one win, so a typo'd second ``max_velocity`` would
    silently replace the first."""

    _root: Optional[yaml.Node] = None

    def construct_document(self, node: yaml.Node) -> Any:
        self._root = node  # to name a duplicate's path (error path only)
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: Dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: explicit keys may override it
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: SafeLoader's own error follows
                    continue
                if first is not None:
                    where = _node_path(self._root, node)
                    spelled = key_node.value if isinstance(key_node, yaml.ScalarNode) else key
                    name = ".".join(where + [str(spelled)]).replace(".[", "[")
                    a, b = first.start_mark, key_node.start_mark
                    at = (f"line {a.line + 1} (columns {a.column + 1} and {b.column + 1})" if a.line == b.line
                          else f"lines {a.line + 1} and {b.line + 1}")
                    raise DuplicateKeyError(f"duplicate key {name} at {at} (give each key once)")
                seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def _node_path(root: Optional[yaml.Node], target: yaml.Node, _seen: Optional[set] = None) -> List[str]:
    """The keys (and [i] list indices) from ``root`` down to ``target``; [] when target is the root (or not found).
    Aliases can make the node graph cyclic: each node is visited once."""
    seen = set() if _seen is None else _seen
    if root is None or root is target or id(root) in seen:
        return []
    seen.add(id(root))
    children: List[Tuple[str, yaml.Node]] = []
    if isinstance(root, yaml.MappingNode):
        children = [(str(k.value), v) for k, v in root.value]
    elif isinstance(root, yaml.SequenceNode):
        children = [(f"[{i}]", v) for i, v in enumerate(root.value)]
    for label, child in children:
        if child is target:
            return [label]
        below = _node_path(child, target, seen)
        if below:
            return [label] + below
    return []


def _load_yaml(stream: Any) -> Any:
    """yaml.safe_load, refusing duplicate keys (DuplicateKeyError)."""
    loader = _UniqueKeyLoader(stream)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def parse_override(text: str) -> Tuple[str, str, Any]:
    """``section.key=value`` with the value read as YAML (``4``, ``true``, ``[..]``)."""
    where = f"--set {text}"
    if "=" not in text:
        raise ConfigError(f"{where}: expected section.key=value")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2:
        raise ConfigError(f"{where}: expected section.key=value, got key {dotted!r}")
    section, key = parts
    if section not in SCHEMA:
        raise ConfigError(f"{where}: unknown section {section!r} (known: {', '.join(SCHEMA)})")
    if raw.strip().startswith((paths.RUNTIME_DIR, paths.STATE_DIR)):  # a path, not a YAML flow mapping
        return section, key, raw.strip()
    try:
        value = _load_yaml(raw) if raw.strip() else ""
    except DuplicateKeyError as exc:
        raise ConfigError(f"{where}: value has a {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: value is not valid YAML ({exc})") from None
    if value is None:
        value = raw
    return section, key, value


def load_config(path: Optional[str] = None, overrides: Iterable[str] = ()) -> Config:
    """Schema defaults, then the file (if any), then each ``--set``; ConfigError names the file or --set and key.

    A key given twice in the file is an error (both lines named); the same key in two ``--set``s: the last wins,
    as on any command line."""
    data = defaults()
    if path is not None:
        try:
            with open(path, "r", encoding="utf-8") as f:
                tree = _load_yaml(f)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
        except DuplicateKeyError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        _merge(data, tree, path)
    for text in overrides:
        section, key, value = parse_override(text)
        _set(data, section, key, value, f"--set {text}")
    _check_remote(data["remote"], path or "--set")
    dirs, templates = _expand_dirs(data, path or "--set")
    return Config(data, path, dirs, templates)


#: the placeholders a path key may hold, and what resolves each (runtime/service/paths.py says in which order)
DIR_PLACEHOLDERS = {paths.RUNTIME_DIR: paths.runtime_dir, paths.STATE_DIR: paths.state_dir}


def _expand_dirs(data: Dict[str, Dict[str, Any]],
                 where: str) -> Tuple[Dict[str, Tuple[str, str]], Dict[Tuple[str, str], str]]:
    """Replace {runtime_dir} / {state_dir} in the path keys by this process's directories (resolved only when used);
    other braces in those keys are refused. Returns (the directories used and why, the values as written)."""
    import re

    dirs: Dict[str, Tuple[str, str]] = {}
    templates: Dict[Tuple[str, str], str] = {}
    for section, keys in SCHEMA.items():
        for name, key in keys.items():
            value = data[section][name]
            if not key.dirs or not isinstance(value, str):
                continue
            for token in re.findall(r"\{[^{}]*\}", value):
                if token not in DIR_PLACEHOLDERS:
                    raise ConfigError(f"{where}: {section}.{name}: unknown placeholder {token} in {value!r} (known: "
                                      f"{', '.join(DIR_PLACEHOLDERS)})")
                if token not in dirs:
                    dirs[token] = DIR_PLACEHOLDERS[token]()
            if "{" not in value:
                continue
            templates[(section, name)] = value
            value = paths.expand(value, {t: d for t, (d, _) in dirs.items()})
            if value.startswith("ipc://") and len(value) - len("ipc://") > paths.MAX_IPC_PATH:
                raise ConfigError(f"{where}: {section}.{name}: {value!r}: the socket's path is longer than a unix "
                                  f"socket address holds ({paths.MAX_IPC_PATH} bytes)")
            data[section][name] = value
    return dirs, templates


def _check_remote(remote: Dict[str, Any], where: str) -> None:
    """No combination may contain another: pressing one must never also fire a different action."""
    combos = {k: set(v) for k, v in remote.items() if isinstance(v, list)}
    for a, sa in combos.items():
        for b, sb in combos.items():
            if a < b and (sa <= sb or sb <= sa):
                raise ConfigError(f"{where}: remote.{a} {sorted(sa)} and remote.{b} {sorted(sb)} overlap: one "
                                  "contains the other")


def default_config_path() -> Optional[str]:
    """$WAM_EDGE_CONFIG, else ./config.yaml, else the repository's config.yaml beside this package, else none."""
    env = os.environ.get("WAM_EDGE_CONFIG")
    if env:
        return env
    for candidate in ("config.yaml", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                  "config.yaml")):
        if os.path.isfile(candidate):
            return candidate
    return None


HEADER = """\
# wam-edge configuration: the embedded default (ONNX Runtime on the CPU, the reference model, a synthetic camera,
# the simulated G1). Every key is listed with what it does; a file of your own may set any subset, and any key can
# be overridden on the command line: wam-edge run --set policy.steps=4
# Generated from the schema in runtime/config.py (`wam-edge config --defaults`); a test keeps the two identical.
# {runtime_dir} (sockets) and {state_dir} (e-stop latch, command record) are expanded when the file is loaded:
# under systemd /run/wam-edge and /var/lib/wam-edge; `wam-edge config` prints the effective paths and why
# (docs/safety.md, "Where state lives on the robot").
"""


def render_defaults() -> str:
    """The schema's defaults as commented YAML: what config.yaml holds."""
    lines = [HEADER]
    for section, keys in SCHEMA.items():
        lines.append(f"{section}:")
        for name, key in keys.items():
            if isinstance(key.default, list):
                value = yaml.safe_dump({name: key.default}, default_flow_style=None, sort_keys=False).rstrip()
            else:
                scalar = yaml.safe_dump(key.default, default_flow_style=True).split("\n")[0]
                value = f"{name}: {scalar}"
            rng = ""
            if key.lo is not None or key.hi is not None:
                rng = f" [{key.lo}, {key.hi}]"
            lines.append(f"  # {key.doc}{rng}")
            lines.extend("  " + line for line in value.splitlines())
        lines.append("")
    return "\n".join(lines)
