"""Routed graph calls at a capacity that fits: a call whose busiest expert received more tokens than it had
slots for is run again with more, so a routed export gives what the dense computation gives."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from dgrt.config import ModelConfig
from dgrt.contract.experts import SLOT_MULTIPLE, ExpertRouting
from dgrt.errors import DgrtError

T = TypeVar("T")


class RoutedCalls:
    """One backend's routed calls: picks each call's capacity, redoes overflowed calls, and counts them."""

    def __init__(self, routing: ExpertRouting, cfg: ModelConfig, max_capacity: int | None = None):
        """max_capacity: the most slots the backend takes (TensorRT's TopK: 3840), else no limit."""
        self.routing = routing
        self.cfg = cfg
        self.max_capacity = max_capacity
        self.calls = 0
        self.redos = 0

    def run(self, tokens: int, call: Callable[[int], tuple[T, int]]) -> T:
        """call(capacity) -> (result, busiest expert's load). The capacity grows to the load seen (at
        least doubling) until nothing overflowed; `tokens` slots never overflow."""
        limit = min(tokens, self.max_capacity or tokens)
        capacity = min(self.routing.capacity(self.cfg, tokens), limit)
        self.calls += 1
        while True:
            result, load = call(capacity)
            if load <= capacity:
                return result
            if capacity == limit:
                raise DgrtError(
                    f"an expert was routed {load} of a call's {tokens} tokens, more than the {limit} this backend "
                    "can give one expert; run smaller batches (or a smaller --prefill-chunk)."
                )
            self.redos += 1
            # A layer after the first overflow saw wrong inputs, so its load may be off: grow at least 2x.
            grown = -(-max(load, 2 * capacity) // SLOT_MULTIPLE) * SLOT_MULTIPLE
            capacity = min(limit, grown)


def slot_ids(capacity: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The expert_slots input of a routed graph: arange(capacity), int64."""
    return torch.arange(capacity, dtype=torch.int64, device=device)
