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
