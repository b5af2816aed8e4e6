"""One comparator for every accuracy check: a system under test against a reference, teacher-forced on
the reference's own trajectory, measured with one set of error statistics.

Polygraphy's Comparator is the model (one comparator runs any runner against any other, with the same
statistics everywhere); what it cannot do is the teacher forcing, so that is here:

* a Reference (transformers' DiffusionGemma: HFReference; dgrt's own PyTorch modules: TorchReference)
  runs its own sampler loop over its own cache;
* the subject is a runtime Backend: it prefills the same tokens into its own cache (the runtime's
  KVCache, as in generation) and is given exactly the reference's inputs at every denoise step;
* TeacherForcing.run yields each prefill and denoise step with the reference's results beside the
  subject's inputs; the caller runs the subject and compares what it checks (logits, K/V, step outputs)
  with Errors. TeacherForcing.errors is the usual pair: prefill K/V and denoise logits.

Users: `dgrt validate` (an export against transformers), the quantization accuracy report (a quantized
export against the fp32 modules), tools/gpu_check.py (GPU backends against the CPU modules) and
tests/test_parity.py (dgrt's modules against transformers).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import count, takewhile
from pathlib import Path
from typing import Any, Protocol

import torch

from dgrt.contract.experts import ROUTED, ExpertRouting
from dgrt.contract.manifest import Manifest
from dgrt.errors import DgrtError
from dgrt.runtime.backends import KV, Backend, DenoiseInputs, OnnxRuntimeBackend, StepOutputs, TorchBackend
from dgrt.runtime.experts import RoutedCalls, run_modules, slot_ids
from dgrt.runtime.generator import ModelInfo
from dgrt.runtime.kv_cache import KVCache
from dgrt.sampler import SamplerConfig, accept, sample_from_uniform

# What a comparison runs on when it is given no prompts and the model has no task of its own.
DEFAULT_PROMPTS = (
    "Reverse the string 'diffusion'.",
    "List three prime numbers.",
    "Write one sentence about the sea.",
)


@dataclass(frozen=True, eq=False)
class Errors:
    """How far one compared quantity is from the reference, per token (K/V) or canvas position (logits).

    Built from a pair of tensors by from_tensors and pooled over many by concat; the statistics are over
    everything pooled: the 99th percentile of the per-token maxima, the mean over all elements."""

    token_max: torch.Tensor  # max abs error of each token / position, float64
    abs_sum: float
    count: int  # elements compared
    cosines: torch.Tensor  # per position, float64 (logits only; empty otherwise)
    agree: int  # positions whose argmax agrees (logits only)

    @classmethod
    def from_tensors(cls, ours: torch.Tensor, ref: torch.Tensor, logits: bool = False) -> Errors:
        """ours against ref: same shape, any dtype or device, the token (or canvas position) on dim -2,
        as in K/V [B, heads, T, head_dim], logits [B, C, vocab], soft embeddings [B, C, H]. logits: also
        each position's cosine and argmax agreement over the last dim."""
        if ours.shape != ref.shape:
            raise DgrtError(f"compared tensors differ in shape: {tuple(ours.shape)}, reference {tuple(ref.shape)}.")
        a, b = ours.detach().to("cpu", torch.float64), ref.detach().to("cpu", torch.float64)
        diff = (a - b).abs()
        token_max = diff.movedim(-2, 0).reshape(diff.shape[-2], -1).amax(dim=1)
        cosines = torch.nn.functional.cosine_similarity(a, b, dim=-1).flatten() if logits else _EMPTY
        agree = int((a.argmax(-1) == b.argmax(-1)).sum()) if logits else 0
        return cls(token_max, float(diff.sum()), diff.numel(), cosines, agree)

    @classmethod
    def concat(cls, parts: Iterable[Errors]) -> Errors:
        """Every part's comparisons pooled into one."""
        parts = list(parts)
        return cls(
            torch.cat([_EMPTY, *(p.token_max for p in parts)]),
            sum((p.abs_sum for p in parts), 0.0),
            sum(p.count for p in parts),
            torch.cat([_EMPTY, *(p.cosines for p in parts)]),
            sum(p.agree for p in parts),
        )

    @property
    def max_abs(self) -> float:
        return float(self.token_max.max()) if self.token_max.numel() else 0.0

    @property
    def p99(self) -> float:
        return float(torch.quantile(self.token_max, 0.99)) if self.token_max.numel() else 0.0

    @property
    def mean_abs(self) -> float:
        return self.abs_sum / max(self.count, 1)

    @property
    def positions(self) -> int:
        return self.cosines.numel()

    @property
    def cosine_p1(self) -> float:
        return float(torch.quantile(self.cosines, 0.01)) if self.positions else 1.0

    @property
    def min_cosine(self) -> float:
        return float(self.cosines.min()) if self.positions else 1.0

    @property
    def agreement(self) -> float:
        return self.agree / max(self.positions, 1)


