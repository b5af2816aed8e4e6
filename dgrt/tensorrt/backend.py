"""The TensorRT backend: `dgrt.load(export_dir, backend="tensorrt")`.

Device memory comes from torch (already a dependency, and the CUDA build of torch that a GPU machine has
brings the CUDA runtime): every input and output buffer is a torch CUDA tensor allocated once at the
engine's largest shapes, and each call binds views of them by name (`set_input_shape`,
`set_tensor_address`) and runs `execute_async_v3` on one stream. The KV cache lives on the GPU (the
runtime's KVCache is allocated on the backend's device) and is bound in place; prefill writes its new K/V
into the output buffers and the cache appends them with one device copy per canvas. The self-conditioning
embeddings never leave the GPU. The denoise step is captured in a CUDA graph per (batch, past lengths),
i.e. once per canvas, and replayed for its other steps (the manifest marks the denoise graph as
capturable: no data-dependent shapes); where TensorRT cannot run inside a capture, uncaptured with a
warning.

Engines built with --one-engine hold both graphs and one copy of the weights (dgrt.tensorrt.one_engine):
one execution context per graph, each on its own optimization profile with the other graph bound empty,
sharing one activation buffer; tensors are named `<graph>/<name>` there.

TensorRT runs on a stream of its own; the KV cache is appended on torch's current stream, so each call
first makes its stream wait for the current one, and synchronizes before handing results back.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch

from dgrt.contract.io_spec import TORCH_DTYPES
from dgrt.contract.manifest import GRAPHS, Manifest
from dgrt.errors import DgrtError, DgrtWarning
from dgrt.exporter.lint import TOPK_MAX_K
from dgrt.runtime.backends import KV, DenoiseInputs, StepOutputs, capture_key
from dgrt.runtime.experts import RoutedCalls, run_with_slots
from dgrt.tensorrt.build import ENGINE_FILE, require_gpu, require_tensorrt
from dgrt.tensorrt.one_engine import ONE_ENGINE_PLAN, combine, idle_graph, idle_shapes, parse_path, prefixed
from dgrt.tensorrt.options import BuildOptions, max_shapes, onnx_digest, outside_profile, profiles

if TYPE_CHECKING:  # typed against TensorRT's stubs by `mypy --config-file mypy-tensorrt.ini`
    import tensorrt as trt

T = TypeVar("T")


def find_engines(export_dir: Path, manifest: Manifest, trt_version: str, gpu: str) -> Path:
    """The engine directory built for this export, TensorRT version and GPU; one clear error where there is
    none, or several to choose from (say, two and one engine, or two --max-batch)."""
    matching, others = [], []
    for file in sorted((export_dir / "engines").glob(f"*/{ENGINE_FILE}")):
        engine = json.loads(file.read_text())
        if engine["onnx"] != onnx_digest(manifest):
            continue  # built from another export
        if engine["tensorrt"] == trt_version and engine["gpu"] == gpu:
            matching.append((file.parent, engine["options"]))
        else:
            others.append(f"{file.parent.name} (TensorRT {engine['tensorrt']}, {engine['gpu']})")
    if len(matching) == 1:
        return matching[0][0]
    if matching:
        builds = ", ".join(
            f"{path} ({'one engine' if options.get('one_engine') else 'two engines'}, max batch {options['max_batch']})"
            for path, options in matching
        )
        raise DgrtError(
            f"{export_dir} has {len(matching)} engine builds for TensorRT {trt_version} on {gpu}: {builds}; choose "
            "one with dgrt.load(..., engines=PATH) or --engines PATH."
        )
    if others:
        raise DgrtError(
            f"{export_dir} has engines for {', '.join(others)}, none for TensorRT {trt_version} on {gpu}; "
            f"rebuild with: dgrt build {export_dir}"
        )
    raise DgrtError(f"{export_dir} has no TensorRT engines; build them with: dgrt build {export_dir}")


def _shape(dims: trt.Dims) -> tuple[int, ...]:
    return tuple(dims[i] for i in range(len(dims)))


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, export_dir: Path, manifest: Manifest, engine_dir: Path | None = None):
        version = require_tensorrt()
        import tensorrt as trt

        gpu, _ = require_gpu()
        engine_dir = engine_dir or find_engines(export_dir, manifest, version, gpu)
        if not (engine_dir / ENGINE_FILE).is_file():
            raise DgrtError(
                f"{engine_dir} is not an engine build (no {ENGINE_FILE}); make one with: dgrt build {export_dir}"
            )
        engine_info = json.loads((engine_dir / ENGINE_FILE).read_text())
        if engine_info["onnx"] != onnx_digest(manifest):
            raise DgrtError(f"{engine_dir} was built from another export than {export_dir} (their digests differ).")
        if engine_info["tensorrt"] != version or engine_info["gpu"] != gpu:
            raise DgrtError(
                f"{engine_dir} was built with TensorRT {engine_info['tensorrt']} for {engine_info['gpu']}; this "
                f"machine has TensorRT {version} and {gpu}. Rebuild with: dgrt build {export_dir}"
            )
        self.device = torch.device("cuda")
        self.dtype = manifest.torch_dtype
        self.specs = {name: graph.spec for name, graph in manifest.graphs.items()}
        self.stream = torch.cuda.Stream()
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        options = BuildOptions(**engine_info["options"])
        self.one_engine = options.one_engine
        self.engines: dict[str, trt.ICudaEngine] = {}
        self.contexts: dict[str, trt.IExecutionContext] = {}
        if options.one_engine:
            self._empty = torch.empty(256, dtype=torch.uint8, device="cuda")  # the idle graph's tensors' address
            engine = self._load(runtime, logger, engine_dir / ONE_ENGINE_PLAN, options, export_dir, manifest)
            self.engines["model"] = engine
            # One activation buffer for both contexts: they run one after the other on one stream.
            size = max(engine.get_device_memory_size_for_profile_v2(i) for i in range(len(GRAPHS)))
            self._activations = torch.empty(size, dtype=torch.uint8, device="cuda")
            for i, graph in enumerate(GRAPHS):
                context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
                if not context.set_optimization_profile_async(i, self.stream.cuda_stream):
                    raise DgrtError(f"TensorRT refused optimization profile {i} ({graph}) of {engine_dir}.")
                context.set_device_memory(self._activations.data_ptr(), size)
                self._idle(context, manifest, idle_graph(graph))
                self.contexts[graph] = context
            self.stream.synchronize()  # the profiles are set on the stream
        else:
            for graph in GRAPHS:
                engine = self._load(runtime, logger, engine_dir / f"{graph}.plan", options, export_dir, manifest, graph)
                self.engines[graph] = engine
                self.contexts[graph] = engine.create_execution_context()
        self.max_batch: int | None = options.max_batch  # the generator splits larger batches
        self.profiles = {g: profiles(manifest, g, options) for g in GRAPHS}
        self.max_shapes = {g: max_shapes(manifest, g, options) for g in GRAPHS}
        self.buffers = {
            g: {
                t.name: torch.empty(
                    int(torch.Size(self.max_shapes[g][t.name]).numel()), dtype=TORCH_DTYPES[t.dtype], device="cuda"
                )
                for t in self.specs[g].inputs + self.specs[g].outputs
                if t.layer is None or t.name.startswith("new_")  # pasts are bound to the cache in place
            }
            for g in GRAPHS
        }
        self._graphs: dict[tuple[int, ...], torch.cuda.CUDAGraph | None] = {}  # None: runs uncaptured
        routing = manifest.experts
        self.routed = RoutedCalls(routing, manifest.config, TOPK_MAX_K) if routing.routed else None

    @staticmethod
    def _load(
        runtime: trt.Runtime,
        logger: trt.ILogger,
        plan: Path,
        options: BuildOptions,
        export_dir: Path,
        manifest: Manifest,
        graph: str | None = None,
    ) -> trt.ICudaEngine:
        """An engine from its plan; a weight-stripped one refilled from the ONNX weights it was built from
        (`graph`'s file, or both graphs combined for one engine)."""
        import tensorrt as trt

        engine = runtime.deserialize_cuda_engine(plan.read_bytes())
        if engine is None:
            raise DgrtError(f"TensorRT could not load {plan} (its log above says why).")
        if options.strip_weights:
            refitter = trt.Refitter(engine, logger)
            onnx_refitter = trt.OnnxParserRefitter(refitter, logger)
            if graph is not None:
                refilled = onnx_refitter.refit_from_file(str(export_dir / manifest.graphs[graph].file))
            else:
                model = combine(export_dir, manifest).SerializeToString()
                refilled = onnx_refitter.refit_from_bytes(model, parse_path(export_dir, manifest))
            if not refilled or not refitter.refit_cuda_engine():
                raise DgrtError(f"TensorRT could not refit {plan} from {export_dir}.")
        if options.weight_streaming:
            engine.weight_streaming_budget_v2 = engine.get_weight_streaming_automatic_budget()
        return engine

    def _idle(self, context: trt.IExecutionContext, manifest: Manifest, graph: str) -> None:
        """Bind one graph of the one engine empty, for a context that runs the other graph."""
        for name, shape in idle_shapes(manifest, graph).items():
            if not context.set_input_shape(prefixed(graph, name), shape):
                raise DgrtError(f"TensorRT refused the empty shape {shape} for {prefixed(graph, name)}.")
            context.set_tensor_address(prefixed(graph, name), self._empty.data_ptr())
        for spec in manifest.graphs[graph].spec.outputs:
            context.set_tensor_address(prefixed(graph, spec.name), self._empty.data_ptr())

    def _name(self, graph: str, name: str) -> str:
        """A graph's tensor as the engine names it."""
        return prefixed(graph, name) if self.one_engine else name

    def _routed_run(self, graph: str, tokens: int, run: Callable[[dict[str, torch.Tensor]], T]) -> T:
        # The slots go to the device with the other host inputs (_bind copies them into its buffer).
        return run_with_slots(self.routed, tokens, run, lambda: int(self._view(graph, "expert_load", (1,))[0]))

    def _view(self, graph: str, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return self.buffers[graph][name][: int(torch.Size(shape).numel())].view(shape)

    def _bind(self, graph: str, values: dict[str, torch.Tensor], past: list[KV]) -> None:
        """Copy host inputs into their device buffers, bind every input (pasts in place) and output."""
        context = self.contexts[graph]
        for spec in self.specs[graph].inputs:
            name = spec.name
            if spec.layer is not None:
                k, v = past[spec.layer]
                tensor = (k if name.endswith(".key") else v).contiguous()
            else:
                value = values[name]
                tensor = self._view(graph, name, tuple(value.shape))
                if tensor.data_ptr() != value.data_ptr():
                    tensor.copy_(value, non_blocking=True)
            shape = tuple(tensor.shape)
            refused = (
                outside_profile(graph, name, shape, self.profiles[graph][name])
                if name in self.profiles[graph]
                else None
            )
            if refused or not context.set_input_shape(self._name(graph, name), shape):
                raise DgrtError(refused or f"TensorRT refused shape {shape} for the {graph} engine's input {name}.")
            context.set_tensor_address(self._name(graph, name), tensor.data_ptr())
        for spec in self.specs[graph].outputs:
            shape = _shape(context.get_tensor_shape(self._name(graph, spec.name)))
            context.set_tensor_address(self._name(graph, spec.name), self._view(graph, spec.name, shape).data_ptr())

    def _outputs(self, graph: str) -> list[torch.Tensor]:
        context = self.contexts[graph]
        shapes = [_shape(context.get_tensor_shape(self._name(graph, s.name))) for s in self.specs[graph].outputs]
        return [self._view(graph, s.name, shape) for s, shape in zip(self.specs[graph].outputs, shapes, strict=True)]

    def prefill(self, ids: torch.Tensor, positions: torch.Tensor, pad: torch.Tensor, past: list[KV]) -> list[KV]:
        def run(extra: dict[str, torch.Tensor]) -> list[KV]:
            self.stream.wait_stream(torch.cuda.current_stream())  # the cache's last append
            with torch.cuda.stream(self.stream):
                self._bind("prefill", {"input_ids": ids, "position_ids": positions, "pad_lengths": pad} | extra, past)
                self._execute("prefill")
            self.stream.synchronize()
            out = self._outputs("prefill")
            return [(out[i], out[i + 1]) for i in range(0, 2 * len(past), 2)]

        return self._routed_run("prefill", ids.numel(), run)

    def denoise(self, inputs: DenoiseInputs, past: list[KV]) -> StepOutputs:
        def run(extra: dict[str, torch.Tensor]) -> None:
            capacity = extra["expert_slots"].numel() if extra else 0
            key = capture_key(inputs.canvas_ids.shape[0], past, capacity)
            self.stream.wait_stream(torch.cuda.current_stream())  # the cache's append, the soft embeddings' copy
            with torch.cuda.stream(self.stream):
                self._bind("denoise", inputs.by_name() | extra, past)
                if key not in self._graphs:
                    # The first step with these shapes runs directly (TensorRT sets itself up for them), and
                    # is captured; later steps of the canvas replay the capture.
                    self._execute("denoise")
                    self._graphs = {key: self._capture()}  # one canvas at a time: drop earlier captures
                elif (graph := self._graphs[key]) is not None:
                    graph.replay()
                else:
                    self._execute("denoise")
            self.stream.synchronize()

        self._routed_run("denoise", inputs.canvas_ids.numel(), run)
        argmax, sample, entropy, soft = self._outputs("denoise")[:4]
        # Small [B, C] results go to the host for the sampler; the soft embeddings stay on the GPU (they are
        # the next step's input: a copy out of this buffer happens before the next step overwrites it).
        return StepOutputs(argmax.cpu(), sample.cpu(), entropy.float().cpu(), soft.clone())

    def _execute(self, graph: str) -> None:
        if not self.contexts[graph].execute_async_v3(self.stream.cuda_stream):
            raise DgrtError(f"TensorRT failed to run the {graph} engine (its log above says why).")

    def _capture(self) -> torch.cuda.CUDAGraph | None:
        """The denoise step captured in a CUDA graph, or None (with a warning) where TensorRT cannot run
        inside a capture: the steps then run uncaptured, slower but right."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream):
                captured = self.contexts["denoise"].execute_async_v3(self.stream.cuda_stream)
        except RuntimeError as e:  # the capture itself failed (an operation that cannot be captured)
            captured, why = False, str(e)
        else:
            why = "execute_async_v3 returned False"
        if captured:
            return graph
        warnings.warn(
            f"TensorRT could not run the denoise engine inside a CUDA graph capture ({why}); its steps run uncaptured.",
            DgrtWarning,
            stacklevel=2,
        )
        return None

    def close(self) -> None:
        self._graphs.clear()
        self.contexts.clear()
        self.engines.clear()
        self.buffers.clear()

    def __enter__(self) -> TensorRTBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
