"""Complete Hugging Face-layout DiffusionGemma checkpoints with random weights, for tests and demos.

`write_tiny(out_dir, preset, seed)` writes config.json (with the smallest vision_config transformers
accepts), generation_config.json (with EOS and pad ids), model.safetensors and a character-level tokenizer
with a Gemma-style chat template, sized to the vocabulary. No transformers needed.

Random weights follow docs/reference.md's traps: every norm, router scale, per-expert scale and layer scalar
is randomised, encoder and decoder layer scalars differ, and matrices have a small gain so that whole
generations are not chaotic.
"""

from __future__ import annotations

import itertools
import json
import unicodedata
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from dgrt.checkpoint import expected_tensors
from dgrt.config import FULL, SLIDING, ModelConfig
from dgrt.errors import MAX_SEED, DgrtError, check_ints
from dgrt.fsutil import atomic_dir, check_output

S, F = SLIDING, FULL
# Real models whose config.json and generation_config.json ship in dgrt/data/<name>/ (see slice_config).
REAL_MODELS = ("gemma4-26b-a4b",)

# The text_config values and canvas length of each preset.
PRESETS: dict[str, dict[str, Any]] = {
    # Every text feature, small enough to build in milliseconds (docs/reference.md's tiny config).
    "tiny": dict(
        text=dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            layer_types=[S, F, S, F],
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            global_head_dim=32,
            num_global_key_value_heads=1,
            sliding_window=8,
            num_experts=4,
            top_k_experts=2,
            moe_intermediate_size=32,
            max_position_embeddings=4096,
        ),
        canvas_length=16,
    ),
    # A little larger: the demo's default model until a trained one ships.
    "small": dict(
        text=dict(
            vocab_size=512,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=6,
            layer_types=[S, S, F, S, S, F],
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            global_head_dim=64,
            num_global_key_value_heads=1,
            sliding_window=24,
            num_experts=8,
            top_k_experts=2,
            moe_intermediate_size=64,
            max_position_embeddings=4096,
        ),
        canvas_length=32,
    ),
    # The architecture of dgrt's shipped trained model (tools/train_small.py, dgrt.task): 1.15M parameters.
    "reverse": dict(
        text=dict(
            vocab_size=128,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            layer_types=[S, F, S, F],
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            global_head_dim=64,
            num_global_key_value_heads=1,
            sliding_window=16,
            num_experts=4,
            top_k_experts=2,
            moe_intermediate_size=64,
            max_position_embeddings=512,
        ),
        canvas_length=16,
    ),
    # docs/reference.md's CPU timing config: 77M parameters, canvas 256.
    "bench": dict(
        text=dict(
            vocab_size=32768,
            hidden_size=512,
            intermediate_size=2048,
            num_hidden_layers=8,
            layer_types=[S, S, S, S, S, F, S, F],
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=64,
            global_head_dim=128,
            num_global_key_value_heads=2,
            sliding_window=512,
            num_experts=4,
            top_k_experts=2,
            moe_intermediate_size=512,
            max_position_embeddings=8192,
        ),
        canvas_length=256,
    ),
}

# The smallest vision tower transformers builds (docs/reference.md); without one it builds a 167M default.
VISION_CONFIG = {
    "model_type": "gemma4_vision",
    "hidden_size": 4,
    "intermediate_size": 4,
    "num_hidden_layers": 0,
    "num_attention_heads": 1,
    "num_key_value_heads": 1,
    "head_dim": 4,
    "position_embedding_size": 1,
    "patch_size": 1,
    "pooling_kernel_size": 1,
}
ROPE_PARAMETERS = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}

# Character-level vocabulary: specials, then newline, space and printable ASCII, then more letters and
# symbols beyond ASCII to fill the vocabulary (so a random model's output reads as text, not markup); the
# last three ids are the image tokens every DiffusionGemma config names.
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
PAD_ID, EOS_ID, BOS_ID, UNK_ID, START_TURN_ID, END_TURN_ID = range(6)
CHARS = ["\n", " "] + [chr(c) for c in range(33, 127)]
IMAGE_TOKENS = ["<end_of_image>", "<start_of_image>", "<image_soft_token>"]  # ids V-3, V-2, V-1
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
GENERATION_DEFAULTS = {
    "max_denoising_steps": 48,
    "t_min": 0.4,
    "t_max": 0.8,
    "sampler_config": {"entropy_bound": 0.1, "_cls_name": "EntropyBoundSamplerConfig"},
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
}


def preset_config(preset: str) -> dict[str, Any]:
    """The config.json content of a preset."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    vocab = p["text"]["vocab_size"]
    text = dict(
        p["text"],
        rope_parameters=ROPE_PARAMETERS,
        final_logit_softcapping=30.0,
        rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh",
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
        tie_word_embeddings=True,
        model_type="diffusion_gemma_text",
    )
    return {
        "architectures": ["DiffusionGemmaForBlockDiffusion"],
        "model_type": "diffusion_gemma",
        "text_config": text,
        "vision_config": dict(VISION_CONFIG),
        "canvas_length": p["canvas_length"],
        "image_token_id": vocab - 1,
        "boi_token_id": vocab - 2,
        "eoi_token_id": vocab - 3,
        "tie_word_embeddings": True,
        "dtype": "float32",
    }


def random_weights(cfg: ModelConfig, seed: int, gain: float = 0.5) -> dict[str, torch.Tensor]:
    """Checkpoint key -> random tensor for every text tensor, deterministic in `seed`."""
    return dict(random_tensors(cfg, seed, gain))


def random_tensors(cfg: ModelConfig, seed: int, gain: float = 0.5) -> Iterator[tuple[str, torch.Tensor]]:
    """random_weights one tensor at a time (a checkpoint larger than memory is written as it is drawn)."""
    g = torch.Generator().manual_seed(seed)

    def uniform(shape: tuple[int, ...], lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=g)

    for key, (name, shape) in sorted(expected_tensors(cfg).items()):
        if name.endswith("encoder_layer_scalar"):
            t = uniform(shape, 0.9, 0.95)
        elif name.endswith("layer_scalar"):
            t = uniform(shape, 1.1, 1.15)
        elif name.endswith("per_expert_scale"):
            t = uniform(shape, 0.5, 1.5)
        elif len(shape) == 1:  # every RMSNorm weight and router.scale
            t = 1.0 + 0.2 * torch.randn(shape, generator=g)
        else:  # matrices, expert stacks and the embedding: fan-in is the last dimension
            t = gain * torch.randn(shape, generator=g) / shape[-1] ** 0.5
        yield key, t.contiguous()


def vision_weights(hidden_size: int) -> dict[str, torch.Tensor]:
    """The three tensors of the smallest vision tower (unused for text, required by transformers)."""
    return {
        "model.encoder.vision_tower.patch_embedder.input_proj.weight": torch.zeros(4, 3),
        "model.encoder.vision_tower.patch_embedder.position_embedding_table": torch.ones(2, 1, 4),
        "model.encoder.embed_vision.embedding_projection.weight": torch.zeros(hidden_size, 4),
    }


def _extra_chars(n: int) -> list[str]:
    """The first n letters, digits, punctuation and symbols after ASCII (no marks, spaces or controls) of
    the Basic Multilingual Plane, then `<unused_I>` tokens (a 262144-token vocabulary has more ids than
    Unicode has such characters)."""
    out: list[str] = []
    code = 0xA1
    while len(out) < n and code < 0xFFFF:
        ch = chr(code)
        if unicodedata.category(ch)[0] in "LNPS":
            out.append(ch)
        code += 1
    return out + [f"<unused_{i}>" for i in range(n - len(out))]


def tokenizer_json(vocab_size: int) -> str:
    """A character-level `tokenizers` tokenizer covering exactly `vocab_size` ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    fixed = len(SPECIALS) + len(CHARS) + len(IMAGE_TOKENS)
    if vocab_size < fixed:
        raise ValueError(f"vocab_size {vocab_size} is too small for the character tokenizer (needs >= {fixed})")
    tokens = SPECIALS + CHARS + _extra_chars(vocab_size - fixed) + IMAGE_TOKENS
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS + IMAGE_TOKENS)
    return tok.to_str(pretty=False)


def tokenizer_config(cfg: ModelConfig) -> dict[str, Any]:
    """tokenizer_config.json: the special tokens and the chat template."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "model_max_length": cfg.max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
    }


def real_config(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json, generation_config.json) of a real model whose config dgrt ships (REAL_MODELS)."""
    if name not in REAL_MODELS:
        raise DgrtError(f"unknown model {name!r}; expected one of {', '.join(REAL_MODELS)}.")
    folder = resources.files("dgrt").joinpath(f"data/{name}")
    return json.loads(folder.joinpath("config.json").read_text()), json.loads(
        folder.joinpath("generation_config.json").read_text()
    )


def slice_config(name: str, layers: int, **text: Any) -> dict[str, Any]:
    """A real model's config.json cut to its first `layers` layers (the last made a full-attention layer,
    as a DiffusionGemma stack must end), with the smallest vision tower and `text` values replaced (a
    narrower vocabulary or fewer experts for tests, where the layout is the point, not the size)."""
    cfg, _ = real_config(name)
    real = cfg["text_config"]
    check_ints("--layers", layers, 1, real["num_hidden_layers"])
    types = real["layer_types"][: layers - 1] + [FULL]
    cfg["text_config"] = real | {"num_hidden_layers": layers, "layer_types": types} | text
    cfg["vision_config"] = dict(VISION_CONFIG)  # the real one is a 27-layer tower dgrt never runs
    vocab = cfg["text_config"]["vocab_size"]
    if vocab != real["vocab_size"]:  # the image token ids must stay inside a narrowed vocabulary
        cfg.update(image_token_id=vocab - 1, boi_token_id=vocab - 2, eoi_token_id=vocab - 3)
    return cfg