_EMPTY = torch.zeros(0, dtype=torch.float64)


class Reference(Protocol):
    """A model whose own sampling trajectory the subject is fed. It holds one prompt's cache."""

    def prefill(self, tokens: torch.Tensor, positions: torch.Tensor) -> list[KV]:
        """Add tokens to the cache; every layer's cached K/V after them (a sliding layer may keep only its
        window)."""
        ...

    def denoise(self, canvas: torch.Tensor, positions: torch.Tensor, conditioning: torch.Tensor | None) -> torch.Tensor:
        """fp32 logits [B, C, vocab] of a canvas over the cache; conditioning: the previous step's
        logits over its temperature, None on a canvas's first step."""
        ...

    def soft(self, conditioning: torch.Tensor) -> torch.Tensor:
        """The soft embeddings [B, C, H] a denoise graph is given for that self-conditioning input."""
        ...


class HFReference:
    """transformers' DiffusionGemma: its DynamicCache, decoder and self-conditioning."""

    def __init__(self, hf: Any):
        from transformers.cache_utils import DynamicCache

        self.hf = hf
        self.cache: Any = DynamicCache(config=hf.config.text_config)  # its layers are typed loosely

    def prefill(self, tokens: torch.Tensor, positions: torch.Tensor) -> list[KV]:
        self.hf.model.encoder(input_ids=tokens, past_key_values=self.cache, position_ids=positions)
        return [(layer.keys, layer.values) for layer in self.cache.layers]

    def denoise(self, canvas: torch.Tensor, positions: torch.Tensor, conditioning: torch.Tensor | None) -> torch.Tensor:
        return self.hf(decoder_input_ids=canvas, past_key_values=self.cache, decoder_position_ids=positions,
                       self_conditioning_logits=conditioning).logits  # fmt: skip

    def soft(self, conditioning: torch.Tensor) -> torch.Tensor:
        # What transformers' decoder computes inline from self_conditioning_logits.
        emb = self.hf.model.decoder.embed_tokens
        probs = conditioning.softmax(dim=-1, dtype=torch.float32).to(emb.weight.dtype)
        return torch.matmul(probs, emb.weight) * emb.embed_scale.to(emb.weight.dtype)


class TorchReference:
    """dgrt's own PyTorch modules (in fp32, the same math as the fp32 graphs): what a quantized export and
    a GPU backend are measured against."""

    def __init__(self, model: Any):
        self.model = model
        self.past: list[KV] = []  # the whole history, from the first prefill on

    def prefill(self, tokens: torch.Tensor, positions: torch.Tensor) -> list[KV]:
        past = self.past or self.model.empty_past(tokens.shape[0])
        new = self.model.prefill(tokens, positions, past)
        self.past = [(torch.cat([a, x], 2), torch.cat([b, y], 2)) for (a, b), (x, y) in zip(past, new, strict=True)]
        return self.past

    def denoise(self, canvas: torch.Tensor, positions: torch.Tensor, conditioning: torch.Tensor | None) -> torch.Tensor:
        if conditioning is None:
            soft = torch.zeros(*canvas.shape, self.model.config.hidden_size)
        else:
            soft = self.soft(conditioning)
        return self.model.denoise(canvas, soft, positions, self.past)

    def soft(self, conditioning: torch.Tensor) -> torch.Tensor:
        return self.model.soft_embeddings(conditioning)


