"""`dgrt export`: trace prefill and denoise to ONNX without the weights in memory, then attach them.

The model is built on the meta device and traced with torch.export (dynamo, optimize=False); the
graphs' initializers are then pointed at one weights file, written tensor by tensor from the
memory-mapped checkpoint. Peak memory is the traced graphs plus about one tensor, so a checkpoint larger
than RAM can be exported.
"""

from __future__ import annotations

import ast
import logging
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import onnx_ir as ir
import torch
from onnxscript.optimizer import fold_constants
from torch import nn

from dgrt import __version__
from dgrt.checkpoint import Checkpoint, checkpoint_key
from dgrt.contract import manifest as manifest_mod
from dgrt.contract.io_spec import DTYPES, TORCH_DTYPES, GraphSpec, denoise_spec, prefill_spec
from dgrt.contract.manifest import Manifest, WeightsEntry, mark_verified
from dgrt.errors import DgrtError
from dgrt.exporter.lint import LintReport, lint_export
from dgrt.exporter.manifest import build as build_manifest
from dgrt.exporter.quantize import (
    QuantizedWeight,
    Recipe,
    quantize_activations,
    quantize_weight,
    quantize_weights,
)
from dgrt.exporter.weights import WeightFile
from dgrt.fsutil import atomic_dir, check_output
from dgrt.model import Denoise, DiffusionGemma, Prefill
from dgrt.progress import Progress
from dgrt.task import TASK_FILE

WEIGHTS_FILE = "weights.bin"
DEFAULT_OPSET = 21
# torch 2.13's exporter emits opsets 18..23; 21 is the first with blocked INT4 DequantizeLinear.
SUPPORTED_OPSETS = range(18, 24)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
IR_DTYPES = {"float32": ir.DataType.FLOAT, "float16": ir.DataType.FLOAT16, "bfloat16": ir.DataType.BFLOAT16}
# Example sizes for tracing: all different, none 0 or 1, so torch.export specialises nothing.
EXAMPLE_DIMS = {"batch": 2, "seq": 5, "past_full": 7, "past_sliding": 6}


@dataclass(frozen=True)
class ExportOptions:
    dtype: str = "fp32"  # a key of DTYPES
    opset: int = DEFAULT_OPSET
    max_context: int | None = None  # default: the model's max_position_embeddings
    debug_logits: bool = False
    quant: Recipe | None = None  # None: no quantization
    # FP8 calibration prompts: 'auto', 'builtin', 'task' or a file (see dgrt.exporter.calibrate.read_prompts)
    calibration: str = "auto"
    calibration_samples: int = 32
    measure_accuracy: bool = True  # quantized exports: measure against fp32 into the manifest


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
    cfg = ckpt.config
    max_context = cfg.max_position_embeddings if options.max_context is None else options.max_context
    if not cfg.canvas_length < max_context <= cfg.max_position_embeddings:
        raise DgrtError(
            f"--max-context {max_context} must be larger than the canvas ({cfg.canvas_length}) and at most the "
            f"model's max_position_embeddings ({cfg.max_position_embeddings})."
        )
    check_output(out_dir, force, inputs=[ckpt.path])  # fail now, not after tracing and calibration
    dtype = DTYPES[options.dtype]

    model, buffers = _meta_model(ckpt, TORCH_DTYPES[dtype])
    if options.quant is not None:  # bad quantization options fail now, not after tracing
        from dgrt.exporter.calibrate import check_samples

        check_samples(options.calibration_samples)
        for name, param in model.named_parameters():
            if param.ndim >= 2:  # GEMM weights (and the embedding, which no recipe quantizes)
                options.quant.check_blocks(name, param.shape)
    specs = {"prefill": prefill_spec(cfg, dtype), "denoise": denoise_spec(cfg, dtype, options.debug_logits)}
    graphs = _traced_graphs(model, dtype, options.opset, max_context, progress)
    if not options.debug_logits:
        graphs["denoise"].graph.outputs.pop()  # "logits", the last output
    quantized: dict[str, QuantizedWeight] = {}
    quantization = None
    if options.quant is not None:
        quantized, quantization = _quantize(graphs, ckpt, options, IR_DTYPES[dtype], progress)

    with atomic_dir(out_dir, force=force, inputs=[ckpt.path]) as tmp:
        weights = WeightFile(tmp / WEIGHTS_FILE)
        try:
            _attach_weights(
                graphs, ckpt, buffers, TORCH_DTYPES[dtype], weights, tmp, progress, quantized, options.quant
            )
        finally:
            weights_sha = weights.close()
        files = {}
        for name, graph in graphs.items():
            progress.update(f"saving {name}.onnx")
            ir.save(graph, tmp / f"{name}.onnx")
            files[name] = f"{name}.onnx"
        copied = _copy_side_files(ckpt.path, tmp)
        manifest = build_manifest(
            ckpt=ckpt,
            specs=specs,
            files=files,
            out=tmp,
            dtype=options.dtype,
            opset=options.opset,
            max_context=max_context,
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
        if quantization is not None and options.measure_accuracy:
            from dgrt.exporter.accuracy import measure

            progress.update("measuring accuracy against fp32")
            manifest = replace(manifest, quantization=quantization | {"accuracy": measure(tmp, ckpt.path)})
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
        "round to nearest; FP8 E4M3 scale = max |w| / 448 per output channel (per expert and channel for expert "
        "stacks); INT4 scale = max |w| / 7 per block of the input dimension; embedding / LM head not quantized"
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
            "method": "max |x| per GEMM input and graph over dgrt's generate loop (fp32 PyTorch modules); "
            "scale = max / 448, per tensor",
        }
    formats = [q.fmt for q in planned.values() if q.part == "quantized"]
    entry["quantized_weights"] = {fmt: formats.count(fmt) for fmt in sorted(set(formats))}
    return planned, entry


