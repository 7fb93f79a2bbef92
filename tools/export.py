"""`wam-edge export`: a PyTorch model to one ONNX file per stage plus manifest.json (and golden.npz).

Factory contract. ``--factory MOD:FN`` names a function ``FN(checkpoint: Optional[str]) -> ExportSpec`` in the
importable module MOD. ``ExportSpec(manifest, stages)``: ``manifest`` is everything of manifest.json but
"stages" (format, version, name, cameras, state, action, sampler, optional rtc); ``stages`` is a list of
StageExport in run order, each with its torch module (weights loaded, e.g. with load_checkpoint), example inputs
at the shapes to export (the opt shape of any dynamic axis) and each input's manifest source. A teacher (a
velocity network the sampler runs for K steps) and a distilled one-step student export through the same path;
the factory's manifest says which (sampler.distilled) and how many steps the sampler takes (sampler.steps).
Every camera entry of the written manifest states its channel_order (the order the model was trained on: "rgb",
or "bgr" for datasets recorded through Unitree's image client): ``--channel-order NAME=bgr`` (or ``bgr`` for every
camera) over what the factory states, "rgb" where neither says. The factory's mean and std are in that order.
tools/make_reference.py has two such factories: ``tools.make_reference:student`` and ``...:teacher``.

What the export guarantees: opset >= 17 (LayerNormalization is one op, which TensorRT maps to its normalization
layer; attention stays MatMul/Softmax as the model writes it), static shapes except the axes a stage declares in
StageExport.dynamic (their min/opt/max profile goes into the manifest), the onnx checker and strict shape
inference pass on every file, no custom-domain nodes, and the manifest records every file's sha256. A dynamic
input's manifest "shape" is its opt shape and "profile" its {"min", "opt", "max"} shapes; an output whose size
follows dynamic inputs gets the same, derived by evaluating the exporter's symbolic size (e.g. "h*w") at min, opt
and max; any other symbolic size (data-dependent, e.g. nonzero, or one the exporter cannot express in the
declared axes) is an ExportError naming the stage and module. Opset 17 is torch's opset-18 output rewritten by
downgrade_18_to_17 (torch's own down-conversion breaks on Split and Reduce*). The
manifest's tensor dtypes/shapes are read back from the exported graphs, so they agree with the files by
construction; the runtime's own parser validates the manifest before it is written.
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib
import json
import logging
import math
import os
import re
import sys
import warnings
from fractions import Fraction
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import onnx
import torch

from runtime.policy.manifest import CHANNEL_ORDERS, DEFAULT_CHANNEL_ORDER, ManifestError, parse_manifest, sha256_file
from tools.onnx_forms import (  # noqa: F401 (ExportError, MIN_OPSET and the form checks are part of this API)
    DECOMPOSED_NORM,
    MIN_OPSET,
    ExportError,
    check_trt_friendly,
    default_opset,
    downgrade_18_to_17,
    external_tensors,
    norm_warning,
    strip_metadata,
)

DEFAULT_OPSET = 17  # JetPack 5's TensorRT 8.5 parses opsets up to 17
#: --external-data: weights in a file beside the ONNX file ("always"), inside it ("never"), or beside it when they
#: would bring the file near protobuf's 2 GB limit ("auto"; a 5B-parameter model is 10 GB even in FP16)
EXTERNAL_DATA_MODES = ("auto", "always", "never")
EXTERNAL_DATA_AUTO_BYTES = 1536 << 20
Profile = Tuple[int, int, int]  # (min, opt, max) of one axis

# ONNX TensorProto element type -> manifest dtype name.
_ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.BOOL: "bool",
}


class StageExport(NamedTuple):
    """One stage to export. sources maps each input name to its manifest source
    (camera:<name>, state, sampler:x, sampler:t, rtc:*, <stage>:<output>); sinks maps
    outputs the host consumes (sampler:velocity). dynamic declares the only axes that
    may vary: input name -> axis -> (min, opt, max); the example inputs must be at opt."""

    name: str
    module: torch.nn.Module
    example_inputs: Tuple[torch.Tensor, ...]
    input_names: Sequence[str]
    output_names: Sequence[str]
    runs: str = "once"
    sources: Optional[Dict[str, str]] = None
    sinks: Optional[Dict[str, str]] = None
    dynamic: Optional[Dict[str, Dict[int, Profile]]] = None


class ExportSpec(NamedTuple):
    """What a factory returns: the manifest without "stages", and the stages to export."""

    manifest: Dict[str, Any]
    stages: List[StageExport]


class StageReport(NamedTuple):
    """What the export summary prints for one file."""

    name: str
    path: str
    sha256: str
    bytes: int                 # the ONNX file and its external data
    op_counts: Dict[str, int]  # REPORTED_OPS -> how many nodes
    data_file: Optional[str] = None  # the external data file's name, when the weights are beside the ONNX file


# --- checkpoints -------------------------------------------------------------------------------------------------

def read_checkpoint(path: str) -> Dict[str, Any]:
    """torch.load with weights_only=True (no code from the file runs); the top level must be a dict."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise ExportError("checkpoint %s does not exist" % path) from exc
    except Exception as exc:
        raise ExportError("checkpoint %s cannot be read with torch.load(weights_only=True): %s: %s"
                          % (path, type(exc).__name__, exc)) from exc
    if not isinstance(obj, dict):
        raise ExportError("checkpoint %s holds a %s, expected a state dict" % (path, type(obj).__name__))
    return obj


