"""The host half of the sampler against transformers' own classes, on synthetic inputs."""

from __future__ import annotations

import pytest
import torch

from dgrt.runtime.sampler import AdaptiveStop, SamplerConfig, accept, finalize_canvas

hf = pytest.importorskip(
    "transformers.models.diffusion_gemma.generation_diffusion_gemma", reason="the reference extra is needed"
)


def test_temperature_schedule_is_bit_identical() -> None:
    cfg = SamplerConfig(steps=48, t_min=0.4, t_max=0.8)
    schedule = hf.LinearTemperatureScheduleLogitsProcessor(t_min=0.4, t_max=0.8, max_denoising_steps=48)
    logits = torch.randn(1, 4, 8)
    for step in range(48, 0, -1):
        ref = schedule(None, logits, cur_step=torch.tensor(step, dtype=torch.int32))
        assert torch.equal(logits / cfg.temperature(step), ref)


def test_acceptance_matches_entropy_bound_sampler() -> None:
    gen = torch.Generator().manual_seed(0)
    sampler = hf.EntropyBoundSampler(
        hf.EntropyBoundSamplerConfig(entropy_bound=0.1), vocab_size=50, canvas_length=16, max_denoising_steps=8
    )
    for scale in (0.5, 3.0, 10.0):
        logits = torch.randn(3, 16, 50, generator=gen) * scale
        current, proposal = torch.zeros(3, 16, dtype=torch.long), torch.ones(3, 16, dtype=torch.long)
        sampler.accept_canvas(current, proposal, logits, cur_step=1)
        entropy = torch.distributions.Categorical(logits=logits).entropy()
        assert torch.equal(accept(entropy, 0.1), sampler.accepted_token_mask)
        assert accept(entropy, 0.1).sum(-1).min() >= 1  # the lowest-entropy position is always kept


@pytest.mark.parametrize("stability", [0, 1, 2])
def test_adaptive_stop_matches_stable_and_confident(stability: int) -> None:
    gen = torch.Generator().manual_seed(stability)
    ref = hf.StableAndConfidentStoppingCriteria(stability_threshold=stability, confidence_threshold=1.0)
    ours = AdaptiveStop(stability, 1.0, batch=4, canvas=6)
    argmax = torch.randint(0, 3, (4, 6), generator=gen)
    for _ in range(12):
        changed = torch.rand(4, 1, generator=gen) < 0.3  # rows repeat their argmax most of the time
        argmax = torch.where(changed, torch.randint(0, 3, (4, 6), generator=gen), argmax)
        logits = torch.randn(4, 6, 5, generator=gen) * 3
        entropy = torch.distributions.Categorical(logits=logits).entropy()
        assert torch.equal(ours(argmax, entropy), ref(argmax, logits))


def test_finalize_matches_transformers() -> None:
    eos, pad = torch.tensor([7, 9]), 0
    canvas = torch.tensor([[1, 2, 7, 3, 9], [4, 5, 6, 1, 2], [9, 1, 1, 1, 1], [3, 3, 3, 3, 3]])
    before = torch.tensor([False, False, False, True])
    tokens, finished = finalize_canvas(canvas, before, reached_length=False, eos_ids=eos, pad_id=pad)
    assert tokens.tolist() == [[1, 2, 7, 0, 0], [4, 5, 6, 1, 2], [9, 0, 0, 0, 0], [0, 0, 0, 0, 0]]
    assert finished.tolist() == [True, False, True, True]
    _, finished = finalize_canvas(canvas, before, reached_length=True, eos_ids=None, pad_id=None)
    assert finished.all()


def test_generation_config_defaults() -> None:
    cfg = SamplerConfig.from_generation_config(
        {"max_denoising_steps": 16, "sampler_config": {"entropy_bound": 0.2}, "confidence_threshold": None}
    )
    assert (cfg.steps, cfg.entropy_bound, cfg.t_max, cfg.confidence_threshold) == (16, 0.2, 0.8, 0.005)
