"""How an export computes its mixture of experts, and how many tokens each expert takes per call.

* routed (the default): each expert computes at most `capacity` tokens of a graph call, chosen in the graph
  (dgrt.model.layers.Experts). The call returns its busiest expert's load; where that exceeds the capacity,
  the runtime runs the call again with more slots (dgrt.runtime.experts), so the result never differs from
  the dense computation.
* dense: every expert computes every token, mixed by a dense routing matrix. num_experts / top_k times the
  expert work; kept for comparison and as a fallback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dgrt.config import ModelConfig

FORMULATIONS = ("routed", "dense")
# Slots per expert as a multiple of the mean load (tokens * top_k / num_experts). See docs/measurements.md
# ("Routed experts") for the loads measured and the trade-off: 2x is the most the FLOP goal allows, and
# covers the busiest expert of uniform routing at a canvas of 256 tokens with 128 experts top-8.
DEFAULT_CAPACITY_FACTOR = 2.0
# ...or the mean plus this many standard deviations of an expert's load under uniform routing, where that is
# fewer: with few experts 2x the mean is every token (4 experts top-2), though the load hardly strays from
# it (the bench preset's busiest expert over 8 layers: 145-167 of 256 tokens, mean 128, sd 8).
LOAD_SPREAD = 6.0
SLOT_MULTIPLE = 8  # capacities are rounded up to this, for GEMM tiles and fewer distinct shapes


@dataclass(frozen=True)
class ExpertRouting:
    formulation: str = "routed"
    capacity_factor: float = DEFAULT_CAPACITY_FACTOR

    @property
    def routed(self) -> bool:
        return self.formulation == "routed"

    def capacity(self, cfg: ModelConfig, tokens: int) -> int:
        """Slots per expert for a graph call over `tokens` tokens (batch x sequence): capacity_factor times
        the mean load, or the mean plus LOAD_SPREAD standard deviations of a uniform router's load if fewer
        (so a larger factor stops adding slots there: past it, the runtime follows the loads it sees),
        rounded up to SLOT_MULTIPLE, at most `tokens` (where no expert can overflow)."""
        k, e = cfg.top_k_experts, cfg.num_experts
        mean = tokens * k / e
        variance = tokens * k * (e - k) / e**2  # binomial: each token picks a given expert with chance k / e
        slots = min(self.capacity_factor * mean, mean + LOAD_SPREAD * math.sqrt(variance))
        return max(1, min(tokens, math.ceil(math.ceil(slots) / SLOT_MULTIPLE) * SLOT_MULTIPLE))

    def describe(self) -> str:
        return f"routed MoE (capacity at most {self.capacity_factor:g}x the mean load)" if self.routed else "dense MoE"

    def to_json(self) -> dict[str, object]:
        return {"formulation": self.formulation, "capacity_factor": self.capacity_factor}


ROUTED = ExpertRouting()
DENSE = ExpertRouting("dense")