def _unwrap_state_dict(obj: Dict[str, Any]) -> Dict[str, Any]:
    for key in ("state_dict", "model"):
        if isinstance(obj.get(key), dict):
            return obj[key]
    return obj


def _short(keys: Sequence[str], limit: int = 8) -> str:
    keys = sorted(keys)
    text = ", ".join(keys[:limit])
    return text + (", ... (%d in all)" % len(keys) if len(keys) > limit else "")


def load_state(module: torch.nn.Module, state: Dict[str, Any], where: str) -> None:
    """Load a state dict (plain, or under "state_dict"/"model") strictly; mismatches name the module class."""
    state = _unwrap_state_dict(state)
    cls = type(module).__name__
    expected = set(module.state_dict().keys())
    got = set(state.keys())
    missing, unexpected = expected - got, got - expected
    if missing or unexpected:
        parts = []
        if missing:
            parts.append("missing keys: " + _short(list(missing)))
        if unexpected:
            parts.append("unexpected keys: " + _short(list(unexpected)))
        raise ExportError("%s does not fit %s: %s" % (where, cls, "; ".join(parts)))
    try:
        module.load_state_dict(state, strict=True)
    except Exception as exc:  # size mismatches, non-tensor values
        raise ExportError("%s does not fit %s: %s" % (where, cls, str(exc).strip().replace("\n\t", " "))) from exc


def load_checkpoint(module: torch.nn.Module, path: str, key: Optional[str] = None) -> None:
    """Load <path> into module: a plain state dict, or {"state_dict": ...} / {"model": ...}; with key, the
    checkpoint's entry under key (e.g. one stage of a per-stage checkpoint)."""
    obj = read_checkpoint(path)
    where = "checkpoint %s" % path
    if key is not None:
        if not isinstance(obj.get(key), dict):
            raise ExportError("%s has no state dict under %r for %s (top-level keys: %s)"
                              % (where, key, type(module).__name__, _short([str(k) for k in obj])))
        obj, where = obj[key], "%s[%r]" % (where, key)
    load_state(module, obj, where)


# --- export ------------------------------------------------------------------------------------------------------

def _stage_label(stage: StageExport) -> str:
    return "stage %r (%s)" % (stage.name, type(stage.module).__name__)


