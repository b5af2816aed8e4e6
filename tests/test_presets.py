"""`dgrt tiny` checkpoints: complete, loadable by transformers, randomised where REFERENCE.md says it matters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dgrt.checkpoint import Checkpoint
from dgrt.presets import BOS_ID, END_TURN_ID, PRESETS, START_TURN_ID, write_tiny
from dgrt.runtime.tokenizer import Tokenizer


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_loads_in_transformers_without_missing_or_unexpected_keys(tmp_path: Path, preset: str) -> None:
    transformers = pytest.importorskip("transformers", reason="the reference extra is needed")
    path = write_tiny(tmp_path / preset, preset=preset)
    ckpt = Checkpoint.open(path)
    model, info = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.config.canvas_length == ckpt.config.canvas_length
    gen = transformers.GenerationConfig.from_pretrained(path)
    assert gen.eos_token_id == [1, 5] and gen.pad_token_id == 0 and gen.max_denoising_steps == 48
    if preset == "bench":  # REFERENCE.md's 77M-parameter timing config
        text_params = sum(p.numel() for n, p in model.named_parameters() if "vision" not in n)
        assert 77.0e6 < text_params < 77.8e6, text_params


def test_random_weights_avoid_the_identity_traps(tiny_ckpt: Path) -> None:
    ckpt = Checkpoint.open(tiny_ckpt)
    for key in ckpt.tensors:
        t = ckpt.tensor(key)
        if key.endswith(("norm.weight", "router.scale", "per_expert_scale", "layer_scalar")):
            assert not torch.all(t == 1), f"{key} is all ones: a wrong implementation would still pass"
    for i in range(ckpt.config.num_layers):
        enc = ckpt.tensor(f"model.encoder.language_model.layers.{i}.layer_scalar")
        dec = ckpt.tensor(f"model.decoder.layers.{i}.layer_scalar")
        assert enc.item() < 1.0 < dec.item()


def test_same_seed_same_weights_other_seed_other_weights(tmp_path: Path) -> None:
    a = Checkpoint.open(write_tiny(tmp_path / "a", seed=3)).tensor("model.decoder.embed_tokens.weight")
    b = Checkpoint.open(write_tiny(tmp_path / "b", seed=3)).tensor("model.decoder.embed_tokens.weight")
    c = Checkpoint.open(write_tiny(tmp_path / "c", seed=4)).tensor("model.decoder.embed_tokens.weight")
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_tokenizer_round_trip_and_chat_template(tiny_ckpt: Path) -> None:
    tok = Tokenizer.from_dir(tiny_ckpt)
    assert tok.vocab_size == 256
    text = "Sort: dcba\n-> abcd!"
    assert tok.decode(tok.encode(text)) == text
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert ids[:2] == [BOS_ID, START_TURN_ID]
    assert END_TURN_ID in ids and tok.decode(ids) == "user\nhi\nmodel\n"


def test_tokenizer_matches_transformers(tiny_ckpt: Path) -> None:
    transformers = pytest.importorskip("transformers", reason="the reference extra is needed")
    hf = transformers.AutoTokenizer.from_pretrained(tiny_ckpt)
    ours = Tokenizer.from_dir(tiny_ckpt)
    messages = [{"role": "user", "content": "Reverse 'abc'"}, {"role": "assistant", "content": "cba"}]
    assert hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False) == (
        ours.apply_chat_template(messages)
    )


def test_existing_output_is_refused_then_replaced_with_force(tmp_path: Path) -> None:
    from dgrt.errors import DgrtError

    write_tiny(tmp_path / "x")
    with pytest.raises(DgrtError, match="already exists"):
        write_tiny(tmp_path / "x")
    write_tiny(tmp_path / "x", seed=1, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # no temporary folder left behind
