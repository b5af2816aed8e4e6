"""The EntropyBound sampler on [batch, canvas] tensors: schedule, acceptance, renoising, adaptive stop.

The vocabulary-sized part (argmax, sample, entropy, soft embeddings) runs inside the denoise graph
(dgrt.model.sampling); this module is the rest, exactly as transformers' DiffusionGemma does it
(REFERENCE.md, "The sampler").
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from dgrt.errors import DgrtError


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

    def with_overrides(self, **overrides: Any) -> SamplerConfig:
        """A copy with the given fields replaced (None only where a field allows it: the thresholds)."""
        names = {f.name for f in fields(self)}
        unknown = set(overrides) - names
        if unknown:
            raise DgrtError(f"unknown sampler setting(s) {sorted(unknown)}; expected some of {sorted(names)}.")
        return replace(self, **overrides).checked()

    def checked(self) -> SamplerConfig:
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise DgrtError(f"steps is {self.steps!r}, expected a positive integer.")
        if not 0 <= self.t_min < self.t_max:
            raise DgrtError(f"temperatures t_min={self.t_min}, t_max={self.t_max}: expected 0 <= t_min < t_max.")
        if not self.entropy_bound > 0:
            raise DgrtError(f"entropy_bound is {self.entropy_bound}, expected a positive number.")
        if self.stability_threshold is not None and self.stability_threshold < 0:
            raise DgrtError(f"stability_threshold is {self.stability_threshold}, expected >= 0 or None.")
        if self.confidence_threshold is not None and not self.confidence_threshold > 0:
            raise DgrtError(f"confidence_threshold is {self.confidence_threshold}, expected > 0 or None.")
        return self

    @property
    def adaptive(self) -> bool:
        return self.stability_threshold is not None and self.confidence_threshold is not None

    def temperature(self, step: int) -> torch.Tensor:
        """The linear schedule at `step` (counting down from `steps` to 1), in fp32 exactly as transformers
        computes it (an int32 step divided in float32)."""
        fraction = torch.tensor(step, dtype=torch.int32) / self.steps
        return self.t_min + (self.t_max - self.t_min) * fraction


def accept(entropy: torch.Tensor, entropy_bound: float) -> torch.Tensor:
    """Positions [B, C] to keep: the lowest-entropy ones whose entropies, summed without the largest of
    them, stay within the bound (the lowest is always kept)."""
    sorted_entropy, order = torch.sort(entropy, dim=-1)
    keep_sorted = torch.cumsum(sorted_entropy, dim=-1) - sorted_entropy <= entropy_bound
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


class AdaptiveStop:
    """Per-row stop: the argmax equals that of each of the last `stability` steps and the mean entropy
    is below `confidence`. The history starts at -1 (so with stability 1 the earliest stop is step 2)."""

    def __init__(self, stability: int, confidence: float, batch: int, canvas: int):
        self.confidence = confidence
        self.history = torch.full((stability, batch, canvas), -1, dtype=torch.int64)

    def __call__(self, argmax: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        stable = (self.history == argmax[None]).all(dim=-1).all(dim=0)
        if len(self.history):
            self.history = torch.roll(self.history, shifts=-1, dims=0)
            self.history[-1] = argmax
        return stable & (entropy.mean(dim=-1) < self.confidence)


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