def _dim_names(stage: StageExport) -> Dict[str, Tuple[str, int, Profile]]:
    """symbolic dim name -> (input, axis, profile) for every declared dynamic axis, after checking them."""
    names: Dict[str, Tuple[str, int, Profile]] = {}
    for input_name, axes in (stage.dynamic or {}).items():
        if input_name not in stage.input_names:
            raise ExportError("%s: dynamic axes declared for %r, which is not an input (%s)"
                              % (_stage_label(stage), input_name, ", ".join(stage.input_names)))
        example = stage.example_inputs[list(stage.input_names).index(input_name)]
        for axis, profile in sorted(axes.items()):
            where = "%s: input %r axis %r" % (_stage_label(stage), input_name, axis)
            if not isinstance(axis, int) or not 0 <= axis < example.dim():
                raise ExportError("%s: not an axis of its %d-d example" % (where, example.dim()))
            if len(profile) != 3 or not all(isinstance(v, int) for v in profile) \
                    or not 1 <= profile[0] <= profile[1] <= profile[2]:
                raise ExportError("%s: profile %r must be integers 1 <= min <= opt <= max" % (where, profile))
            if example.shape[axis] != profile[1]:
                raise ExportError("%s: the example input has %d there; export at the opt size %d"
                                  % (where, example.shape[axis], profile[1]))
            name = re.sub(r"[^A-Za-z0-9_]", "_", "%s_%d" % (input_name, axis))
            if not name[0].isalpha():
                name = "d_" + name
            while name in names:
                name += "_"
            names[name] = (input_name, axis, tuple(profile))  # type: ignore[assignment]
    return names


def _distinct_examples(examples: Sequence[Any]) -> Tuple[Any, ...]:
    """The example inputs with every tensor that shares memory with an earlier one cloned. The dynamo exporter
    takes one tensor passed for two inputs (zeros of the same shape for K and V, say) as one input: the graph then
    reads it for both and leaves the other input unused, a silently wrong model."""
    seen: set = set()
    out = []
    for t in examples:
        if isinstance(t, torch.Tensor):
            key = t.untyped_storage().data_ptr() if t.numel() else None
            if key is not None and key in seen:
                t = t.clone()
            seen.add(key)
        out.append(t)
    return tuple(out)


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's parameters and buffers: what the ONNX file would hold."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _torch_export(stage: StageExport, path: str, opset: int, dims: Dict[str, Tuple[str, int, Profile]],
                  external: bool = False) -> str:
    """dynamo exporter first; the TorchScript one only if dynamo fails (said aloud). Returns which one ran."""
    examples = _distinct_examples(stage.example_inputs)
    kwargs: Dict[str, Any] = dict(input_names=list(stage.input_names), output_names=list(stage.output_names),
                                  opset_version=opset)
    dynamo_kwargs: Dict[str, Any] = dict(external_data=external, verbose=False)
    legacy_kwargs: Dict[str, Any] = {}
    if dims:
        per_input: Dict[str, Dict[int, Any]] = {}
        axes: Dict[str, Dict[int, str]] = {}
        for name, (input_name, axis, (lo, _, hi)) in dims.items():
            per_input.setdefault(input_name, {})[axis] = torch.export.Dim(name, min=lo, max=hi)
            axes.setdefault(input_name, {})[axis] = name
        dynamo_kwargs["dynamic_shapes"] = tuple(per_input.get(n) for n in stage.input_names)
        legacy_kwargs["dynamic_axes"] = axes
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's own chatter (opset conversion notes, deprecations)
            torch.onnx.export(stage.module, examples, path, dynamo=True, **kwargs, **dynamo_kwargs)
        return "dynamo"
    except Exception as exc:  # any exporter failure triggers the fallback
        dynamo_error = exc
    warnings.warn("stage %r: dynamo ONNX export failed (%s: %s); falling back to dynamo=False"
                  % (stage.name, type(dynamo_error).__name__, _first_line(dynamo_error)), stacklevel=3)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(stage.module, examples, path, dynamo=False, **kwargs, **legacy_kwargs)
        return "torchscript"
    except Exception as exc:
        raise ExportError("%s: ONNX export failed with both exporters: dynamo: %s; torchscript: %s"
                          % (_stage_label(stage), _first_line(dynamo_error), _first_line(exc))) from exc


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(exc).__name__


