"""Quantized exports: the weight math, the Q/DQ structure TensorRT expects, the lint's quantization rules,
calibration inputs, and that the graphs run on ONNX Runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch

import dgrt
from dgrt.checkpoint import Checkpoint, checkpoint_key
from dgrt.errors import DgrtError
from dgrt.exporter import accuracy, quantize
from dgrt.exporter.calibrate import builtin_prompts, read_prompts
from dgrt.exporter.lint import lint_export, lint_model
from dgrt.exporter.onnx_export import ExportOptions, export
from dgrt.exporter.quantize import (
    FP8_MAX,
    Recipe,
    dequantize,
    fp8_weight,
    int4_weight,
    layout,
    pack_int4,
    quantize_stored,
    quantize_weight,
    stored,
)

# -- the weight math ---------------------------------------------------------------------------------------


def test_fp8_weights_reproduce_the_originals_within_e4m3_rounding() -> None:
    w = torch.randn(40, 64) * torch.logspace(-3, 1, 40)[:, None]  # rows of very different ranges
    q, scale = fp8_weight(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (40,)  # one scale per output row
    # E4M3 keeps 3 mantissa bits: relative rounding error <= 2^-4; below 2^-6 (subnormals) the step is 2^-9.
    bound = 2**-4 * w.abs() + scale[:, None] * 2**-9
    assert torch.all((dequantize(q, scale, layout("fp8", [40, 64], 32)) - w).abs() <= bound)
    assert torch.allclose(q.float().abs().amax(dim=-1), torch.full((40,), FP8_MAX))  # each row uses the range


def test_int4_blocks_reproduce_the_originals_within_half_a_step() -> None:
    w = torch.randn(16, 128)
    q, scale = int4_weight(w, block_size=32)
    assert scale.shape == (16, 4) and q.min() >= -7 and q.max() <= 7
    step = scale.repeat_interleave(32, dim=-1)
    assert torch.all((dequantize(q, scale, layout("int4", [16, 128], 32)) - w).abs() <= step / 2 + 1e-7)


def test_expert_stacks_are_stored_as_the_right_operand_with_2d_scales() -> None:
    """[E, N, K] becomes [E*K, N]: FP8 scales per output channel (shared by the experts), INT4 blocks along K
    that never straddle two experts."""
    e, n, k = 3, 40, 64
    w = torch.randn(e, n, k) * torch.tensor([1.0, 0.1, 3.0])[:, None, None]  # experts of different ranges
    fp8, int4 = layout("fp8", [e, n, k], 32), layout("int4", [e, n, k], 32)
    assert (fp8.dims, fp8.scale_dims, fp8.attributes) == ([e * k, n], [n], {"axis": 1})
    assert (int4.dims, int4.scale_dims, int4.attributes) == (
        [e * k, n],
        [e * k // 32, n],
        {"axis": 0, "block_size": 32},
    )
    as_right_operand = w.transpose(1, 2).reshape(e * k, n)  # x @ this, expert by expert
    for lay in (fp8, int4):
        fmt = "fp8" if lay is fp8 else "int4"
        q, scale = quantize_stored(w, fmt, 32)
        assert list(q.shape) == lay.dims and list(scale.shape) == lay.scale_dims
        error = (dequantize(q, scale, lay) - as_right_operand).abs()
        bound = 2**-4 * as_right_operand.abs() + 1e-3 if fmt == "fp8" else scale.repeat_interleave(32, 0) / 2 + 1e-7
        assert torch.all(error <= bound)


@pytest.mark.parametrize("shape", [(3, 40, 64), (3, 7, 64), (40, 64), (5, 64)])
def test_weights_quantized_a_chunk_at_a_time_are_the_whole_weight_quantized(
    shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A few channels at a time (their INT4 values packed chunk by chunk where rows are even), the bytes are
    those of quantizing and packing the weight whole."""
    w = torch.randn(*shape)
    whole = {fmt: quantize_weight(w, fmt, 32) for fmt in ("fp8", "int4")}
    monkeypatch.setattr(quantize, "VALUES_PER_CHUNK", 2 * 64 * shape[0])  # 2 to 4 channels a chunk
    for fmt, (data, scale) in whole.items():
        chunked_data, chunked_scale = quantize_weight(w, fmt, 32)
        assert torch.equal(chunked_data.view(torch.uint8), data.view(torch.uint8))
        assert torch.equal(chunked_scale, scale)
    assert torch.equal(whole["int4"][0], pack_int4(quantize_stored(w, "int4", 32)[0]))


