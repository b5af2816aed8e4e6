"""The routed MoE: each expert computes only the tokens routed to it, up to a capacity per call, and a call
that overflows it is run again with more slots, so routed and dense exports generate the same tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import VARIANTS, variant_config

import dgrt
from dgrt.checkpoint import load_model
from dgrt.config import FULL, SLIDING, ModelConfig
from dgrt.contract import manifest as manifest_mod
from dgrt.contract.experts import DENSE, ExpertRouting
from dgrt.errors import DgrtError
from dgrt.model import DiffusionGemma
from dgrt.model.layers import ExpertSlots
from dgrt.presets import preset_config, random_weights, real_config, save_checkpoint
from dgrt.runtime.backends import TorchBackend
from dgrt.runtime.experts import RoutedCalls, slot_ids

# 8 experts top-2: the default capacity is half a call's tokens, so uneven routing overflows it.
EIGHT_EXPERTS = variant_config(num_hidden_layers=2, layer_types=[SLIDING, FULL], num_experts=8, top_k_experts=2)


def test_capacity_is_twice_the_mean_load_or_six_deviations_above_it_in_multiples_of_eight() -> None:
    real = ModelConfig.from_dict(real_config("gemma4-26b-a4b")[0])  # 128 experts, top-8
    routing = ExpertRouting()
    assert routing.capacity(real, 256) == 32  # a canvas: 256 tokens x top-8 / 128 experts = 16 on average
    assert routing.capacity(real, 1024) == 112  # a prefill chunk: mean 64, sd 7.7, 64 + 6 sd = 110.5 < 128
    assert routing.capacity(real, 3) == 3  # never more slots than tokens
    assert ExpertRouting(capacity_factor=1.3).capacity(real, 256) == 24  # 20.8 rounded up to a multiple of 8
    assert ExpertRouting(capacity_factor=4).capacity(real, 256) == 40  # a larger factor stops at 16 + 6 sd
    bench = preset_config("bench")
    few = ModelConfig.from_dict(bench)  # 4 experts, top-2
    assert routing.capacity(few, 256) == 176  # mean 128, sd 8: 176 slots, not 2x the mean (every token)
    assert routing.capacity(few, 128) == 104  # mean 64, sd 5.7: 97.9, rounded up to a multiple of 8
    assert routing.capacity(few, 1) == 1
    every = ModelConfig.from_dict(bench | {"text_config": bench["text_config"] | {"top_k_experts": 4}})
    assert routing.capacity(every, 256) == 256  # top-4 of 4: every expert takes every token


def test_an_overflowing_call_runs_again_with_more_slots() -> None:
    cfg = ModelConfig.from_dict(EIGHT_EXPERTS)
    tried: list[int] = []

    def call(capacity: int) -> tuple[str, int]:
        tried.append(capacity)
        return f"at {capacity}", 40  # the busiest expert takes 40 tokens

    calls = RoutedCalls(ExpertRouting(), cfg)
    assert calls.run(64, call) == "at 64"  # 32 slots overflow; at least doubled: 64
    assert tried == [32, 64] and (calls.calls, calls.redos) == (1, 1)
    assert calls.run(64, call) == "at 40"  # the next call of 64 tokens starts at the load seen (40)
    assert tried[2:] == [40] and (calls.calls, calls.redos) == (2, 1)
    assert calls.run(16, lambda capacity: (capacity, 12)) == 16  # other token counts start afresh: 8, then 16
    with pytest.raises(DgrtError, match="an expert was routed 40 of a call's 64 tokens, more than the 36"):
        RoutedCalls(ExpertRouting(), cfg, max_capacity=36).run(64, call)


@pytest.fixture(scope="module")
def narrow_model() -> DiffusionGemma:
    cfg = ModelConfig.from_dict(VARIANTS["narrow"])  # 6 experts top-3
    model = DiffusionGemma(cfg).eval()
    weights = random_weights(cfg, seed=5)
    model.load_state_dict({k.removeprefix("model.decoder."): v for k, v in weights.items()}, strict=False)
    return model


@torch.inference_mode()
def test_routed_modules_equal_dense_when_nothing_overflows(narrow_model: DiffusionGemma) -> None:
    model = narrow_model
    ids = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(16)[None].expand(4, -1)
    dense = model.prefill(ids, positions, model.empty_past(4))
    fits = ExpertSlots(slot_ids(64))
    model.prefill(ids, positions, model.empty_past(4), None, fits)
    load = int(fits.load())
    assert 64 * 3 / 6 <= load < 64  # uneven routing, yet no expert took every token

    exact = ExpertSlots(slot_ids(load))  # just enough slots
    routed = model.prefill(ids, positions, model.empty_past(4), None, exact)
    assert int(exact.load()) == load
    for (dk, dv), (rk, rv) in zip(dense, routed, strict=True):
        torch.testing.assert_close(rk, dk, atol=1e-5, rtol=0)
        torch.testing.assert_close(rv, dv, atol=1e-5, rtol=0)

    short = ExpertSlots(slot_ids(load - 1))  # one slot short: tokens dropped, and the graph says so
    dropped = model.prefill(ids, positions, model.empty_past(4), None, short)
    assert int(short.load()) > load - 1
    assert max((r[0] - d[0]).abs().max() for r, d in zip(dropped, dense, strict=True)) > 1e-2


@pytest.fixture(scope="module")
def forced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint whose first router sends every token to the same two experts (a zero router: all
    scores tie and TopK takes the same two)."""
    weights = random_weights(ModelConfig.from_dict(EIGHT_EXPERTS), seed=7)
    weights["model.decoder.layers.0.router.proj.weight"].zero_()
    return save_checkpoint(tmp_path_factory.mktemp("forced") / "ckpt", EIGHT_EXPERTS, weights)