# A symbolic output dim is an arithmetic expression of declared input dims (e.g. "image_head_2*image_head_3").
_BINOPS: Dict[type, Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
    ast.FloorDiv: lambda a, b: Fraction(math.floor(a / b)), ast.Div: lambda a, b: a / b,
    ast.Mod: lambda a, b: a % b,
}
_CALLS: Dict[str, Callable[..., Fraction]] = {
    "floor": lambda a: Fraction(math.floor(a)), "FloorDiv": lambda a, b: Fraction(math.floor(a / b)),
    "ceiling": lambda a: Fraction(math.ceil(a)), "ceil": lambda a: Fraction(math.ceil(a)),
    "max": max, "min": min, "Max": max, "Min": min,
}


def _eval_dim(expr: str, values: Dict[str, int]) -> int:
    """Evaluate a symbolic dim (sympy-style text) at integer values of the declared dims; ValueError otherwise."""
    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return Fraction(node.value)
        if isinstance(node, ast.Name) and node.id in values:
            return Fraction(values[node.id])
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _CALLS \
                and not node.keywords:
            return _CALLS[node.func.id](*[ev(a) for a in node.args])
        raise ValueError(node.id if isinstance(node, ast.Name) else ast.dump(node))

    value = ev(ast.parse(expr, mode="eval"))
    if value.denominator != 1:
        raise ValueError("%r is not an integer at %s" % (expr, values))
    return int(value)


def _tensor_entries(values: Sequence[onnx.ValueInfoProto], label: str, kind: str,
                    dims: Dict[str, Tuple[str, int, Profile]]) -> List[Dict[str, Any]]:
    """Manifest entries read from the graph. Symbolic dims must be declared (inputs) or expressions of declared
    dims (outputs); then "shape" is the opt shape and "profile" holds min/opt/max."""
    entries = []
    for vi in values:
        ttype = vi.type.tensor_type
        dtype = _ONNX_DTYPES.get(ttype.elem_type)
        if dtype is None:
            raise ExportError("%s: %s %r has unsupported ONNX element type %d"
                              % (label, kind, vi.name, ttype.elem_type))
        points: List[List[int]] = [[], [], []]
        dynamic = False
        for axis, dim in enumerate(ttype.shape.dim):
            if dim.HasField("dim_value"):
                for p in points:
                    p.append(int(dim.dim_value))
                continue
            dynamic = True
            sym = dim.dim_param
            if kind == "input":
                declared = dims.get(sym)
                if declared is None or declared[:2] != (vi.name, axis):
                    raise ExportError("%s: input %r axis %d is symbolic (%r) but not declared in "
                                      "StageExport.dynamic" % (label, vi.name, axis, sym))
                for p, v in zip(points, declared[2]):
                    p.append(v)
                continue
            try:
                for i, p in enumerate(points):
                    p.append(_eval_dim(sym, {name: d[2][i] for name, d in dims.items()}))
            except (ValueError, TypeError, SyntaxError, ZeroDivisionError) as exc:
                raise ExportError("%s: output %r axis %d has a data-dependent or undeclared symbolic size %r "
                                  "(not an expression of declared dynamic axes: %s); export with static shapes "
                                  "or declare the axis" % (label, vi.name, axis, sym, exc)) from exc
        entry: Dict[str, Any] = {"name": vi.name, "dtype": dtype, "shape": points[1]}
        if dynamic:
            lo, opt, hi = points
            if not all(1 <= a <= b <= c for a, b, c in zip(lo, opt, hi)):
                raise ExportError("%s: %s %r: profile min %s / opt %s / max %s derived from its symbolic shape is "
                                  "not ordered" % (label, kind, vi.name, lo, opt, hi))
            entry["profile"] = {"min": lo, "opt": opt, "max": hi}
        entries.append(entry)
    return entries


def _data_file_name(stage: str, sha256: str) -> str:
    """The external data file is named after its content, and the ONNX file names it: so the ONNX file's sha256
    (what engines and golden data record) changes whenever the weights do."""
    return "%s.%s.onnx.data" % (stage, sha256[:16])


