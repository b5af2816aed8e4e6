"""`dgrt export`: trace prefill and denoise to ONNX without the weights in memory, then attach them.

The model is built on the meta device and traced with torch.export (dynamo, optimize=False); the
graphs' initializers are then pointed at one weights file, written tensor by tensor from the
memory-mapped checkpoint. Peak memory is the traced graphs plus about one tensor, so a checkpoint larger
than RAM can be exported.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import onnx_ir as ir
import torch

from dgrt.checkpoint import Checkpoint, checkpoint_key
from dgrt.contract import manifest as manifest_mod
from dgrt.contract.experts import FORMULATIONS, ROUTED, ExpertRouting
from dgrt.contract.io_spec import DTYPES, TORCH_DTYPES, denoise_spec, prefill_spec
from dgrt.contract.manifest import Manifest, WeightsEntry, default_prefill_chunk, mark_verified
from dgrt.errors import DgrtError
from dgrt.exporter.accuracy import measure, resolve_mode
from dgrt.exporter.lint import LintReport, lint_export
from dgrt.exporter.manifest import build as build_manifest
from dgrt.exporter.quantize import (
    QuantizedWeight,
    Recipe,
    quantize_activations,
    quantize_weight,
    quantize_weights,
)
from dgrt.exporter.tracing import TraceSettings, drop_logits, is_weight, meta_model, traced_graphs, weight_order
from dgrt.exporter.weights import WeightFile
from dgrt.fsutil import atomic_dir, check_output
from dgrt.interop.polygraphy import write_data_loader
from dgrt.progress import Progress
from dgrt.task import TASK_FILE

WEIGHTS_FILE = "weights.bin"
DEFAULT_OPSET = 21
# torch 2.13's exporter emits opsets 18..23; 21 is the first with blocked INT4 DequantizeLinear.
SUPPORTED_OPSETS = range(18, 24)
# Canvas positions per chunk of the denoise graph's vocabulary-sized work, for fp32 exports (ONNX Runtime
# on a CPU). Each chunk reads the embedding twice (LM head, next soft embeddings): 2.9 GB in fp32 at the
# real vocabulary. On the real-width slice a step took 5.75 s in chunks of 128 against 7.96 s in chunks of
# 64 (and 6.25 s whole), for about 0.4 GB more memory (docs/measurements.md, "head chunk"). Other dtypes
# are for GPUs and take the whole canvas at once.
DEFAULT_HEAD_CHUNK = 128
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
IR_DTYPES = {"float32": ir.DataType.FLOAT, "float16": ir.DataType.FLOAT16, "bfloat16": ir.DataType.BFLOAT16}


@dataclass(frozen=True)
class ExportOptions:
    dtype: str = "fp32"  # a key of DTYPES
    opset: int = DEFAULT_OPSET
    max_context: int | None = None  # default: the model's max_position_embeddings
    prefill_chunk: int | None = None  # most tokens per prefill call; default DEFAULT_PREFILL_CHUNK (or max_context)
    head_chunk: int | None = None  # canvas positions per chunk of the vocabulary-sized work; see default_head_chunk
    experts: ExpertRouting = ROUTED  # routed (the default) or dense MoE, and the routed capacity
    debug_logits: bool = False
    quant: Recipe | None = None  # None: no quantization
    # FP8 calibration prompts: 'auto', 'builtin', 'task' or a file (see dgrt.exporter.calibrate.read_prompts)
    calibration: str = "auto"
    calibration_samples: int = 32
    # quantized exports: measure against fp32 into the manifest; a mode of dgrt.exporter.accuracy
    accuracy: str = "auto"


def default_head_chunk(dtype: str, canvas: int) -> int:
    """DEFAULT_HEAD_CHUNK positions for fp32 exports, the whole canvas for the GPU dtypes."""
    return min(DEFAULT_HEAD_CHUNK, canvas) if dtype == "fp32" else canvas


@dataclass(frozen=True)
class Exported:
    manifest: Manifest
    lint: LintReport  # of the graphs as written (an export that fails it is not written)


def export(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    options: ExportOptions = ExportOptions(),
    force: bool = False,
    progress: Progress | None = None,
) -> Exported:
    """Write an export directory; returns its manifest and TensorRT lint report."""
    progress = progress or Progress()
    if options.dtype not in DTYPES:
        raise DgrtError(f"unsupported dtype {options.dtype!r}; expected one of {', '.join(DTYPES)}.")
    if options.opset not in SUPPORTED_OPSETS:
        raise DgrtError(
            f"unsupported opset {options.opset}; expected {SUPPORTED_OPSETS.start} to {SUPPORTED_OPSETS.stop - 1}."
        )
    ckpt = Checkpoint.open(checkpoint_dir)
    accuracy = resolve_mode(options.accuracy, ckpt.weight_bytes)
    cfg = ckpt.config
    max_context = cfg.max_position_embeddings if options.max_context is None else options.max_context
    if not cfg.canvas_length < max_context <= cfg.max_position_embeddings:
        raise DgrtError(
            f"--max-context {max_context} must be larger than the canvas ({cfg.canvas_length}) and at most the "
            f"model's max_position_embeddings ({cfg.max_position_embeddings})."
        )
    chunk = default_prefill_chunk(max_context) if options.prefill_chunk is None else options.prefill_chunk
    if not 1 <= chunk <= max_context:
        raise DgrtError(f"--prefill-chunk {chunk} must be from 1 to the max context ({max_context}).")
    experts = options.experts
    if experts.formulation not in FORMULATIONS or not experts.capacity_factor > 0:
        raise DgrtError(
            f"--moe {experts.formulation} with --expert-capacity-factor {experts.capacity_factor}: expected one of "
            f"{', '.join(FORMULATIONS)} and a factor > 0."
        )
    check_output(out_dir, force, inputs=[ckpt.path])  # fail now, not after tracing and calibration
    dtype = DTYPES[options.dtype]

    model, buffers = meta_model(cfg, TORCH_DTYPES[dtype])
    if options.quant is not None:  # bad quantization options fail now, not after tracing
        from dgrt.exporter.calibrate import check_samples

        check_samples(options.calibration_samples)
        for name, param in model.named_parameters():
            if param.ndim >= 2:  # GEMM weights (and the embedding, which no recipe quantizes)
                options.quant.check_blocks(name, param.shape)
    routed = options.experts.routed
    specs = {
        "prefill": prefill_spec(cfg, dtype, routed),
        "denoise": denoise_spec(cfg, dtype, options.debug_logits, routed),
    }
    head_chunk = (
        default_head_chunk(options.dtype, cfg.canvas_length) if options.head_chunk is None else options.head_chunk
    )
    if not 1 <= head_chunk <= cfg.canvas_length:
        raise DgrtError(f"--head-chunk {head_chunk} must be from 1 to the canvas length ({cfg.canvas_length}).")
    graphs = traced_graphs(model, TraceSettings(dtype, options.opset, max_context, head_chunk, routed), progress)
    if not options.debug_logits:
        drop_logits(graphs["denoise"])
    quantized: dict[str, QuantizedWeight] = {}
    quantization = None
    if options.quant is not None:
        quantized, quantization = _quantize(graphs, ckpt, options, IR_DTYPES[dtype], progress)

    with atomic_dir(out_dir, force=force, inputs=[ckpt.path]) as tmp:
        weights = WeightFile(tmp / WEIGHTS_FILE)
        try:
            _attach_weights(
                graphs,
                ckpt,
                buffers,
                TORCH_DTYPES[dtype],
                weights,
                tmp,
                progress,
                quantized,
                options.quant,
                weight_order(model),
            )
        finally:
            weights_sha = weights.close()
        files = {}
        for name, graph in graphs.items():
            progress.update(f"saving {name}.onnx")
            ir.save(graph, tmp / f"{name}.onnx")
            files[name] = f"{name}.onnx"
        copied = [*_copy_side_files(ckpt.path, tmp), write_data_loader(tmp)]
        manifest = build_manifest(
            ckpt=ckpt,
            specs=specs,
            files=files,
            out=tmp,
            dtype=options.dtype,
            opset=options.opset,
            max_context=max_context,
            prefill_chunk=chunk,
            experts=options.experts,
            weights=WeightsEntry(WEIGHTS_FILE, weights.size, weights.count, weights_sha),
            side_files=copied,
            quantization=quantization,
        )
        manifest_mod.write(tmp, manifest)
        mark_verified(tmp, manifest.weights)  # hashed while writing: loading need not hash it again
        progress.update("linting for TensorRT")
        report = lint_export(tmp)
        if not report.ok:
            raise DgrtError(f"the exported graphs fail the TensorRT lint: {report.errors[0]}")
        if quantization is not None and accuracy != "off":
            progress.update(f"measuring accuracy against fp32 ({accuracy})")
            manifest = replace(manifest, quantization=quantization | {"accuracy": measure(tmp, ckpt.path, accuracy)})
            manifest_mod.write(tmp, manifest)
        progress.close()
    return Exported(manifest, report)


def _quantize(
    graphs: dict[str, ir.Model], ckpt: Checkpoint, options: ExportOptions, scale_dtype: ir.DataType, progress: Progress
) -> tuple[dict[str, QuantizedWeight], dict[str, Any]]:
    """Put weight DQ in both graphs, then (FP8 GEMMs) calibrate and add activation Q/DQ; a bad block size
    fails before calibration. Returns the quantized initializers to write and the manifest's entry."""
    from dgrt.exporter.calibrate import calibrate, read_prompts

    recipe = options.quant
    assert recipe is not None
    entry: dict[str, Any] = {"recipe": recipe.name, "block_size": recipe.block_size if recipe.name != "fp8" else None}
    entry["weights"] = (
        "round to nearest; FP8 E4M3 scale = max |w| / 448 per output channel (shared by an expert stack's "
        "experts); INT4 scale = max |w| / 7 per block of the input dimension; weights stored 2-D as the GEMM's "
        "right operand (expert stacks [E*K, N]); embedding / LM head not quantized"
    )
    planned: dict[str, QuantizedWeight] = {}
    fp8_inputs = {}
    for name, graph in graphs.items():
        progress.update(f"quantizing {name} graph ({recipe.name})")
        weights, fp8_inputs[name] = quantize_weights(graph, recipe, scale_dtype)
        planned |= weights
    if any(fp8_inputs.values()):  # FP8 GEMMs: their activation scales come from calibration
        prompts, described = read_prompts(options.calibration, ckpt.path)
        amax = calibrate(ckpt.path, prompts, options.calibration_samples, progress)
        for name, graph in graphs.items():
            quantize_activations(graph, fp8_inputs[name], amax[name], scale_dtype)
        entry["calibration"] = {
            "source": described,
            "samples": options.calibration_samples,
            "method": "max |x| per GEMM input and graph over dgrt's generate loop (PyTorch modules in the "
            f"checkpoint's {str(ckpt.dtype).removeprefix('torch.')}); "
            "scale = max / 448, per tensor",
        }
    formats = [q.fmt for q in planned.values() if q.part == "quantized"]
    entry["quantized_weights"] = {fmt: formats.count(fmt) for fmt in sorted(set(formats))}
    return planned, entry