@dataclass
class PrefillStep:
    """The prompt's or a finished canvas's prefill: the subject's K/V of the new tokens and the reference's
    whole cache after them. Valid until the next step (a backend may reuse its output buffers)."""

    prompt: int  # index in the plan's prompts
    canvas: int | None  # None: the prompt itself
    ours: list[KV]
    reference: list[KV]

    def compared(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """(what, ours, the reference's) for each layer's K and V, over the tokens both sides hold."""
        for i, ((k, v), (ref_k, ref_v)) in enumerate(zip(self.ours, self.reference, strict=True)):
            n = min(ref_k.shape[2], k.shape[2])  # the new tokens, or those of them in a sliding window
            yield f"layer {i} K", k[:, :, -n:], ref_k[:, :, -n:]
            yield f"layer {i} V", v[:, :, -n:], ref_v[:, :, -n:]

    def errors(self) -> Errors:
        return Errors.concat(Errors.from_tensors(ours, ref) for _, ours, ref in self.compared())


@dataclass
class DenoiseStep:
    """One denoise step of the reference's trajectory: exactly what the subject is given, and what the
    reference computed from the same inputs. Valid until the next step (the cache moves at a prefill)."""

    prompt: int
    canvas: int
    step: int  # counts down from the sampler's steps to 1
    inputs: DenoiseInputs  # the reference's canvas and soft embeddings, in the subject's dtype and device
    past: list[KV]  # the subject's own cache of the reference's tokens
    conditioning: torch.Tensor | None  # the reference's: the previous step's logits over its temperature
    logits: torch.Tensor  # the reference's, fp32 [B, C, vocab]
    reference: StepOutputs  # the reference's sampler step on those logits: argmax, sample, entropy, soft


Step = PrefillStep | DenoiseStep
LogitsFn = Callable[[DenoiseInputs, list[KV]], torch.Tensor]  # a subject's denoise logits [B, C, vocab]


@dataclass(frozen=True)
class Comparison:
    kv: Errors  # prefill K/V
    logits: Errors  # denoise logits


@dataclass(frozen=True)
class TeacherForcing:
    """A teacher-forced comparison: a fresh reference per prompt (`reference()`, seeded seed + its index)
    samples `canvases` canvases with `sampler`; any number of subjects can be run along it."""

    reference: Callable[[], Reference]
    info: ModelInfo
    prompts: Sequence[torch.Tensor]  # token ids [B, P] each
    sampler: SamplerConfig
    canvases: int
    seed: int

    def run(self, subject: Backend) -> Iterator[Step]:
        for i, prompt in enumerate(self.prompts):
            yield from self._trajectory(i, self.reference(), subject, prompt)

    def errors(self, subject: Backend, logits: LogitsFn) -> Comparison:
        """The subject's prefill K/V and denoise logits (from `logits`) against the reference's."""
        kv, denoise = [], []
        for step in self.run(subject):
            if isinstance(step, PrefillStep):
                kv += [Errors.from_tensors(ours, ref) for _, ours, ref in step.compared()]
            else:
                denoise.append(Errors.from_tensors(logits(step.inputs, step.past), step.logits, logits=True))
        return Comparison(Errors.concat(kv), Errors.concat(denoise))

    def _trajectory(self, index: int, reference: Reference, subject: Backend, prompt: torch.Tensor) -> Iterator[Step]:
        """Canvases of uniform random tokens; at each step the schedule's temperature, entropy-bound
        acceptance and renoising on the reference's logits; then the prefill of its final argmax."""
        info, sampler = self.info, self.sampler
        (b, p), c = prompt.shape, info.canvas_length
        rng = torch.Generator().manual_seed(self.seed + index)
        pad = torch.zeros(b, dtype=torch.int64)
        cache = KVCache(info.layers, b, p + self.canvases * c, subject.dtype, subject.device)

        def prefill(tokens: torch.Tensor, positions: torch.Tensor, canvas: int | None) -> Iterator[Step]:
            ref = reference.prefill(tokens, positions)
            new = subject.prefill(tokens, positions, pad, cache.past())
            yield PrefillStep(index, canvas, new, ref)
            cache.append(new)

        yield from prefill(prompt, torch.arange(p)[None].repeat(b, 1), None)
        for k in range(self.canvases):
            positions = torch.arange(p + k * c, p + (k + 1) * c)[None].repeat(b, 1)
            canvas = torch.randint(0, info.vocab_size, (b, c), generator=rng)
            soft = torch.zeros(b, c, info.hidden_size)
            conditioning = None
            for step in range(sampler.steps, 0, -1):
                logits = reference.denoise(canvas, positions, conditioning)
                temperature = sampler.temperature(step)
                inputs = DenoiseInputs(canvas, soft.to(subject.device, subject.dtype), positions, pad,
                                       temperature.reshape(1).repeat(b), torch.rand(b, c, generator=rng))  # fmt: skip
                # The reference's own sampler step picks the next inputs: its trajectory, not the subject's.
                processed = logits / temperature
                entropy = torch.distributions.Categorical(logits=processed).entropy()
                sample = sample_from_uniform(processed.softmax(-1), inputs.uniform)
                outputs = StepOutputs(logits.argmax(-1), sample, entropy, reference.soft(processed))
                yield DenoiseStep(index, k, step, inputs, cache.past(), conditioning, logits, outputs)
                noise = torch.randint(0, info.vocab_size, (b, c), generator=rng)
                canvas = torch.where(accept(entropy, sampler.entropy_bound), sample, noise)
                conditioning, soft = processed, outputs.next_soft
            yield from prefill(outputs.argmax, positions, k)


def torch_logits(model: Any, experts: ExpertRouting = ROUTED) -> LogitsFn:
    """dgrt's modules' denoise logits for a step's inputs, with their MoE run as `experts` says."""
    routed = RoutedCalls(experts, model.config) if experts.routed else None

    def run(inputs: DenoiseInputs, past: list[KV]) -> torch.Tensor:
        args = (inputs.canvas_ids, inputs.soft_embeds, inputs.position_ids, past, inputs.pad_lengths)
        return run_modules(routed, inputs.canvas_ids.numel(), lambda slots: model.denoise(*args, slots))

    return run


def export_logits(export_dir: Path, manifest: Manifest) -> LogitsFn:
    """An export's denoise logits: its denoise graph on ONNX Runtime's CPU provider, with the `logits`
    value it keeps inside made an output."""
    import onnx
    import onnxruntime as ort

    from dgrt.runtime.backends import session_options

    graph = onnx.load(str(export_dir / manifest.graphs["denoise"].file), load_external_data=False)
    produced = {name for node in graph.graph.node for name in node.output}
    chunks = list(takewhile(produced.__contains__, (f"logits.{i}" for i in count())))  # see exporter.tracing
    if "logits" not in produced and chunks:
        graph.graph.node.append(onnx.helper.make_node("Concat", chunks, ["logits"], axis=1))
    elif "logits" not in produced:
        raise DgrtError(f"{export_dir}: its denoise graph has no 'logits' value to compare; re-export it.")
    if "logits" not in [o.name for o in graph.graph.output]:
        graph.graph.output.append(onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, None))
    options = session_options(manifest)
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(export_dir))
    session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
    past_names = [t.name for t in manifest.graphs["denoise"].spec.inputs if t.layer is not None]
    routed = RoutedCalls(manifest.experts, manifest.config)

    def run(inputs: DenoiseInputs, past: list[KV]) -> torch.Tensor:
        feed = {name: t.numpy() for name, t in inputs.by_name().items()}
        feed |= dict(zip(past_names, [t.numpy() for kv in past for t in kv], strict=True))
        if not manifest.experts.routed:
            return torch.from_numpy(session.run(["logits"], feed)[0])

        def call(capacity: int) -> tuple[torch.Tensor, int]:
            logits, load = session.run(["logits", "expert_load"], feed | {"expert_slots": slot_ids(capacity).numpy()})
            return torch.from_numpy(logits), int(load[0])

        return routed.run(inputs.canvas_ids.numel(), call)

    return run


def subject_logits(backend: Backend, export_dir: Path, manifest: Manifest) -> LogitsFn:
    """The denoise logits of an export loaded on `backend` (the torch backend's modules, or the graph
    itself on ONNX Runtime)."""
    if isinstance(backend, TorchBackend):
        return torch_logits(backend.model, manifest.experts)
    if isinstance(backend, OnnxRuntimeBackend):
        return export_logits(export_dir, manifest)
    raise DgrtError(
        f"the {backend.name} backend keeps its logits inside its engines; compare its step outputs instead "
        "(tools/gpu_check.py), or validate with --backend onnxruntime or torch."
    )