def _save(model: onnx.ModelProto, path: str, stage: str, external: bool) -> Optional[Dict[str, str]]:
    """Write the ONNX file; with external data, its weights go to a content-named file beside it, whose name and
    sha256 are returned (for the manifest). Leaves no other data file of this stage in the directory.

    model is the graph as loaded without its external data: when the exporter wrote one data file, that file is
    hashed and renamed, never read into memory; otherwise the weights are loaded and written out here."""
    out_dir = os.path.dirname(path)
    locations = {_location(t) for t in external_tensors(model)}
    own = re.compile(re.escape(stage) + r"\.([0-9a-f]{16}\.)?onnx\.data(\.partial)?")  # never another stage's
    stale = [f for f in os.listdir(out_dir) if own.fullmatch(f) and f not in locations]  # an earlier export's
    if len(locations) > 1 or (locations and not external):  # e.g. the TorchScript exporter's file per tensor
        onnx.load_external_data_for_model(model, out_dir)
        stale += sorted(locations)
        locations = set()
    for name in stale:
        os.remove(os.path.join(out_dir, name))
    if not external:
        onnx.save_model(model, path, save_as_external_data=False)
        return None
    if locations:
        written = locations.pop()
    else:
        # tensors under 1 kB (shapes, scalars) stay inline: shape inference and TensorRT's parser read their values
        written = stage + ".onnx.data.partial"
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=written,
                        size_threshold=1024, convert_attribute=False)
        if not os.path.exists(os.path.join(out_dir, written)):
            return None  # every tensor under the threshold: nothing went beside the file
        model = onnx.load(path, load_external_data=False)
    sha = sha256_file(os.path.join(out_dir, written))
    final = _data_file_name(stage, sha)
    os.replace(os.path.join(out_dir, written), os.path.join(out_dir, final))
    for tensor in external_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = final
    onnx.save_model(model, path, save_as_external_data=False)
    os.chmod(os.path.join(out_dir, final), os.stat(path).st_mode & 0o777)  # written 0600; copied as the model
    return {"file": final, "sha256": sha}


def _location(tensor: onnx.TensorProto) -> str:
    return next(e.value for e in tensor.external_data if e.key == "location")


def _export_stage(stage: StageExport, out_dir: str, opset: int,
                  external_data: str = "auto") -> Tuple[Dict[str, Any], StageReport]:
    if external_data not in EXTERNAL_DATA_MODES:
        raise ExportError("external_data %r is not one of %s" % (external_data, ", ".join(EXTERNAL_DATA_MODES)))
    if opset < MIN_OPSET:
        raise ExportError("opset %d is below %d: TensorRT uses its normalization layer only for opset >= 17's "
                          "single LayerNormalization op" % (opset, MIN_OPSET))
    label = _stage_label(stage)
    if len(stage.example_inputs) != len(stage.input_names):
        raise ExportError("%s: %d example inputs for %d input names"
                          % (label, len(stage.example_inputs), len(stage.input_names)))
    dims = _dim_names(stage)
    os.makedirs(out_dir, exist_ok=True)
    file_name = stage.name + ".onnx"
    path = os.path.join(out_dir, file_name)
    stage.module.eval()
    torch_opset = max(opset, 18)  # torch's ONNX functions are opset 18; 17 is our own rewrite of its output
    weights = weight_bytes(stage.module)
    external = external_data == "always" or (external_data == "auto" and weights > EXTERNAL_DATA_AUTO_BYTES)
    with torch.no_grad():
        _torch_export(stage, path, torch_opset, dims, external)
    try:  # the graph only: with external data the weights stay in the exporter's file (a 2 GB proto cannot be
        # serialised, and shape inference serialises)
        model = onnx.load(path, load_external_data=False)
        if external_tensors(model) and external_data == "auto":
            external = True  # the exporter moved weights out itself (constants made in forward count too)
        elif not external:
            onnx.load_external_data_for_model(model, out_dir)
    except Exception as exc:
        raise ExportError("%s: the exporter wrote an unreadable %s: %s" % (label, path, exc)) from exc
    if default_opset(model) != torch_opset:
        raise ExportError("%s: asked torch for opset %d, it produced opset %s (its version conversion failed)"
                          % (label, torch_opset, default_opset(model)))
    if opset < torch_opset:
        downgrade_18_to_17(model, label)
    strip_metadata(model)
    data = _save(model, path, stage.name, external)
    if data is not None:
        model = onnx.load(path, load_external_data=False)  # the graph; the weights stay on disk
    try:
        onnx.checker.check_model(path, full_check=True)
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as exc:
        raise ExportError("%s: %s fails ONNX checks: %s" % (label, path, exc)) from exc
    counts = check_trt_friendly(model, stage.name, type(stage.module).__name__)

    inputs = _tensor_entries(model.graph.input, label, "input", dims)
    outputs = _tensor_entries(model.graph.output, label, "output", dims)
    if [t["name"] for t in inputs] != list(stage.input_names):
        raise ExportError("%s: graph inputs %s, expected %s"
                          % (label, [t["name"] for t in inputs], list(stage.input_names)))
    if [t["name"] for t in outputs] != list(stage.output_names):
        raise ExportError("%s: graph outputs %s, expected %s"
                          % (label, [t["name"] for t in outputs], list(stage.output_names)))
    sources = stage.sources or {}
    sinks = stage.sinks or {}
    for entry in inputs:
        if entry["name"] not in sources:
            raise ExportError("%s: input %r has no source" % (label, entry["name"]))
        entry["source"] = sources[entry["name"]]
    for entry in outputs:
        if entry["name"] in sinks:
            entry["sink"] = sinks[entry["name"]]
    for entry in inputs + outputs:  # the manifest's key order: name, dtype, shape, source/sink, profile
        if "profile" in entry:
            entry["profile"] = entry.pop("profile")
    sha = sha256_file(path)
    size = os.path.getsize(path) + (os.path.getsize(os.path.join(out_dir, data["file"])) if data else 0)
    report = StageReport(stage.name, path, sha, size, counts, data["file"] if data else None)
    entry: Dict[str, Any] = {"name": stage.name, "file": file_name, "sha256": sha}
    if data is not None:
        entry["data"] = data
    entry.update({"runs": stage.runs, "inputs": inputs, "outputs": outputs})
    return entry, report


