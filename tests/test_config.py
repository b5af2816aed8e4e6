"""config.json parsing: what transformers computes with, and loud refusals for what dgrt does not implement."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from dgrt.config import (
    FULL,
    GENERATION_CONFIG,
    SLIDING,
    LayerSpec,
    ModelConfig,
    RopeConfig,
    read_generation_config,
)
from dgrt.errors import CheckpointError, ConfigError
from dgrt.presets import preset_config


def tiny_with(**text) -> dict:
    cfg = copy.deepcopy(preset_config("tiny"))
    cfg["text_config"].update(text)
    return cfg


def test_tiny_preset_resolves_like_transformers() -> None:
    cfg = ModelConfig.from_dict(preset_config("tiny"))
    assert [(s.layer_type, s.head_dim, s.num_kv_heads) for s in cfg.layers] == [
        (SLIDING, 16, 2),
        (FULL, 32, 1),
        (SLIDING, 16, 2),
        (FULL, 32, 1),
    ]
    assert [s.has_v_proj for s in cfg.layers] == [True, False, True, False]
    assert cfg.embed_scale == 8.0 and cfg.canvas_length == 16
    assert cfg.rope[FULL].rope_type == "proportional" and cfg.rope[FULL].partial_rotary_factor == 0.25


def test_per_layer_config_layout_is_read() -> None:
    """The layout transformers' save_pretrained writes."""
    cfg = tiny_with(per_layer_config={"1": {"head_dim": 32, "num_key_value_heads": 1}, "3": {"head_dim": 32}})
    layers = ModelConfig.from_dict(cfg).layers
    assert (layers[1].head_dim, layers[1].num_kv_heads) == (32, 1)
    assert (layers[3].head_dim, layers[3].num_kv_heads) == (32, 2)


def test_defaults_follow_transformers() -> None:
    """No layer_types: 5 sliding then 1 full; no global_head_dim: 512, as transformers does."""
    cfg = tiny_with(num_hidden_layers=6)
    for key in ("layer_types", "global_head_dim", "num_global_key_value_heads"):
        del cfg["text_config"][key]
    parsed = ModelConfig.from_dict(cfg)
    assert [s.layer_type for s in parsed.layers] == [SLIDING] * 5 + [FULL]
    assert parsed.layers[-1].head_dim == 512 and parsed.layers[-1].num_kv_heads == 2


def test_vision_bidirectional_is_text_causal() -> None:
    """'vision' only changes attention between image tokens: the text model is the one without the key."""
    vision = ModelConfig.from_dict(tiny_with(use_bidirectional_attention="vision"))
    assert vision == ModelConfig.from_dict(preset_config("tiny"))
    assert vision.layers[0] == LayerSpec(SLIDING, 16, 2) and vision.sliding_window == 8


def test_tiny_preset_values() -> None:
    cfg = ModelConfig.from_dict(preset_config("tiny"))
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads) == (256, 64, 128, 4)
    assert (cfg.num_experts, cfg.top_k_experts, cfg.moe_intermediate_size) == (4, 2, 32)
    assert (cfg.max_position_embeddings, cfg.rms_norm_eps, cfg.final_logit_softcapping) == (4096, 1e-6, 30.0)
    assert (cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id) == (0, (1,), 2)
    assert cfg.rope[SLIDING] == RopeConfig(10_000.0, "default")
    assert cfg.rope[FULL] == RopeConfig(1_000_000.0, "proportional", 0.25, 1.0)


