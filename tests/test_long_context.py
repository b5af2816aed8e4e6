"""Long prompts: prefill in chunks gives the K/V and tokens of one call over the whole prompt (and of
transformers), and the cache keeps sliding layers to their window however long the context."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

import dgrt
from dgrt.compare import Errors, HFReference
from dgrt.runtime.generator import Generator, prefill
from dgrt.runtime.kv_cache import KVCache, cache_bytes
from dgrt.sampler import SamplerConfig
from dgrt.validate import shared_noise

transformers = pytest.importorskip("transformers", reason="the reference extra (transformers==5.23.0) is needed")

# The narrow variant: window 5, canvas 8, layers sliding, sliding, full, sliding, full. Chunks below, at
# and above the window; prompts shorter than, equal to and longer than the chunks and the window.
CHUNKS = [3, 5, 8]
PROMPT_LENGTHS = [2, 5, 13]


@pytest.fixture(scope="module")
def narrow(exports: dict[str, Path]) -> Generator:
    with dgrt.load(exports["narrow"]) as gen:
        yield gen


@pytest.fixture(scope="module")
def hf(checkpoints: dict[str, Path]) -> transformers.DiffusionGemmaForBlockDiffusion:
    return transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(checkpoints["narrow"], dtype=torch.float32)


def prompts(gen: Generator) -> list[list[int]]:
    rng = torch.Generator().manual_seed(7)
    return [torch.randint(0, gen.info.vocab_size, (n,), generator=rng).tolist() for n in PROMPT_LENGTHS]


def prefill_batch(gen: Generator, rows: list[list[int]], chunk: int) -> tuple[KVCache, torch.Tensor]:
    """The rows left-padded into one batch and prefilled as generate does it; (cache, left padding)."""
    p = max(map(len, rows))
    pad = torch.tensor([p - len(r) for r in rows])
    ids = torch.zeros(len(rows), p, dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, p - len(r) :] = torch.tensor(r)
    positions = (torch.arange(p)[None] - pad[:, None]).clamp(min=0)
    cache = KVCache(gen.info.layers, len(rows), p, gen.backend.dtype)
    prefill(gen.backend, cache, ids, positions, pad, chunk)
    return cache, pad


def real_tokens(cache: KVCache, row: int, pad: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's K/V of one row's real (not padding) tokens among those the layer holds."""
    held = [min(cache.length - pad, k.shape[2]) for k, _ in cache.past()]
    return [
        (k[row, :, k.shape[2] - n :], v[row, :, v.shape[2] - n :]) for (k, v), n in zip(cache.past(), held, strict=True)
    ]


@pytest.mark.parametrize("chunk", CHUNKS)
def test_chunked_prefill_equals_one_call_and_transformers(narrow: Generator, hf, chunk: int) -> None:
    rows = prompts(narrow)
    chunked, pad = prefill_batch(narrow, rows, chunk)
    whole, _ = prefill_batch(narrow, rows, max(PROMPT_LENGTHS))
    for b, row in enumerate(rows):
        ref = HFReference(hf).prefill(torch.tensor([row]), torch.arange(len(row))[None])
        for i, ((k, v), (wk, wv), (rk, rv)) in enumerate(
            zip(real_tokens(chunked, b, int(pad[b])), real_tokens(whole, b, int(pad[b])), ref, strict=True)
        ):
            n = k.shape[1]
            assert Errors.from_tensors(k, wk).max_abs < 1e-5 and Errors.from_tensors(v, wv).max_abs < 1e-5, i
            assert Errors.from_tensors(k, rk[0, :, -n:]).max_abs < 1e-4, f"row {b} layer {i} K vs transformers"
            assert Errors.from_tensors(v, rv[0, :, -n:]).max_abs < 1e-4, f"row {b} layer {i} V vs transformers"


def test_generation_does_not_depend_on_the_chunk(narrow: Generator) -> None:
    """A batch with left padding; prompts and the committed canvases (8 tokens) are prefilled in chunks."""
    settings = dict(max_new_tokens=24, seed=3, steps=3, eos_token_id=None, pad_token_id=None)
    whole = narrow.generate(prompts(narrow), **settings)
    default = narrow.info
    try:
        for chunk in CHUNKS:
            narrow.info = replace(default, prefill_chunk=chunk)
            assert narrow.generate(prompts(narrow), **settings).tokens == whole.tokens, chunk
    finally:
        narrow.info = default


def test_chunked_generation_matches_transformers_with_shared_noise(narrow: Generator, hf) -> None:
    default = narrow.info
    narrow.info = replace(default, prefill_chunk=3)
    try:
        agreement, ours, ref = shared_noise(narrow, hf, prompts(narrow)[-1], SamplerConfig(steps=4), 2, seed=5)
    finally:
        narrow.info = default
    assert agreement == 1.0 and ours == ref


def test_sliding_layers_hold_their_window_however_long_the_context(narrow: Generator) -> None:
    layers, window = narrow.info.layers, 5
    short, long = (KVCache(layers, 2, n, torch.float32).nbytes for n in (100, 10_000))
    full = [s for s in layers if s.window is None]
    assert long - short == cache_bytes(full, 2, 10_000 - 100, 4)  # only the full layers grow
    assert all(s.tokens_held(10_000) == window - 1 for s in layers if s.window is not None)