def export_stage(stage: StageExport, out_dir: str, opset: int = DEFAULT_OPSET,
                 external_data: str = "auto") -> Dict[str, Any]:
    """Export one stage to <out_dir>/<name>.onnx, check it, return its manifest entry."""
    return _export_stage(stage, out_dir, opset, external_data)[0]


def record_channel_orders(manifest: Dict[str, Any], orders: Optional[Dict[str, str]] = None) -> None:
    """Make every camera entry of ``manifest`` state its channel_order, in place: ``orders`` (camera name ->
    "rgb" | "bgr"; the name "*" for every camera) over what the entry states, DEFAULT_CHANNEL_ORDER where neither
    says. ExportError for an order or a camera name that is not there."""
    orders = dict(orders or {})
    cameras = manifest.get("cameras")
    entries = [c for c in cameras if isinstance(c, dict)] if isinstance(cameras, list) else []
    names = [c.get("name") for c in entries]
    for name, order in orders.items():
        if order not in CHANNEL_ORDERS:
            which = "every camera" if name == "*" else "camera %r" % name
            raise ExportError("channel order %r for %s is not one of %s" % (order, which, ", ".join(CHANNEL_ORDERS)))
        if name != "*" and name not in names:
            raise ExportError("channel order for camera %r: the manifest has no such camera (cameras: %s)"
                              % (name, ", ".join(map(str, names)) or "none"))
    for entry in entries:
        order = orders.get(entry.get("name"), orders.get("*"))
        if order is not None:
            entry["channel_order"] = order
        else:
            entry.setdefault("channel_order", DEFAULT_CHANNEL_ORDER)


