"""Everything about a TensorRT build that needs no TensorRT and no GPU: optimization profiles from the
manifest's dims, builder and network flags per TensorRT major version, the engine cache key, and the
device buffers the backend allocates. Pure functions, unit-tested on any machine."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace

from dgrt.contract.manifest import Manifest
from dgrt.errors import DgrtError
from dgrt.exporter.lint import TOPK_MAX_K

# First TensorRT version whose ONNX parser takes each precision's Q/DQ (research/onnx_trt.md §2.3).
MIN_VERSION = {"fp32": (10, 0), "fp16": (10, 0), "bf16": (10, 0), "int4": (10, 0), "fp8": (10, 6)}
MIN_VERSION["int4-experts"] = MIN_VERSION["fp8"]
Shape = tuple[int, ...]


@dataclass(frozen=True)
class BuildOptions:
    target: str = "auto"
    max_batch: int = 1
    max_context: int | None = None  # default: the export's max_context
    opt_context: int | None = None  # the cached length kernels are tuned for; default min(1024, max)
    workspace_gb: float | None = None
    refit: bool = False  # refittable engine (weights can be swapped without a rebuild)
    strip_weights: bool = False  # weight-stripped plan, refilled from the ONNX weights at load
    weight_streaming: bool = False  # keep weights in host memory and stream them (large models, small GPUs)
    tf32: bool = False  # let fp32 GEMMs round their inputs to TF32 (TensorRT's default; off: fp32 means fp32)
    one_engine: bool = False  # both graphs in one engine: one copy of the weights (dgrt.tensorrt.one_engine)

    def checked(self, export_max_context: int, canvas: int) -> BuildOptions:
        if self.max_batch < 1:
            raise DgrtError(f"--max-batch is {self.max_batch}; expected at least 1.")
        max_context = self.max_context or export_max_context
        if not canvas < max_context <= export_max_context:
            raise DgrtError(
                f"--max-context {max_context} must exceed the canvas ({canvas}) and be at most the export's "
                f"max_context ({export_max_context})."
            )
        opt = self.opt_context if self.opt_context is not None else min(1024, max_context - canvas)
        if not 0 <= opt <= max_context - canvas:
            raise DgrtError(f"--opt-context {opt} must be between 0 and {max_context - canvas} (max context - canvas).")
        if self.strip_weights and self.weight_streaming:
            raise DgrtError("--strip-weights and --weight-streaming cannot be combined; choose one.")
        return replace(self, max_context=max_context, opt_context=opt)


def check_version(trt_version: str, manifest: Manifest) -> int:
    """The TensorRT major version, after checking it can parse this export."""
    major, minor = (int(x) for x in trt_version.split(".")[:2])
    need = MIN_VERSION[manifest.precision]
    if (major, minor) < need:
        raise DgrtError(
            f"TensorRT {trt_version} cannot build {manifest.precision} engines; {need[0]}.{need[1]} or newer is needed."
        )
    return major


def network_flags(major: int) -> list[str]:
    """NetworkDefinitionCreationFlag names: strongly typed (precision from the ONNX). TensorRT 11 networks
    are always strongly typed and the flag is gone from its list of meaningful ones."""
    return ["STRONGLY_TYPED"] if major == 10 else []


def builder_flags(major: int, options: BuildOptions) -> list[str]:
    """BuilderFlag names. No precision flags on any version: the network is strongly typed (TensorRT 11
    removed FP16/BF16/INT8/FP8/INT4 flags, and 10.x ignores them for strongly typed networks)."""
    flags = []
    if options.refit:
        flags.append("REFIT")
    if options.strip_weights:
        flags += ["STRIP_PLAN", "REFIT_IDENTICAL"]
    if options.weight_streaming:
        flags.append("WEIGHT_STREAMING")
    return flags


def cleared_flags(options: BuildOptions) -> list[str]:
    """BuilderFlag names to clear: TF32, which TensorRT enables by default (an "fp32" engine would round
    every fp32 GEMM's inputs to 10-bit mantissas), unless asked for."""
    return [] if options.tf32 else ["TF32"]


def outside_profile(graph: str, name: str, shape: Shape, profile: tuple[Shape, Shape, Shape]) -> str | None:
    """The sentence to raise when `shape` is outside an input's (min, opt, max) profile shapes, else None."""
    low, _, high = profile
    if len(shape) == len(low) and all(lo <= d <= hi for d, lo, hi in zip(shape, low, high, strict=True)):
        return None
    return (
        f"the {graph} engine takes {name} of shapes {low} to {high} (its optimization profile), not {shape}; "
        "rebuild with dgrt build --max-batch / --max-context to cover it."
    )


def dim_ranges(manifest: Manifest, graph: str, options: BuildOptions) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of each symbolic dimension of a graph, from the build options.

    Prefill takes up to the export's prefill chunk of new tokens (the runtime prefills longer prompts in
    chunks; opt: one canvas, the length it runs most); a past may be empty. The denoise graph's past
    leaves room for its canvas. Sliding layers' pasts never exceed
    sliding_window - 1 tokens (the runtime keeps no more). A routed MoE's capacity goes up to every token of
    the call (the runtime's redo after an overflow), within TensorRT's TopK limit; opt: one row's default.
    """
    assert options.max_context is not None and options.opt_context is not None  # see BuildOptions.checked
    canvas, window = manifest.canvas_length, manifest.config.sliding_window
    past_max = options.max_context - (canvas if graph == "denoise" else 1)
    opt = min(options.opt_context, past_max)
    chunk = min(manifest.prefill_chunk, options.max_context)
    row_tokens = canvas if graph == "denoise" else chunk
    opt_tokens = canvas if graph == "denoise" else min(canvas, chunk)
    return {
        "batch": (1, 1, options.max_batch),
        "seq": (1, min(canvas, chunk), chunk),
        "past_full": (0, opt, past_max),
        "past_sliding": (0, min(opt, window - 1, past_max), min(window - 1, past_max)),
        "expert_capacity": (
            1,
            manifest.experts.capacity(manifest.config, opt_tokens),
            min(options.max_batch * row_tokens, TOPK_MAX_K),
        ),
    }


def profiles(manifest: Manifest, graph: str, options: BuildOptions) -> dict[str, tuple[Shape, Shape, Shape]]:
    """Input name -> (min, opt, max) shapes for the graph's optimization profile (inputs with symbolic
    dimensions only)."""
    ranges = dim_ranges(manifest, graph, options)
    out = {}
    for spec in manifest.graphs[graph].spec.inputs:
        if all(isinstance(d, int) for d in spec.shape):
            continue
        shapes = [tuple(d if isinstance(d, int) else ranges[d][k] for d in spec.shape) for k in range(3)]
        out[spec.name] = (shapes[0], shapes[1], shapes[2])
    return out


def max_shapes(manifest: Manifest, graph: str, options: BuildOptions) -> dict[str, Shape]:
    """Every input and output of a graph at its largest: what the backend allocates once."""
    ranges = dim_ranges(manifest, graph, options)
    spec = manifest.graphs[graph].spec
    tensors = spec.inputs + spec.outputs
    return {t.name: tuple(d if isinstance(d, int) else ranges[d][2] for d in t.shape) for t in tensors}


def onnx_digest(manifest: Manifest) -> dict[str, str]:
    """What the engines are built from: each graph's and the weights' sha256 (engine.json records it)."""
    return {g: v.sha256 for g, v in manifest.graphs.items()} | {"weights": manifest.weights.sha256}


def engine_key(
    manifest: Manifest, options: BuildOptions, trt_version: str, gpu: str, compute_capability: tuple[int, int]
) -> str:
    """The engine cache key: TensorRT version, GPU, precision, profiles, flags and the ONNX digest. Any
    change gives another key, so a stale engine is never reused."""
    identity = {
        "tensorrt": trt_version,
        "gpu": gpu,
        "compute_capability": list(compute_capability),
        "precision": manifest.precision,
        "options": asdict(options),
        "profiles": {g: profiles(manifest, g, options) for g in manifest.graphs},
        "onnx": onnx_digest(manifest),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return f"sm{compute_capability[0]}{compute_capability[1]}-{manifest.precision}-{digest}"
