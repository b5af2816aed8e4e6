"""The text model's configuration, parsed from a Hugging Face `config.json`, and the checked reading of
`generation_config.json`.

Only what the text stack computes with is kept. Every value that would change the math and that dgrt does
not implement is refused with a ConfigError naming the key; nothing falls back silently to a default that
transformers would not use too. Every key read is checked for its JSON type and range (no NaN, no
non-positive sizes), so a malformed file gets one sentence instead of a failure further on.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dgrt.errors import CheckpointError, ConfigError

GENERATION_CONFIG = "generation_config.json"
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
        # Full layers have K = V: the value is the raw k_proj output (docs/reference.md).
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


# Upper bounds far above any real model, low enough that no tensor's size overflows int64 when the model
# is built (a malformed config then gets a sentence, not a torch error).
_MAX_COUNT = 2**12  # layers, heads, experts, head_dim
_MAX_WIDTH = 2**20  # vocabulary, hidden and MLP widths, canvas
_MAX_POSITIONS = 2**31 - 1
_REQUIRED: Any = object()  # the default of a key that must be present


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _present(d: dict[str, Any], key: str, where: str, default: Any) -> Any:
    value = d.get(key, default)
    if value is _REQUIRED:
        raise ConfigError(f"{where}: missing required key '{key}'.")
    return value


def _int(
    d: dict[str, Any], key: str, where: str, default: Any = _REQUIRED, minimum: int = 1, maximum: int | None = None
) -> int:
    """d[key] (or the default when absent): an integer in [minimum, maximum]; null is refused."""
    value = _present(d, key, where, default)
    if not _is_int(value, minimum, maximum):
        raise ConfigError(f"{where}: '{key}' is {_show(value)}, expected {_int_span(minimum, maximum)}.")
    return value


def _is_int(value: Any, minimum: int, maximum: int | None) -> bool:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    return ok and (maximum is None or value <= maximum)


def _int_span(minimum: int, maximum: int | None) -> str:
    if maximum is not None:
        return f"an integer from {minimum} to {maximum}"
    return "a positive integer" if minimum == 1 else f"an integer >= {minimum}"


def _optional_int(
    d: dict[str, Any], key: str, where: str, default: int | None = None, minimum: int = 1, maximum: int | None = None
) -> int | None:
    """Like `_int`, but null means None (and so does absent, unless there is a default)."""
    if d.get(key, default) is None:
        return None
    return _int(d, key, where, default, minimum, maximum)


def _number(
    d: dict[str, Any], key: str, where: str, default: Any = _REQUIRED, zero: bool = False, maximum: float = math.inf
) -> float:
    """d[key] (or the default when absent): a finite number > 0 (>= 0 with `zero`), at most `maximum`."""
    value = _present(d, key, where, default)
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and (value >= 0 if zero else value > 0) and value <= maximum):
        span = f"in [0, {maximum:g}]" if maximum < math.inf else (">= 0" if zero else "> 0")
        raise ConfigError(f"{where}: '{key}' is {_show(value)}, expected a finite number {span}.")
    return float(value)


def _optional_number(
    d: dict[str, Any], key: str, where: str, default: float | None = None, zero: bool = False
) -> float | None:
    """Like `_number`, but null means None (and so does absent, unless there is a default)."""
    if d.get(key, default) is None:
        return None
    return _number(d, key, where, default, zero)


def _token_ids(d: dict[str, Any], key: str, where: str, vocab_size: int | None) -> tuple[int, ...]:
    """An id or a list of ids (EOS); absent or null for none."""
    value = d.get(key)
    ids = value if isinstance(value, list) else [] if value is None else [value]
    top = None if vocab_size is None else vocab_size - 1
    if not all(_is_int(i, 0, top) for i in ids):
        raise ConfigError(
            f"{where}: '{key}' is {_show(value)}, expected a token id or a list of token ids, each {_int_span(0, top)}."
        )
    return tuple(ids)


def _refuse(text: dict[str, Any], key: str, allowed: tuple[Any, ...], where: str, why: str) -> None:
    value = text.get(key, allowed[0])
    # Compared with their types: 1 is not true, 0 is not false, in a JSON file.
    if not any(type(value) is type(a) and value == a for a in allowed):
        raise ConfigError(f"{where}: '{key}' = {_show(value)} is not supported ({why}); expected {allowed!r}.")


def read_json(path: Path) -> dict[str, Any]:
    """A file holding one JSON object (UTF-8), or a CheckpointError that names the file and the problem."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found.") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror}).") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {e.start} is not valid UTF-8).") from None
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}).") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {_show(data)}.")
    return data


def read_generation_config(folder: Path, vocab_size: int | None = None) -> dict[str, Any]:
    """`folder`'s generation_config.json ({} when there is none), with every key dgrt reads checked.

    Absent or null keys are allowed (the sampler's defaults apply); token ids are checked against
    `vocab_size` when it is known. Other keys (transformers' own) pass through unread.
    """
    file = folder / GENERATION_CONFIG
    if not file.exists():
        return {}
    gen = read_json(file)
    where = str(file)
    _token_ids(gen, "eos_token_id", where, vocab_size)
    top_id = None if vocab_size is None else vocab_size - 1
    for key in ("pad_token_id", "bos_token_id"):
        _optional_int(gen, key, where, minimum=0, maximum=top_id)
    for key in ("max_new_tokens", "max_denoising_steps"):
        _optional_int(gen, key, where)
    t_min = _optional_number(gen, "t_min", where, zero=True)
    t_max = _optional_number(gen, "t_max", where, zero=True)
    if t_min is not None and t_max is not None and not t_min < t_max:
        raise ConfigError(f"{where}: t_min is {t_min:g} and t_max is {t_max:g}, expected t_min < t_max.")
    _optional_int(gen, "stability_threshold", where, minimum=0)
    _optional_number(gen, "confidence_threshold", where)
    sampler = gen.get("sampler_config")
    if sampler is not None:
        if not isinstance(sampler, dict):
            raise ConfigError(f"{where}: 'sampler_config' is {_show(sampler)}, expected an object.")
        _optional_number(sampler, "entropy_bound", f"{where} sampler_config")
    return gen


def _parse(cfg: dict[str, Any], source: str) -> ModelConfig:
    if not isinstance(cfg, dict):
        raise ConfigError(f"{source}: expected a JSON object, found {_show(cfg)}.")
    model_type = cfg.get("model_type")
    if model_type != "diffusion_gemma":
        raise ConfigError(f"{source}: model_type is {_show(model_type)}, expected 'diffusion_gemma'.")
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise ConfigError(f"{source}: missing 'text_config' object.")
    if not isinstance(cfg.get("vision_config"), dict):
        # transformers silently builds a 167M-parameter default tower without one (docs/reference.md).
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

    vocab = _int(text, "vocab_size", where, maximum=_MAX_WIDTH)
    hidden = _int(text, "hidden_size", where, maximum=_MAX_WIDTH)
    heads = _int(text, "num_attention_heads", where, maximum=_MAX_COUNT)
    layer_types = _layer_types(text, _int(text, "num_hidden_layers", where, maximum=_MAX_COUNT), where)
    head_dim = _int(text, "head_dim", where, maximum=_MAX_COUNT)
    kv_heads = _int(text, "num_key_value_heads", where, maximum=_MAX_COUNT)
    overrides = _per_layer_overrides(text, layer_types, where)
    layers = []
    for i, lt in enumerate(layer_types):
        o = overrides.get(i, {})
        spec = LayerSpec(lt, o.get("head_dim", head_dim), o.get("num_key_value_heads", kv_heads))
        if heads % spec.num_kv_heads:
            raise ConfigError(
                f"{where}: layer {i} has {spec.num_kv_heads} key/value heads, which must divide "
                f"num_attention_heads = {heads}."
            )
        layers.append(spec)

    rope = _parse_rope(text, where, {spec.layer_type: spec.head_dim for spec in layers})
    num_experts = _int(text, "num_experts", where, maximum=_MAX_COUNT)
    top_k = _int(text, "top_k_experts", where, maximum=_MAX_COUNT)
    if top_k > num_experts:
        raise ConfigError(f"{where}: top_k_experts = {top_k} exceeds num_experts = {num_experts}.")
    top_id = vocab - 1
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_int(text, "intermediate_size", where, maximum=_MAX_WIDTH),
        num_attention_heads=heads,
        layers=tuple(layers),
        sliding_window=_int(text, "sliding_window", where, maximum=_MAX_POSITIONS),
        rope=rope,
        num_experts=num_experts,
        top_k_experts=top_k,
        moe_intermediate_size=_int(text, "moe_intermediate_size", where, maximum=_MAX_WIDTH),
        rms_norm_eps=_number(text, "rms_norm_eps", where, default=1e-6),
        # null turns softcapping off; absent is transformers' default.
        final_logit_softcapping=_optional_number(text, "final_logit_softcapping", where, default=30.0),
        canvas_length=_int(cfg, "canvas_length", source, default=256, maximum=_MAX_WIDTH),
        max_position_embeddings=_int(text, "max_position_embeddings", where, default=131_072, maximum=_MAX_POSITIONS),
        pad_token_id=_optional_int(text, "pad_token_id", where, minimum=0, maximum=top_id),
        eos_token_id=_token_ids(text, "eos_token_id", where, vocab),
        bos_token_id=_optional_int(text, "bos_token_id", where, minimum=0, maximum=top_id),
        raw=cfg,
    )


def _layer_types(text: dict[str, Any], num_layers: int, where: str) -> list[str]:
    layer_types = text.get("layer_types")
    if layer_types is None:  # transformers' default pattern: 5 sliding then 1 full
        layer_types = [SLIDING if (i + 1) % 6 else FULL for i in range(num_layers)]
    if not isinstance(layer_types, list) or len(layer_types) != num_layers:
        raise ConfigError(f"{where}: 'layer_types' must list {num_layers} entries, got {_show(layer_types)}.")
    for i, lt in enumerate(layer_types):
        if lt not in (SLIDING, FULL):
            raise ConfigError(f"{where}: layer_types[{i}] = {_show(lt)}, expected '{SLIDING}' or '{FULL}'.")
    if layer_types[-1] != FULL:
        # transformers forces the last layer to full attention with only a warning; refuse instead.
        raise ConfigError(f"{where}: the last entry of 'layer_types' is {layer_types[-1]!r}, expected '{FULL}'.")
    return layer_types


def _per_layer_overrides(text: dict[str, Any], layer_types: list[str], where: str) -> dict[int, dict[str, int]]:
    """Full-attention layers' head_dim / KV heads, in either of the layouts transformers writes."""
    plc = text.get("per_layer_config")
    if plc is None:
        # transformers 5.11 layout (or none at all): global_head_dim defaults to 512 there too.
        o = {"head_dim": _int(text, "global_head_dim", where, default=_HF_DEFAULT_GLOBAL_HEAD_DIM, maximum=_MAX_COUNT)}
        kv = _optional_int(text, "num_global_key_value_heads", where, maximum=_MAX_COUNT)
        if kv is not None:
            o["num_key_value_heads"] = kv
        return {i: dict(o) for i, lt in enumerate(layer_types) if lt == FULL}
    if not isinstance(plc, dict):
        raise ConfigError(f"{where}: 'per_layer_config' is {_show(plc)}, expected an object keyed by layer index.")
    out: dict[int, dict[str, int]] = {}
    for key, values in plc.items():
        try:
            idx = int(key)
        except ValueError:
            raise ConfigError(f"{where}: per_layer_config key {key!r} is not a layer index.") from None
        if not 0 <= idx < len(layer_types):
            raise ConfigError(f"{where}: per_layer_config names layer {idx}, but there are {len(layer_types)}.")
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: per_layer_config[{key}] is {_show(values)}, expected an object.")
        unknown = set(values) - {"head_dim", "num_key_value_heads"}
        if unknown:
            raise ConfigError(
                f"{where}: per_layer_config[{key}] sets {sorted(unknown)}, which dgrt does not support; "
                "expected only head_dim and num_key_value_heads."
            )
        out[idx] = {k: _int(values, k, f"{where} per_layer_config[{key}]", maximum=_MAX_COUNT) for k in values}
    return out


def _parse_rope(text: dict[str, Any], where: str, head_dims: dict[str, int]) -> dict[str, RopeConfig]:
    params = text.get("rope_parameters")
    if params is None:
        params = _HF_DEFAULT_ROPE
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: 'rope_parameters' is {_show(params)}, expected an object keyed by layer type.")
    out = {}
    for layer_type in head_dims:
        p = params.get(layer_type)
        if not isinstance(p, dict):
            raise ConfigError(
                f"{where}: rope_parameters['{layer_type}'] is {_show(p)}, expected an object (rope_parameters "
                f"is keyed by layer type: '{SLIDING}', '{FULL}')."
            )
        rope_where = f"{where} rope_parameters.{layer_type}"
        rope_type = p.get("rope_type", "default")
        theta = _number(p, "rope_theta", rope_where)
        prf = _number(p, "partial_rotary_factor", rope_where, default=1.0, zero=True, maximum=1.0)
        if rope_type == "default":
            if prf != 1.0:
                raise ConfigError(
                    f"{rope_where}: partial_rotary_factor {prf} with rope_type 'default' is not supported; "
                    "expected 1.0 (or rope_type 'proportional')."
                )
            rope = RopeConfig(theta, "default")
        elif rope_type == "proportional":
            rope = RopeConfig(theta, "proportional", prf, _number(p, "factor", rope_where, default=1.0))
        else:
            raise ConfigError(
                f"{rope_where}: rope_type {_show(rope_type)} is not supported; expected 'default' or 'proportional'."
            )
        if head_dims[layer_type] % 2:
            raise ConfigError(f"{where}: {layer_type} head_dim {head_dims[layer_type]} must be even for RoPE.")
        out[layer_type] = rope
    return out
