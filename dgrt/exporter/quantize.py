"""Quantization recipes as standard ONNX Q/DQ: which weights get which format, the weight math, and the
rewrite of the traced graphs.

* fp8: E4M3 weights with one scale per output channel, and every such GEMM's activation input through a
  QuantizeLinear/DequantizeLinear pair with one static per-tensor scale from calibration (W8A8).
* int4: weight-only; signed INT4 in blocks of `block_size` along the input dimension, packed two per byte
  (low nibble first); activations untouched (W4A16).
* int4-experts: INT4 expert stacks, FP8 everything else.

Weights are stored 2-D as the right-hand (or transB) operand of their GEMM (see `layout`). Every rule
TensorRT states holds by construction: symmetric (no zero point on weights; the activation
pairs carry an explicit zero FP8 zero point, which is what fixes their output type), constant positive
scales, per-tensor activation scales, INT4 only on weights. The tied embedding / LM head stays in the
export dtype (it is also read by Gather and by the self-conditioning matmul). The router's linear layer is
quantized like any other; its softmax and top-k stay in full precision.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch

from dgrt.contract.manifest import RECIPES
from dgrt.errors import DgrtError

BLOCK_SIZES = (32, 64, 128)
VALUES_PER_CHUNK = 2**24  # weight values quantized at once, 64 MiB in fp32 (see _stored_chunks)
FP8_MAX = 448.0  # largest finite E4M3FN value
INT4_MAX = 7  # symmetric: [-7, 7] is used, -8 never
QUANTIZED_SUFFIX, SCALE_SUFFIX = "_quantized", "_scale"


@dataclass(frozen=True)
class Recipe:
    name: str
    block_size: int = 64

    def __post_init__(self) -> None:
        if self.name not in RECIPES:
            raise DgrtError(f"unknown quantization recipe {self.name!r}; expected one of {', '.join(RECIPES)}.")
        if self.block_size not in BLOCK_SIZES:
            raise DgrtError(f"block size {self.block_size} is not supported; expected one of {BLOCK_SIZES}.")

    def weight_format(self, param: str) -> str | None:
        """'fp8', 'int4' or None (kept in the export dtype) for the weight parameter of a GEMM."""
        if param == "embed_tokens.weight":
            return None
        if self.name == "int4-experts":
            return "int4" if ".experts." in param else "fp8"
        return "int4" if self.name == "int4" else "fp8"

    def check_blocks(self, param: str, shape: Sequence[int]) -> None:
        """Refuse a GEMM weight ([N, K] or [E, N, K]) whose input dimension K this recipe's INT4 blocks do
        not divide. Called on the model's parameters before tracing, and on each weight as it is rewritten."""
        k = shape[-1]
        if self.weight_format(param) == "int4" and k % self.block_size:
            raise DgrtError(
                f"{param} has input dimension {k}, which INT4 blocks of {self.block_size} do not divide; "
                "choose a --block-size that divides it."
            )


# -- the layouts and the weight math ---------------------------------------------------------------------
#
# A GEMM weight is stored 2-D, as the weight operand TensorRT's FP8 and INT4 weight-only GEMMs take: a
# linear layer's [N, K] as checkpoints hold it (read by Gemm(x, W, transB=1)); an expert stack [E, N, K]
# transposed and flattened to [E*K, N] (each expert's [K, N] in turn), dequantized, reshaped to [E, K, N]
# and read as the right operand of MatMul(x, W). Scales are 1-D per output channel (FP8) or 2-D blocks
# along K (INT4; a block never straddles two experts because it divides K). An expert stack's FP8 scale is
# per channel across its experts: E4M3 is floating point, so a shared scale changes the rounding of an
# expert with smaller weights very little (relative weight error 2.732e-2 against 2.710e-2 per expert on
# the real-width slice, measured 2026-11-30).


@dataclass(frozen=True)
class Layout:
    """How a weight of some shape is stored quantized."""

    dims: list[int]  # the stored tensor's
    scale_dims: list[int]
    attributes: dict[str, int]  # DequantizeLinear's

    @property
    def scales(self) -> int:
        return math.prod(self.scale_dims)


