"""The host half of the sampler against transformers' own classes, on synthetic inputs."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

from dgrt.errors import DgrtError
from dgrt.sampler import AdaptiveStop, SamplerConfig, accept, finalize_canvas


@pytest.fixture
def hf() -> ModuleType:
    """transformers' DiffusionGemma generation classes (the tests that need them skip without them)."""
    return pytest.importorskip(
        "transformers.models.diffusion_gemma.generation_diffusion_gemma", reason="the reference extra is needed"
    )


def test_temperature_schedule_is_bit_identical(hf: ModuleType) -> None:
    cfg = SamplerConfig(steps=48, t_min=0.4, t_max=0.8)
    schedule = hf.LinearTemperatureScheduleLogitsProcessor(t_min=0.4, t_max=0.8, max_denoising_steps=48)
    logits = torch.randn(1, 4, 8)
    for step in range(48, 0, -1):
        ref = schedule(None, logits, cur_step=torch.tensor(step, dtype=torch.int32))
        assert torch.equal(logits / cfg.temperature(step), ref)


def test_acceptance_matches_entropy_bound_sampler(hf: ModuleType) -> None:
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
def test_adaptive_stop_matches_stable_and_confident(hf: ModuleType, stability: int) -> None:
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


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"steps": 0}, "steps is 0, expected an integer from 1 to 10000."),
        ({"steps": 10**6}, "steps is 1000000, expected an integer from 1 to 10000."),
        ({"steps": "8"}, "steps is '8', expected an integer from 1 to 10000."),
        ({"steps": 8.0}, "steps is 8.0, expected an integer"),
        ({"steps": True}, "steps is True, expected an integer"),
        ({"t_max": float("inf")}, "t_max is inf, expected a finite number."),
        ({"t_min": float("nan")}, "t_min is nan, expected a finite number."),
        ({"t_min": "0.4"}, "t_min is '0.4', expected a finite number."),
        ({"t_min": 0.9}, "t_min=0.9, t_max=0.8: expected 0 <= t_min < t_max."),
        ({"t_min": -0.1}, "expected 0 <= t_min < t_max."),
        ({"t_max": 1e39}, "give float32 temperatures from inf to inf; expected positive finite ones"),
        ({"t_min": 0, "t_max": 1e-46}, "give float32 temperatures from 0.0 to 0.0"),
        ({"entropy_bound": 0}, "entropy_bound is 0, expected a finite positive number."),
        ({"entropy_bound": float("nan")}, "entropy_bound is nan"),
        ({"stability_threshold": 10**9}, "stability_threshold is 1000000000, expected an integer from 0 to 48 (steps)"),
        ({"steps": 4, "stability_threshold": 5}, "a longer history of unchanged steps can never be satisfied."),
        ({"stability_threshold": -1}, "stability_threshold is -1, expected an integer from 0 to 48"),
        ({"confidence_threshold": 0.0}, "confidence_threshold is 0.0, expected a finite positive number, or None."),
        ({"confidence_threshold": float("inf")}, "confidence_threshold is inf"),
    ],
)
def test_out_of_range_settings_are_refused_with_the_accepted_range(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(DgrtError) as err:
        SamplerConfig().with_overrides(**settings)
    assert message in str(err.value)


def test_checked_settings_are_plain_python_numbers() -> None:
    cfg = SamplerConfig().with_overrides(steps=np.int64(8), t_max=np.float32(0.5), stability_threshold=8)
    assert (cfg.steps, cfg.t_max, cfg.stability_threshold) == (8, 0.5, 8)
    assert type(cfg.steps) is int and type(cfg.t_max) is float
    assert SamplerConfig().with_overrides(stability_threshold=None).adaptive is False
    with pytest.raises(DgrtError, match=r"unknown sampler setting\(s\) \['temprature'\]"):
        SamplerConfig().with_overrides(temprature=1.0)


def test_adaptive_stop_per_row_is_each_rows_own() -> None:
    """Rows of one batch with their own thresholds (continuous batching) stop as each would alone."""
    stability, confidence = [0, 1, 2, 3], [1.0, 0.8, 1.2, float("-inf")]  # -inf: the last row never stops
    together = AdaptiveStop(stability, confidence, batch=4, canvas=6)
    alone = [AdaptiveStop(k, c, batch=1, canvas=6) for k, c in zip(stability, confidence, strict=True)]
    gen = torch.Generator().manual_seed(0)
    argmax = torch.randint(0, 3, (4, 6), generator=gen)
    for _ in range(10):
        changed = torch.rand(4, 1, generator=gen) < 0.3
        argmax = torch.where(changed, torch.randint(0, 3, (4, 6), generator=gen), argmax)
        entropy = torch.rand(4, 6, generator=gen) * 2
        expected = torch.cat([stop(argmax[i : i + 1], entropy[i : i + 1]) for i, stop in enumerate(alone)])
        assert torch.equal(together(argmax, entropy), expected)
        assert not expected[3]