def _meta_model(ckpt: Checkpoint, dtype: torch.dtype) -> tuple[DiffusionGemma, dict[str, torch.Tensor]]:
    """The model with no storage (meta), and the real values of its buffers (not in the checkpoint)."""
    with torch.device("meta"):
        model = DiffusionGemma(ckpt.config)
    buffers = {name: b.clone() for name, b in model.named_buffers()}  # built on the CPU (RoPE frequencies)
    model = model.to(device="meta", dtype=dtype)
    for name, b in buffers.items():  # keep RoPE frequencies in fp32 whatever the model dtype
        module_name, _, attr = name.rpartition(".")
        (model.get_submodule(module_name) if module_name else model)._buffers[attr] = b.to("meta")
    return model.eval().requires_grad_(False), buffers


# Traced graphs by (config, dtype, opset, max context), least recently used first. Tracing is most of an
# export's time (tens of seconds, whatever the weights) and depends on nothing else, so a process that
# exports an architecture again (the test suite; a quantized export after a float one) traces it once.
_TRACED: dict[tuple[str, str, int, int], dict[str, ir.Model]] = {}
_TRACED_KEEP = 8


def _traced_graphs(
    model: DiffusionGemma, dtype: str, opset: int, max_context: int, progress: Progress
) -> dict[str, ir.Model]:
    """Both graphs, without weights: copies the caller may change. The denoise graph is always traced with
    its logits output, which the caller drops unless asked for: the value keeps the name "logits" inside
    the graph, where `dgrt validate` can expose it again."""
    cfg = model.config
    key = (repr(cfg), dtype, opset, max_context)  # every field but `raw`, which the graphs do not read
    graphs = _TRACED.pop(key, None)
    if graphs is None:
        traced = {
            "prefill": (Prefill(model), prefill_spec(cfg, dtype)),
            "denoise": (Denoise(model, True), denoise_spec(cfg, dtype, True)),
        }
        graphs = {}
        for i, (name, (module, spec)) in enumerate(traced.items()):
            progress.update(f"tracing {name} graph ({i + 1}/2)")
            graphs[name] = _without_tracing_state(_trace(module, spec, opset, max_context))
        while len(_TRACED) >= _TRACED_KEEP:
            del _TRACED[next(iter(_TRACED))]
    _TRACED[key] = graphs  # now the most recently used
    return {name: graph.clone() for name, graph in graphs.items()}


def _without_tracing_state(model: ir.Model) -> ir.Model:
    """A copy that no longer points to torch's tracing state (FX graph, fake tensors, shape environment:
    tens of MiB), which the exporter leaves in every node's and value's `meta`."""
    for node in model.graph:
        node.meta.clear()
        for value in node.outputs:
            value.meta.clear()
    for value in (*model.graph.inputs, *model.graph.initializers.values()):
        value.meta.clear()
    return model.clone()  # leaves behind the values the graph dropped, which keep theirs