def test_int4_packs_two_values_per_byte_low_nibble_first() -> None:
    packed = pack_int4(torch.tensor([1, -2, 3], dtype=torch.int8))
    assert packed.tolist() == [0xE1, 0x03]  # -2 is 0xE in two's complement; the odd tail is zero-padded


def test_recipes_choose_formats_per_weight() -> None:
    linear, expert = "layers.0.self_attn.q_proj.weight", "layers.0.experts.gate_up_proj"
    assert [Recipe(r).weight_format(linear) for r in ("fp8", "int4", "int4-experts")] == ["fp8", "int4", "fp8"]
    assert [Recipe(r).weight_format(expert) for r in ("fp8", "int4", "int4-experts")] == ["fp8", "int4", "int4"]
    assert Recipe("fp8").weight_format("embed_tokens.weight") is None  # tied LM head: kept
    with pytest.raises(DgrtError, match="unknown quantization recipe"):
        Recipe("int3")
    with pytest.raises(DgrtError, match="block size 48"):
        Recipe("int4", block_size=48)


# -- exports ---------------------------------------------------------------------------------------------


def _weight_gemms(model: ir.Model) -> list[tuple[ir.Node, int, int, ir.Node]]:
    """(GEMM, weight input, activation input, DequantizeLinear) for every GEMM fed by a dequantized weight
    (expert stacks through a Reshape to [E, K, N])."""
    out = []
    for dq in model.graph:
        if dq.op_type == "DequantizeLinear" and (dq.inputs[0].name or "").endswith("_quantized"):
            for use in dq.outputs[0].uses():
                uses = use.node.outputs[0].uses() if use.node.op_type == "Reshape" else [use]
                out += [(u.node, u.idx, 1 - u.idx, dq) for u in uses]
    return out


@pytest.mark.parametrize("recipe", ["fp8", "int4", "int4-experts"])
def test_every_linear_and_expert_weight_is_dequantized_in_front_of_its_gemm(
    quantized: dict[str, Path], tiny_ckpt: Path, recipe: str
) -> None:
    ckpt = Checkpoint.open(tiny_ckpt)
    expected_formats = {"fp8": ("fp8", "fp8"), "int4": ("int4", "int4"), "int4-experts": ("fp8", "int4")}[recipe]
    model = ir.load(quantized[recipe] / "denoise.onnx")
    gemms = _weight_gemms(model)
    cfg = ckpt.config
    # per layer: q, k, (v), o, 3 MLP, router, 2 expert GEMMs; 3 self-conditioning linears
    assert len(gemms) == sum(9 + s.has_v_proj for s in cfg.layers) + 3
    assert {n.op_type for n, _, _, _ in gemms} == {"Gemm", "MatMul"}
    unquantized = [n for n in model.graph if n.op_type == "Gemm" and n.inputs[1].is_initializer()]
    assert [n.inputs[1].name for n in unquantized] == ["model.embed_tokens.weight"]  # the LM head only
    for node, w_index, x_index, dq in gemms:
        assert len(dq.inputs) == 2  # no zero point
        weight = dq.inputs[0]
        param = weight.name.removeprefix("model.").removesuffix("_quantized")
        fmt = expected_formats[1] if ".experts." in param else expected_formats[0]
        assert weight.dtype == (ir.DataType.FLOAT8E4M3FN if fmt == "fp8" else ir.DataType.INT4)
        # Stored 2-D as the GEMM's right operand, and dequantized as the graph does, the checkpoint's weight
        # within the format's error.
        original = stored(ckpt.tensor(checkpoint_key(param)).float())
        lay = layout(fmt, list(ckpt.tensor(checkpoint_key(param)).shape), 32)
        assert (
            list(weight.shape.dims) == lay.dims and {a: v.as_int() for a, v in dq.attributes.items()} == lay.attributes
        )
        q = torch.from_numpy(np.asarray(weight.const_value.numpy()).astype(np.float32))
        scale = torch.tensor(dq.inputs[1].const_value.numpy())
        assert list(scale.shape) == lay.scale_dims and scale.dim() <= 2  # what TensorRT's DQ takes
        bound = 2**-4 * original.abs() + 1e-6 if fmt == "fp8" else scale.max() / 2 + 1e-6
        assert torch.all((dequantize(q, scale, lay) - original).abs() <= bound)
        assert w_index == 1  # the right operand: MatMul's B, or Gemm's B with transB=1
        activation = node.inputs[x_index].producer()
        if fmt == "fp8":  # W8A8: a Q/DQ pair with one positive constant scale on the activation
            assert activation is not None and activation.op_type == "DequantizeLinear"
            assert activation.inputs[0].producer().op_type == "QuantizeLinear"
            act_scale = activation.inputs[1].const_value.numpy()
            assert act_scale.shape == () and act_scale > 0
        else:  # weight-only
            assert activation is None or activation.op_type != "DequantizeLinear"
    embedding = model.graph.initializers["model.embed_tokens.weight"]
    assert embedding.dtype == ir.DataType.FLOAT  # tied embedding / LM head stays in full precision


