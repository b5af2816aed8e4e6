"""DiffusionGemma's EntropyBound sampler, exactly as transformers does it (docs/reference.md, "The sampler").

Two halves, one module:
* per position, inside the denoise graph (`step_outputs`, `sample_from_uniform`): everything
  vocabulary-sized. From the step's raw logits and temperature, the argmax, a token sampled from
  softmax(logits / T), the entropy of that distribution (and, in dgrt.model.graphs, the next step's
  self-conditioning soft embeddings);
* on [batch, canvas] tensors, in the runtime: the settings and temperature schedule (`SamplerConfig`),
  acceptance (`accept`), adaptive stopping (`AdaptiveStop`) and the end of a canvas (`finalize_canvas`).

Sampling is by inverse CDF from one uniform number per position, given as an input: a seed on the host
makes runs repeatable, and two backends fed the same numbers draw the same tokens. (transformers draws
with torch.multinomial instead, so its samples differ under the same seed; tests feed both sides the
same draws.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from numbers import Integral, Real
from typing import Any, TypedDict, Unpack

import torch
import torch.nn.functional as F

from dgrt.errors import DgrtError

MAX_STEPS = 10_000  # denoising steps per canvas; the reference uses 48


@dataclass(frozen=True)
class SamplerConfig:
    steps: int = 48  # max_denoising_steps
    t_min: float = 0.4
    t_max: float = 0.8
    entropy_bound: float = 0.1
    stability_threshold: int | None = 1  # adaptive stopping is off when either threshold is None
    confidence_threshold: float | None = 0.005

    @classmethod
    def from_generation_config(cls, gen: dict[str, Any]) -> SamplerConfig:
        """Defaults from a checkpoint's generation_config.json; absent or null keys keep the reference's."""
        values: dict[str, Any] = {}
        mapping = {"steps": "max_denoising_steps", "t_min": "t_min", "t_max": "t_max"}
        mapping |= {"stability_threshold": "stability_threshold", "confidence_threshold": "confidence_threshold"}
        for field, key in mapping.items():
            if gen.get(key) is not None:
                values[field] = gen[key]
        bound = (gen.get("sampler_config") or {}).get("entropy_bound")
        if bound is not None:
            values["entropy_bound"] = bound
        return cls(**values).checked()

    def with_overrides(self, **overrides: Unpack[SamplerSettings]) -> SamplerConfig:
        """A copy with the given fields replaced (None only where a field allows it: the thresholds)."""
        names = {f.name for f in fields(self)}
        unknown = set(overrides) - names
        if unknown:
            raise DgrtError(f"unknown sampler setting(s) {sorted(unknown)}; expected some of {sorted(names)}.")
        return replace(self, **overrides).checked()

    def checked(self) -> SamplerConfig:
        """This config with every value range-checked (each error names the accepted range) and plain
        Python numbers in place of numpy ones."""
        steps = _integer("steps", self.steps, 1, MAX_STEPS)
        t_min, t_max = _number("t_min", self.t_min), _number("t_max", self.t_max)
        if not 0 <= t_min < t_max:
            raise DgrtError(f"temperatures t_min={t_min}, t_max={t_max}: expected 0 <= t_min < t_max.")
        checked = replace(
            self,
            steps=steps,
            t_min=t_min,
            t_max=t_max,
            entropy_bound=_number("entropy_bound", self.entropy_bound, positive=True),
            stability_threshold=None
            if self.stability_threshold is None
            else _integer(
                "stability_threshold",
                self.stability_threshold,
                0,
                steps,
                " (steps), or None; a longer history of unchanged steps can never be satisfied",
            ),
            confidence_threshold=None
            if self.confidence_threshold is None
            else _number("confidence_threshold", self.confidence_threshold, positive=True, why=", or None"),
        )
        # The schedule runs in float32: its ends must be positive, finite temperatures there too.
        ends = [float(checked.temperature(step)) for step in (1, steps)]
        if not (ends[0] > 0 and math.isfinite(ends[1])):
            raise DgrtError(
                f"temperatures t_min={t_min}, t_max={t_max} give float32 temperatures from {ends[0]} to {ends[1]}; "
                "expected positive finite ones (keep t_max within float32's range)."
            )
        return checked

    @property
    def adaptive(self) -> bool:
        return self.stability_threshold is not None and self.confidence_threshold is not None

    def temperature(self, step: int) -> torch.Tensor:
        """The linear schedule at `step` (counting down from `steps` to 1), in fp32 exactly as transformers
        computes it (an int32 step divided in float32)."""
        fraction = torch.tensor(step, dtype=torch.int32) / self.steps
        return self.t_min + (self.t_max - self.t_min) * fraction


class SamplerSettings(TypedDict, total=False):
    """SamplerConfig's fields as keyword arguments (`gen.generate(prompt, steps=16)`): each one given
    replaces the config's, an absent one keeps it (None is a value: it turns adaptive stopping off)."""

    steps: int
    t_min: float
    t_max: float
    entropy_bound: float
    stability_threshold: int | None
    confidence_threshold: float | None


