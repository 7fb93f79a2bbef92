"""Regenerate exported/reference/ (manifest.json, world.onnx, action_expert.onnx).

    python -m tools.make_reference [--out exported/reference] [--horizon H] [--cameras N]

Also the reference's two export factories (tools/export.py's contract, for `wam-edge export --factory`):
tools.make_reference:student (exactly the committed reference: one step, distilled) and
tools.make_reference:teacher (the same network as a velocity model the sampler runs for 10 Euler steps, shift 5).
Their checkpoint format is per stage: {"world": <state dict>, "action_expert": <state dict>} (torch.save);
write_checkpoint writes the seed-0 reference in it.

--horizon and --cameras build variants with another chunk length or more cameras (extra_1, ... after the
reference's three; for `wam-edge bench --sweep`); with the defaults (32, 3) the output is exactly the reference.

Deterministic: fixed seed, metadata stripped; rerunning reproduces the same
manifest and (with the same torch/onnx versions) the same file hashes.
"""

import argparse
import os
import sys
from typing import Any, Dict, List, Optional

import torch

from tools import reference_model as rm
from tools.export import DEFAULT_OPSET, ExportError, ExportSpec, StageExport, export_stages, load_state, read_checkpoint

DEFAULT_OUT = os.path.join("exported", "reference")


def manifest_base() -> Dict[str, Any]:
    """Everything in the manifest but the stages (which the exporter fills in)."""
    return {
        "format": "wam-edge-manifest",
        "version": 1,
        "name": "reference",
        "description": "Tiny random-weight ImageWAM-shaped reference (tools/reference_model.py, "
                       "seed 0): world pass -> per-layer K/V -> one-step flow-matching action "
                       "expert. For plumbing and tests only; its actions mean nothing.",
        "cameras": [
            {"name": cam, "height": rm.IMAGE_SIZE, "width": rm.IMAGE_SIZE, "resize": "nearest",
             "mean": list(rm.IMAGE_MEAN), "std": list(rm.IMAGE_STD), "input": "image_" + cam,
             "channel_order": "rgb"}  # what the reference's inputs are (say "bgr" for a model trained on BGR)
            for cam in rm.CAMERAS
        ],
        "state": {"joints": list(rm.G1_JOINTS), "mean": list(rm.STATE_MEAN),
                  "std": list(rm.STATE_STD)},
        "action": {"kind": "joint_position", "joints": list(rm.ACTION_JOINTS),
                   "horizon": rm.HORIZON, "step_s": rm.STEP_S,
                   "mean": list(rm.ACTION_MEAN), "std": list(rm.ACTION_STD)},
        "sampler": {"type": "flow_matching", "steps": 1, "shift": 1.0, "distilled": True},
    }


def reference_stages(checkpoint: Optional[str] = None) -> List[StageExport]:
    """The two stages; with checkpoint, their weights come from it (see the module docstring for its format)."""
    world, expert = rm.build_reference()
    if checkpoint is not None:
        state = read_checkpoint(checkpoint)
        for name, module in (("world", world), ("action_expert", expert)):
            if not isinstance(state.get(name), dict):
                raise ExportError("checkpoint %s has no state dict under %r for %s; the reference's checkpoints "
                                  "hold {\"world\": ..., \"action_expert\": ...} (top-level keys: %s)"
                                  % (checkpoint, name, type(module).__name__, ", ".join(sorted(map(str, state)))))
            load_state(module, state[name], "checkpoint %s[%r]" % (checkpoint, name))
    examples = rm.example_inputs()
    kv = list(rm.KV_NAMES)
    images = ["image_" + cam for cam in rm.CAMERAS]
    return [
        StageExport("world", world, examples["world"], images, kv, runs="once",
                    sources={"image_" + cam: "camera:" + cam for cam in rm.CAMERAS}),
        StageExport("action_expert", expert, examples["action_expert"],
                    ["x_t", "t", "state"] + kv, ["velocity"], runs="per_step",
                    sources=dict({"x_t": "sampler:x", "t": "sampler:t", "state": "state"},
                                 **{name: "world:" + name for name in kv}),
                    sinks={"velocity": "sampler:velocity"}),
    ]