def test_weights_are_stored_once_and_smaller(quantized: dict[str, Path], tiny_ckpt: Path) -> None:
    fp8, int4 = (json.loads((quantized[r] / "manifest.json").read_text()) for r in ("fp8", "int4"))
    fp32_bytes = Checkpoint.open(tiny_ckpt).weight_bytes
    assert int4["weights"]["bytes"] < fp8["weights"]["bytes"] < fp32_bytes
    prefill = ir.load(quantized["int4"] / "prefill.onnx").graph.initializers
    denoise = ir.load(quantized["int4"] / "denoise.onnx").graph.initializers
    shared = [n for n in prefill if n.endswith("_quantized") and n in denoise]
    assert shared and all(prefill[n].const_value.offset == denoise[n].const_value.offset for n in shared)


def test_manifest_records_the_recipe_calibration_and_accuracy(quantized: dict[str, Path]) -> None:
    manifest = json.loads((quantized["fp8"] / "manifest.json").read_text())
    q = manifest["quantization"]
    assert q["recipe"] == "fp8" and q["calibration"]["samples"] == 4 and "builtin" in q["calibration"]["source"]
    assert manifest["onnxruntime"]["session_config"]["session.disable_quant_qdq"] == "1"
    tf = q["accuracy"]["teacher_forced"]
    # A random-weight model is the harsh case (near-uniform logits, ties everywhere): measured on tiny,
    # 2026-11-28, argmax agreement 0.63 and cosine p1 0.59. The bounds only say the graphs compute the model.
    assert tf["argmax_agreement"] > 0.4 and tf["logits_cosine_p1"] > 0.3
    int4 = json.loads((quantized["int4"] / "manifest.json").read_text())["quantization"]
    assert int4["block_size"] == 32 and "calibration" not in int4  # weight-only: nothing to calibrate


def test_a_quick_accuracy_report_is_teacher_forced_over_one_canvas(quantized: dict[str, Path], tiny_ckpt: Path) -> None:
    report = accuracy.measure(quantized["int4"], tiny_ckpt, "quick")
    tf = report["teacher_forced"]
    steps = min(4, dgrt.load(quantized["int4"]).sampler.steps)
    canvas = json.loads((quantized["int4"] / "manifest.json").read_text())["canvas_length"]
    assert report["mode"] == "quick" and len(report["prompts"]) == 1
    assert (tf["canvases"], tf["steps_per_canvas"], tf["positions"]) == (1, steps, steps * canvas)
    assert "steps_per_canvas" not in report and "task" not in report  # no end-to-end runs
    assert "quick report" in accuracy.format_summary("int4", report)


def test_accuracy_auto_is_quick_above_a_checkpoint_size() -> None:
    big = accuracy.QUICK_ABOVE_BYTES + 1
    assert accuracy.resolve_mode("auto", big) == "quick" and accuracy.resolve_mode("auto", 2**20) == "full"
    assert accuracy.resolve_mode("full", big) == "full" and accuracy.resolve_mode("off", 2**20) == "off"
    with pytest.raises(DgrtError, match="accuracy mode 'fast' is not one of auto, full, quick, off"):
        accuracy.resolve_mode("fast", 2**20)


@pytest.mark.parametrize("recipe", ["fp8", "int4", "int4-experts"])
def test_quantized_exports_generate_and_pass_the_lint(quantized: dict[str, Path], recipe: str) -> None:
    assert lint_export(quantized[recipe]).ok
    with dgrt.load(quantized[recipe]) as gen:
        result = gen.generate(["Hello", "Reverse: abc"], seed=0, max_new_tokens=32)
    assert len(result.tokens) == 2 and all(len(t) == 32 for t in result.tokens)


def test_the_torch_backend_refuses_a_quantized_export(quantized: dict[str, Path]) -> None:
    with pytest.raises(DgrtError, match="int4 export; the torch backend runs unquantized exports"):
        dgrt.load(quantized["int4"], backend="torch")


def test_lint_rejects_what_tensorrt_rejects(quantized: dict[str, Path]) -> None:
    model = ir.load(quantized["fp8"] / "denoise.onnx")
    q_nodes = [n for n in model.graph if n.op_type == "QuantizeLinear"]
    scale = q_nodes[0].inputs[1]
    scale.const_value = ir.tensor(np.array(-0.5, dtype=np.float32))
    assert any("positive" in e for e in lint_model(model, "denoise", True).errors)
    scale.const_value = ir.tensor(np.array([0.5, 0.5], dtype=np.float32))
    assert any("per-tensor" in e for e in lint_model(model, "denoise", True).errors)

    model = ir.load(quantized["int4"] / "denoise.onnx")
    dq = next(n for n in model.graph if n.op_type == "DequantizeLinear")
    dq.attributes["block_size"] = ir.AttrInt64("block_size", 16)
    assert any("blocks of 16" in e for e in lint_model(model, "denoise", True).errors)

    # Where TensorRT's quantized GEMMs read weights: the right operand, blocked along K, scales of rank <= 2.
    model = ir.load(quantized["int4"] / "denoise.onnx")
    gemm = next(n for n in model.graph if n.op_type == "Gemm" and n.inputs[1].producer() is not None)
    gemm.attributes["transB"] = ir.AttrInt64("transB", 0)  # now K is the weight's axis 0; its blocks run along 1
    assert any("blocks run along axis 1" in e for e in lint_model(model, "denoise", True).errors)
    x, w = gemm.inputs[0], gemm.inputs[1]
    gemm.replace_input_with(0, w)
    gemm.replace_input_with(1, x)
    assert any("left operand of Gemm" in e for e in lint_model(model, "denoise", True).errors)
    dq = next(n for n in model.graph if n.op_type == "DequantizeLinear")
    dq.inputs[1].const_value = ir.tensor(np.ones((1, 2, 2), dtype=np.float32))
    assert any("scale of rank 3" in e for e in lint_model(model, "denoise", True).errors)


def test_int4_refuses_a_block_size_that_does_not_divide(tiny_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(DgrtError, match="--block-size"):
        export(tiny_ckpt, tmp_path / "out", ExportOptions(quant=Recipe("int4", 64)))
    assert not (tmp_path / "out").exists()


# -- calibration inputs ------------------------------------------------------------------------------------


def test_calibration_prompts_from_builtin_text_and_jsonl(tmp_path: Path) -> None:
    assert len(builtin_prompts()) >= 30
    lines = tmp_path / "p.txt"
    lines.write_text("first prompt\n\nsecond prompt\n")
    assert read_prompts(str(lines), tmp_path)[0] == ["first prompt", "second prompt"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('"a"\n{"prompt": "b"}\n{"text": "c"}\n{"messages": [{"role": "user", "content": "d"}]}\n')
    assert read_prompts(str(jsonl), tmp_path)[0] == ["a", "b", "c", [{"role": "user", "content": "d"}]]
    jsonl.write_text('{"nothing": 1}\n')
    with pytest.raises(DgrtError, match=r"p.jsonl:1: expected a string"):
        read_prompts(str(jsonl), tmp_path)
    with pytest.raises(DgrtError, match="has no dgrt_task.json"):
        read_prompts("task", tmp_path)
    with pytest.raises(DgrtError, match="expected 'builtin', 'task' or a prompt file"):
        read_prompts(str(tmp_path / "missing.txt"), tmp_path)
