"""ONNX graph forms for TensorRT: the opset-18 -> 17 rewrite, the form checks, the export's clean-up.

torch's dynamo exporter writes opset 18, and its own down-conversion breaks on Split and the Reduce* ops, while
JetPack 5's TensorRT 8.5 parses opsets up to 17: downgrade_18_to_17 rewrites what changed. check_trt_friendly refuses
what TensorRT's parser cannot take (custom domains, sequences, optionals, strings) and counts what matters for
precision (LayerNormalization, Softmax, normalisations written out by hand). Pure onnx: no torch here.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np
import onnx
from onnx import numpy_helper

MIN_OPSET = 17  # LayerNormalization is a single op from 17 on; TensorRT then uses its normalization layer


class ExportError(RuntimeError):
    """A model that cannot be exported in a form the runtime and TensorRT take; the message names the module."""


_DEFAULT_DOMAINS = ("", "ai.onnx")
# Ops TensorRT's ONNX parser cannot take in any version: TensorRT has no sequence, optional or string tensors.
TRT_UNSUPPORTED_OPS = (
    "ConcatFromSequence", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert",
    "SequenceLength", "SequenceMap", "SplitToSequence", "Optional", "OptionalGetElement", "OptionalHasElement",
    "StringConcat", "StringNormalizer", "StringSplit", "RegexFullMatch", "TfIdfVectorizer",
)
REPORTED_OPS = ("LayerNormalization", "Softmax")
#: the count of normalisations written out by hand (RMSNorm, a custom layer norm): a ReduceMean of a square
DECOMPOSED_NORM = "decomposed norm"


#: initializers with at most this many elements are read as constants by the opset-17 rewrite
SMALL_CONSTANT = 4096


def strip_metadata(model: onnx.ModelProto) -> None:
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


def default_opset(model: onnx.ModelProto) -> Optional[int]:
    for op in model.opset_import:
        if op.domain in _DEFAULT_DOMAINS:
            return int(op.version)
    return None


# Ops whose axes became an input in opset 18; opset 17 takes them as an attribute.
_REDUCE_AXES_18 = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                   "ReduceMin", "ReduceProd", "ReduceSumSquare")


# Opset-18 additions that opset 17 lacks, per op: attributes whose default value means "as in opset 17"
# (dropped), and the highest input count opset 17 takes.
_COMPAT_18_ATTRS: Dict[str, Dict[str, Any]] = {
    "Resize": {"antialias": 0, "keep_aspect_ratio_policy": b"stretch"},
    "LpPool": {"ceil_mode": 0},
}
_COMPAT_18_INPUTS = {"Pad": 3}
_COMPAT_18_REDUCTIONS = ("none", "add", "mul")  # ScatterElements/ScatterND: 18 added max and min


def _same_in_17(node: onnx.NodeProto, attrs: Dict[str, onnx.AttributeProto]) -> bool:
    """True when node means the same in opset 17 (after dropping opset-18 attributes at their defaults);
    False for ops new in 18 and for uses of what 18 added."""
    try:
        if onnx.defs.get_schema(node.op_type, 18).since_version != 18:
            return True
    except Exception:  # not an ONNX op: check_trt_friendly names it
        return True
    if node.op_type in ("ScatterElements", "ScatterND"):
        reduction = attrs["reduction"].s.decode() if "reduction" in attrs else "none"
        return reduction in _COMPAT_18_REDUCTIONS
    if node.op_type in _COMPAT_18_INPUTS:
        return not any(node.input[_COMPAT_18_INPUTS[node.op_type]:])
    if node.op_type in _COMPAT_18_ATTRS:
        if "axes" in attrs:
            return False
        for name, default in _COMPAT_18_ATTRS[node.op_type].items():
            if name in attrs:
                if onnx.helper.get_attribute_value(attrs[name]) != default:
                    return False
                node.attribute.remove(attrs[name])
        return True
    return False  # new in opset 18 (GroupNormalization, Mish, Bitwise*, Optional*, Col2Im, CenterCropPad)


def downgrade_18_to_17(model: onnx.ModelProto, label: str) -> None:
    """Rewrite an opset-18 graph in opset 17's forms, in place. torch's dynamo exporter writes opset 18; its own
    down-conversion leaves Split's num_outputs in place and fails on Reduce* ops whose axes are inputs. So: Reduce*
    axes (constant inputs) become the axes attribute, Split's num_outputs becomes a constant "split" input with
    the sizes (Split-18: ceil-sized chunks, the last one smaller), opset-18 attributes left at their defaults are
    dropped (Resize, LpPool), and any other use of what opset 18 added is refused by name."""
    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes: Dict[str, List[Optional[int]]] = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    # the small ones only (axes, split sizes, pads): weights may be external and are never needed here
    constants: Dict[str, np.ndarray] = {init.name: numpy_helper.to_array(init) for init in graph.initializer
                                        if init.data_location != onnx.TensorProto.EXTERNAL
                                        and int(np.prod(init.dims, dtype=np.int64)) <= SMALL_CONSTANT}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS:
            for a in node.attribute:
                if a.name == "value":
                    constants[node.output[0]] = numpy_helper.to_array(a.t)
                elif a.name == "value_ints":
                    constants[node.output[0]] = np.asarray(list(a.ints), dtype=np.int64)
    detached = set()
    for node in walk_nodes(graph):
        if node.domain not in _DEFAULT_DOMAINS:
            continue
        attrs = {a.name: a for a in node.attribute}
        where = "%s: %s node %r" % (label, node.op_type, node.name)
        if node.op_type in _REDUCE_AXES_18:
            if "noop_with_empty_axes" in attrs:
                if attrs["noop_with_empty_axes"].i:
                    raise ExportError("%s: noop_with_empty_axes=1 has no opset-17 form; export at --opset 18" % where)
                node.attribute.remove(attrs["noop_with_empty_axes"])
            if len(node.input) > 1 and node.input[1]:
                axes = constants.get(node.input[1])
                if axes is None:
                    raise ExportError("%s: its axes are computed in the graph, opset 17 needs them constant; "
                                      "export at --opset 18" % where)
                detached.add(node.input[1])
                del node.input[1:]
                node.attribute.append(onnx.helper.make_attribute("axes", [int(v) for v in axes.reshape(-1)]))
        elif node.op_type == "Split" and "num_outputs" in attrs:
            parts = int(attrs["num_outputs"].i)
            axis = int(attrs["axis"].i) if "axis" in attrs else 0
            shape = shapes.get(node.input[0])
            length = shape[axis] if shape is not None and -len(shape) <= axis < len(shape) else None
            if length is None:
                raise ExportError("%s: the length of its input along axis %d is not static, opset 17 needs the "
                                  "split sizes; export at --opset 18" % (where, axis))
            chunk = -(-length // parts)
            sizes = [chunk] * (parts - 1) + [length - chunk * (parts - 1)]
            if sizes[-1] < 0:
                raise ExportError("%s: cannot cut length %d into %d parts" % (where, length, parts))
            const_name = "%s_split_sizes" % (node.name or node.output[0])
            graph.initializer.append(numpy_helper.from_array(np.asarray(sizes, dtype=np.int64), const_name))
            node.attribute.remove(attrs["num_outputs"])
            del node.input[1:]
            node.input.append(const_name)
        elif not _same_in_17(node, attrs):
            raise ExportError("%s: this use of %s needs opset 18 (no opset-17 form); export at --opset 18"
                              % (where, node.op_type))
    used = set(name for node in walk_nodes(graph) for name in node.input) | set(o.name for o in graph.output)
    keep = [init for init in graph.initializer if init.name not in detached or init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    keep_nodes = [n for n in graph.node if not (n.op_type == "Constant" and n.output[0] in detached
                                                 and n.output[0] not in used)]
    del graph.node[:]
    graph.node.extend(keep_nodes)
    for op in model.opset_import:
        if op.domain in _DEFAULT_DOMAINS:
            op.version = 17


def walk_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from walk_nodes(attr.g)
            for g in attr.graphs:
                yield from walk_nodes(g)


def check_trt_friendly(model: onnx.ModelProto, stage: str, module_name: str) -> Dict[str, int]:
    """The form TensorRT parses: default-domain opset >= 17, no custom-domain nodes (no local functions), none of
    TRT_UNSUPPORTED_OPS, every graph input used. Returns the count of each REPORTED_OPS (for the summary, never an
    error)."""
    label = "stage %r (%s)" % (stage, module_name)
    opset = default_opset(model)
    if opset is None or opset < MIN_OPSET:
        raise ExportError("%s: default-domain opset is %s; it must be >= %d so LayerNormalization is one op "
                          "(TensorRT's normalization layer)" % (label, opset, MIN_OPSET))
    counts = {op: 0 for op in REPORTED_OPS}
    counts[DECOMPOSED_NORM] = 0
    nodes = list(walk_nodes(model.graph)) + [n for f in model.functions for n in f.node]
    producer = {out: n for n in nodes for out in n.output}
    for node in nodes:
        if node.domain not in _DEFAULT_DOMAINS:
            raise ExportError("%s: node %r is %s:%s, a custom-domain op that TensorRT's ONNX parser does not know"
                              % (label, node.name, node.domain, node.op_type))
        if node.op_type in TRT_UNSUPPORTED_OPS:
            raise ExportError("%s: node %r is %s, which TensorRT cannot parse (no sequence, optional or string "
                              "tensors)" % (label, node.name, node.op_type))
        if node.op_type in counts:
            counts[node.op_type] += 1
        if node.op_type == "ReduceMean" and _is_square(producer.get(node.input[0])):
            counts[DECOMPOSED_NORM] += 1
    used = {name for n in nodes for name in n.input} | {o.name for o in model.graph.output}
    weights = {t.name for t in model.graph.initializer}
    unused = [i.name for i in model.graph.input if i.name not in used and i.name not in weights]
    if unused:
        raise ExportError("%s: input%s %s %s not used by the exported graph: the engine would not have %s (TensorRT "
                          "drops unused inputs), so it could not match the manifest; remove %s from the stage's "
                          "inputs and the module's forward" % (label, "s" if len(unused) > 1 else "", unused,
                                                               "are" if len(unused) > 1 else "is",
                                                               "them" if len(unused) > 1 else "it",
                                                               "them" if len(unused) > 1 else "it"))
    return counts


def _is_square(node: Optional[onnx.NodeProto]) -> bool:
    """Pow(x, 2) or Mul(x, x): the square a hand-written norm averages (it overflows FP16 for |x| > 256)."""
    if node is None:
        return False
    if node.op_type == "Mul":
        return len(node.input) == 2 and node.input[0] == node.input[1]
    return node.op_type == "Pow"


def norm_warning(stage: str, counts: Dict[str, int]) -> Optional[str]:
    """What to tell the user about hand-written normalisations in a stage, if any."""
    n = counts.get(DECOMPOSED_NORM, 0)
    if not n:
        return None
    return ("warning: stage %s has %d normalisation%s written out as ReduceMean of a square (RMSNorm or a hand-written "
            "layer norm). In FP16 the square overflows for activations above 256: `wam-edge build` keeps these layers "
            "in FP32 in fp16 and bf16 stages (--fp32-norms, on by default); check the engine with `wam-edge verify`, "
            "and if it still fails, build the whole stage with `wam-edge build --precision %s=fp32`. Use "
            "nn.LayerNorm where it fits" % (stage, n, "" if n == 1 else "s", stage))


def external_tensors(model: onnx.ModelProto) -> List[onnx.TensorProto]:
    """The initializers (of the graph and its subgraphs) whose data lives in an external file."""
    graphs, found = [model.graph], []
    while graphs:
        graph = graphs.pop()
        found += [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        for node in graph.node:
            for attr in node.attribute:
                graphs += ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
    return found


def external_locations(path: str) -> List[str]:
    """The files an ONNX file reads its external weights from (sorted; empty when they are all inside it)."""
    model = onnx.load(path, load_external_data=False)
    return sorted({e.value for t in external_tensors(model) for e in t.external_data if e.key == "location"})