def student(checkpoint: Optional[str] = None) -> ExportSpec:
    """Factory: the committed reference, a distilled one-step student."""
    return ExportSpec(manifest_base(), reference_stages(checkpoint))


def teacher(checkpoint: Optional[str] = None) -> ExportSpec:
    """Factory: the same network as a teacher, a velocity model the sampler runs for 10 Euler steps, shift 5."""
    base = manifest_base()
    base["name"] = "reference-teacher"
    base["description"] = base["description"].replace("one-step flow-matching action expert",
                                                      "flow-matching action expert run for 10 Euler steps")
    base["sampler"] = {"type": "flow_matching", "steps": 10, "shift": 5.0, "distilled": False}
    return ExportSpec(base, reference_stages(checkpoint))


def write_checkpoint(path: str) -> None:
    """The seed-0 reference's weights in the factories' checkpoint format (for round-trip tests)."""
    world, expert = rm.build_reference()
    torch.save({"world": world.state_dict(), "action_expert": expert.state_dict()}, path)


def make_reference(out_dir: str = DEFAULT_OUT) -> Dict[str, Any]:
    return export_stages(reference_stages(), out_dir, manifest_base(), opset=DEFAULT_OPSET)


def make_variant(out_dir: str, horizon: int = rm.HORIZON, cameras: int = len(rm.CAMERAS)) -> Dict[str, Any]:
    """The reference model with another action horizon (the chunk length) and/or more cameras (extra_1, ... after
    the reference's); its weights are as random, not the reference's. The defaults give the reference itself, byte
    for byte."""
    base_cameras = tuple(rm.CAMERAS)
    if horizon == rm.HORIZON and cameras == len(base_cameras):
        return make_reference(out_dir)
    if cameras < len(base_cameras):
        raise ValueError("a variant keeps the reference's %d cameras; --cameras %d is fewer"
                         % (len(base_cameras), cameras))
    saved = (rm.HORIZON, rm.CAMERAS, rm.WORLD_TOKENS)
    # read when the models and their example inputs are built
    rm.HORIZON = horizon
    rm.CAMERAS = base_cameras + tuple("extra_%d" % i for i in range(1, cameras - len(base_cameras) + 1))
    rm.WORLD_TOKENS = rm.TOKENS_PER_CAMERA * len(rm.CAMERAS)
    try:
        base = manifest_base()
        base["name"] = "reference-h%d-c%d" % (horizon, cameras)
        base["description"] += " Variant: action horizon %d, %d cameras (benchmarking only)." % (horizon, cameras)
        return export_stages(reference_stages(), out_dir, base, opset=DEFAULT_OPSET)
    finally:
        rm.HORIZON, rm.CAMERAS, rm.WORLD_TOKENS = saved


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="output directory (default %(default)s)")
    parser.add_argument("--horizon", type=int, default=rm.HORIZON,
                        help="action horizon (chunk length, default %(default)s: the reference)")
    parser.add_argument("--cameras", type=int, default=len(rm.CAMERAS),
                        help="cameras (default %(default)s: the reference's; more adds extra_1, ...)")
    args = parser.parse_args(argv)
    if not 1 <= args.horizon <= 1024:
        parser.error("--horizon must be in [1, 1024]")
    if not len(rm.CAMERAS) <= args.cameras <= 16:
        parser.error("--cameras must be in [%d, 16]" % len(rm.CAMERAS))
    manifest = make_variant(args.out, args.horizon, args.cameras)
    for stage in manifest["stages"]:
        path = os.path.join(args.out, stage["file"])
        print("%s  %s  %d bytes" % (stage["sha256"], path, os.path.getsize(path)))
    print("wrote %s" % os.path.join(args.out, "manifest.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