PROMPTS = [[2, 40, 41, 42, 43, 44, 45], [2, 9, 8]]
FAST = {"seed": 3, "max_new_tokens": 32, "steps": 4}


def test_a_forced_router_overflows_every_call_and_still_generates_what_dense_does(forced: Path) -> None:
    model = load_model(forced)
    dense = dgrt.load(forced, backend=TorchBackend(model, experts=DENSE)).generate(PROMPTS, **FAST)
    routed_backend = TorchBackend(model)
    routed = dgrt.load(forced, backend=routed_backend).generate(PROMPTS, **FAST)
    assert routed.tokens == dense.tokens
    calls = routed_backend.routed
    # Each token count overflows its default capacity once, then starts at the load it saw.
    assert calls is not None and 0 < calls.redos < calls.calls


def test_an_export_generates_the_same_tokens_whatever_the_capacity(exports: dict[str, Path]) -> None:
    """The narrow variant's routed export (6 experts top-3), at its default capacity (every token: nothing
    overflows) and at a quarter of it, where calls overflow and run again."""
    full = dgrt.load(exports["narrow"]).generate(PROMPTS, **FAST)
    tight = dgrt.load(exports["narrow"], capacity_factor=0.25)
    assert tight.generate(PROMPTS, **FAST).tokens == full.tokens
    calls = tight.backend.routed
    assert calls is not None and 0 < calls.redos <= calls.calls
    with pytest.raises(DgrtError, match="capacity_factor is 0, expected a number > 0"):
        dgrt.load(exports["narrow"], capacity_factor=0)


def test_the_manifest_says_how_experts_are_computed(exports: dict[str, Path]) -> None:
    manifest = manifest_mod.load(exports["narrow"])
    assert manifest.experts == ExpertRouting("routed", 2.0)
    assert [t.name for t in manifest.graphs["denoise"].spec.inputs][6] == "expert_slots"
    assert manifest.graphs["prefill"].spec.outputs[-1].name == "expert_load"
    data = manifest.to_json()
    del data["experts"]  # a manifest without the field (an export from before) describes dense graphs
    with pytest.raises(DgrtError, match="'dims' is .* but its config implies"):
        manifest_mod.Manifest.from_json(data)