def test_absent_keys_take_transformers_defaults_and_null_softcap_turns_it_off() -> None:
    cfg = tiny_with(final_logit_softcapping=None, eos_token_id=[1, 5])
    for key in ("max_position_embeddings", "rms_norm_eps", "rope_parameters", "pad_token_id", "bos_token_id"):
        del cfg["text_config"][key]
    del cfg["canvas_length"]
    parsed = ModelConfig.from_dict(cfg)
    assert (parsed.max_position_embeddings, parsed.rms_norm_eps, parsed.canvas_length) == (131_072, 1e-6, 256)
    assert parsed.final_logit_softcapping is None
    assert (parsed.pad_token_id, parsed.eos_token_id, parsed.bos_token_id) == (None, (1, 5), None)
    assert parsed.rope[FULL] == RopeConfig(1_000_000.0, "proportional", 0.25)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(use_bidirectional_attention="all"), "'use_bidirectional_attention' = 'all' is not supported"),
        (dict(hidden_activation="silu"), "'hidden_activation' = 'silu' is not supported"),
        (dict(attention_bias=True), "'attention_bias' = True is not supported"),
        (dict(layer_types=[SLIDING, FULL, SLIDING, SLIDING]), "last entry of 'layer_types'"),
        (dict(layer_types=[SLIDING, FULL]), "'layer_types' must list 4 entries"),
        (dict(num_global_key_value_heads=3), "layer 1 has 3 key/value heads, which must divide"),
        (dict(hidden_size=0), "'hidden_size' is 0, expected an integer from 1 to 1048576"),
        (dict(top_k_experts=5), "top_k_experts = 5 exceeds num_experts = 4"),
        (
            dict(rope_parameters={SLIDING: {"rope_type": "yarn", "rope_theta": 1.0}, FULL: {"rope_theta": 1.0}}),
            "rope_type 'yarn' is not supported",
        ),
        (
            dict(per_layer_config={"1": {"sliding_window": 4}}),
            "sets ['sliding_window'], which dgrt does not support",
        ),
    ],
)
def test_unsupported_values_name_the_key(change: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict(tiny_with(**change))
    assert message in str(err.value)


def test_missing_vision_config_is_refused() -> None:
    cfg = preset_config("tiny")
    del cfg["vision_config"]
    with pytest.raises(ConfigError, match="missing 'vision_config'"):
        ModelConfig.from_dict(cfg)


def test_wrong_model_type_is_refused() -> None:
    with pytest.raises(ConfigError, match="model_type is 'gemma3', expected 'diffusion_gemma'"):
        ModelConfig.from_dict(preset_config("tiny") | {"model_type": "gemma3"})


ROPE = preset_config("tiny")["text_config"]["rope_parameters"]
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        # sizes: the wrong JSON type, zero, negative, absurdly large, null
        (dict(max_position_embeddings=None), "'max_position_embeddings' is None, expected an integer from 1 to"),
        (dict(global_head_dim="abc"), "'global_head_dim' is 'abc', expected an integer from 1 to 4096"),
        (dict(hidden_size="64"), "'hidden_size' is '64', expected an integer"),
        (dict(hidden_size=64.0), "'hidden_size' is 64.0, expected an integer"),
        (dict(hidden_size=True), "'hidden_size' is True, expected an integer"),
        (dict(intermediate_size=[128]), "'intermediate_size' is [128], expected an integer"),
        (dict(vocab_size=2**40), "'vocab_size' is 1099511627776, expected an integer from 1 to 1048576"),
        (dict(num_hidden_layers=-4), "'num_hidden_layers' is -4, expected an integer"),
        (dict(sliding_window=0), "'sliding_window' is 0, expected an integer"),
        (dict(num_experts=None), "'num_experts' is None, expected an integer"),
        (dict(top_k_experts="2"), "'top_k_experts' is '2', expected an integer"),
        (dict(moe_intermediate_size=-32), "'moe_intermediate_size' is -32, expected an integer"),
        (dict(num_global_key_value_heads=0), "'num_global_key_value_heads' is 0, expected an integer from 1"),
        (dict(num_global_key_value_heads="1"), "'num_global_key_value_heads' is '1', expected an integer"),
        (dict(head_dim=16.5), "'head_dim' is 16.5, expected an integer"),
        # floats: NaN, infinity, strings, out of range
        (dict(rms_norm_eps=NAN), "'rms_norm_eps' is nan, expected a finite number > 0"),
        (dict(rms_norm_eps="1e-6"), "'rms_norm_eps' is '1e-6', expected a finite number > 0"),
        (dict(rms_norm_eps=0), "'rms_norm_eps' is 0, expected a finite number > 0"),
        (dict(final_logit_softcapping=INF), "'final_logit_softcapping' is inf, expected a finite number > 0"),
        (dict(final_logit_softcapping=-30.0), "'final_logit_softcapping' is -30.0, expected a finite number > 0"),
        # layer_types: not a list, unknown names, other types
        (dict(layer_types="sliding_attention"), "'layer_types' must list 4 entries, got 'sliding_attention'"),
        (dict(layer_types=[SLIDING, "local", SLIDING, FULL]), "layer_types[1] = 'local', expected"),
        (dict(layer_types=[SLIDING, 5, SLIDING, FULL]), "layer_types[1] = 5, expected"),
        # rope_parameters: wrong shape, wrong values
        (dict(rope_parameters=[ROPE]), "'rope_parameters' is [{"),
        (dict(rope_parameters=ROPE[SLIDING]), "rope_parameters['sliding_attention'] is None, expected an object"),
        (dict(rope_parameters=ROPE | {FULL: 5}), "rope_parameters['full_attention'] is 5, expected an object"),
        (dict(rope_parameters=ROPE | {FULL: {}}), "rope_parameters.full_attention: missing required key 'rope_theta'"),
        (
            dict(rope_parameters=ROPE | {SLIDING: {"rope_theta": "1e4"}}),
            "rope_parameters.sliding_attention: 'rope_theta' is '1e4', expected a finite number > 0",
        ),
        (
            dict(rope_parameters=ROPE | {FULL: ROPE[FULL] | {"partial_rotary_factor": "0.25"}}),
            "'partial_rotary_factor' is '0.25', expected a finite number in [0, 1]",
        ),
        (
            dict(rope_parameters=ROPE | {FULL: ROPE[FULL] | {"partial_rotary_factor": 1.5}}),
            "'partial_rotary_factor' is 1.5, expected a finite number in [0, 1]",
        ),
        (
            dict(rope_parameters=ROPE | {FULL: ROPE[FULL] | {"factor": NAN}}),
            "rope_parameters.full_attention: 'factor' is nan, expected a finite number > 0",
        ),
        (dict(rope_parameters=ROPE | {FULL: ROPE[FULL] | {"rope_type": 5}}), "rope_type 5 is not supported"),
        # per_layer_config
        (dict(per_layer_config={"1": {"head_dim": "32"}}), "per_layer_config[1]: 'head_dim' is '32', expected"),
        (dict(per_layer_config={"one": {}}), "per_layer_config key 'one' is not a layer index"),
        (dict(per_layer_config={"9": {}}), "per_layer_config names layer 9, but there are 4"),
        (dict(per_layer_config=[1]), "'per_layer_config' is [1], expected an object keyed by layer index"),
        # token ids: types and the vocabulary (256 ids)
        (dict(eos_token_id="x"), "'eos_token_id' is 'x', expected a token id or a list of token ids, each an integer"),
        (dict(eos_token_id=[1, "2"]), "'eos_token_id' is [1, '2'], expected a token id or a list of token ids"),
        (
            dict(eos_token_id=256),
            "'eos_token_id' is 256, expected a token id or a list of token ids, each an integer from 0 to 255",
        ),
        (dict(pad_token_id=-1), "'pad_token_id' is -1, expected an integer from 0 to 255"),
        (dict(bos_token_id=1.5), "'bos_token_id' is 1.5, expected an integer from 0 to 255"),
        # flags compared with their JSON types
        (dict(attention_bias=0), "'attention_bias' = 0 is not supported"),
        (dict(tie_word_embeddings=1), "'tie_word_embeddings' = 1 is not supported"),
    ],
)
def test_malformed_values_name_the_key(change: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict(tiny_with(**change))
    assert message in str(err.value)
    assert str(err.value).startswith("config.json text_config")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(canvas_length="16"), "config.json: 'canvas_length' is '16', expected an integer from 1 to"),
        (dict(canvas_length=0), "config.json: 'canvas_length' is 0, expected an integer from 1 to"),
        (dict(text_config=[]), "config.json: missing 'text_config' object"),
        (dict(vision_config=None), "config.json: missing 'vision_config' object"),
        (dict(model_type=None), "config.json: model_type is None, expected 'diffusion_gemma'"),
    ],
)
def test_malformed_top_level_values_name_the_key(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        ModelConfig.from_dict(preset_config("tiny") | change)


def test_missing_required_key_is_named() -> None:
    cfg = preset_config("tiny")
    del cfg["text_config"]["vocab_size"]
    with pytest.raises(ConfigError, match=re.escape("config.json text_config: missing required key 'vocab_size'")):
        ModelConfig.from_dict(cfg)


def test_config_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(ConfigError, match=re.escape("manifest.json config: expected a JSON object, found [1, 2]")):
        ModelConfig.from_dict([1, 2], "manifest.json config")


def write_generation_config(folder: Path, content: object) -> Path:
    (folder / GENERATION_CONFIG).write_text(json.dumps(content))
    return folder


def test_generation_config_is_read_with_nulls_meaning_defaults(tmp_path: Path) -> None:
    gen = {"t_min": None, "stability_threshold": None, "eos_token_id": [1, 5], "do_sample": "anything"}
    assert read_generation_config(write_generation_config(tmp_path, gen)) == gen
    assert read_generation_config(tmp_path / "elsewhere") == {}  # no file: every default applies


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"max_new_tokens": "abc"}, "'max_new_tokens' is 'abc', expected a positive integer"),
        ({"max_new_tokens": 0}, "'max_new_tokens' is 0, expected a positive integer"),
        ({"max_denoising_steps": -3}, "'max_denoising_steps' is -3, expected a positive integer"),
        (
            {"eos_token_id": "x"},
            "'eos_token_id' is 'x', expected a token id or a list of token ids, each an integer >= 0",
        ),
        ({"eos_token_id": [1, -5]}, "'eos_token_id' is [1, -5], expected a token id or a list of token ids"),
        ({"pad_token_id": "0"}, "'pad_token_id' is '0', expected an integer >= 0"),
        ({"bos_token_id": -1}, "'bos_token_id' is -1, expected an integer >= 0"),
        ({"t_min": "low"}, "'t_min' is 'low', expected a finite number >= 0"),
        ({"t_max": NAN}, "'t_max' is nan, expected a finite number >= 0"),
        ({"t_min": 0.9, "t_max": 0.8}, "t_min is 0.9 and t_max is 0.8, expected t_min < t_max"),
        ({"stability_threshold": 1.5}, "'stability_threshold' is 1.5, expected an integer >= 0"),
        ({"stability_threshold": -1}, "'stability_threshold' is -1, expected an integer >= 0"),
        ({"confidence_threshold": 0}, "'confidence_threshold' is 0, expected a finite number > 0"),
        ({"sampler_config": 5}, "'sampler_config' is 5, expected an object"),
        (
            {"sampler_config": {"entropy_bound": 0}},
            "sampler_config: 'entropy_bound' is 0, expected a finite number > 0",
        ),
        ({"sampler_config": {"entropy_bound": "0.1"}}, "sampler_config: 'entropy_bound' is '0.1', expected"),
        ([{"max_new_tokens": 8}], "generation_config.json: expected a JSON object, found [{'max_new_tokens': 8}]"),
    ],
)
def test_malformed_generation_config_names_the_key(tmp_path: Path, content: object, message: str) -> None:
    write_generation_config(tmp_path, content)
    with pytest.raises(CheckpointError) as err:
        read_generation_config(tmp_path)
    assert str(err.value).startswith(str(tmp_path / GENERATION_CONFIG))
    assert message in str(err.value)


def test_generation_config_token_ids_are_checked_against_the_vocabulary(tmp_path: Path) -> None:
    write_generation_config(tmp_path, {"pad_token_id": 256})
    assert read_generation_config(tmp_path) == {"pad_token_id": 256}
    with pytest.raises(ConfigError, match=re.escape("'pad_token_id' is 256, expected an integer from 0 to 255")):
        read_generation_config(tmp_path, vocab_size=256)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xff\xfe{}", "not UTF-8 text (byte 0 is not valid UTF-8)"),
        (b'{"t_min": ', "not valid JSON"),
        (b"", "not valid JSON"),
    ],
)
def test_unreadable_generation_config_is_one_sentence(tmp_path: Path, data: bytes, message: str) -> None:
    (tmp_path / GENERATION_CONFIG).write_bytes(data)
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / GENERATION_CONFIG}: {message}")):
        read_generation_config(tmp_path)
