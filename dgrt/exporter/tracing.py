"""The prefill and denoise graphs, traced without weights: a model on the meta device through torch.export
(dynamo, optimize=False), small constant subgraphs folded, nodes named after their modules.

Tracing is most of an export's time and grows with the layer count (measured 2026-11-30 on this project's
2-core CPU machine: ~7 s per layer per graph, whatever the widths), so:
* with two CPUs or more, the denoise graph is traced by a second Python process while this one traces
  prefill (`python -m dgrt.exporter.tracing`, which sends the graph back without weights);
* a process keeps the graphs it traced, so it exports an architecture again (the test suite; a quantized
  export after a float one) without tracing it again.
"""

from __future__ import annotations

import ast
import inspect
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx
import onnx_ir as ir
import torch
from onnx_ir.passes.common import RemoveUnusedNodesPass
from onnxscript.optimizer import fold_constants
from torch import nn

import dgrt
from dgrt import __version__
from dgrt.config import ModelConfig
from dgrt.contract.io_spec import TORCH_DTYPES, GraphSpec, denoise_spec, prefill_spec
from dgrt.model import Denoise, DiffusionGemma, Prefill
from dgrt.progress import Progress

# Example sizes for tracing: all different, none 0 or 1, so torch.export specialises nothing.
EXAMPLE_DIMS = {"batch": 2, "seq": 5, "past_full": 7, "past_sliding": 6, "expert_capacity": 3}
# Stands in for the weights of a graph sent between processes; never read (export points every weight
# at its weights file before anything reads one).
NO_DATA = "<weights not attached yet>"

# Traced graphs by (config, dtype, opset, max context), least recently used first.
_TRACED: dict[tuple[str, TraceSettings], dict[str, ir.Model]] = {}
_TRACED_KEEP = 8


def meta_model(cfg: ModelConfig, dtype: torch.dtype) -> tuple[DiffusionGemma, dict[str, torch.Tensor]]:
    """The model with no storage (meta), and the real values of its buffers (not in the checkpoint)."""
    with torch.device("meta"):
        model = DiffusionGemma(cfg)
    buffers = {name: b.clone() for name, b in model.named_buffers()}  # built on the CPU (RoPE frequencies)
    model = model.to(device="meta", dtype=dtype)
    for name, b in buffers.items():  # keep RoPE frequencies in fp32 whatever the model dtype
        module_name, _, attr = name.rpartition(".")
        (model.get_submodule(module_name) if module_name else model)._buffers[attr] = b.to("meta")
    return model.eval().requires_grad_(False), buffers


def is_weight(value: ir.Value) -> bool:
    return (value.name or "").startswith("model.")


def weight_order(model: DiffusionGemma) -> dict[str, int]:
    """The order weights are written in (parameters, then buffers, as the modules define them), by the
    initializer name the graphs give them: one layout for every export of an architecture, whatever order
    tracing produced, so `dgrt plan` can predict the file byte for byte."""
    names = [name for name, _ in model.named_parameters()] + [name for name, _ in model.named_buffers()]
    return {f"model.{name}": i for i, name in enumerate(names)}


@dataclass(frozen=True)
class TraceSettings:
    """What a traced graph depends on besides the model config."""

    dtype: str  # the contract's name, e.g. "float32"
    opset: int
    max_context: int
    head_chunk: int  # canvas positions per chunk of the denoise graph's vocabulary-sized work
    routed: bool = True  # the MoE runs routed (dgrt.contract.experts), else dense


def traced_graphs(model: DiffusionGemma, settings: TraceSettings, progress: Progress) -> dict[str, ir.Model]:
    """Both graphs, without weights: copies the caller may change. The denoise graph is always traced with
    its logits output, which the caller drops unless asked for (see `drop_logits`)."""
    key = (repr(model.config), settings)  # every config field but `raw`, which tracing does not read
    graphs = _TRACED.pop(key, None)
    if graphs is None:
        graphs = _trace_both(model, settings, progress)
        while len(_TRACED) >= _TRACED_KEEP:
            del _TRACED[next(iter(_TRACED))]
    _TRACED[key] = graphs  # now the most recently used
    return {name: graph.clone() for name, graph in graphs.items()}


def _trace_both(model: DiffusionGemma, settings: TraceSettings, progress: Progress) -> dict[str, ir.Model]:
    if _cpus() < 2:
        progress.update("tracing prefill graph (1/2)")
        prefill = trace_graph(model, "prefill", settings)
        progress.update("tracing denoise graph (2/2)")
        return {"prefill": prefill, "denoise": trace_graph(model, "denoise", settings)}
    progress.update("tracing prefill and denoise graphs (two processes)")
    with tempfile.TemporaryDirectory(prefix="dgrt-trace-") as tmp:
        out, log = Path(tmp) / "denoise.onnx", Path(tmp) / "stderr.txt"
        request = {"config": model.config.raw, "config_repr": repr(model.config), "settings": asdict(settings)}
        # The worker imports this dgrt, wherever it lies (an installed one may be another version).
        package_root = str(Path(dgrt.__file__).resolve().parents[1])
        env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        with log.open("wb") as stderr:
            worker = subprocess.Popen(
                [sys.executable, "-m", "dgrt.exporter.tracing", str(out)],
                stdin=subprocess.PIPE,
                stderr=stderr,
                env=env,
            )
            try:
                assert worker.stdin is not None
                worker.stdin.write(json.dumps(request).encode())
                worker.stdin.close()
                prefill = trace_graph(model, "prefill", settings)
                code = worker.wait()
            finally:
                if worker.poll() is None:  # this process failed or was interrupted: do not leave it running
                    worker.kill()
                    worker.wait()
        if code != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-20:]
            raise RuntimeError(f"tracing the denoise graph failed (exit code {code}):\n" + "\n".join(tail))
        denoise = ir.from_proto(onnx.load(out, load_external_data=False))
    assert isinstance(denoise, ir.Model)
    return {"prefill": prefill, "denoise": denoise}


def _cpus() -> int:
    """CPUs this process may run on (all of them where the OS cannot say)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def trace_graph(model: DiffusionGemma, name: str, settings: TraceSettings) -> ir.Model:
    """One graph, "prefill" or "denoise" (with its debug logits output), without tracing state."""
    cfg, dtype = model.config, settings.dtype
    routed = settings.routed
    module, spec = (Prefill(model, routed), prefill_spec(cfg, dtype, routed)) if name == "prefill" else (
        Denoise(model, True, settings.head_chunk, routed), denoise_spec(cfg, dtype, True, routed))  # fmt: skip
    graph = _without_tracing_state(_trace(module, spec, settings.opset, settings.max_context))
    if name == "denoise":
        _name_logits_chunks(graph)
    return graph


def _name_logits_chunks(model: ir.Model) -> None:
    """Name the logits of each head chunk logits.0, logits.1, ... where the canvas has several: the names
    by which `dgrt validate` finds them again once the export dropped their concatenation."""
    logits = model.graph.outputs[-1]
    node = logits.producer()
    assert logits.name == "logits" and node is not None
    if node.op_type == "Concat":  # else the canvas is one chunk: "logits" is its own value
        for i, value in enumerate(node.inputs):
            assert value is not None
            value.name = f"logits.{i}"


def drop_logits(model: ir.Model) -> None:
    """Remove the denoise graph's debug logits output and what computes only it (the concatenation of
    its chunks); the chunks' own logits stay inside, named logits.<i> (or "logits" for one chunk)."""
    model.graph.outputs.pop()
    RemoveUnusedNodesPass()(model)


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
        "expert_capacity": torch.export.Dim("expert_capacity", min=1, max=4096 * max_context),
    }
    args, shapes = [], []
    for t in spec.inputs:
        size = [EXAMPLE_DIMS[d] if isinstance(d, str) else d for d in t.shape]
        args.append(torch.zeros(size, dtype=TORCH_DTYPES[t.dtype], device="meta"))
        shapes.append({axis: dims[d] for axis, d in enumerate(t.shape) if isinstance(d, str)})
    n_fixed = len(inspect.signature(module.forward).parameters) - 1  # the rest are the *rest varargs
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
        return False if any(v is not None and is_weight(v) for v in node.inputs) else None

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


def _worker(out: Path) -> None:
    """Trace the denoise graph described on stdin into `out`, its weights left as NO_DATA placeholders."""
    request = json.load(sys.stdin)
    cfg = ModelConfig.from_dict(request["config"])
    assert repr(cfg) == request["config_repr"], "the worker read another model from the config"
    settings = TraceSettings(**request["settings"])
    model, _ = meta_model(cfg, TORCH_DTYPES[settings.dtype])
    graph = trace_graph(model, "denoise", settings)
    for value in graph.graph.initializers.values():
        if is_weight(value):
            assert value.name is not None and value.shape is not None and value.dtype is not None
            length = math.prod(value.shape.numpy()) * value.dtype.itemsize
            value.const_value = ir.ExternalTensor(
                NO_DATA, 0, int(length), value.dtype, shape=value.shape, name=value.name
            )
    onnx.save(ir.to_proto(graph), out)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