def _attach_weights(
    graphs: dict[str, ir.Model],
    ckpt: Checkpoint,
    buffers: dict[str, torch.Tensor],
    dtype: torch.dtype,
    weights: WeightFile,
    base_dir: Path,
    progress: Progress,
    quantized: dict[str, QuantizedWeight],
    recipe: Recipe | None,
    order: dict[str, int],
) -> None:
    """Point every model initializer at the weights file; each tensor is written once for both graphs, in
    `order` (see tracing.weight_order). Quantized weights are computed from the checkpoint tensor here, one
    weight at a time."""
    values = [v for g in graphs.values() for v in g.graph.initializers.values() if is_weight(v)]
    shapes: dict[str, ir.Shape] = {}
    for v in values:
        assert v.name is not None and v.shape is not None  # initializers are named and typed
        shapes[v.name] = v.shape

    def position(name: str) -> tuple[int, bool]:  # in `order`; a quantized weight's data, then its scale
        q = quantized.get(name)
        return (order["model." + q.param], q.part == "scale") if q else (order[name], False)

    names = sorted(shapes, key=position)
    written: dict[str, tuple[int, int]] = {}
    current: tuple[str, tuple[torch.Tensor, torch.Tensor]] | None = None  # the last quantized weight

    def tensor_for(name: str, shape: ir.Shape) -> tuple[torch.Tensor, torch.dtype | None]:
        """The tensor to write, and the dtype to write it in (None: as it is)."""
        nonlocal current
        if name in quantized:
            q = quantized[name]
            assert recipe is not None
            if current is None or current[0] != q.param:
                source = ckpt.tensor(checkpoint_key(q.param))
                current = (q.param, quantize_weight(source, q.fmt, recipe.block_size))
            data, scale = current[1]
            return (data, None) if q.part == "quantized" else (scale, dtype)  # INT4 data is packed: no shape check
        param = name.removeprefix("model.")
        tensor, to = (buffers[param], None) if param in buffers else (ckpt.tensor(checkpoint_key(param)), dtype)
        if tuple(tensor.shape) != tuple(shape.dims):
            raise DgrtError(
                f"initializer {name} has shape {list(shape.dims)} in the graph, {list(tensor.shape)} on disk."
            )
        return tensor, to

    for i, name in enumerate(names):
        progress.update("writing weights", i, len(names))
        written[name] = weights.add(*tensor_for(name, shapes[name]))
    for value in values:
        assert value.name is not None and value.dtype is not None
        offset, length = written[value.name]
        value.const_value = ir.ExternalTensor(
            WEIGHTS_FILE, offset, length, value.dtype, shape=shapes[value.name], name=value.name, base_dir=base_dir
        )


def _copy_side_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in (*TOKENIZER_FILES, "generation_config.json", TASK_FILE):
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied
