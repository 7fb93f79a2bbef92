"""Export torch stages to one self-contained ONNX file each plus manifest.json.

The manifest's tensor dtypes/shapes are read back from the exported graphs, so
they agree with the files by construction; the runtime re-checks both at load.
"""

import copy
import json
import os
import warnings
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import onnx
import torch

from runtime.policy.manifest import ManifestError, parse_manifest, sha256_file

# ONNX TensorProto element type -> manifest dtype name.
_ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.BOOL: "bool",
}


class ExportError(RuntimeError):
    pass


class StageExport(NamedTuple):
    """One stage to export. sources maps each input name to its manifest source
    (camera:<name>, state, sampler:x, sampler:t, <stage>:<output>); sinks maps
    outputs the host consumes (sampler:velocity)."""

    name: str
    module: torch.nn.Module
    example_inputs: Tuple[torch.Tensor, ...]
    input_names: Sequence[str]
    output_names: Sequence[str]
    runs: str = "once"
    sources: Optional[Dict[str, str]] = None
    sinks: Optional[Dict[str, str]] = None


def _torch_export(stage: StageExport, path: str, opset: int) -> None:
    """dynamo exporter first; the TorchScript one only if dynamo fails (said aloud)."""
    kwargs = dict(input_names=list(stage.input_names), output_names=list(stage.output_names),
                  opset_version=opset, external_data=False)
    try:
        torch.onnx.export(stage.module, stage.example_inputs, path, dynamo=True, verbose=False, **kwargs)
        return
    except Exception as exc:  # any exporter failure triggers the fallback
        dynamo_error = exc
    warnings.warn("stage %r: dynamo ONNX export failed (%s: %s); falling back to dynamo=False"
                  % (stage.name, type(dynamo_error).__name__, dynamo_error), stacklevel=3)
    kwargs.pop("external_data")
    try:
        torch.onnx.export(stage.module, stage.example_inputs, path, dynamo=False, **kwargs)
    except Exception as exc:
        raise ExportError("stage %r (%s): ONNX export failed with both exporters: dynamo: %s; "
                          "torchscript: %s" % (stage.name, type(stage.module).__name__,
                                               dynamo_error, exc)) from exc


def _strip_metadata(model: onnx.ModelProto) -> None:
    """Drop exporter debug metadata (stack traces with absolute paths, fx node
    dumps): it makes files machine-dependent and bigger, and no backend uses it."""
    def strip_graph(graph: onnx.GraphProto) -> None:
        graph.doc_string = ""
        del graph.metadata_props[:]
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            vi.doc_string = ""
            del vi.metadata_props[:]
        for init in graph.initializer:
            init.doc_string = ""
            del init.metadata_props[:]
        for node in graph.node:
            node.doc_string = ""
            del node.metadata_props[:]
            for attr in node.attribute:
                if attr.HasField("g"):
                    strip_graph(attr.g)
                for g in attr.graphs:
                    strip_graph(g)

    model.doc_string = ""
    del model.metadata_props[:]
    strip_graph(model.graph)


def _tensor_entries(values: Sequence[onnx.ValueInfoProto], where: str) -> List[Dict[str, Any]]:
    entries = []
    for vi in values:
        ttype = vi.type.tensor_type
        dtype = _ONNX_DTYPES.get(ttype.elem_type)
        if dtype is None:
            raise ExportError("%s: tensor %r has unsupported ONNX element type %d"
                              % (where, vi.name, ttype.elem_type))
        shape = []
        for dim in ttype.shape.dim:
            if not dim.HasField("dim_value"):
                raise ExportError("%s: tensor %r has a dynamic dimension %r; export with "
                                  "static shapes" % (where, vi.name, dim.dim_param))
            shape.append(int(dim.dim_value))
        entries.append({"name": vi.name, "dtype": dtype, "shape": shape})
    return entries


def export_stage(stage: StageExport, out_dir: str, opset: int = 18) -> Dict[str, Any]:
    """Export one stage to <out_dir>/<name>.onnx, check it, return its manifest entry."""
    os.makedirs(out_dir, exist_ok=True)
    file_name = stage.name + ".onnx"
    path = os.path.join(out_dir, file_name)
    stage.module.eval()
    with torch.no_grad():
        _torch_export(stage, path, opset)
    try:
        model = onnx.load(path)
        _strip_metadata(model)
        onnx.save_model(model, path, save_as_external_data=False)
        onnx.checker.check_model(path, full_check=True)
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as exc:
        raise ExportError("stage %r (%s): %s fails ONNX checks: %s"
                          % (stage.name, type(stage.module).__name__, path, exc)) from exc

    where = "stage %r (%s)" % (stage.name, path)
    inputs = _tensor_entries(model.graph.input, where)
    outputs = _tensor_entries(model.graph.output, where)
    if [t["name"] for t in inputs] != list(stage.input_names):
        raise ExportError("%s: graph inputs %s, expected %s"
                          % (where, [t["name"] for t in inputs], list(stage.input_names)))
    if [t["name"] for t in outputs] != list(stage.output_names):
        raise ExportError("%s: graph outputs %s, expected %s"
                          % (where, [t["name"] for t in outputs], list(stage.output_names)))
    sources = stage.sources or {}
    sinks = stage.sinks or {}
    for entry in inputs:
        if entry["name"] not in sources:
            raise ExportError("%s: input %r has no source" % (where, entry["name"]))
        entry["source"] = sources[entry["name"]]
    for entry in outputs:
        if entry["name"] in sinks:
            entry["sink"] = sinks[entry["name"]]
    return {"name": stage.name, "file": file_name, "sha256": sha256_file(path),
            "runs": stage.runs, "inputs": inputs, "outputs": outputs}


def export_stages(stages: Sequence[StageExport], out_dir: str, manifest: Dict[str, Any],
                  opset: int = 18) -> Dict[str, Any]:
    """Export every stage and write <out_dir>/manifest.json.

    manifest holds everything but "stages" (format, cameras, state, action,
    sampler, ...). The result is validated with the runtime's own parser before
    it is written, so a manifest this writes is one the runtime loads.
    """
    os.makedirs(out_dir, exist_ok=True)
    full = copy.deepcopy(dict(manifest))
    full["stages"] = [export_stage(stage, out_dir, opset) for stage in stages]
    manifest_path = os.path.join(out_dir, "manifest.json")
    try:
        parse_manifest(full, manifest_path)
    except ManifestError as exc:
        raise ExportError("refusing to write an invalid manifest: %s" % exc) from exc
    with open(manifest_path, "w", encoding="utf-8") as f:
        json.dump(full, f, indent=2)
        f.write("\n")
    return full
