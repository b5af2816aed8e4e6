"""dgrt's torch modules against transformers' DiffusionGemma, teacher-forced, in float32.

Each case runs a whole block-diffusion chain on transformers' own trajectory (dgrt.compare): the prompt
prefill, then for each of 3 canvases a denoise step without and one with self-conditioning (transformers'
sampler picks the second step's canvas and self-conditioning input), then the prefill of the finished
(argmax) canvas at the decoder's positions. dgrt runs on the runtime's own cache, and computes its own
self-conditioning embeddings from transformers' self-conditioning logits. Prefill K/V are compared with
the HF DynamicCache's contents, denoise logits with HF's. Tolerance: 1e-4 max abs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dgrt
from dgrt.checkpoint import load_model
from dgrt.compare import Errors, HFReference, PrefillStep, TeacherForcing
from dgrt.model import DiffusionGemma
from dgrt.runtime.backends import TorchBackend
from dgrt.sampler import SamplerConfig

transformers = pytest.importorskip("transformers", reason="the reference extra (transformers==5.23.0) is needed")

TOL = 1e-4
N_CANVASES = 3


def load_reference(path: Path) -> transformers.DiffusionGemmaForBlockDiffusion:
    return transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.float32).eval()


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    err = Errors.from_tensors(ours, ref).max_abs  # refuses different shapes
    assert err <= TOL, f"{what}: max abs error {err:.3g} > {TOL}"


def run_chain(path: Path, model: DiffusionGemma, hf, prompt: torch.Tensor, seed: int) -> int:
    """The teacher-forced chain described above; returns the number of comparisons made."""
    checks = 0
    with dgrt.load(path, backend=TorchBackend(model)) as gen:  # the runtime's model info and cache around it
        plan = TeacherForcing(lambda: HFReference(hf), gen.info, [prompt], SamplerConfig(steps=2), N_CANVASES, seed)
        for step in plan.run(gen.backend):
            if isinstance(step, PrefillStep):
                what = "prompt prefill" if step.canvas is None else f"canvas {step.canvas} prefill"
                for name, ours, ref in step.compared():
                    assert_close(ours, ref, f"{what} {name}")
            else:
                conditioning = step.conditioning
                soft = step.inputs.soft_embeds if conditioning is None else model.soft_embeddings(conditioning)
                logits = model.denoise(step.inputs.canvas_ids, soft, step.inputs.position_ids, step.past)
                assert_close(logits, step.logits, f"canvas {step.canvas} step {step.step} logits")
            checks += 1
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
    assert run_chain(checkpoints[name], model, hf, prompt, seed=batch) == 1 + 3 * N_CANVASES


@torch.inference_mode()
def test_single_token_prompt(tiny_ckpt: Path) -> None:
    model, hf = load_model(tiny_ckpt), load_reference(tiny_ckpt)
    assert run_chain(tiny_ckpt, model, hf, torch.tensor([[2]]), seed=0) == 1 + 3 * N_CANVASES


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
