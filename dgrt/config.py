"""The text model's configuration, parsed from a Hugging Face `config.json`.

Only what the text stack computes with is kept. Every value that would change the math and that dgrt does
not implement is refused with a ConfigError naming the key; nothing falls back silently to a default that
transformers would not use too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from dgrt.errors import ConfigError

SLIDING = "sliding_attention"
FULL = "full_attention"

# transformers' DiffusionGemmaTextConfig defaults (5.23.0), used exactly where transformers uses them.
_HF_DEFAULT_GLOBAL_HEAD_DIM = 512
_HF_DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rope_type: str  # "default" or "proportional"
    partial_rotary_factor: float = 1.0
    factor: float = 1.0


@dataclass(frozen=True)
class LayerSpec:
    layer_type: str
    head_dim: int
    num_kv_heads: int

    @property
    def is_sliding(self) -> bool:
        return self.layer_type == SLIDING

    @property
    def has_v_proj(self) -> bool:
        # Full layers have K = V: the value is the raw k_proj output (REFERENCE.md).
        return self.is_sliding


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    layers: tuple[LayerSpec, ...]
    sliding_window: int
    rope: dict[str, RopeConfig]
    num_experts: int
    top_k_experts: int
    moe_intermediate_size: int
    rms_norm_eps: float
    final_logit_softcapping: float | None
    canvas_length: int
    max_position_embeddings: int
    pad_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    bos_token_id: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def embed_scale(self) -> float:
        return self.hidden_size**0.5

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> ModelConfig:
        return _parse(cfg, source)


def _require(d: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in d or d[key] is None:
        raise ConfigError(f"{where}: missing required key '{key}'.")
    value = d[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"{where}: '{key}' is {value!r}, expected {_kind_name(kind)}.")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _positive(d: dict[str, Any], key: str, where: str) -> int:
    value = _require(d, key, int, where)
    if value <= 0:
        raise ConfigError(f"{where}: '{key}' is {value}, expected a positive integer.")
    return int(value)


def _refuse(text: dict[str, Any], key: str, allowed: tuple[Any, ...], where: str, why: str) -> None:
    value = text.get(key, allowed[0])
    if value not in allowed:
        raise ConfigError(f"{where}: '{key}' = {value!r} is not supported ({why}); expected {allowed!r}.")


def _parse(cfg: dict[str, Any], source: str) -> ModelConfig:
    model_type = cfg.get("model_type")
    if model_type != "diffusion_gemma":
        raise ConfigError(f"{source}: model_type is {model_type!r}, expected 'diffusion_gemma'.")
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise ConfigError(f"{source}: missing 'text_config' object.")
    if not isinstance(cfg.get("vision_config"), dict):
        # transformers silently builds a 167M-parameter default tower without one (REFERENCE.md).
        raise ConfigError(f"{source}: missing 'vision_config' object (transformers needs one to load the model).")
    where = f"{source} text_config"

    _refuse(text, "hidden_activation", ("gelu_pytorch_tanh",), where, "only tanh-approximated GELU is implemented")
    _refuse(text, "attention_bias", (False,), where, "DiffusionGemma projections have no bias")
    _refuse(
        text,
        "use_bidirectional_attention",
        (None, "vision"),
        where,
        "'all' changes the encoder to non-causal attention, which dgrt does not implement",
    )
    for tie_where, tie_cfg in ((source, cfg), (where, text)):
        _refuse(tie_cfg, "tie_word_embeddings", (True,), tie_where, "the LM head must be the tied embedding")

    hidden = _positive(text, "hidden_size", where)
    heads = _positive(text, "num_attention_heads", where)
    num_layers = _positive(text, "num_hidden_layers", where)
    layer_types = text.get("layer_types")
    if layer_types is None:  # transformers' default pattern: 5 sliding then 1 full
        layer_types = [SLIDING if (i + 1) % 6 else FULL for i in range(num_layers)]
    if not isinstance(layer_types, list) or len(layer_types) != num_layers:
        raise ConfigError(f"{where}: 'layer_types' must list {num_layers} entries, got {layer_types!r}.")
    for i, lt in enumerate(layer_types):
        if lt not in (SLIDING, FULL):
            raise ConfigError(f"{where}: layer_types[{i}] = {lt!r}, expected '{SLIDING}' or '{FULL}'.")
    if layer_types[-1] != FULL:
        # transformers forces the last layer to full attention with only a warning; refuse instead.
        raise ConfigError(f"{where}: the last entry of 'layer_types' is {layer_types[-1]!r}, expected '{FULL}'.")

    head_dim = _positive(text, "head_dim", where)
    kv_heads = _positive(text, "num_key_value_heads", where)
    overrides = _per_layer_overrides(text, layer_types, where)
    layers = []
    for i, lt in enumerate(layer_types):
        o = overrides.get(i, {})
        spec = LayerSpec(lt, int(o.get("head_dim", head_dim)), int(o.get("num_key_value_heads", kv_heads)))
        if heads % spec.num_kv_heads:
            raise ConfigError(
                f"{where}: layer {i} has {spec.num_kv_heads} key/value heads, which must divide "
                f"num_attention_heads = {heads}."
            )
        layers.append(spec)

    rope = _parse_rope(text, where, {spec.layer_type: spec.head_dim for spec in layers})
    num_experts = _positive(text, "num_experts", where)
    top_k = _positive(text, "top_k_experts", where)
    if top_k > num_experts:
        raise ConfigError(f"{where}: top_k_experts = {top_k} exceeds num_experts = {num_experts}.")
    softcap = text.get("final_logit_softcapping", 30.0)
    if softcap is not None and (not isinstance(softcap, int | float) or softcap <= 0):
        raise ConfigError(f"{where}: 'final_logit_softcapping' is {softcap!r}, expected a positive number or null.")
    eps = text.get("rms_norm_eps", 1e-6)
    if not isinstance(eps, int | float) or eps <= 0:
        raise ConfigError(f"{where}: 'rms_norm_eps' is {eps!r}, expected a positive number.")
    canvas = cfg.get("canvas_length", 256)
    if not isinstance(canvas, int) or canvas <= 0:
        raise ConfigError(f"{source}: 'canvas_length' is {canvas!r}, expected a positive integer.")
    eos = text.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))

    return ModelConfig(
        vocab_size=_positive(text, "vocab_size", where),
        hidden_size=hidden,
        intermediate_size=_positive(text, "intermediate_size", where),
        num_attention_heads=heads,
        layers=tuple(layers),
        sliding_window=_positive(text, "sliding_window", where),
        rope=rope,
        num_experts=num_experts,
        top_k_experts=top_k,
        moe_intermediate_size=_positive(text, "moe_intermediate_size", where),
        rms_norm_eps=float(eps),
        final_logit_softcapping=None if softcap is None else float(softcap),
        canvas_length=canvas,
        max_position_embeddings=int(text.get("max_position_embeddings", 131_072)),
        pad_token_id=text.get("pad_token_id"),
        eos_token_id=eos_ids,
        bos_token_id=text.get("bos_token_id"),
        raw=cfg,
    )


def _per_layer_overrides(text: dict[str, Any], layer_types: list[str], where: str) -> dict[int, dict[str, int]]:
    """Full-attention layers' head_dim / KV heads, in either of the layouts transformers writes."""
    plc = text.get("per_layer_config")
    if plc is None:
        # transformers 5.11 layout (or none at all): global_head_dim defaults to 512 there too.
        o: dict[str, int] = {"head_dim": int(text.get("global_head_dim", _HF_DEFAULT_GLOBAL_HEAD_DIM))}
        if text.get("num_global_key_value_heads") is not None:
            o["num_key_value_heads"] = int(text["num_global_key_value_heads"])
        return {i: dict(o) for i, lt in enumerate(layer_types) if lt == FULL}
    if not isinstance(plc, dict):
        raise ConfigError(f"{where}: 'per_layer_config' is {plc!r}, expected an object keyed by layer index.")
    out: dict[int, dict[str, int]] = {}
    for key, values in plc.items():
        try:
            idx = int(key)
        except ValueError:
            raise ConfigError(f"{where}: per_layer_config key {key!r} is not a layer index.") from None
        if not 0 <= idx < len(layer_types):
            raise ConfigError(f"{where}: per_layer_config names layer {idx}, but there are {len(layer_types)}.")
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: per_layer_config[{key}] is {values!r}, expected an object.")
        unknown = set(values) - {"head_dim", "num_key_value_heads"}
        if unknown:
            raise ConfigError(
                f"{where}: per_layer_config[{key}] sets {sorted(unknown)}, which dgrt does not support; "
                "expected only head_dim and num_key_value_heads."
            )
        for k, v in values.items():
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{where}: per_layer_config[{key}].{k} is {v!r}, expected a positive integer.")
        out[idx] = dict(values)
    return out


