"""`dgrt tiny` checkpoints: complete, loadable by transformers, randomised where docs/reference.md says it matters."""

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
    if preset == "bench":  # docs/reference.md's 77M-parameter timing config
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


def test_a_slice_of_the_real_model_is_written_like_it_and_computes_like_transformers(tmp_path: Path) -> None:
    """The 26B-A4B at its real widths (hidden 2816; 16 heads of 256 over 8 KV heads, and of 512 over 2 with
    K = V and RoPE on a quarter of the dims; dense MLP 2112, experts of 704), its first layers cut to one
    sliding and one full, written as the real checkpoint is: bf16 shards and an index. Narrowed to a
    4096-token vocabulary and 4 experts to stay fast: the layout and the head geometry are the point."""
    import json

    from safetensors import safe_open

    from dgrt.checkpoint import load_model
    from dgrt.presets import write_slice

    path = write_slice(tmp_path / "slice", layers=2, vocab_size=4096, num_experts=4, top_k_experts=2,
                       shard_bytes=64 * 2**20)  # fmt: skip
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    assert sorted(p.name for p in path.glob("*.safetensors")) == shards  # no leftovers
    total = 0
    for shard in shards:
        with safe_open(str(path / shard), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                tensor = f.get_tensor(key)
                assert tensor.dtype == torch.bfloat16 and index["weight_map"][key] == shard, key
                total += tensor.nbytes
    assert index["metadata"]["total_size"] == total
    cfg = Checkpoint.open(path).config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.moe_intermediate_size) == (
        2816, 16, 2112, 704)  # fmt: skip
    assert [(s.layer_type, s.head_dim, s.num_kv_heads, s.has_v_proj) for s in cfg.layers] == [
        ("sliding_attention", 256, 8, True), ("full_attention", 512, 2, False)]  # fmt: skip

    transformers = pytest.importorskip("transformers", reason="the reference extra is needed")
    from transformers.cache_utils import DynamicCache

    hf = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.float32).eval()
    ours = load_model(Checkpoint.open(path), torch.float32)  # as transformers is loaded: fp32 from bf16
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, 12), generator=g)
    canvas = torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length), generator=g)
    positions = torch.arange(12, 12 + cfg.canvas_length)[None]
    cache = DynamicCache(config=hf.config.text_config)
    with torch.inference_mode():
        hf.model.encoder(input_ids=ids, past_key_values=cache, position_ids=torch.arange(12)[None])
        ref = hf(decoder_input_ids=canvas, past_key_values=cache, decoder_position_ids=positions).logits
        past = ours.prefill(ids, torch.arange(12)[None], ours.empty_past(1))
        logits = ours.denoise(canvas, torch.zeros(1, cfg.canvas_length, cfg.hidden_size), positions, past)
    assert (logits - ref).abs().max() < 1e-4
    assert torch.equal(logits.argmax(-1), ref.argmax(-1))
