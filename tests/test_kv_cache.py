"""The runtime's KV cache: in-place appends give exactly the concatenated history (or its window)."""

from __future__ import annotations

import pytest
import torch

from dgrt.errors import DgrtError
from dgrt.runtime.kv_cache import KVCache, LayerShape


def test_appends_match_concatenation_and_sliding_layers_keep_their_window() -> None:
    layers = [LayerShape(2, 4, window=6), LayerShape(1, 8, window=None), LayerShape(3, 2, window=3)]
    cache = KVCache(layers, batch=2, capacity=64, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    history = [[torch.zeros(2, s.num_kv_heads, 0, s.head_dim)] * 2 for s in layers]
    for n in (1, 9, 3, 2, 7, 1, 9):  # prompt, then canvases and chunks of other sizes
        new = [
            (
                torch.randn(2, s.num_kv_heads, n, s.head_dim, generator=gen),
                torch.randn(2, s.num_kv_heads, n, s.head_dim, generator=gen),
            )
            for s in layers
        ]
        cache.append(new)
        history = [
            [torch.cat([h, t], 2) for h, t in zip(hist, kv, strict=True)] for hist, kv in zip(history, new, strict=True)
        ]
        for (k, v), (hk, hv), s in zip(cache.past(), history, layers, strict=True):
            keep = hk.shape[2] if s.window is None else min(hk.shape[2], s.window - 1)
            assert torch.equal(k, hk[:, :, hk.shape[2] - keep :]) and torch.equal(v, hv[:, :, hv.shape[2] - keep :])
            assert k.is_contiguous()
    assert cache.length == 32


def test_past_views_share_the_buffers() -> None:
    cache = KVCache([LayerShape(1, 2, None)], batch=1, capacity=8, dtype=torch.float32)
    cache.append([(torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2))])
    k, _ = cache.past()[0]
    assert k.untyped_storage().data_ptr() == cache._buffers[0][0].untyped_storage().data_ptr()


def test_overflow_is_refused() -> None:
    cache = KVCache([LayerShape(1, 2, None)], batch=1, capacity=4, dtype=torch.float32)
    cache.append([(torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2))])
    with pytest.raises(DgrtError, match="would reach 5 tokens; this cache holds 4"):
        cache.append([(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2))])


def test_rows_join_right_aligned_and_leave_by_moving_up() -> None:
    """Continuous batching's row operations: a history placed into a longer timeline ends where it ends;
    rows after one that leaves move up; appends then extend every active row."""
    layers = [LayerShape(1, 2, window=4), LayerShape(1, 2, window=None)]
    cache = KVCache(layers, batch=3, capacity=16, dtype=torch.float32)
    cache.start(6)  # a timeline of 6 masked tokens, no rows yet
    cache.set_batch(0)
    histories = []
    for row, n in enumerate((6, 2, 4)):
        alone = KVCache(layers, batch=1, capacity=n, dtype=torch.float32)
        kv = [(torch.full((1, 1, n, 2), float(row + 1)), torch.full((1, 1, n, 2), -float(row + 1))) for _ in layers]
        alone.append(kv)
        cache.set_batch(row + 1)
        cache.place_row(row, alone, 0, n)
        histories.append(alone.past())
    for (k, _), s in zip(cache.past(), layers, strict=True):
        kept = 6 if s.window is None else 3
        for row, n in enumerate((6, 2, 4)):
            tail = min(n, kept)
            assert torch.all(k[row, :, kept - tail :] == row + 1)  # right-aligned to the timeline
    cache.move_row(2, 1)  # row 1 leaves; row 2 moves up
    cache.set_batch(2)
    cache.append([(torch.zeros(2, 1, 1, 2), torch.zeros(2, 1, 1, 2)) for _ in layers])
    k_full = cache.past()[1][0]
    assert k_full.shape == (2, 1, 7, 2) and torch.all(k_full[1, :, 2:6] == 3) and torch.all(k_full[:, :, 6] == 0)
    with pytest.raises(DgrtError, match="rows requested"):
        cache.set_batch(4)


def test_trimming_the_timeline_keeps_every_rows_history() -> None:
    """When the longest row has left, the padding every remaining row has is dropped from the timeline."""
    layers = [LayerShape(1, 2, window=5), LayerShape(2, 2, window=None)]
    cache = KVCache(layers, batch=2, capacity=16, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    new = [
        (torch.randn(2, s.num_kv_heads, 10, 2, generator=gen), torch.randn(2, s.num_kv_heads, 10, 2)) for s in layers
    ]
    cache.append(new)  # rows whose own histories are their last 7 and 4 tokens: 3 tokens of padding in common
    cache.trim(3)
    assert cache.length == 7
    for (k, v), (nk, nv), s in zip(cache.past(), new, layers, strict=True):
        kept = 7 if s.window is None else 4
        assert torch.equal(k, nk[:, :, 10 - kept :]) and torch.equal(v, nv[:, :, 10 - kept :])
    with pytest.raises(DgrtError, match="cannot trim 8 tokens from a 7-token timeline"):
        cache.trim(8)