def show(value: Any) -> str:
    """A value as an error quotes it: its repr, cut short (a 400-digit seed is still one line)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _integer(name: str, value: Any, low: int, high: int, why: str = "") -> int:
    if isinstance(value, Integral) and not isinstance(value, bool) and low <= int(value) <= high:
        return int(value)
    raise DgrtError(f"{name} is {show(value)}, expected an integer from {low} to {high}{why}.")


def _number(name: str, value: Any, positive: bool = False, why: str = "") -> float:
    if not isinstance(value, Real) or isinstance(value, bool) or not math.isfinite(value) or positive and value <= 0:
        raise DgrtError(f"{name} is {show(value)}, expected a finite {'positive ' if positive else ''}number{why}.")
    return float(value)


# -- per position, inside the denoise graph --------------------------------------------------------


CDF_BLOCK = 512  # vocabulary entries per block of the two-level inverse CDF (sqrt of the real 262144)


def sample_from_uniform(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The token i with cdf[i-1] <= u * total < cdf[i], for probabilities [..., V] and uniforms [...] in [0, 1).

    A two-level inverse CDF with static shapes: the vocabulary in blocks of CDF_BLOCK, the block holding
    u * total found from the blocks' running sums, then the token within it from that block's running
    sums. Running sums are matrix products with triangular ones (no CumSum, which TensorRT before 10.8
    runs as a loop over the axis, and no [..., V] cumulative tensor): about 2 x 256 x 512 x 512
    multiply-adds per canvas at the real vocabulary. Counting running sums at or below the threshold
    never picks a zero-probability token; the last sum of each level is left out of its count, which
    bounds the result without a clamp (TensorRT has no integer Clip) except where the vocabulary was
    padded to whole blocks.
    """
    vocab = probs.shape[-1]
    size = min(CDF_BLOCK, vocab)
    count = -(-vocab // size)
    padded = F.pad(probs, (0, count * size - vocab)) if count * size != vocab else probs
    blocks = padded.reshape(*probs.shape[:-1], count, size)
    ends = _running_sums(blocks.sum(dim=-1))  # [..., count]: the cdf at each block's end
    threshold = uniform * ends[..., -1]
    block = (ends[..., :-1] <= threshold[..., None]).sum(dim=-1)  # [...]
    starts = torch.cat([torch.zeros_like(ends[..., :1]), ends[..., :-1]], dim=-1)
    rest = threshold - starts.gather(-1, block[..., None]).squeeze(-1)
    chosen = blocks.gather(-2, block[..., None, None].expand(*block.shape, 1, size)).squeeze(-2)  # [..., size]
    within = (_running_sums(chosen)[..., :-1] <= rest[..., None]).sum(dim=-1)
    token = block * size + within
    return token if count * size == vocab else torch.minimum(token, torch.tensor(vocab - 1))


def _running_sums(x: torch.Tensor) -> torch.Tensor:
    """Inclusive running sums over the last axis, as a product with upper-triangular ones."""
    n = x.shape[-1]
    index = torch.arange(n, device=x.device)
    return x @ (index[:, None] <= index[None, :]).to(x.dtype)


def step_outputs(
    logits: torch.Tensor, temperature: torch.Tensor, uniform: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(processed logits, argmax, sample, entropy) for raw fp32 logits [B, C, V], temperatures [B], uniforms [B, C].

    The entropy is the one transformers' Categorical(logits=lg).entropy() computes: -sum(p * log p), as a
    product of [1, V] and [V, 1] rows, which leaves no [B, C, V] product for a runtime to hold (and on ONNX
    Runtime is faster than Mul then ReduceSum: 43 ms against 58 ms over [128, 262144], 2 threads).
    """
    processed = logits / temperature[:, None, None]
    log_probs = torch.log_softmax(processed, dim=-1)
    probs = log_probs.exp()
    entropy = -(probs[..., None, :] @ log_probs[..., :, None])[..., 0, 0]
    return processed, processed.argmax(dim=-1), sample_from_uniform(probs, uniform), entropy


# -- on [batch, canvas] tensors, in the runtime ----------------------------------------------------


def accept(entropy: torch.Tensor, entropy_bound: float | torch.Tensor) -> torch.Tensor:
    """Positions [B, C] to keep: the lowest-entropy ones whose entropies, summed without the largest of
    them, stay within the bound (a float, or [B, 1] one per row; the lowest is always kept)."""
    sorted_entropy, order = torch.sort(entropy, dim=-1)
    keep_sorted = torch.cumsum(sorted_entropy, dim=-1) - sorted_entropy <= entropy_bound
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


class AdaptiveStop:
    """Per-row stop: the argmax equals that of each of the last `stability` steps and the mean entropy
    is below `confidence`. The history starts at -1 (so with stability 1 the earliest stop is step 2).
    Both may be given per row ([B] sequences), a row whose confidence is -inf never stopping."""

    def __init__(self, stability: int | Sequence[int], confidence: float | Sequence[float], batch: int, canvas: int):
        depths = torch.as_tensor(stability, dtype=torch.int64).expand(batch)
        self.confidence = torch.as_tensor(confidence, dtype=torch.float32).expand(batch)
        depth = int(depths.max()) if batch else 0
        self.history = torch.full((depth, batch, canvas), -1, dtype=torch.int64)
        self.counted = torch.arange(depth)[:, None] >= depth - depths[None, :]  # each row's last `stability`

    def __call__(self, argmax: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        stable = ((self.history == argmax[None]).all(dim=-1) | ~self.counted).all(dim=0)
        if len(self.history):
            self.history = torch.roll(self.history, shifts=-1, dims=0)
            self.history[-1] = argmax
        return stable & (entropy.mean(dim=-1) < self.confidence)


class RowSettings:
    """The sampler settings of each row of a batch, as the loop uses them (rows may differ: continuous
    batching). Row r runs its own `steps`, its own temperature schedule and bound, and stops adaptively
    by its own thresholds (or never, where they are None)."""

    def __init__(self, samplers: Sequence[SamplerConfig]):
        self.samplers = list(samplers)
        self.steps = torch.tensor([s.steps for s in samplers], dtype=torch.int64)
        self.entropy_bound = torch.tensor([[s.entropy_bound] for s in samplers], dtype=torch.float32)
        self._distinct: dict[SamplerConfig, list[int]] = {}  # each distinct config: its rows
        for i, sampler in enumerate(samplers):
            self._distinct.setdefault(sampler, []).append(i)

    @property
    def most_steps(self) -> int:
        return int(self.steps.max())

    def fill_temperature(self, out: torch.Tensor, iteration: int) -> None:
        """Each row's temperature at this iteration of the canvas (its step counting down from its
        `steps`; a row past its schedule keeps its last value, unused)."""
        for sampler, rows in self._distinct.items():
            out[rows] = sampler.temperature(max(sampler.steps - iteration, 1)).item()

    def adaptive_stop(self, canvas: int) -> AdaptiveStop | None:
        """None where no row stops adaptively."""
        thresholds = [(s.stability_threshold, s.confidence_threshold) for s in self.samplers]
        rows = [(k, c) if k is not None and c is not None else (0, -math.inf) for k, c in thresholds]  # off: never
        if all(c == -math.inf for _, c in rows):
            return None
        return AdaptiveStop([k for k, _ in rows], [c for _, c in rows], len(rows), canvas)


def finalize_canvas(
    canvas: torch.Tensor,
    finished_before: torch.Tensor,
    reached_length: bool,
    eos_ids: torch.Tensor | None,
    pad_id: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(canvas to emit and prefill, rows finished now) after a canvas, as transformers does it.

    A row is finished when it reached max_new_tokens or its canvas holds an EOS. With a pad id, rows
    finished before get an all-pad canvas and rows finishing now get pad after their first EOS.
    """
    has_eos = torch.isin(canvas, eos_ids) if eos_ids is not None else torch.zeros_like(canvas, dtype=torch.bool)
    finished = finished_before | has_eos.any(dim=-1) | reached_length
    if pad_id is None or not finished.any():
        return canvas, finished
    canvas = canvas.clone()
    canvas[finished_before] = pad_id
    eos_count = has_eos.cumsum(dim=-1)
    after_first_eos = (eos_count > 0) & ~((eos_count == 1) & has_eos)
    canvas[after_first_eos & ~finished_before[:, None]] = pad_id
    return canvas, finished
