"""Routed graph calls at a capacity that fits: a call whose busiest expert received more tokens than it had
slots for is run again with more, so a routed export gives what the dense computation gives."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TypeVar

import torch

from dgrt.config import ModelConfig
from dgrt.contract.experts import SLOT_MULTIPLE, ExpertRouting
from dgrt.errors import DgrtError
from dgrt.model.layers import ExpertSlots

T = TypeVar("T")


class RoutedCalls:
    """One backend's routed calls: picks each call's capacity, redoes overflowed calls, and counts them.

    A call starts at the export's capacity for its token count, or at the busiest load of the last
    RECENT calls with that count if higher: the capacity follows the router. (A redo repeats the whole
    call, so a capacity that overflows often costs more than a few more slots: with uniform routing over
    30 layers of 128 experts top-8, a 256-token canvas overflows 32 slots in about a third of the steps
    and 40 in almost none; see docs/measurements.md, "Routed experts".)
    """

    RECENT = 8

    def __init__(self, routing: ExpertRouting, cfg: ModelConfig, max_capacity: int | None = None):
        """max_capacity: the most slots the backend takes (TensorRT's TopK: 3840), else no limit."""
        self.routing = routing
        self.cfg = cfg
        self.max_capacity = max_capacity
        self.calls = 0
        self.redos = 0
        self._loads: dict[int, deque[int]] = {}  # token count -> the busiest loads of its last calls

    def run(self, tokens: int, call: Callable[[int], tuple[T, int]]) -> T:
        """call(capacity) -> (result, busiest expert's load). The capacity grows to the load seen (at
        least doubling) until nothing overflowed; `tokens` slots never overflow."""
        limit = min(tokens, self.max_capacity or tokens)
        recent = self._loads.setdefault(tokens, deque(maxlen=self.RECENT))
        capacity = min(max(self.routing.capacity(self.cfg, tokens), _round_up(max(recent, default=0))), limit)
        self.calls += 1
        while True:
            result, load = call(capacity)
            if load <= capacity:
                recent.append(load)
                return result
            if capacity == limit:
                raise DgrtError(
                    f"an expert was routed {load} of a call's {tokens} tokens, more than the {limit} this backend "
                    "can give one expert; run smaller batches (or a smaller --prefill-chunk)."
                )
            self.redos += 1
            # A layer after the first overflow saw wrong inputs, so its load may be off: grow at least 2x.
            capacity = min(limit, _round_up(max(load, 2 * capacity)))


def _round_up(n: int) -> int:
    return -(-n // SLOT_MULTIPLE) * SLOT_MULTIPLE


def run_with_slots(
    calls: RoutedCalls | None,
    tokens: int,
    run: Callable[[dict[str, torch.Tensor]], T],
    load: Callable[[], int],
    device: torch.device | str = "cpu",
) -> T:
    """run(extra graph inputs) once for a dense export (calls None); for a routed one with `expert_slots` at
    a capacity that fits, reading the call's expert_load with load() after each run."""
    if calls is None:
        return run({})

    def call(capacity: int) -> tuple[T, int]:
        result = run({"expert_slots": slot_ids(capacity, device)})
        return result, load()

    return calls.run(tokens, call)


def run_modules(
    calls: RoutedCalls | None, tokens: int, run: Callable[[ExpertSlots | None], T], device: torch.device | str = "cpu"
) -> T:
    """run(slots) of dgrt's torch modules: once with None (dense) where calls is None, else with the slots of a
    capacity that fits (the modules record the load in them)."""
    if calls is None:
        return run(None)

    def call(capacity: int) -> tuple[T, int]:
        slots = ExpertSlots(slot_ids(capacity, device))
        return run(slots), int(slots.load())

    return calls.run(tokens, call)


def slot_ids(capacity: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The expert_slots input of a routed graph: arange(capacity), int64."""
    return torch.arange(capacity, dtype=torch.int64, device=device)