def _trace(module: nn.Module, spec: GraphSpec, opset: int, max_context: int) -> ir.Model:
    dims = {
        "batch": torch.export.Dim("batch", min=1, max=4096),
        "seq": torch.export.Dim("seq", min=1, max=max_context),
        "past_full": torch.export.Dim("past_full", min=0, max=max_context),
        "past_sliding": torch.export.Dim("past_sliding", min=0, max=max_context),
    }
    args, shapes = [], []
    for t in spec.inputs:
        size = [EXAMPLE_DIMS[d] if isinstance(d, str) else d for d in t.shape]
        args.append(torch.zeros(size, dtype=TORCH_DTYPES[t.dtype], device="meta"))
        shapes.append({axis: dims[d] for axis, d in enumerate(t.shape) if isinstance(d, str)})
    n_fixed = sum(1 for t in spec.inputs if t.layer is None)  # the rest are the *past varargs
    dynamic_shapes = (*shapes[:n_fixed], tuple(shapes[n_fixed:]))
    # Without torch's fake-tensor dispatch cache: with symbolic shapes it costs more than it saves here
    # (measured: the same graphs, about 10% sooner).
    from torch._dynamo import config as dynamo_config  # imported by torch.onnx.export anyway

    no_fake_cache = dynamo_config.patch(fake_tensor_cache_enabled=False)
    with warnings.catch_warnings(), torch.no_grad(), _quiet_logger("torch.onnx"), no_fake_cache:
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            tuple(args),
            dynamic_shapes=dynamic_shapes,
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            opset_version=opset,
            dynamo=True,
            optimize=False,  # the optimizer cannot run on meta tensors; the graph is small anyway
            verbose=False,
        )
    assert program is not None  # dynamo=True always returns a program
    model = program.model
    _fold_constants(model)
    _name_nodes(model)
    model.producer_name, model.producer_version = "dgrt", __version__
    model.graph.name = spec.name
    model.doc_string = spec.doc
    return model


@contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _fold_constants(model: ir.Model) -> None:
    """Fold the small constant subgraphs the exporter leaves (shapes, axes) into constants: TensorRT's
    parser wants some of them (Reduce axes, TopK's K) as build-time constants. Nodes that read a weight
    are left alone, so no weight is read, copied or transformed."""

    def should_fold(node: ir.Node) -> bool | None:
        return False if any(v is not None and _is_weight(v) for v in node.inputs) else None

    fold_constants(model, should_fold=should_fold)
    ir.passes.common.RemoveUnusedNodesPass()(model)


def _name_nodes(model: ir.Model) -> None:
    """Hierarchical node names from the module path ("model.layers.3/linear_12"), stable across exports;
    the exporter's per-node metadata (stack traces with local paths) is dropped."""
    used: set[str] = set()
    for node in model.graph:
        scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
        base = "/".join(s for s in ast.literal_eval(scopes) if s) if scopes else (node.name or node.op_type)
        name, k = base, 0
        while name in used:  # one torch op may become several nodes
            k += 1
            name = f"{base}_{k}"
        used.add(name)
        node.name = name
        node.metadata_props.clear()


def _is_weight(value: ir.Value) -> bool:
    return (value.name or "").startswith("model.")


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
) -> None:
    """Point every model initializer at the weights file; each tensor is written once for both graphs.
    Quantized weights are computed from the checkpoint tensor here, one weight at a time."""
    values = [v for g in graphs.values() for v in g.graph.initializers.values() if _is_weight(v)]
    written: dict[str, tuple[int, int]] = {}
    names = list(dict.fromkeys(v.name for v in values))
    current: tuple[str, tuple[torch.Tensor, torch.Tensor]] | None = None  # the last quantized weight

    def tensor_for(name: str, shape: ir.Shape) -> torch.Tensor:
        nonlocal current
        if name in quantized:
            q = quantized[name]
            assert recipe is not None
            if current is None or current[0] != q.param:
                source = ckpt.tensor(checkpoint_key(q.param))
                current = (q.param, quantize_weight(source, q.fmt, recipe.block_size))
            data, scale = current[1]
            return data if q.part == "quantized" else scale.to(dtype)  # INT4 data is packed: no shape check
        param = name.removeprefix("model.")
        tensor = buffers[param] if param in buffers else ckpt.tensor(checkpoint_key(param)).to(dtype)
        if tuple(tensor.shape) != tuple(shape.dims):
            raise DgrtError(
                f"initializer {name} has shape {list(shape.dims)} in the graph, {list(tensor.shape)} on disk."
            )
        return tensor

    for value in values:
        name, shape, dtype_ = value.name, value.shape, value.dtype
        assert name is not None and shape is not None and dtype_ is not None  # initializers are typed
        if name not in written:
            progress.update("writing weights", len(written), len(names))
            written[name] = weights.add(tensor_for(name, shape))
        offset, length = written[name]
        value.const_value = ir.ExternalTensor(
            WEIGHTS_FILE, offset, length, dtype_, shape=shape, name=name, base_dir=base_dir
        )


def _copy_side_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in (*TOKENIZER_FILES, "generation_config.json", TASK_FILE):
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied
