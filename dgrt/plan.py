"""`dgrt plan`: will a model fit on a target, and how fast can it go, without running it.

From a config alone (a checkpoint, an export, or the shipped 26B-A4B config): the bytes of `weights.bin`
as `dgrt export` would write it (exactly: the same tensors, formats, order and alignment), the KV cache the
runtime allocates, an estimate of each graph's largest activations, and per target (dgrt/data/targets.json)
the memory that adds up to and the floor of a denoise step: the larger of the bytes it must read over the
memory bandwidth and its FLOPs over the tensor cores' dense peak. Floors, not predictions: real steps are
slower by whatever the kernels lose.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from dgrt.config import ModelConfig, read_generation_config, read_json
from dgrt.contract.experts import ROUTED, ExpertRouting
from dgrt.contract.io_spec import DTYPES, TORCH_DTYPES
from dgrt.contract.manifest import DEFAULT_PREFILL_CHUNK, Manifest
from dgrt.errors import DgrtError, check_ints
from dgrt.exporter.onnx_export import default_head_chunk
from dgrt.exporter.quantize import Recipe, layout
from dgrt.exporter.tracing import meta_model, weight_order
from dgrt.exporter.weights import file_size
from dgrt.model import DiffusionGemma
from dgrt.presets import REAL_MODELS
from dgrt.runtime.kv_cache import LayerShape, cache_bytes
from dgrt.tensorrt.targets import TARGETS

GB = 1e9  # vendors' unit
RESERVED_GB = {"datacenter": 2.0, "jetson": 8.0}  # CUDA context and workspace; on Jetson also the OS
# What the graphs hold at their peaks, counted on ONNX Runtime (the real-width slice, 2026-12-01;
# docs/measurements.md): in the denoise graph's vocabulary tail, three fp32 [B, head chunk, V] buffers
# (the processed logits, log-probabilities and probabilities); in a routed MoE, two [E, capacity, H] (the
# tokens gathered and their transposed copy, or the results and theirs); beside either, about eight
# [B, n, H] tensors of the layer's own stream.
VOCAB_TEMPORARIES = 3
EXPERT_TEMPORARIES = 2
STREAM_TEMPORARIES = 8


@dataclass(frozen=True)
class Hardware:
    name: str
    title: str
    memory_gb: float
    bandwidth_gbs: float
    tflops: dict[str, float]
    sources: list[str]
    jetson: bool

    def compute_seconds(self, precision: str, flops: float, expert_flops: float) -> float:
        """Time of `flops` (of which `expert_flops` in the routed experts) at the dense tensor-core peaks:
        fp32 runs as TF32 (half the bf16 peak); FP8 GEMMs at the FP8 peak where there is one; INT4 weights
        are dequantized into 16-bit GEMMs (int4-experts: its experts; its other GEMMs are FP8)."""
        bf16, fp8 = self.tflops["bf16"] * 1e12, self.tflops.get("fp8", self.tflops["bf16"]) * 1e12
        peaks = {"fp32": (bf16 / 2, bf16 / 2), "fp8": (fp8, fp8), "int4-experts": (fp8, bf16)}
        other, experts = peaks.get(precision, (bf16, bf16))
        return (flops - expert_flops) / other + expert_flops / experts


def hardware() -> dict[str, Hardware]:
    """The figures of every target dgrt builds for (dgrt.tensorrt.targets), from dgrt/data/targets.json."""
    data = json.loads(resources.files("dgrt").joinpath("data/targets.json").read_text())
    return {
        name: Hardware(name, d["title"], d["memory_gb"], d["bandwidth_gbs"], d["tflops"], d["sources"], target.jetson)
        for name, target in TARGETS.items()
        for d in [data[name]]
    }


def resolve(
    source: str,
) -> tuple[ModelConfig, dict[str, Any], str, tuple[str, Recipe | None, ExpertRouting] | None]:
    """(config, generation config, what it is, an export's dtype, recipe and MoE formulation) for a shipped
    config's name, an export directory or a checkpoint folder."""
    if source in REAL_MODELS:
        folder = Path(str(resources.files("dgrt").joinpath(f"data/{source}")))
        what = f"{source} (the shipped config.json of the real model)"
    else:
        folder = Path(source)
        what = str(folder)
    if (folder / "manifest.json").is_file():
        m = Manifest.from_json(read_json(folder / "manifest.json"), str(folder / "manifest.json"))  # the files unread
        q = m.quantization
        recipe = Recipe(q["recipe"], q["block_size"] or 64) if q else None
        return m.config, read_generation_config(folder, m.config.vocab_size), what, (m.dtype, recipe, m.experts)
    if not (folder / "config.json").is_file():
        raise DgrtError(
            f"{source}: neither an export, a checkpoint folder nor a shipped config; expected a folder with "
            f"manifest.json or config.json, or one of: {', '.join(REAL_MODELS)}."
        )
    cfg = ModelConfig.from_dict(read_json(folder / "config.json"), str(folder / "config.json"))
    return cfg, read_generation_config(folder, cfg.vocab_size), what, None


@dataclass(frozen=True)
class Weights:
    """What depends on the model and its precision only (building the meta model takes seconds at 26B)."""

    file_bytes: int  # weights.bin
    expert_bytes: int  # of which the routed experts
    params: int
    expert_params: int


def weights_of(cfg: ModelConfig, dtype: str, recipe: Recipe | None) -> Weights:
    model, buffers = meta_model(cfg, TORCH_DTYPES[DTYPES[dtype]])
    tensors = weight_tensors(model, buffers, dtype, recipe)
    counts = {name: p.numel() for name, p in model.named_parameters()}
    return Weights(
        file_bytes=file_size(n for _, n in tensors),
        expert_bytes=sum(n for name, n in tensors if ".experts." in name),
        params=sum(counts.values()),
        expert_params=sum(n for name, n in counts.items() if ".experts." in name),
    )


def weight_tensors(
    model: DiffusionGemma, buffers: dict[str, torch.Tensor], dtype: str, recipe: Recipe | None
) -> list[tuple[str, int]]:
    """(initializer name, bytes) of every tensor `dgrt export` writes to weights.bin, in the order it writes
    them: parameters in the export dtype or in the recipe's formats (FP8: a byte a weight and a scale per
    output channel; INT4: half a byte and a scale per block; see quantize.layout), buffers (RoPE
    frequencies) in fp32. `model` and `buffers`: tracing.meta_model's, in that dtype."""
    itemsize = TORCH_DTYPES[DTYPES[dtype]].itemsize
    sizes: dict[str, int] = {}
    rank: dict[str, tuple[str, bool]] = {}  # name -> (the parameter it stores, is it a scale)
    unread = model.unread_parameters()
    for name, param in model.named_parameters():
        if name in unread:
            continue
        key, n = f"model.{name}", param.numel()
        fmt = recipe.weight_format(name) if recipe is not None and param.ndim >= 2 else None
        if fmt is None:
            sizes[key], rank[key] = n * itemsize, (key, False)
            continue
        assert recipe is not None
        recipe.check_blocks(name, list(param.shape))
        data = n if fmt == "fp8" else (n + 1) // 2
        scales = layout(fmt, list(param.shape), recipe.block_size).scales
        sizes[key + "_quantized"], rank[key + "_quantized"] = data, (key, False)
        sizes[key + "_scale"], rank[key + "_scale"] = scales * itemsize, (key, True)
    for name, buffer in buffers.items():
        sizes[f"model.{name}"], rank[f"model.{name}"] = buffer.numel() * buffer.element_size(), (f"model.{name}", False)
    order = weight_order(model)
    return sorted(sizes.items(), key=lambda item: (order[rank[item[0]][0]], rank[item[0]][1]))


@dataclass(frozen=True)
class Sizes:
    """Bytes and FLOPs of one configuration (model, precision, batch, context)."""

    weights: int  # weights.bin
    expert_weights: int  # of which the routed experts
    kv_per_token: int  # the full layers' K and V of one token, one row (they grow with the context)
    kv_sliding: int  # the sliding layers' K and V, one row: their last window - 1 tokens, fixed
    kv: int  # what the runtime allocates for `batch` rows of `context` tokens
    denoise_activations: int
    prefill_activations: int
    denoise_bytes_read: int  # per step: every weight (each expert is computed today) and the cache
    denoise_flops: float
    expert_flops: float  # of which in the routed experts
    routed_bytes_read: int  # the same with only the top-k experts read (routed MoE)
    routed_flops: float
    routed_expert_flops: float

    @property
    def one_engine(self) -> int:
        """Device memory as one engine: the weights once, the KV cache, the larger graph's activations."""
        return self.weights + self.kv + max(self.denoise_activations, self.prefill_activations)


def sizes(
    cfg: ModelConfig, w: Weights, dtype: str, batch: int, context: int, prompt: int, routing: ExpertRouting = ROUTED
) -> Sizes:
    """routing: how the graphs compute the MoE (an export's manifest says; routed by default)."""
    weights, experts = w.file_bytes, w.expert_bytes
    act = TORCH_DTYPES[DTYPES[dtype]].itemsize  # bytes of an activation (the cache has the export dtype too)
    layers = LayerShape.of(cfg)
    full, sliding = [s for s in layers if s.window is None], [s for s in layers if s.window is not None]
    kv = cache_bytes(layers, batch, context, act)  # Generator._cache_for: capacity = the call's length
    c, v, h, e = cfg.canvas_length, cfg.vocab_size, cfg.hidden_size, cfg.num_experts
    heads = cfg.num_attention_heads
    past = context - c  # the denoise step of the last canvas attends to everything before it

    def held(s: LayerShape, cached: int) -> int:  # what a layer reads of `cached` tokens
        return cached if s.window is None else min(cached, s.window - 1)

    def attention(queries: int, cached: int, of: list[LayerShape]) -> int:
        # the scores and the masked scores (fp32), and beside them the values the layer read, copied once
        # with the new ones appended (what it reads: see held)
        def one(s: LayerShape) -> int:
            keys = held(s, cached) + queries
            return batch * (2 * heads * queries * keys * 4 + s.num_kv_heads * keys * s.head_dim * act)

        return max(map(one, of), default=0)

    def expert_tensors(tokens: int) -> int:  # every expert's tokens and results, [E, capacity or all tokens, H]
        per_expert = routing.capacity(cfg, batch * tokens) if routing.routed else batch * tokens
        return EXPERT_TEMPORARIES * per_expert * e * h * act

    def stream(tokens: int) -> int:
        return STREAM_TEMPORARIES * batch * tokens * h * act

    # The vocabulary-sized work runs in chunks of canvas positions, the prompt's prefill in chunks of tokens.
    head, chunk = default_head_chunk(dtype, c), min(prompt, DEFAULT_PREFILL_CHUNK)
    vocab = VOCAB_TEMPORARIES * batch * head * v * 4
    denoise = max(vocab, attention(c, past, layers), expert_tensors(c)) + stream(c)
    # The prompt's last chunk attends to the rest of it, in every layer but the last (which writes only K/V).
    prefill = max(attention(chunk, prompt - chunk, layers[:-1]), expert_tensors(chunk)) + stream(chunk)
    cache_read = sum(2 * batch * s.num_kv_heads * held(s, past) * s.head_dim * act for s in layers)
    params, expert_params = w.params, w.expert_params
    tokens = batch * c
    attention_flops = sum(4 * tokens * heads * (held(s, past) + c) * s.head_dim for s in layers)
    # every parameter is a multiply-add per token (the embedding's as the LM head)
    dense_flops = 2.0 * tokens * params + attention_flops
    k = cfg.top_k_experts
    # Routed, each expert computes its capacity's worth of tokens (unused slots included).
    routed_expert_flops = 2.0 * (routing if routing.routed else ROUTED).capacity(cfg, tokens) * expert_params
    routed_flops = dense_flops - 2.0 * tokens * expert_params + routed_expert_flops
    # A step's tokens pick k experts each: with uniform routing 1 - (1 - k/E)^tokens of the experts are hit
    # (a 256-token canvas of the 26B model hits all 128 of them: routing saves FLOPs, not bandwidth).
    routed_experts = round(experts * (1 - (1 - k / e) ** tokens))
    return Sizes(
        weights=weights,
        expert_weights=experts,
        kv_per_token=cache_bytes(full, 1, 1, act),
        kv_sliding=cache_bytes(sliding, 1, cfg.max_position_embeddings, act),
        kv=kv,
        denoise_activations=denoise,
        prefill_activations=prefill,
        denoise_bytes_read=weights + cache_read,
        denoise_flops=dense_flops,
        expert_flops=2.0 * tokens * expert_params,
        routed_bytes_read=weights - experts + routed_experts + cache_read,
        routed_flops=routed_flops,
        routed_expert_flops=routed_expert_flops,
    )


@dataclass(frozen=True)
class Fit:
    """One target: memory needed against what it has, and the speed floors."""

    target: str
    runs: bool  # TensorRT runs this precision on it (dgrt.tensorrt.targets)
    usable_bytes: int  # memory less RESERVED_GB
    one_engine_bytes: int  # `dgrt build --one-engine`: weights once, the KV cache, the largest activations
    two_engines_bytes: int  # `dgrt build`: an engine per graph, each with its own copy of the weights
    step_floor_s: float
    step_bound: str  # "bandwidth" or "compute"
    routed_step_floor_s: float
    tokens_per_s: float  # per target at `steps` per canvas, plus the canvas's prefill
    routed_tokens_per_s: float

    @property
    def fits(self) -> bool:
        return self.two_engines_bytes <= self.usable_bytes

    @property
    def fits_one_engine(self) -> bool:
        return self.one_engine_bytes <= self.usable_bytes


def fit(hw: Hardware, s: Sizes, precision: str, batch: int, canvas: int, steps: float) -> Fit:
    reserved = RESERVED_GB["jetson" if hw.jetson else "datacenter"] * GB
    one = s.one_engine
    bandwidth = hw.bandwidth_gbs * GB
    compute = hw.compute_seconds(precision, s.denoise_flops, s.expert_flops)
    step = max(s.denoise_bytes_read / bandwidth, compute)
    routed = max(s.routed_bytes_read / bandwidth, hw.compute_seconds(precision, s.routed_flops, s.routed_expert_flops))
    prefill = s.weights / bandwidth  # the finished canvas is prefilled: every weight read once more
    return Fit(
        target=hw.name,
        runs=TARGETS[hw.name].supports(precision),
        usable_bytes=int(hw.memory_gb * GB - reserved),
        one_engine_bytes=one,
        two_engines_bytes=one + s.weights,
        step_floor_s=step,
        step_bound="bandwidth" if s.denoise_bytes_read / bandwidth >= compute else "compute",
        routed_step_floor_s=routed,
        tokens_per_s=batch * canvas / (steps * step + prefill),
        routed_tokens_per_s=batch * canvas / (steps * routed + prefill),
    )


@dataclass(frozen=True)
class Plan:
    source: str
    precision: str  # dtype, or the quantization recipe
    dtype: str
    batch: int
    context: int
    prompt: int
    steps: float
    sizes: Sizes
    fits: list[Fit]
    changes: dict[str, str]  # target -> the first thing to change, where it does not fit

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        s, cfg_line = self.sizes, f"{self.precision} weights"
        lines = [
            f"plan for {self.source}: {cfg_line}, batch {self.batch}, context {self.context} tokens, prompt "
            f"{self.prompt}, {self.steps:g} denoise steps per canvas",
            f"  weights.bin      {_gb(s.weights)}  (routed experts {_gb(s.expert_weights)}; what `dgrt export` writes)",
            f"  KV cache         {_gb(s.kv)}  (as the runtime allocates it for {self.batch} x {self.context} tokens: "
            f"per row {s.kv_per_token / 1024:.1f} KiB per token in full layers, {_gb(s.kv_sliding)} in sliding ones)",
            f"  activations      {_gb(s.denoise_activations)} denoise, {_gb(s.prefill_activations)} prefill of the "
            "prompt (largest live tensors, estimated)",
            f"  per denoise step {_gb(s.denoise_bytes_read)} read, {s.denoise_flops / 1e12:.2f} TFLOP (dense: every "
            f"expert on every token); routed: {_gb(s.routed_bytes_read)}, {s.routed_flops / 1e12:.2f} TFLOP (each "
            f"expert at its capacity, at most {ROUTED.capacity_factor:g}x the mean load)",
            "",
            f"{'target':<8}{'usable':>10}{'1 engine':>10}{'2 engines':>10}  {'fits':<12}{'step floor':>12}"
            f"{'routed':>10}{'tokens/s':>10}{'routed':>9}",
        ]
        for f in self.fits:
            verdict = "yes" if f.fits else ("1 engine" if f.fits_one_engine else "no")
            if not f.runs:
                verdict = "unsupported"
            lines.append(
                f"{f.target:<8}{_gb(f.usable_bytes):>10}{_gb(f.one_engine_bytes):>10}{_gb(f.two_engines_bytes):>10}  "
                f"{verdict:<12}{f.step_floor_s * 1e3:>9.2f} ms{f.routed_step_floor_s * 1e3:>7.2f} ms"
                f"{f.tokens_per_s:>10.0f}{f.routed_tokens_per_s:>9.0f}"
            )
        lines.append(
            "usable: memory less 2 GB (Jetson: 8 GB) reserved; '1 engine': `dgrt build --one-engine` (one copy of "
            "the weights), '2 engines': `dgrt build` (a copy per graph); fits '1 engine': only as one engine; "
            "'unsupported': TensorRT does not run this precision there; floors: max(bytes read / "
            "bandwidth, FLOPs / dense peak); tokens/s: a canvas each `steps` denoise steps plus its prefill."
        )
        lines += [f"{target}: {change}" for target, change in self.changes.items()]
        return "\n".join(lines)


def _gb(n: float) -> str:
    return f"{n / GB:.2f} GB"


def make_plan(
    source: str,
    dtype: str | None = None,
    recipe: Recipe | None = None,
    target: str | None = None,
    batch: int = 1,
    context: int | None = None,
    prompt: int = 1024,
    steps: float | None = None,
) -> Plan:
    """The plan for `source` (see resolve) on one target, or all of them. An export's own dtype and recipe
    are the defaults; context defaults to the prompt plus generation_config's max_new_tokens in whole
    canvases, as generate allocates it; steps per canvas to its max_denoising_steps."""
    from dgrt.sampler import SamplerConfig

    cfg, gen, what, exported = resolve(source)
    experts = ROUTED
    if exported is not None:  # the export's own precision unless another is asked for
        dtype = dtype or exported[0]
        recipe = recipe or exported[1]
        experts = exported[2]
    dtype = dtype or "fp32"
    if dtype not in DTYPES:
        raise DgrtError(f"unsupported dtype {dtype!r}; expected one of {', '.join(DTYPES)}.")
    targets = hardware()
    if target is not None and target not in targets:
        raise DgrtError(f"unknown target {target!r}; expected one of {', '.join(targets)}.")
    check_ints("--batch", batch, 1, 4096)
    check_ints("--prompt", prompt, 1, cfg.max_position_embeddings)
    c = cfg.canvas_length
    if context is None:
        max_new = int(gen.get("max_new_tokens") or 256)
        context = min(prompt + -(-max_new // c) * c, cfg.max_position_embeddings)
    check_ints("--context", context, max(prompt, c) + 1, cfg.max_position_embeddings)
    steps = float(steps if steps is not None else SamplerConfig.from_generation_config(gen).steps)
    if not 1 <= steps <= 10_000:
        raise DgrtError(f"--steps is {steps:g}, expected a number from 1 to 10000 (denoise steps per canvas).")
    precision = recipe.name if recipe is not None else dtype
    w = weights_of(cfg, dtype, recipe)
    s = sizes(cfg, w, dtype, batch, context, prompt, experts)
    chosen = [targets[target]] if target else list(targets.values())
    fits = [fit(hw, s, precision, batch, c, steps) for hw in chosen]
    changes = {
        f.target: _first_change(f, targets[f.target], cfg, w, dtype, recipe, batch, context, prompt)
        for f in fits
        if not f.fits or not f.runs
    }
    return Plan(what, precision, dtype, batch, context, prompt, steps, s, fits, changes)


def _first_change(
    f: Fit,
    hw: Hardware,
    cfg: ModelConfig,
    w: Weights,
    dtype: str,
    recipe: Recipe | None,
    batch: int,
    context: int,
    prompt: int,
) -> str:
    precision = recipe.name if recipe is not None else dtype
    if not f.runs:
        return f"TensorRT does not run {precision} there; export with --quant int4 (or --dtype fp16/bf16)."
    if f.fits_one_engine:
        return "fits as one engine: dgrt build --one-engine (one copy of the weights; two engines hold two)."
    usable = f.usable_bytes

    known = {(dtype, recipe): w}  # each precision's model facts computed once, whatever the contexts tried

    def one_engine(d: str, r: Recipe | None, ctx: int) -> int:
        if (d, r) not in known:
            known[d, r] = weights_of(cfg, d, r)
        s = sizes(cfg, known[d, r], d, batch, ctx, min(prompt, ctx - 1))
        return s.one_engine

    half = "bf16" if dtype == "fp32" else dtype
    options: list[tuple[str, Recipe | None]] = [(half, None)] if dtype == "fp32" and recipe is None else []
    options += [(half, Recipe(r, recipe.block_size if recipe else 64)) for r in ("fp8", "int4-experts", "int4")]
    if w.file_bytes <= usable:  # the weights fit: shrink the context first
        low, high = cfg.canvas_length + 1, context
        while low < high:  # the longest context that fits
            mid = (low + high + 1) // 2
            low, high = (mid, high) if one_engine(dtype, recipe, mid) <= usable else (low, mid - 1)
        if one_engine(dtype, recipe, low) <= usable:
            return f"lower --context to {low} tokens (with --one-engine), or --batch."
    for d, r in options:
        name = r.name if r else d
        if TARGETS[hw.name].supports(name) and one_engine(d, r, context) <= usable:
            flag = f"--quant {name}" if r else f"--dtype {d}"
            return f"export with {flag} ({_gb(one_engine(d, r, context))} as one engine)."
    return "does not fit at any precision dgrt exports; choose a target with more memory."