def layout(fmt: str, shape: Sequence[int], block_size: int) -> Layout:
    """The stored layout of a GEMM weight (`shape`: [N, K] or an expert stack's [E, N, K]) in a format."""
    if len(shape) == 2:
        (n, k), k_axis = shape, 1
        dims = [n, k]
    else:
        e, n, k = shape
        dims, k_axis = [e * k, n], 0
    channel_axis = 1 - k_axis
    if fmt == "fp8":
        return Layout(dims, [dims[channel_axis]], {"axis": channel_axis})
    scale_dims = list(dims)
    scale_dims[k_axis] //= block_size
    return Layout(dims, scale_dims, {"axis": k_axis, "block_size": block_size})


def stored(w: torch.Tensor) -> torch.Tensor:
    """A GEMM weight in its stored orientation (see `layout`): [N, K] as is, [E, N, K] as [E*K, N]."""
    return w if w.dim() == 2 else w.transpose(1, 2).reshape(-1, w.shape[1])


def fp8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 weight, fp32 scale [N]) of w [N, K]: one scale per output row."""
    amax = w.float().abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale.squeeze(-1)


def int4_weight(w: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 tensor holding INT4 values, fp32 scales [N, K / block_size]) of w [N, K]: round to nearest."""
    n, k = w.shape
    blocks = w.float().reshape(n, k // block_size, block_size)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / INT4_MAX, torch.ones_like(amax))
    q = torch.round(blocks / scale).clamp(-INT4_MAX, INT4_MAX).to(torch.int8)
    return q.reshape(n, k), scale.squeeze(-1)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """INT4 values as ONNX stores them: two per byte, the first in the low nibble (uint8, ceil(n / 2))."""
    flat = q.flatten().to(torch.uint8) & 0x0F
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def quantize_stored(w: torch.Tensor, fmt: str, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, scale) of a weight in its stored layout (see `layout`), INT4 values unpacked in int8."""
    return _stored_chunks(w, fmt, block_size, lambda q: q)


def quantize_weight(w: torch.Tensor, fmt: str, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(bytes as stored, scale) of a weight in a format: FP8 tensor or packed INT4 uint8 tensor. INT4
    values are packed a chunk at a time (each chunk's stored rows hold an even number of values, so no
    byte straddles two chunks): unpacked, a real expert stack's values and their copies were 0.5 GB each."""
    even = w.shape[-1 if w.dim() == 2 else -2] % 2 == 0
    if fmt == "fp8" or not even:
        q, scale = quantize_stored(w, fmt, block_size)
        return (q if fmt == "fp8" else pack_int4(q)), scale
    packed, scale = _stored_chunks(w, fmt, block_size, lambda q: pack_int4(q).reshape(q.shape[0], -1))
    return packed.flatten(), scale


def _stored_chunks(
    w: torch.Tensor, fmt: str, block_size: int, finish: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantizes an even number of output channels at a time, about VALUES_PER_CHUNK values, each chunk's
    values turned into their stored orientation and through finish() before the next: an expert stack of
    the real model is 2 GB in fp32, and the arithmetic on all of it at once held four such temporaries (an
    INT4 export of the real-width slice peaked at 8.0 GiB)."""
    n, stack = w.shape[-2], w.dim() == 3
    channels = max(2, VALUES_PER_CHUNK // (w.numel() // n) // 2 * 2)
    values, scales = [], []
    for i in range(0, n, channels):  # the chunk's values are [its channels, what they cover]
        q, scale = _quantize_rows(_channels(w, i, min(n, i + channels)), fmt, block_size)
        values.append(finish(q.t().contiguous() if stack else q))
        scales.append(scale)
    scale = torch.cat(scales)
    if stack and fmt != "fp8":
        scale = scale.t()
    return torch.cat(values, dim=1 if stack else 0), scale.contiguous()


def _channels(w: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Output channels [start, stop) as rows of what each channel's scales cover: a [N, K] weight's rows; for
    an [E, N, K] stack, the column of the stored [E*K, N] weight (every expert's K values)."""
    return w[start:stop] if w.dim() == 2 else w[:, start:stop].permute(1, 0, 2).reshape(stop - start, -1)


def _quantize_rows(rows: torch.Tensor, fmt: str, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return fp8_weight(rows) if fmt == "fp8" else int4_weight(rows, block_size)


def dequantize(q: torch.Tensor, scale: torch.Tensor, lay: Layout) -> torch.Tensor:
    """What DequantizeLinear computes, for checks: the fp32 stored weight from (values, scale)."""
    axis = lay.attributes["axis"]
    if "block_size" not in lay.attributes:
        return q.float() * (scale[:, None] if axis == 0 else scale[None, :])
    return q.float() * scale.repeat_interleave(lay.attributes["block_size"], dim=axis)


# -- the graph rewrite ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizedWeight:
    """Where a quantized initializer's data comes from: the parameter, the format, and which part."""

    param: str
    fmt: str
    part: str  # "quantized" or "scale"


@dataclass(frozen=True)
class ActivationInput:
    """An FP8 GEMM's activation input, to get a Q/DQ pair once calibration has measured it."""

    node: ir.Node
    index: int
    param: str  # the GEMM's weight parameter: calibration statistics are keyed by it


def quantize_weights(
    model: ir.Model, recipe: Recipe, scale_dtype: ir.DataType
) -> tuple[dict[str, QuantizedWeight], list[ActivationInput]]:
    """Insert a weight DequantizeLinear in front of every GEMM that reads a weight the recipe quantizes
    (expert GEMMs turned around to read it as their right operand; see `layout`). Returns the new weight
    initializers (data still to be written: see `quantize_weight`) and the FP8 GEMMs' activation inputs
    (see `quantize_activations`). Refuses a block size before any calibration."""
    graph = model.graph
    planned: dict[str, QuantizedWeight] = {}
    fp8_inputs: list[ActivationInput] = []
    for node in list(graph):
        slots = _gemm_slots(node)
        if slots is None:
            continue
        w_index, x_index = slots
        weight = node.inputs[w_index]
        assert weight is not None and weight.name is not None and weight.shape is not None
        param = weight.name.removeprefix("model.")
        fmt = recipe.weight_format(param)
        if fmt is None:
            continue
        dims = [int(d) for d in weight.shape.dims if isinstance(d, int)]  # weights have static shapes
        recipe.check_blocks(param, dims)
        lay = layout(fmt, dims, recipe.block_size)
        q_name, s_name = weight.name + QUANTIZED_SUFFIX, weight.name + SCALE_SUFFIX
        q_dtype = ir.DataType.FLOAT8E4M3FN if fmt == "fp8" else ir.DataType.INT4
        q_value = _initializer(graph, q_name, q_dtype, lay.dims)
        s_value = _initializer(graph, s_name, scale_dtype, lay.scale_dims)
        planned[q_name] = QuantizedWeight(param, fmt, "quantized")
        planned[s_name] = QuantizedWeight(param, fmt, "scale")
        dq = ir.node("DequantizeLinear", [q_value, s_value], attributes=lay.attributes, name=f"{node.name}/weight_dq")
        graph.insert_before(node, dq)
        if len(dims) == 2:
            node.replace_input_with(w_index, dq.outputs[0])
        else:
            node, x_index = _as_right_operand(graph, node, dq.outputs[0], dims)
        if fmt == "fp8":
            fp8_inputs.append(ActivationInput(node, x_index, param))
    for name in [n for n, v in graph.initializers.items() if not v.uses() and n.startswith("model.")]:
        graph.initializers.pop(name)
    model.ir_version = max(model.ir_version, 10)  # INT4 is an IR-10 type
    return planned, fp8_inputs


def _as_right_operand(graph: ir.Graph, node: ir.Node, weight: ir.Value, dims: list[int]) -> tuple[ir.Node, int]:
    """Replace an expert GEMM MatMul(W [E, N, K], a [..., K, T]) by Transpose(MatMul(aT, W')) where W' is the
    stored [E*K, N] weight reshaped to [E, K, N]; returns the new MatMul and its activation input. The
    transposes around it cancel against the ones the traced graph has (runtimes fold such pairs)."""
    e, n, k = dims
    name, activation, out = node.name, node.inputs[1], node.outputs[0]
    assert activation is not None and activation.shape is not None and out.shape is not None
    shape = ir.Value(name=f"qdq/{name}/weight_shape", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([3]))
    shape.const_value = ir.tensor(np.array([e, k, n], dtype=np.int64), name=shape.name)
    graph.register_initializer(shape)
    w = ir.node("Reshape", [weight, shape], name=f"{name}/weight_reshape")
    a_t = ir.node(
        "Transpose",
        [activation],
        attributes={"perm": _swap_last(len(activation.shape))},
        name=f"{name}/activation_transpose",
    )
    gemm = ir.node("MatMul", [a_t.outputs[0], w.outputs[0]], name=name)
    out_t = ir.node(
        "Transpose", [gemm.outputs[0]], attributes={"perm": _swap_last(len(out.shape))}, name=f"{name}/output_transpose"
    )
    out_t.outputs[0].type, out_t.outputs[0].shape = out.type, out.shape
    graph.insert_before(node, [w, a_t, gemm, out_t])
    ir.convenience.replace_all_uses_with(out, out_t.outputs[0])
    graph.remove(node, safe=True)
    return gemm, 0


def _swap_last(rank: int) -> list[int]:
    return [*range(rank - 2), rank - 1, rank - 2]


def quantize_activations(
    model: ir.Model, inputs: list[ActivationInput], amax: dict[str, float], dtype: ir.DataType
) -> None:
    """x -> QuantizeLinear -> DequantizeLinear -> GEMM for each FP8 GEMM input: E4M3, one constant scale
    from amax (weight parameter -> calibrated max |input| of its GEMM in this graph)."""
    graph = model.graph
    for a in inputs:
        x = a.node.inputs[a.index]
        assert x is not None
        name = a.node.name
        s = ir.Value(name=f"qdq/{name}/input_scale", type=ir.TensorType(dtype), shape=ir.Shape([]))
        s.const_value = ir.tensor(np.array(max(amax[a.param], 1e-12) / FP8_MAX, dtype=dtype.numpy()), name=s.name)
        zp_type = ir.TensorType(ir.DataType.FLOAT8E4M3FN)
        zp = ir.Value(name=f"qdq/{name}/input_zero_point", type=zp_type, shape=ir.Shape([]))
        zp.const_value = ir.tensor(np.zeros((), dtype=ir.DataType.FLOAT8E4M3FN.numpy()), name=zp.name)
        graph.register_initializer(s)
        graph.register_initializer(zp)
        q = ir.node("QuantizeLinear", [x, s, zp], name=f"{name}/input_q")
        dq = ir.node("DequantizeLinear", [q.outputs[0], s, zp], name=f"{name}/input_dq")
        graph.insert_before(a.node, [q, dq])
        a.node.replace_input_with(a.index, dq.outputs[0])


def _gemm_slots(node: ir.Node) -> tuple[int, int] | None:
    """(weight input, activation input) of a GEMM reading a model weight as stored, or None: Gemm(x, W^T)
    for linear layers, MatMul(W, x^T) for expert stacks (see dgrt.model.layers)."""

    def is_weight(i: int) -> bool:
        v = node.inputs[i] if len(node.inputs) > i else None
        return v is not None and v.is_initializer() and (v.name or "").startswith("model.")

    if node.op_type == "Gemm" and is_weight(1):
        trans_b = node.attributes.get("transB")
        if trans_b is None or trans_b.as_int() != 1:
            raise DgrtError(f"{node.name}: a Gemm reading a weight untransposed; expected transB=1.")
        return 1, 0
    if node.op_type == "MatMul" and is_weight(0):
        return 0, 1
    return None


def _initializer(graph: ir.Graph, name: str, dtype: ir.DataType, dims: list[int]) -> ir.Value:
    """The graph's initializer of that name, created (without data yet) on first use."""
    if name not in graph.initializers:
        graph.initializers[name] = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(dims))
    return graph.initializers[name]
