"""The KV cache: one buffer per layer and kind, allocated once, read by every step without a copy.

Each layer's past is handed to the backend as a contiguous [batch, kv_heads, length, head_dim] view of
the front of its buffer, so a denoise step reads the cache in place (no per-step copy). Appending a
canvas re-strides the rows in place, once per canvas. Sliding layers keep only their last
sliding_window - 1 tokens (all the graphs ever attend to), so their buffers stay small however long the
context grows.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from dgrt.config import ModelConfig
from dgrt.errors import DgrtError
from dgrt.runtime.heap import DURING, large_blocks_mapped


@dataclass(frozen=True)
class LayerShape:
    num_kv_heads: int
    head_dim: int
    window: int | None  # sliding layers: keep the last window - 1 tokens

    @classmethod
    def of(cls, cfg: ModelConfig) -> list[LayerShape]:
        return [cls(s.num_kv_heads, s.head_dim, cfg.sliding_window if s.is_sliding else None) for s in cfg.layers]

    def tokens_held(self, capacity: int) -> int:
        """Tokens this layer's buffer holds in a cache of `capacity` tokens: a sliding layer its last
        window - 1 (appends shift them in place), however long the context."""
        return capacity if self.window is None else min(capacity, self.window - 1)


def cache_bytes(layers: list[LayerShape], batch: int, capacity: int, itemsize: int) -> int:
    """The bytes a KVCache(layers, batch, capacity, ...) allocates, K and V."""
    return sum(2 * batch * s.num_kv_heads * s.tokens_held(capacity) * s.head_dim * itemsize for s in layers)


class KVCache:
    def __init__(
        self,
        layers: list[LayerShape],
        batch: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        """capacity: most tokens a full layer will hold; device: where the backend reads the cache (a GPU
        backend binds it in place)."""
        self.layers, self.batch, self.capacity = layers, batch, capacity
        self.allocated_rows = batch  # `batch` (the rows calls see) may shrink and grow back up to this
        self.length = 0  # tokens in the history (what a full layer holds)
        self._kept = [0] * len(layers)  # tokens each layer holds
        self._buffers = []
        for shape in layers:
            numel = batch * shape.num_kv_heads * shape.tokens_held(capacity) * shape.head_dim
            self._buffers.append(
                (torch.zeros(numel, dtype=dtype, device=device), torch.zeros(numel, dtype=dtype, device=device))
            )

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self._buffers)

    def reset(self) -> None:
        self.length = 0
        self._kept = [0] * len(self.layers)

    # -- rows that come and go (continuous batching, dgrt.runtime.batching) ------------------------------
    #
    # Rows share one timeline (`length`); a row's history is right-aligned to it, and what lies before it in
    # the row is old but finite data that the row's left padding masks. Active rows are the first `batch`
    # rows, so the past of a call is still a prefix of each buffer.

    def start(self, length: int) -> None:
        """An empty cache whose timeline starts at `length` tokens of masked history (see place_row)."""
        if not 0 <= length <= self.capacity:
            raise DgrtError(f"the timeline would start at {length} tokens; this cache holds {self.capacity}.")
        self.length = length
        self._kept = [s.tokens_held(length) for s in self.layers]

    def set_batch(self, rows: int) -> None:
        """Make the first `rows` rows the active ones (their contents stay where they are)."""
        if not 0 <= rows <= self.allocated_rows:
            raise DgrtError(f"{rows} rows requested; this cache holds {self.allocated_rows}.")
        self.batch = rows

    def move_row(self, src: int, dst: int) -> None:
        """Copy row `src`'s history over row `dst` (to close the gap a leaving row makes)."""
        for i, (k_buf, v_buf) in enumerate(self._buffers):
            for buf in (k_buf, v_buf):
                view = self._rows_view(buf, i)
                view[dst] = view[src]

    def trim(self, tokens: int) -> None:
        """Drop the first `tokens` of the timeline from every active row: padding that no row attends to
        any more (every row's history then starts later; the timeline shrinks by as much)."""
        if not 0 <= tokens <= self.length:
            raise DgrtError(f"cannot trim {tokens} tokens from a {self.length}-token timeline.")
        for i, (k_buf, v_buf) in enumerate(self._buffers):
            old, new = self._kept[i], self.layers[i].tokens_held(self.length - tokens)
            rows = self.batch * self.layers[i].num_kv_heads
            for buf in (k_buf, v_buf):
                _restride(buf, rows, self.layers[i].head_dim, old, new, new)
            self._kept[i] = new
        self.length -= tokens

    def place_row(self, row: int, other: KVCache, other_row: int, tokens: int) -> None:
        """Put the last `tokens` of row `other_row` of another cache's history into `row`, right-aligned to
        this cache's timeline."""
        if tokens > min(other.length, self.length):
            raise DgrtError(f"cannot place {tokens} tokens of a {other.length}-token history into {self.length}.")
        for i, ((k_buf, v_buf), (k, v)) in enumerate(zip(self._buffers, other.past(), strict=True)):
            n = min(tokens, k.shape[2])  # a sliding layer holds its window's worth
            self._rows_view(k_buf, i)[row, :, self._kept[i] - n :] = k[other_row, :, k.shape[2] - n :]
            self._rows_view(v_buf, i)[row, :, self._kept[i] - n :] = v[other_row, :, v.shape[2] - n :]

    def _rows_view(self, flat: torch.Tensor, layer: int) -> torch.Tensor:
        """Every allocated row of a layer's buffer at the current layout, [allocated, kv_heads, kept, dim]."""
        s = self.layers[layer]
        return flat[: self.allocated_rows * s.num_kv_heads * self._kept[layer] * s.head_dim].view(
            self.allocated_rows, s.num_kv_heads, self._kept[layer], s.head_dim
        )

    def past(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's past, [batch, kv_heads, kept, head_dim], oldest first: views, not copies."""
        return [
            (self._view(k, i, self._kept[i]), self._view(v, i, self._kept[i])) for i, (k, v) in enumerate(self._buffers)
        ]

    def _view(self, flat: torch.Tensor, layer: int, length: int) -> torch.Tensor:
        s = self.layers[layer]
        return flat[: self.batch * s.num_kv_heads * length * s.head_dim].view(
            self.batch, s.num_kv_heads, length, s.head_dim
        )

    def append(self, new: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Add the K/V of new tokens ([batch, kv_heads, n, head_dim] per layer) after the history."""
        n = new[0][0].shape[2]
        if self.length + n > self.capacity:
            raise DgrtError(f"the context would reach {self.length + n} tokens; this cache holds {self.capacity}.")
        for i, ((k_buf, v_buf), (k, v)) in enumerate(zip(self._buffers, new, strict=True)):
            window = self.layers[i].window
            old = self._kept[i]
            keep = old + n if window is None else min(old + n, window - 1)
            from_old = max(0, keep - n)  # the newest tokens of the history that stay
            rows, dim = self.batch * self.layers[i].num_kv_heads, self.layers[i].head_dim
            for buf, t in ((k_buf, k), (v_buf, v)):
                _restride(buf, rows, dim, old, keep, from_old)
                self._view(buf, i, keep)[:, :, from_old:] = t[:, :, n - (keep - from_old) :]
            self._kept[i] = keep
        self.length += n


def _restride(flat: torch.Tensor, rows: int, dim: int, old: int, new: int, keep: int) -> None:
    """In place: rows of `old` tokens become rows of `new` tokens whose first `keep` tokens are the last
    `keep` of the old row. Rows move towards the end when they grow and towards the start when they
    shrink, so each row is copied before anything overwrites it."""
    if keep == 0 or rows == 0:
        return
    size = keep * dim
    scratch: torch.Tensor | None = None  # for the rows that overlap their new place
    for r in range(rows - 1, -1, -1) if new > old else range(rows):
        src, dst = (r * old + old - keep) * dim, r * new * dim
        if src == dst:
            continue
        segment = flat[src : src + size]
        if abs(src - dst) < size:
            if scratch is None:  # one per call, with its own mapping where large: from glibc's heap, these
                # temporaries (up to a row of the longest layer) made it grow with the prompt (dgrt.runtime.heap)
                large = flat.device.type == "cpu" and size * flat.element_size() >= DURING
                with large_blocks_mapped() if large else nullcontext():
                    scratch = torch.empty_like(segment)
            segment = scratch.copy_(segment)
        flat[dst : dst + size] = segment