def _parse_rope(text: dict[str, Any], where: str, head_dims: dict[str, int]) -> dict[str, RopeConfig]:
    params: dict[str, Any] = text.get("rope_parameters") or _HF_DEFAULT_ROPE
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: 'rope_parameters' is {params!r}, expected an object keyed by layer type.")
    out = {}
    for layer_type in head_dims:
        p = params.get(layer_type)
        if not isinstance(p, dict):
            raise ConfigError(f"{where}: rope_parameters has no entry for '{layer_type}'.")
        rope_where = f"{where} rope_parameters.{layer_type}"
        rope_type = p.get("rope_type", "default")
        theta = p.get("rope_theta")
        if not isinstance(theta, int | float) or theta <= 0:
            raise ConfigError(f"{rope_where}: 'rope_theta' is {theta!r}, expected a positive number.")
        prf = float(p.get("partial_rotary_factor", 1.0))
        if rope_type == "default":
            if prf != 1.0:
                raise ConfigError(
                    f"{rope_where}: partial_rotary_factor {prf} with rope_type 'default' is not supported; "
                    "expected 1.0 (or rope_type 'proportional')."
                )
            rope = RopeConfig(float(theta), "default")
        elif rope_type == "proportional":
            if not 0.0 <= prf <= 1.0:
                raise ConfigError(f"{rope_where}: partial_rotary_factor is {prf}, expected a value in [0, 1].")
            factor = float(p.get("factor", 1.0))
            if not math.isfinite(factor) or factor <= 0:
                raise ConfigError(f"{rope_where}: 'factor' is {factor}, expected a positive number.")
            rope = RopeConfig(float(theta), "proportional", prf, factor)
        else:
            raise ConfigError(
                f"{rope_where}: rope_type {rope_type!r} is not supported; expected 'default' or 'proportional'."
            )
        if head_dims[layer_type] % 2:
            raise ConfigError(f"{where}: {layer_type} head_dim {head_dims[layer_type]} must be even for RoPE.")
        out[layer_type] = rope
    return out
