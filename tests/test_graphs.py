"""The flat-signature graph modules the exporter traces, and the in-graph sampler outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dgrt.checkpoint import load_model
from dgrt.model import Denoise, Prefill
from dgrt.sampler import sample_from_uniform, step_outputs


@torch.inference_mode()
def test_flat_modules_match_the_model(tiny_ckpt: Path) -> None:
    model = load_model(tiny_ckpt)
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (2, 5))
    positions = torch.arange(5)[None].expand(2, -1)
    no_padding = torch.zeros(2, dtype=torch.int64)
    new = Prefill(model)(ids, positions, no_padding, *[t for kv in model.empty_past(2) for t in kv])
    assert len(new) == 2 * cfg.num_layers
    for t, spec in zip(new[::2], cfg.layers, strict=True):
        assert t.shape == (2, spec.num_kv_heads, 5, spec.head_dim)

    c, h = cfg.canvas_length, cfg.hidden_size
    canvas = torch.randint(0, cfg.vocab_size, (2, c))
    cpos = torch.arange(5, 5 + c)[None].expand(2, -1)
    soft = torch.randn(2, c, h)
    temperature = torch.tensor([0.8, 0.5])
    uniform = torch.rand(2, c)
    argmax, sample, entropy, next_soft, logits = Denoise(model, debug_logits=True)(
        canvas, soft, cpos, no_padding, temperature, uniform, *new
    )
    pairs = list(zip(new[::2], new[1::2], strict=True))
    assert torch.equal(logits, model.denoise(canvas, soft, cpos, pairs))
    processed = logits / temperature[:, None, None]
    assert torch.equal(argmax, processed.argmax(-1))
    assert torch.equal(next_soft, model.soft_embeddings(processed))
    expected_entropy = torch.distributions.Categorical(logits=processed).entropy()  # what transformers uses
    assert torch.allclose(entropy, expected_entropy, atol=1e-5)
    assert sample.dtype == torch.int64 and sample.shape == (2, c)


def test_inverse_cdf_sampling_picks_the_bucket_of_u() -> None:
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3]])
    cases = {0.0: 0, 0.05: 0, 0.1: 2, 0.69: 2, 0.71: 3, 0.999: 3}  # token 1 has probability 0
    for u, token in cases.items():
        assert sample_from_uniform(probs, torch.tensor([u])).item() == token, u


def test_inverse_cdf_sampling_follows_the_distribution() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 1, 50, generator=gen) * 2
    draws = torch.stack(
        [step_outputs(logits, torch.tensor([0.7]), torch.rand(1, 1, generator=gen))[2] for _ in range(20000)]
    )
    freq = torch.bincount(draws.flatten(), minlength=50).float() / draws.numel()
    expected = torch.softmax(logits[0, 0] / 0.7, -1)
    assert (freq - expected).abs().max() < 0.015


@torch.inference_mode()
def test_left_padded_rows_match_the_same_prompts_alone(tiny_ckpt: Path) -> None:
    """A batch of prompts of different lengths, left-padded, gives each row what it gives alone."""
    model = load_model(tiny_ckpt)
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    short, long = torch.randint(3, 200, (1, 5), generator=gen), torch.randint(3, 200, (1, 12), generator=gen)
    pad = torch.tensor([7, 0])
    ids = torch.cat([torch.cat([torch.zeros(1, 7, dtype=torch.int64), short], 1), long])
    positions = (torch.arange(12)[None] - pad[:, None]).clamp(min=0)  # real tokens start at position 0
    batched = model.prefill(ids, positions, model.empty_past(2), pad)
    alone = [model.prefill(p, torch.arange(p.shape[1])[None], model.empty_past(1)) for p in (short, long)]
    for (bk, bv), (sk, sv), (lk, lv) in zip(batched, *alone, strict=True):
        assert (bk[0, :, 7:] - sk[0]).abs().max() < 1e-5 and (bv[0, :, 7:] - sv[0]).abs().max() < 1e-5
        assert (bk[1] - lk[0]).abs().max() < 1e-5 and (bv[1] - lv[0]).abs().max() < 1e-5

    c = cfg.canvas_length
    canvas = torch.randint(0, cfg.vocab_size, (1, c), generator=gen).expand(2, -1)
    soft = torch.zeros(2, c, cfg.hidden_size)
    logits = model.denoise(canvas, soft, torch.arange(12, 12 + c)[None] - pad[:, None], batched, pad)
    for row, (prompt, past) in enumerate(zip((short, long), alone, strict=True)):
        p = prompt.shape[1]
        expected = model.denoise(canvas[:1], soft[:1], torch.arange(p, p + c)[None], past)
        assert (logits[row] - expected[0]).abs().max() < 1e-5


@pytest.mark.parametrize("vocab", [301, 1000, 262144])  # one block, padded blocks, the real vocabulary
def test_two_level_inverse_cdf_picks_what_a_running_sum_search_picks(vocab: int) -> None:
    gen = torch.Generator().manual_seed(vocab)
    probs = torch.softmax(torch.randn(64, vocab, generator=gen) * 8, dim=-1)  # many underflow to 0
    uniform = torch.rand(64, generator=gen)
    cdf = torch.cumsum(probs, dim=-1)
    expected = (cdf[..., :-1] <= (uniform * cdf[..., -1])[..., None]).sum(dim=-1)
    sample = sample_from_uniform(probs, uniform)
    assert (sample == expected).float().mean() >= 0.97  # equal but where rounding puts u on a boundary
    assert (sample < vocab).all() and (probs.gather(-1, sample[:, None]) > 0).all()
