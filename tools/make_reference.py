"""Regenerate exported/reference/ (manifest.json, world.onnx, action_expert.onnx).

    python -m tools.make_reference [--out exported/reference]

Deterministic: fixed seed, metadata stripped; rerunning reproduces the same
manifest and (with the same torch/onnx versions) the same file hashes.
"""

import argparse
import os
import sys
from typing import Any, Dict, List, Optional

from tools import reference_model as rm
from tools.export import StageExport, export_stages

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
             "mean": list(rm.IMAGE_MEAN), "std": list(rm.IMAGE_STD), "input": "image_" + cam}
            for cam in rm.CAMERAS
        ],
        "state": {"joints": list(rm.G1_JOINTS), "mean": list(rm.STATE_MEAN),
                  "std": list(rm.STATE_STD)},
        "action": {"kind": "joint_position", "joints": list(rm.ACTION_JOINTS),
                   "horizon": rm.HORIZON, "step_s": rm.STEP_S,
                   "mean": list(rm.ACTION_MEAN), "std": list(rm.ACTION_STD)},
        "sampler": {"type": "flow_matching", "steps": 1, "shift": 1.0, "distilled": True},
    }


def reference_stages() -> List[StageExport]:
    world, expert = rm.build_reference()
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


def make_reference(out_dir: str = DEFAULT_OUT) -> Dict[str, Any]:
    return export_stages(reference_stages(), out_dir, manifest_base(), opset=18)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="output directory (default %(default)s)")
    args = parser.parse_args(argv)
    manifest = make_reference(args.out)
    for stage in manifest["stages"]:
        path = os.path.join(args.out, stage["file"])
        print("%s  %s  %d bytes" % (stage["sha256"], path, os.path.getsize(path)))
    print("wrote %s" % os.path.join(args.out, "manifest.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