def export_model(stages: Sequence[StageExport], out_dir: str, manifest: Dict[str, Any],
                 opset: int = DEFAULT_OPSET, external_data: str = "auto",
                 channel_orders: Optional[Dict[str, str]] = None) -> Tuple[Dict[str, Any], List[StageReport]]:
    """Export every stage and write <out_dir>/manifest.json; returns the manifest and one report per file.

    manifest holds everything but "stages". Each camera's channel order is recorded (record_channel_orders).
    The result is validated with the runtime's own parser before it is written, so a manifest this writes is one
    the runtime loads.
    """
    if "stages" in manifest:
        raise ExportError("the manifest given to the exporter must not hold \"stages\" (the exporter writes them)")
    full = copy.deepcopy(dict(manifest))
    record_channel_orders(full, channel_orders)  # before the long part: a wrong name fails at once
    os.makedirs(out_dir, exist_ok=True)
    done = [_export_stage(stage, out_dir, opset, external_data) for stage in stages]
    full["stages"] = [entry for entry, _ in done]
    manifest_path = os.path.join(out_dir, "manifest.json")
    try:
        parse_manifest(full, manifest_path)
    except ManifestError as exc:
        raise ExportError("refusing to write an invalid manifest: %s" % exc) from exc
    with open(manifest_path, "w", encoding="utf-8") as f:
        json.dump(full, f, indent=2)
        f.write("\n")
    return full, [report for _, report in done]


def export_stages(stages: Sequence[StageExport], out_dir: str, manifest: Dict[str, Any],
                  opset: int = DEFAULT_OPSET) -> Dict[str, Any]:
    """export_model without the reports."""
    return export_model(stages, out_dir, manifest, opset)[0]


# --- the command -------------------------------------------------------------------------------------------------

def resolve_factory(text: str) -> Callable[[Optional[str]], Any]:
    """"package.module:function" -> the function; ExportError saying what is wrong otherwise."""
    mod_name, sep, fn_name = text.partition(":")
    if not sep or not mod_name or not fn_name or ":" in fn_name \
            or not all(part.isidentifier() for part in mod_name.split(".")) or not fn_name.isidentifier():
        raise ExportError("--factory %r: expected MODULE:FUNCTION, e.g. tools.make_reference:student" % text)
    try:
        module = importlib.import_module(mod_name)
    except Exception as exc:  # the factory's module may fail in any way while importing
        raise ExportError("--factory %r: cannot import module %r: %s: %s"
                          % (text, mod_name, type(exc).__name__, _first_line(exc))) from exc
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise ExportError("--factory %r: module %r has no attribute %r" % (text, mod_name, fn_name))
    if not callable(fn):
        raise ExportError("--factory %r: %s.%s is a %s, not a function" % (text, mod_name, fn_name, type(fn).__name__))
    return fn


def call_factory(text: str, checkpoint: Optional[str]) -> ExportSpec:
    fn = resolve_factory(text)
    try:
        spec = fn(checkpoint)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError("--factory %r raised %s: %s" % (text, type(exc).__name__, _first_line(exc))) from exc
    if not isinstance(spec, ExportSpec):
        raise ExportError("--factory %r returned a %s; it must return tools.export.ExportSpec(manifest, stages)"
                          % (text, type(spec).__name__))
    if not isinstance(spec.manifest, dict):
        raise ExportError("--factory %r: ExportSpec.manifest is a %s, expected a dict"
                          % (text, type(spec.manifest).__name__))
    if not isinstance(spec.stages, (list, tuple)) or not spec.stages \
            or not all(isinstance(s, StageExport) for s in spec.stages):
        raise ExportError("--factory %r: ExportSpec.stages must be a non-empty list of tools.export.StageExport"
                          % text)
    return spec