def write_slice(
    out_dir: str | Path,
    name: str = "gemma4-26b-a4b",
    layers: int = 2,
    seed: int = 0,
    force: bool = False,
    shard_bytes: int = 2 * 2**30,
    **text: Any,
) -> Path:
    """A random checkpoint of a real model's first layers at its real widths, written the way the real
    checkpoint is: bfloat16 tensors in shards of at most `shard_bytes` with model.safetensors.index.json,
    drawn and written one tensor at a time."""
    check_ints("seed", seed, 0, MAX_SEED)
    check_output(out_dir, force)
    config = slice_config(name, layers, **text)
    weights = random_tensors(ModelConfig.from_dict(config), seed)
    metadata = {"dgrt_random": f"{name} {layers} layers seed={seed} gain=0.5"}
    return save_checkpoint(
        out_dir, config, weights, metadata=metadata, force=force, shard_bytes=shard_bytes, dtype=torch.bfloat16
    )


def write_tiny(out_dir: str | Path, preset: str = "tiny", seed: int = 0, force: bool = False) -> Path:
    """Write a complete random checkpoint folder of a preset; returns its path."""
    return write_checkpoint(out_dir, preset_config(preset), seed=seed, force=force, tag=preset)


def write_checkpoint(
    out_dir: str | Path,
    config: dict[str, Any],
    seed: int = 0,
    gain: float = 0.5,
    force: bool = False,
    tag: str = "custom",
) -> Path:
    """Write a complete random checkpoint folder for any config.json content (see `preset_config`)."""
    check_ints("seed", seed, 0, MAX_SEED)
    check_output(out_dir, force)  # before the weights are drawn: a refused folder costs nothing
    weights = random_weights(ModelConfig.from_dict(config), seed, gain)
    return save_checkpoint(
        out_dir, config, weights, metadata={"dgrt_random": f"{tag} seed={seed} gain={gain}"}, force=force
    )


def save_checkpoint(
    out_dir: str | Path,
    config: dict[str, Any],
    text_weights: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    *,
    generation: dict[str, Any] | None = None,
    metadata: dict[str, str] | None = None,
    extra_files: dict[str, str] | None = None,
    force: bool = False,
    shard_bytes: int | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a complete checkpoint folder: config, generation config (the defaults updated by
    `generation`), tokenizer, safetensors of `text_weights` (checkpoint key -> tensor, a dict or pairs
    drawn one at a time) plus the vision stub, cast to `dtype` if given, and `extra_files` (name -> text).
    With `shard_bytes`, the tensors go to shards of at most that size (one larger tensor gets a shard of its
    own) and an index."""
    cfg = ModelConfig.from_dict(config)
    pairs = text_weights.items() if isinstance(text_weights, dict) else text_weights
    weights: Iterable[tuple[str, torch.Tensor]] = itertools.chain(pairs, vision_weights(cfg.hidden_size).items())
    if dtype is not None:
        weights = ((key, tensor.to(dtype)) for key, tensor in weights)
    generation = dict(
        GENERATION_DEFAULTS,
        max_new_tokens=3 * cfg.canvas_length,
        eos_token_id=[EOS_ID, END_TURN_ID],
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
    ) | (generation or {})
    with atomic_dir(out_dir, force=force) as tmp:  # reads no folder: no inputs to protect
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        (tmp / "tokenizer.json").write_text(tokenizer_json(cfg.vocab_size))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(cfg), indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        meta = {"format": "pt"} | (metadata or {})
        if shard_bytes is None:
            save_file(dict(weights), str(tmp / "model.safetensors"), metadata=meta)
        else:
            _save_shards(tmp, weights, shard_bytes, meta)
    return Path(out_dir)


def _save_shards(
    folder: Path, weights: Iterable[tuple[str, torch.Tensor]], shard_bytes: int, meta: dict[str, str]
) -> None:
    """model-0000I-of-0000N.safetensors and model.safetensors.index.json, holding one shard in memory."""
    shards: list[list[str]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0
    for key, tensor in itertools.chain(weights, [("", None)]):  # a last item to write the last shard
        if shard and (tensor is None or size + tensor.nbytes > shard_bytes):
            save_file(shard, str(folder / f"shard-{len(shards)}.tmp"), metadata=meta)
            shards.append(list(shard))
            shard, size = {}, 0
        if tensor is not None:
            shard[key] = tensor
            size += tensor.nbytes
            total += tensor.nbytes
    weight_map: dict[str, str] = {}
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (folder / f"shard-{i}.tmp").rename(folder / name)
        weight_map |= dict.fromkeys(keys, name)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
