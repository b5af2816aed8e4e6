"""config.json parsing: what transformers computes with, and loud refusals for what dgrt does not implement."""

from __future__ import annotations

import copy

import pytest

from dgrt.config import FULL, SLIDING, ModelConfig
from dgrt.errors import ConfigError
from dgrt.tiny import preset_config


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
    assert ModelConfig.from_dict(tiny_with(use_bidirectional_attention="vision"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(use_bidirectional_attention="all"), "'use_bidirectional_attention' = 'all' is not supported"),
        (dict(hidden_activation="silu"), "'hidden_activation' = 'silu' is not supported"),
        (dict(attention_bias=True), "'attention_bias' = True is not supported"),
        (dict(layer_types=[SLIDING, FULL, SLIDING, SLIDING]), "last entry of 'layer_types'"),
        (dict(layer_types=[SLIDING, FULL]), "'layer_types' must list 4 entries"),
        (dict(num_global_key_value_heads=3), "layer 1 has 3 key/value heads, which must divide"),
        (dict(hidden_size=0), "'hidden_size' is 0, expected a positive integer"),
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