def describe_sampler(sampler: Dict[str, Any]) -> str:
    """"student: 1 step (distilled)" / "teacher: 10 Euler steps, shift 5"."""
    steps = sampler.get("steps")
    if sampler.get("distilled"):
        return "student: %s step%s (distilled)" % (steps, "" if steps == 1 else "s")
    return "teacher: %s Euler step%s, shift %g" % (steps, "" if steps == 1 else "s", float(sampler.get("shift", 1.0)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's arguments, description and epilog (`wam-edge export` and ``python -m tools.export``)."""
    parser.description = ("Export a PyTorch world action model to one ONNX file per stage, manifest.json and "
                          "golden.npz (torch inputs and outputs for verification).")
    parser.epilog = "The factory is FN(checkpoint: Optional[str]) -> tools.export.ExportSpec; see tools/export.py."
    parser.add_argument("--factory", required=True, metavar="MOD:FN",
                        help="the model factory, e.g. tools.make_reference:student or tools.make_reference:teacher")
    parser.add_argument("--checkpoint", metavar="PATH", help="weights passed to the factory (default: none)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help="ONNX opset, >= %d (default %%(default)s: what JetPack 5's TensorRT 8.5 parses)"
                        % MIN_OPSET)
    parser.add_argument("--external-data", choices=EXTERNAL_DATA_MODES, default="auto",
                        help="weights in a file beside each ONNX file (always), inside it (never), or beside it when "
                        "a stage's weights pass %d MiB, near protobuf's 2 GB limit (auto, the default)"
                        % (EXTERNAL_DATA_AUTO_BYTES >> 20))
    parser.add_argument("--golden", dest="golden", action="store_true", default=True,
                        help="write <out>/golden.npz (the default)")
    parser.add_argument("--no-golden", dest="golden", action="store_false", help="do not write golden.npz")
    parser.add_argument("--seed", type=int, default=0, help="seed of the golden inputs (default %(default)s)")
    parser.add_argument("--channel-order", action="append", default=[], metavar="[CAMERA=]ORDER",
                        help="the channel order (%s) a camera's model input was trained on, e.g. head=bgr for "
                        "frames recorded through Unitree's image client; ORDER alone sets every camera; repeatable; "
                        "default: what the factory states, else %s"
                        % (" or ".join(CHANNEL_ORDERS), DEFAULT_CHANNEL_ORDER))


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog)
    add_arguments(parser)
    return parser


def parse_channel_orders(items: Sequence[str]) -> Dict[str, str]:
    """["head=bgr", "rgb"] -> {"head": "bgr", "*": "rgb"} (record_channel_orders checks names and orders)."""
    out: Dict[str, str] = {}
    for item in items:
        name, sep, order = item.rpartition("=")
        if sep and not name:
            raise ExportError("--channel-order %r: expected CAMERA=ORDER or ORDER" % item)
        out[name if sep else "*"] = order
    return out


def main(argv: Optional[List[str]] = None, prog: str = "wam-edge export") -> int:
    return run(build_parser(prog).parse_args(argv), prog)


def run(args: argparse.Namespace, prog: str = "wam-edge export") -> int:
    # torch's exporter logs a warning per torchvision op it cannot register; nothing here uses torchvision
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    if args.opset < MIN_OPSET:
        print("%s: --opset %d refused: opset >= %d is needed so LayerNormalization stays one op, which TensorRT "
              "runs in its normalization layer (below 17 it is decomposed and overflows in FP16)"
              % (prog, args.opset, MIN_OPSET), file=sys.stderr)
        return 2
    try:
        orders = parse_channel_orders(args.channel_order)
        spec = call_factory(args.factory, args.checkpoint)
        manifest, reports = export_model(spec.stages, args.out, spec.manifest, args.opset, args.external_data,
                                         orders)
        for r in reports:
            ops = ", ".join("%d %s" % (n, op) for op, n in r.op_counts.items())
            weights = "; weights in %s" % r.data_file if r.data_file else ""
            print("%s  %s  %d bytes%s  (%s)" % (r.sha256, r.path, r.bytes, weights, ops))
            warning = norm_warning(r.name, r.op_counts)
            if warning:
                print(warning)
        print("wrote %s" % os.path.join(args.out, "manifest.json"))
        print("sampler: %s" % describe_sampler(manifest["sampler"]))
        print("cameras: %s" % ", ".join("%s (%s)" % (c["name"], c["channel_order"]) for c in manifest["cameras"]))
        if args.golden:
            from tools import golden

            parsed = parse_manifest(manifest, os.path.join(args.out, "manifest.json"))
            arrays = golden.make_golden(spec.stages, parsed, args.seed)
            meta = {"seed": args.seed, "torch": torch.__version__,
                    "stages": {r.name: r.sha256 for r in reports}}
            path = os.path.join(args.out, "golden.npz")
            golden.write_golden(path, arrays, meta)
            print("wrote %s (%d tensors, seed %d)" % (path, len(arrays), args.seed))
    except (ExportError, ManifestError) as exc:
        print("%s: %s" % (prog, exc), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    # run as tools.export, not __main__, so ExportSpec is the class factories import
    from tools.export import main as _main

    sys.exit(_main())
