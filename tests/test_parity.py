"""dgrt's torch modules against transformers' DiffusionGemma, teacher-forced, in float32.

Each case runs a whole block-diffusion chain on both sides with the same inputs: the prompt prefill, then
for each of 3 canvases a denoise step without and one with self-conditioning, then the prefill of the
finished (argmax) canvas at the decoder's positions. Prefill K/V are compared with the HF DynamicCache's
contents, denoise logits with HF's. Tolerance: 1e-4 max abs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dgrt.checkpoint import load_model
from dgrt.model import DiffusionGemma

transformers = pytest.importorskip("transformers", reason="the reference extra (transformers==5.23.0) is needed")
from transformers.cache_utils import DynamicCache  # noqa: E402

TOL = 1e-4
N_CANVASES = 3


def load_reference(path: Path) -> transformers.DiffusionGemmaForBlockDiffusion:
    return transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.float32).eval()


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs reference {tuple(ref.shape)}"
    err = (ours - ref).abs().max().item()
    assert err <= TOL, f"{what}: max abs error {err:.3g} > {TOL}"


def check_prefill(model: DiffusionGemma, cache: DynamicCache, new: list, what: str) -> None:
    """HF's sliding layers keep only the last W - 1 tokens: compare the tokens both sides have."""
    for i, (k, v) in enumerate(new):
        ref_k, ref_v = cache.layers[i].keys, cache.layers[i].values
        n = min(ref_k.shape[2], k.shape[2])
        assert_close(k[:, :, -n:], ref_k[:, :, -n:], f"{what} layer {i} K")
        assert_close(v[:, :, -n:], ref_v[:, :, -n:], f"{what} layer {i} V")


def run_chain(model: DiffusionGemma, hf, prompt: torch.Tensor, seed: int) -> int:
    """The teacher-forced chain described above; returns the number of comparisons made."""
    cfg = model.config
    b, p = prompt.shape
    c = cfg.canvas_length
    gen = torch.Generator().manual_seed(seed)
    cache = DynamicCache(config=hf.config.text_config)
    checks = 0

    positions = torch.arange(p)[None].expand(b, -1)
    hf.model.encoder(input_ids=prompt, past_key_values=cache, position_ids=positions)
    past = model.prefill(prompt, positions, model.empty_past(b))
    check_prefill(model, cache, past, "prompt prefill")
    checks += 1

    for k in range(N_CANVASES):
        start = p + k * c
        positions = torch.arange(start, start + c)[None].expand(b, -1)
        canvas = torch.randint(0, cfg.vocab_size, (b, c), generator=gen)
        ref = hf(decoder_input_ids=canvas, past_key_values=cache, decoder_position_ids=positions).logits
        logits = model.denoise(canvas, torch.zeros(b, c, cfg.hidden_size), positions, past)
        assert_close(logits, ref, f"canvas {k} first step logits")

        processed = ref / 0.7  # the next step's self-conditioning input: logits over a temperature
        canvas = torch.randint(0, cfg.vocab_size, (b, c), generator=gen)
        ref = hf(
            decoder_input_ids=canvas,
            past_key_values=cache,
            decoder_position_ids=positions,
            self_conditioning_logits=processed,
        ).logits
        logits = model.denoise(canvas, model.soft_embeddings(processed), positions, past)
        assert_close(logits, ref, f"canvas {k} self-conditioned logits")

        finished = ref.argmax(-1)
        hf.model.encoder(input_ids=finished, past_key_values=cache, position_ids=positions)
        new = model.prefill(finished, positions, past)
        check_prefill(model, cache, new, f"canvas {k} prefill")
        past = [(torch.cat([pk, nk], 2), torch.cat([pv, nv], 2)) for (pk, pv), (nk, nv) in zip(past, new, strict=True)]
        checks += 3
    return checks


@pytest.mark.parametrize("name", ["tiny", "narrow", "wide"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("prompt_len", ["short", "long"])
@torch.inference_mode()
def test_chain_matches_transformers(checkpoints: dict[str, Path], name: str, batch: int, prompt_len: str) -> None:
    model = load_model(checkpoints[name])
    hf = load_reference(checkpoints[name])
    window = model.config.sliding_window
    p = max(1, window // 2) if prompt_len == "short" else window + 4  # shorter / longer than the window
    prompt = torch.randint(0, model.config.vocab_size, (batch, p), generator=torch.Generator().manual_seed(p))
    assert run_chain(model, hf, prompt, seed=batch) == 1 + 3 * N_CANVASES


@torch.inference_mode()
def test_single_token_prompt(tiny_ckpt: Path) -> None:
    model, hf = load_model(tiny_ckpt), load_reference(tiny_ckpt)
    run_chain(model, hf, torch.tensor([[2]]), seed=0)


@torch.inference_mode()
def test_sliding_past_may_hold_only_the_window(checkpoints: dict[str, Path]) -> None:
    """A sliding layer's past cut to its last W - 1 tokens gives the same outputs as the whole history."""
    model = load_model(checkpoints["narrow"])
    cfg = model.config
    w, b, p = cfg.sliding_window, 2, 3 * cfg.sliding_window
    gen = torch.Generator().manual_seed(0)
    history = model.prefill(
        torch.randint(0, cfg.vocab_size, (b, p), generator=gen), torch.arange(p)[None], model.empty_past(b)
    )
    windowed = [
        (k[:, :, -(w - 1) :], v[:, :, -(w - 1) :]) if spec.is_sliding else (k, v)
        for (k, v), spec in zip(history, cfg.layers, strict=True)
    ]
    positions = torch.arange(p, p + cfg.canvas_length)[None]
    ids = torch.randint(0, cfg.vocab_size, (b, cfg.canvas_length), generator=gen)
    soft = torch.randn(b, cfg.canvas_length, cfg.hidden_size, generator=gen)
    # Equal up to float summation order (the masked keys add exact zeros, but matmul blocking differs).
    a, b = model.denoise(ids, soft, positions, history), model.denoise(ids, soft, positions, windowed)
    assert_close(a, b, "denoise, windowed past")
    for i, (full, cut) in enumerate(
        zip(model.prefill(ids, positions, history), model.prefill(ids, positions, windowed), strict=True)
    ):
        assert_close(full[0], cut[0], f"prefill layer {i} K, windowed past")
        assert_close(full[1], cut[1], f"prefill layer {i} V, windowed past")


@torch.inference_mode()
def test_checkpoint_saved_by_transformers_loads(tmp_path: Path, tiny_ckpt: Path) -> None:
    """transformers' own save_pretrained layout (per_layer_config, its generation config) loads in dgrt."""
    hf = load_reference(tiny_ckpt)
    hf.save_pretrained(tmp_path / "resaved")
    ours, resaved = load_model(tiny_ckpt), load_model(tmp_path / "resaved")
    assert ours.config.layers == resaved.config.layers
    for (name, a), (_, b) in zip(ours.state_dict().items(), resaved.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
