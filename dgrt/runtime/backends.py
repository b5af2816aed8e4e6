"""Backends run the two graphs; the generator (dgrt.runtime.generator) runs the loop around them.

A backend is a runner with an explicit lifetime (use it as a context manager or call close()). Backends
take host tensors for the small inputs and return the [batch, canvas] results on the host; the KV cache
(the generator's, passed in as views) and the soft embeddings live on the backend's `device`.

* TorchBackend: the dgrt.model modules, from a checkpoint folder or from an export's weights.
* OnnxRuntimeBackend: the exported graphs on ONNX Runtime, with IO binding: inputs are bound in place
  (the cache views included, so a denoise step copies no cache), outputs land in preallocated buffers,
  and the self-conditioning embeddings ping-pong between two buffers without leaving them.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch

from dgrt.contract.experts import ROUTED, ExpertRouting
from dgrt.contract.io_spec import TORCH_DTYPES
from dgrt.contract.manifest import Manifest
from dgrt.errors import DgrtError
from dgrt.runtime.experts import RoutedCalls, run_modules, run_with_slots, slot_ids
from dgrt.runtime.heap import large_blocks_mapped

KV = tuple[torch.Tensor, torch.Tensor]
T = TypeVar("T")


@dataclass
class DenoiseInputs:
    """One denoise step's inputs besides the cache; field names are the graph's input names."""

    canvas_ids: torch.Tensor  # [B, C] int64
    soft_embeds: torch.Tensor  # [B, C, H] model dtype
    position_ids: torch.Tensor  # [B, C] int64
    pad_lengths: torch.Tensor  # [B] int64
    temperature: torch.Tensor  # [B] float32
    uniform: torch.Tensor  # [B, C] float32

    def by_name(self) -> dict[str, torch.Tensor]:
        """Graph input name -> tensor, in graph input order (dataclasses.asdict would deep-copy them)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class StepOutputs:
    argmax: torch.Tensor  # [B, C] int64
    sample: torch.Tensor  # [B, C] int64
    entropy: torch.Tensor  # [B, C] float32
    next_soft: torch.Tensor  # [B, C, H] model dtype


def capture_key(batch: int, past: list[KV], capacity: int = 0) -> tuple[int, ...]:
    """What a captured denoise step depends on besides input values: the batch, each layer's past length
    and address (constant over the steps of a canvas), and the routed experts' capacity."""
    return (batch, capacity, *(k.shape[2] for k, _ in past), *(k.data_ptr() for k, _ in past))


class Backend(Protocol):
    name: str
    max_batch: int | None  # most rows one call takes (None: any); Generator.generate splits larger batches
    dtype: torch.dtype  # of the KV cache and soft embeddings
    device: torch.device  # where the KV cache and soft embeddings live

    def prefill(self, ids: torch.Tensor, positions: torch.Tensor, pad: torch.Tensor, past: list[KV]) -> list[KV]: ...

    def denoise(self, inputs: DenoiseInputs, past: list[KV]) -> StepOutputs: ...

    def close(self) -> None: ...


class TorchBackend:
    """The dgrt.model modules on the model's device. On a CUDA device the denoise step is captured in a
    CUDA graph per (batch, past lengths) — once per canvas — and replayed for the canvas's other steps:
    a step is then one graph launch instead of hundreds of kernel launches from Python."""

    name = "torch"
    max_batch: int | None = None

    def __init__(
        self,
        model: Any,
        threads: int | None = None,
        cuda_graphs: bool = True,
        experts: ExpertRouting = ROUTED,
    ):
        from dgrt.model import Denoise

        if threads:
            torch.set_num_threads(threads)
        self.model = model
        self.dtype = model.dtype
        self.device = model.device
        self.routed = RoutedCalls(experts, model.config) if experts.routed else None
        self._denoise = Denoise(model, routed=experts.routed)
        self._cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._captured: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, list[torch.Tensor], tuple[torch.Tensor, ...]]]
        self._captured = {}

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, positions: torch.Tensor, pad: torch.Tensor, past: list[KV]) -> list[KV]:
        d = self.device
        args = (ids.to(d), positions.to(d), past, pad.to(d))
        return run_modules(self.routed, ids.numel(), lambda slots: self.model.prefill(*args, slots), d)

    @torch.inference_mode()
    def denoise(self, inputs: DenoiseInputs, past: list[KV]) -> StepOutputs:
        named = [t.to(self.device) for t in inputs.by_name().values()]
        cache = [t for kv in past for t in kv]
        batch = inputs.canvas_ids.shape[0]

        def call(capacity: int) -> tuple[tuple[torch.Tensor, ...], int]:
            args = named + [slot_ids(capacity, self.device)] + cache if capacity else named + cache
            if self._cuda_graphs:
                outputs = self._run_captured(capture_key(batch, past, capacity), args)
            else:
                outputs = self._denoise(*args)
            return outputs[:4], int(outputs[4]) if capacity else 0

        if self.routed is None:
            outputs, _ = call(0)
        else:
            outputs = self.routed.run(inputs.canvas_ids.numel(), call)
        argmax, sample, entropy, soft = outputs
        return StepOutputs(argmax.cpu(), sample.cpu(), entropy.cpu(), soft.clone() if self._cuda_graphs else soft)

    def _run_captured(self, key: tuple[int, ...], args: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if key not in self._captured:
            static = [t.clone() for t in args[:6]] + args[6:]  # the cache is read in place
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._denoise(*static)  # warm-up outside the capture (allocator, lazy initialisation)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs = self._denoise(*static)
            self._captured = {key: (graph, static, outputs)}  # one canvas at a time
        graph, static, outputs = self._captured[key]
        for dst, src in zip(static[:6], args[:6], strict=True):
            dst.copy_(src)
        graph.replay()
        return outputs

    def close(self) -> None:
        self._captured.clear()
        self.model = None

    def __enter__(self) -> TorchBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


TORCH_TO_NUMPY = {torch.int64: np.int64, torch.float32: np.float32, torch.float16: np.float16}


def ort_device(providers: list[str] | None) -> torch.device:
    """Where the KV cache, soft embeddings and outputs live for these providers: the GPU when CUDA's runs
    first (its device_id option, default 0), else the host."""
    first = (providers or ["CPUExecutionProvider"])[0]
    return torch.device("cuda", 0) if first == "CUDAExecutionProvider" else torch.device("cpu")


def session_options(manifest: Manifest | None, threads: int | None = None, prepack: bool = False) -> Any:
    """ONNX Runtime session options for an export's graphs (None: a graph of its own, unquantized, such as a
    benchmark's): the manifest's session config entries (a quantized export needs its Q/DQ run as written:
    see dgrt.exporter.quantize), pre-packing off unless asked for, and no CPU memory arena: the arena keeps
    every buffer it ever grew to and fragments around the denoise step's vocabulary-sized temporaries
    (measured at vocab 262144: 3.2 GB held after a step against a 1.5 GB peak without it, and no slower on
    the tiny or the real-width models). Its threads spin while a call runs, so each of a graph's hundreds of
    small parallel nodes starts without waking a sleeping thread, and stop as soon as it returns, leaving the
    cores to the Python work between calls (2-core machine, 2026-12-03, against not spinning at all: the
    trained model's step 1.60 -> 1.20 ms at 1 row and 9.9 -> 7.4 ms at 16; 64 requests in the batcher 0.38-0.40
    -> 0.28-0.32 s; the bench preset's generate 4.16-4.21 -> 3.91-3.96 s). Threads that also spin between
    calls take the core the batcher's Python needs: the same 64 requests took 0.50-0.55 s against 0.32-0.36 s.

    An unquantized export's nodes run in the graph's order (priority-based), not ONNX Runtime's default
    depth-first walk back from each output in turn, which computes every head chunk's logits before any
    chunk's sampler and so holds their vocabulary-sized tensors at once (real-width slice, 2026-12-01:
    five [128, 262144] fp32 buffers live at the peak instead of four; the same step time). A quantized
    export keeps the default: in priority order ONNX Runtime dequantizes a later layer's expert weights as
    soon as it can (the order follows node indices, and its fused nodes get new, higher ones), so an INT4
    step of the same slice held 1.2 GiB more, and more with every layer.

    No buffer reuse between tensors: ONNX Runtime's planner gives a later tensor the buffer of an earlier
    one of the same shape, which keeps that buffer allocated in between, so every layer's expert buffers
    stay live through the next layer's attention (real widths, fp32, 2026-12-01: a 1024-token prefill
    chunk of a 6-layer slice held 1677 MiB with reuse and 400-536 without, a denoise step over 8192 cached
    tokens 860-940 MiB against 518; no slower).

    No MatMulScaleFusion: it folds the embedding scale into the self-conditioning MatMul as a new node,
    whose higher index puts it after the next head chunk's work in priority order, so one chunk's
    [B, head chunk, V] probabilities waited through the next chunk (real-width slice: a step's peak
    519 -> 391 MiB without it, the same step time).

    A quantized export also runs without constant folding: with its Q/DQ kept as written
    (`session.disable_quant_qdq`), ONNX Runtime folds every weight's DequantizeLinear into an fp32 copy
    held by each session (those under 1 GiB), so an INT4 session held more than an fp32 one, whose weights
    stay mapped (real-width INT4 slice, a denoise session: 2632 MiB loaded against 164-381 without folding,
    a step 4734 -> 3401 MiB at its peak, 8.4 -> 9.6 s, the weights dequantized at each call instead)."""
    import onnxruntime as ort

    quantized = manifest is not None and manifest.quantization is not None
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = False
    options.enable_mem_reuse = False
    disabled = ["MatMulScaleFusion"] + (["ConstantFolding"] if quantized else [])
    options.add_session_config_entry("optimization.disable_specified_optimizers", ";".join(disabled))
    if not quantized:
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    if threads:
        options.intra_op_num_threads = threads
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    for key, value in (manifest.session_config if manifest else {}).items():
        options.add_session_config_entry(key, value)
    return options


CONTINUED = "prefill.continued"  # the ONNX Runtime backend's prefill session for calls with a history


class OnnxRuntimeBackend:
    """The exported graphs on ONNX Runtime. With the CUDA provider first, the KV cache, the soft embeddings
    and every output live on the GPU and are bound there by address: a step copies only the small
    [batch, canvas] inputs and results between host and device, never the cache."""

    name = "onnxruntime"
    max_batch: int | None = None

    def __init__(
        self,
        export_dir: Path,
        manifest: Manifest,
        threads: int | None = None,
        providers: list[str] | None = None,
        prepack: bool = False,
    ):
        """prepack: let the denoise session pre-pack its weights for faster GEMMs, at the cost of a private
        copy of them and of the default's rounding (tokens may differ). Off by default: every session then
        reads the one memory-mapped weights file, shared (see README, "Memory")."""
        import onnxruntime as ort

        if manifest.dtype == "bf16" and not providers:
            raise DgrtError("ONNX Runtime's CPU provider cannot run bf16 graphs; export with --dtype fp32 or fp16.")
        self.dtype = manifest.torch_dtype
        self.device = ort_device(providers)
        self.sessions = {}
        self.specs = {}
        # ONNX Runtime caches each call's memory plan under the XOR of its input dimensions, in which K and
        # V, and ids and positions, cancel: every prefill call would reuse the plan of the first (a prompt's
        # first chunk, no history) and allocate the attention tensors of a later chunk beside it. On the CPU
        # the calls with a history get a session, and so plans, of their own: its sliding layers' shapes then
        # repeat from chunk to chunk (real widths, 6 layers, a 2048-token prompt: 768 -> 500 MiB beyond the
        # weights and cache, no slower; the sessions share the mapped weights, a few MiB more). A full layer
        # attending over the growing history still misses it (docs/measurements.md, "Activations").
        graphs = dict(manifest.graphs) | ({CONTINUED: manifest.graphs["prefill"]} if self.device.type == "cpu" else {})
        for name, graph in graphs.items():
            options = session_options(manifest, threads, prepack=prepack and name == "denoise")
            try:
                self.sessions[name] = ort.InferenceSession(
                    str(export_dir / graph.file), options, providers=providers or ["CPUExecutionProvider"]
                )
            except Exception as e:  # ORT raises its own exception types for bad files
                raise DgrtError(f"{export_dir / graph.file}: ONNX Runtime cannot load it ({e}).") from None
            self.specs[name] = graph.spec
        self._bindings = {name: s.io_binding() for name, s in self.sessions.items()}
        self._soft: list[torch.Tensor] = []  # two buffers the self-conditioning embeddings ping-pong between
        self._outputs: dict[str, torch.Tensor] = {}
        self._bound: dict[str, dict[str, torch.Tensor]] = {}
        # Called after every graph run with (graph, inputs, outputs) by graph tensor name, e.g. to record
        # real feeds (dgrt.interop.polygraphy); the tensors are the backend's buffers: copy what you keep.
        self.on_run: Callable[[str, dict[str, torch.Tensor], dict[str, torch.Tensor]], None] | None = None
        self.routed = RoutedCalls(manifest.experts, manifest.config) if manifest.experts.routed else None
        self._load = torch.zeros(1, dtype=torch.int64, device=self.device)  # a routed call's expert_load

    def _routed_run(self, tokens: int, run: Callable[[dict[str, torch.Tensor]], T]) -> T:
        return run_with_slots(self.routed, tokens, run, lambda: int(self._load[0]), self.device)

    def _bind(self, binding: Any, name: str, tensor: torch.Tensor, output: bool = False) -> None:
        """Bind a contiguous tensor by address, where it lives (host or GPU)."""
        if not tensor.is_contiguous() or tensor.dtype not in TORCH_TO_NUMPY:
            raise DgrtError(f"internal: ONNX Runtime tensor {name} is not a contiguous int64/fp32/fp16 tensor.")
        device = tensor.device
        where = (device.type, device.index or 0, TORCH_TO_NUMPY[tensor.dtype], list(tensor.shape), tensor.data_ptr())
        (binding.bind_output if output else binding.bind_input)(name, *where)

    def _run(
        self, graph: str, named: dict[str, torch.Tensor], past: list[KV], outputs: dict[str, torch.Tensor]
    ) -> None:
        """Run `graph` on its inputs (`named` and the cache), writing into `outputs`, all bound by address."""
        binding = self._bindings[graph]
        inputs = {}
        for spec in self.specs[graph].inputs:
            if spec.layer is not None:
                k, v = past[spec.layer]
                tensor = k if spec.name.endswith(".key") else v
            else:
                tensor = named[spec.name]
            if tensor.dtype != TORCH_DTYPES[spec.dtype]:
                raise DgrtError(f"internal: {graph} input {spec.name} is {tensor.dtype}, expected {spec.dtype}.")
            self._bind(binding, spec.name, tensor)
            inputs[spec.name] = tensor
        self._bound[graph] = inputs  # a binding holds addresses: keep its tensors alive until the next bind
        for name, tensor in outputs.items():
            self._bind(binding, name, tensor, output=True)
        with large_blocks_mapped() if self.device.type == "cpu" else nullcontext():  # see dgrt.runtime.heap
            self.sessions[graph].run_with_iobinding(binding)
        if self.on_run is not None:
            self.on_run(self.specs[graph].name, inputs, outputs)

    def prefill(self, ids: torch.Tensor, positions: torch.Tensor, pad: torch.Tensor, past: list[KV]) -> list[KV]:
        b, s = ids.shape
        with large_blocks_mapped() if self.device.type == "cpu" else nullcontext():  # freed after the append
            new = [
                torch.empty(b, k.shape[1], s, k.shape[3], dtype=self.dtype, device=self.device)  # the new K/V
                for k, _ in past
                for _ in range(2)
            ]

        graph = CONTINUED if CONTINUED in self.sessions and any(k.shape[2] for k, _ in past) else "prefill"

        def run(extra: dict[str, torch.Tensor]) -> list[KV]:
            named = {"input_ids": ids, "position_ids": positions, "pad_lengths": pad} | extra
            tensors = new + ([self._load] if extra else [])
            outputs = {spec.name: t for spec, t in zip(self.specs["prefill"].outputs, tensors, strict=True)}
            self._run(graph, named, past, outputs)
            return [(new[i], new[i + 1]) for i in range(0, len(new), 2)]

        return self._routed_run(ids.numel(), run)

    def _output_buffers(self, batch: int, canvas: int, hidden: int) -> dict[str, torch.Tensor]:
        """Allocated once per batch shape; every step overwrites them (callers copy what they keep)."""
        if not self._outputs or self._outputs["argmax"].shape != (batch, canvas):
            d = self.device
            self._outputs = {
                "argmax": torch.empty(batch, canvas, dtype=torch.int64, device=d),
                "sample": torch.empty(batch, canvas, dtype=torch.int64, device=d),
                "entropy": torch.empty(batch, canvas, dtype=torch.float32, device=d),
            }
            soft_type = torch.float16 if self.dtype == torch.float16 else torch.float32
            self._soft = [torch.empty(batch, canvas, hidden, dtype=soft_type, device=d) for _ in range(2)]
        return self._outputs

    def denoise(self, inputs: DenoiseInputs, past: list[KV]) -> StepOutputs:
        soft = inputs.soft_embeds
        outputs = self._output_buffers(*soft.shape)
        # Write the next soft embeddings into whichever ping-pong buffer is not this step's input.
        next_soft = self._soft[1] if soft.data_ptr() == self._soft[0].data_ptr() else self._soft[0]

        def run(extra: dict[str, torch.Tensor]) -> None:
            results = outputs | {"next_soft_embeds": next_soft} | ({"expert_load": self._load} if extra else {})
            self._run("denoise", inputs.by_name() | extra, past, results)

        self._routed_run(inputs.canvas_ids.numel(), run)
        host = {name: t.cpu() for name, t in outputs.items()}  # the sampler's [B, C] results (no copy on a CPU)
        return StepOutputs(host["argmax"], host["sample"], host["entropy"], next_soft)

    def close(self) -> None:
        self.sessions.clear()
        self._bindings.clear()

    def __enter__(self) -> OnnxRuntimeBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
