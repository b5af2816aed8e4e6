"""TensorRT-compatibility lint for ONNX graphs: what TensorRT's ONNX parser would refuse, found on a CPU.

Checked against tensorrt_onnx_ops.json (TensorRT's published operator support matrix, with its source):
the opset range, non-default domains, unsupported operators, data types per operator, the restrictions
that can be checked statically, and ops with data-dependent shapes or control flow in graphs meant to be
captured in CUDA graphs.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from dgrt.contract import manifest as manifest_mod

# ITopKLayer: "only values up to 3840 are supported" (NvInfer.h, TensorRT 10); the runtime keeps a routed
# MoE's capacity within it on TensorRT (dgrt.runtime.experts).
TOPK_MAX_K = 3840
# Shapes that depend on values, or control flow: neither can be captured in a CUDA graph.
DATA_DEPENDENT = {"NonZero", "NonMaxSuppression", "Unique", "Compress", "Loop", "If", "Scan"}
REDUCE_OPS = {
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceProd",
    "ReduceSum",
    "ReduceSumSquare",
}
IR_TO_TABLE_TYPE = {
    ir.DataType.FLOAT: "FP32",
    ir.DataType.FLOAT16: "FP16",
    ir.DataType.BFLOAT16: "BF16",
    ir.DataType.INT32: "INT32",
    ir.DataType.INT64: "INT64",
    ir.DataType.BOOL: "BOOL",
    ir.DataType.UINT8: "UINT8",
    ir.DataType.INT8: "INT8",
    ir.DataType.INT4: "INT4",
    ir.DataType.FLOAT8E4M3FN: "FP8",
    ir.DataType.FLOAT4E2M1: "FP4",
}


@cache
def tensorrt_table() -> dict[str, Any]:
    return json.loads((Path(__file__).parent / "tensorrt_onnx_ops.json").read_text())


@dataclass
class GraphReport:
    name: str
    opset: int
    ops: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)


@dataclass
class LintReport:
    graphs: list[GraphReport]

    @property
    def errors(self) -> list[str]:
        return [f"{g.name}: {e}" for g in self.graphs for e in g.errors]

    @property
    def ok(self) -> bool:
        return not self.errors

    def format(self) -> str:
        table = tensorrt_table()
        lines = [f"TensorRT lint against the TensorRT {table['tensorrt_version']} ONNX parser support matrix"]
        for g in self.graphs:
            inventory = ", ".join(f"{op} {n}" for op, n in sorted(g.ops.items()))
            lines.append(f"{g.name}: opset {g.opset}, {sum(g.ops.values())} nodes: {inventory}")
            lines += [f"  error: {e}" for e in g.errors]
        lines.append("lint passed" if self.ok else f"lint failed: {len(self.errors)} error(s)")
        return "\n".join(lines)


def _constant(value: ir.Value | None) -> np.ndarray | None:
    """The value of an initializer or a Constant node's output, else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is not None and node.op_type == "Constant" and "value" in node.attributes:
        return node.attributes["value"].as_tensor().numpy()
    return None


def _from_shapes(value: ir.Value | None) -> bool:
    """Whether a value is computed from constants and tensor shapes only (a TensorRT shape tensor)."""
    if value is None or _constant(value) is not None:
        return True
    node = value.producer()
    if node is None:  # a graph input's values
        return False
    return node.op_type == "Shape" or all(_from_shapes(v) for v in node.inputs)


def _check_node(node: ir.Node, cuda_graph: bool) -> list[str]:
    table = tensorrt_table()
    op, where = node.op_type, f"{node.op_type} node '{node.name}'"
    if node.domain not in ("", "ai.onnx"):
        return [f"{where} is in domain '{node.domain}'; TensorRT's parser takes only the default ONNX domain."]
    if op in table["unsupported"] or op not in table["supported_types"]:
        return [f"{where}: TensorRT's ONNX parser does not support {op}."]
    errors = []
    if cuda_graph and op in DATA_DEPENDENT:
        errors.append(f"{where} has data-dependent shapes or control flow, which a CUDA graph cannot capture.")
    typed = node.inputs[1] if op == "Where" else (node.inputs[0] if node.inputs else None)
    if typed is not None and typed.dtype in IR_TO_TABLE_TYPE:
        kind = IR_TO_TABLE_TYPE[typed.dtype]
        if kind not in table["supported_types"][op]:
            errors.append(f"{where}: TensorRT runs {op} on {', '.join(table['supported_types'][op])}, not {kind}.")
    attrs = node.attributes
    if op == "TopK":
        k = _constant(node.inputs[1])
        if attrs.get("sorted") is not None and attrs["sorted"].as_int() != 1:
            errors.append(f"{where}: `sorted` must be 1.")
        if k is not None and int(k.reshape(-1)[0]) > TOPK_MAX_K:
            errors.append(f"{where}: K is {int(k.reshape(-1)[0])}; TensorRT's TopK takes at most {TOPK_MAX_K}.")
        elif k is None and not _from_shapes(node.inputs[1]):
            # onnx-tensorrt 10 gives a tensor K to ITopKLayer.setInput(1): it must be a shape tensor.
            errors.append(f"{where}: K must be a build-time constant or computed from input shapes only.")
    elif op == "CumSum" and _constant(node.inputs[1]) is None:
        errors.append(f"{where}: `axis` must be a build-time constant.")
    elif op in REDUCE_OPS | {"Squeeze", "Unsqueeze"} and len(node.inputs) > 1 and node.inputs[1] is not None:
        if _constant(node.inputs[1]) is None:
            errors.append(f"{where}: `axes` must be a build-time constant.")
    elif op == "ScatterND" and attrs.get("reduction") is not None and attrs["reduction"].as_string() != "none":
        errors.append(f"{where}: reduction other than 'none' is unsupported.")
    elif op == "Attention":
        for name in ("softcap", "qk_matmul_output_mode"):
            if name in attrs:
                errors.append(f"{where}: the `{name}` attribute is unsupported.")
    elif op in ("QuantizeLinear", "DequantizeLinear"):
        errors += _check_qdq(node, where)
    return errors


def _check_qdq(node: ir.Node, where: str) -> list[str]:
    """TensorRT's explicit-quantization rules: symmetric, constant positive scales, per-tensor activation
    scales, INT4 only on constant weights, scales of rank at most 2, a block layout with exactly one blocked
    axis dividing evenly, and weights where TensorRT's quantized GEMMs read them."""
    x, scale_value = node.inputs[0], node.inputs[1]
    zero_point_value = node.inputs[2] if len(node.inputs) > 2 else None
    if zero_point_value is not None:
        zero_point = _constant(zero_point_value)
        if zero_point is None or np.any(zero_point.astype(np.float32) != 0):
            return [f"{where}: the zero point must be a constant zero (TensorRT quantizes symmetrically)."]
    scale = _constant(scale_value)
    if scale is None:
        return [f"{where}: the scale must be a build-time constant."]
    if not (np.all(np.isfinite(scale.astype(np.float32))) and np.all(scale.astype(np.float32) > 0)):
        return [f"{where}: scales must all be positive and finite."]
    weight = x is not None and _constant(x) is not None
    quantized_type = node.outputs[0].dtype if node.op_type == "QuantizeLinear" else (x.dtype if x else None)
    if quantized_type == ir.DataType.INT4 and not (node.op_type == "DequantizeLinear" and weight):
        return [f"{where}: INT4 is weight-only in TensorRT (a DequantizeLinear of a constant weight)."]
    if scale.ndim > 0 and not weight:
        return [f"{where}: activation scales must be per-tensor (a scalar), not shape {list(scale.shape)}."]
    if x is None or x.shape is None or scale.ndim == 0:
        return []
    if scale.ndim > 2:
        return [f"{where}: a scale of rank {scale.ndim}; TensorRT takes rank 0, 1 or (blocks of a 2-D weight) 2."]
    dims = [d if isinstance(d, int) else None for d in x.shape.dims]
    axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 1
    axis = axis % len(dims)
    if scale.ndim == 1:
        if dims[axis] is not None and scale.shape[0] != dims[axis]:
            return [f"{where}: {scale.shape[0]} per-axis scales for axis {axis} of size {dims[axis]}."]
    else:
        if scale.ndim != len(dims):
            return [f"{where}: scale rank {scale.ndim} is neither 0, 1 nor the input's rank {len(dims)}."]
        blocked = [i for i, (d, s) in enumerate(zip(dims, scale.shape, strict=True)) if d != s]
        block = node.attributes["block_size"].as_int() if "block_size" in node.attributes else 0
        if blocked != [axis] or block <= 0:
            return [f"{where}: a block layout needs exactly one blocked axis, the `axis` attribute, and a block_size."]
        if dims[axis] != scale.shape[axis] * block:
            return [f"{where}: axis {axis} of size {dims[axis]} is not {scale.shape[axis]} blocks of {block}."]
    if weight and node.op_type == "DequantizeLinear":
        return _check_weight_operand(node, where, len(dims), axis, blocked=scale.ndim == 2)
    return []


def _check_weight_operand(node: ir.Node, where: str, rank: int, axis: int, blocked: bool) -> list[str]:
    """A dequantized weight with per-channel or block scales feeds its GEMMs (through Reshapes) as the right
    operand, MatMul's B or Gemm's transposed B, which is how TensorRT's FP8 per-channel and INT4 weight-only
    GEMMs take it; blocks run along the GEMM's reduction axis K, per-channel scales along the other one."""
    errors = []
    uses = list(node.outputs[0].uses())
    while uses:
        consumer, index = uses.pop()
        op = consumer.op_type
        if op == "Reshape" and index == 0:
            uses += consumer.outputs[0].uses()
            continue
        if op not in ("MatMul", "Gemm"):
            continue
        trans_b = op == "Gemm" and "transB" in consumer.attributes and consumer.attributes["transB"].as_int() == 1
        if index != 1:
            errors.append(
                f"{where}: the weight is the left operand of {op} '{consumer.name}'; TensorRT's quantized "
                "GEMMs take it as the right one (MatMul's B, or Gemm's B with transB=1)."
            )
            continue
        k_axis = rank - 1 if trans_b else rank - 2  # the stored tensor's rows hold K unless it is read transposed
        if blocked and axis != k_axis:
            errors.append(
                f"{where}: blocks run along axis {axis}, not along {op} '{consumer.name}''s reduction axis {k_axis}."
            )
        if not blocked and axis == k_axis:
            errors.append(
                f"{where}: per-channel scales along {op} '{consumer.name}''s reduction axis {k_axis}, "
                "which a GEMM cannot factor out; expected the output-channel axis."
            )
    return errors


def lint_model(model: ir.Model, name: str, cuda_graph: bool) -> GraphReport:
    table = tensorrt_table()
    opset = model.opset_imports.get("", 0)
    report = GraphReport(name, opset)
    if not table["min_opset"] <= opset <= table["max_opset"]:
        report.errors.append(f"opset {opset} is outside the parser's range {table['min_opset']}..{table['max_opset']}.")
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        report.ops[node.op_type] += 1
        report.errors += _check_node(node, cuda_graph)
    return report


def lint_export(export_dir: str | Path) -> LintReport:
    """Lint both graphs of an export directory, after loading it (manifest schema, digests, weights'
    sha256), and check that each graph's inputs and outputs are the ones the manifest describes."""
    export_dir = Path(export_dir)
    manifest = manifest_mod.load(export_dir)
    reports = []
    for name, graph in manifest.graphs.items():
        model = ir.load(export_dir / graph.file)
        report = lint_model(model, name, graph.spec.cuda_graph)
        for kind, values, specs in (
            ("inputs", model.graph.inputs, graph.spec.inputs),
            ("outputs", model.graph.outputs, graph.spec.outputs),
        ):
            names, expected = [str(v.name) for v in values], [t.name for t in specs]
            if names != expected:
                report.errors.append(
                    f"{graph.file}: its {len(names)} {kind} ({', '.join(names[:3])}, ...) are not the {len(expected)} "
                    f"of the {name} graph ({', '.join(expected[:3])}, ...)."
                )
        reports.append(report)
    return LintReport(reports)
