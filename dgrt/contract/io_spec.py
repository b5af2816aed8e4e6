"""The I/O contract of the two graphs: every input and output, its dtype, symbolic shape and meaning.

This is the one place the contract is defined. The exporter traces the graphs with these names and
dynamic dimensions, and writes it into manifest.json, from which any runtime drives the graphs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from dgrt.config import ModelConfig

# Symbolic dimensions. The canvas length is static (a number in the shapes).
DIMS = {
    "batch": "number of sequences in the batch",
    "seq": "number of new tokens given to prefill (a prompt, or a finished canvas)",
    "past_full": "number of cached tokens a full-attention layer's past holds: the whole history",
    "past_sliding": (
        "number of cached tokens a sliding-attention layer's past holds: the whole history, or only its "
        "last sliding_window - 1 tokens (both give the same result)"
    ),
    "expert_capacity": "most tokens each expert computes in one call of a routed graph (its expert_slots' length)",
}

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# The contract's dtype names as torch dtypes.
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64}


def torch_dtype(export_dtype: str) -> torch.dtype:
    """The torch dtype of an export's model dtype (a key of DTYPES: fp32, fp16, bf16)."""
    return TORCH_DTYPES[DTYPES[export_dtype]]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy-style name: int64, float32, float16, bfloat16
    shape: tuple[int | str, ...]
    doc: str
    layer: int | None = None
    layer_type: str | None = None

    def to_json(self) -> dict[str, object]:
        return {k: v for k, v in asdict(self).items() if v is not None} | {"shape": list(self.shape)}


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    cuda_graph: bool  # meant to be captured in a CUDA graph: no data-dependent shapes allowed
    doc: str


PAD_LENGTHS = TensorSpec(
    "pad_lengths",
    "int64",
    ("batch",),
    "how many cache slots at the start of each row are left padding, never attended to (0 without padding)",
)


EXPERT_SLOTS = TensorSpec(
    "expert_slots",
    "int64",
    ("expert_capacity",),
    "routed MoE only: arange(capacity), whose length is how many of the call's tokens each expert computes",
)
EXPERT_LOAD = TensorSpec(
    "expert_load",
    "int64",
    (1,),
    "routed MoE only: the most tokens any expert of any layer was routed; above the capacity, some were "
    "dropped and the call must be run again with more expert_slots",
)


def _routed(routed: bool, spec: TensorSpec) -> list[TensorSpec]:
    return [spec] if routed else []


def _past(cfg: ModelConfig, dtype: str) -> list[TensorSpec]:
    out = []
    for i, spec in enumerate(cfg.layers):
        past = "past_sliding" if spec.is_sliding else "past_full"
        for kind in ("key", "value"):
            out.append(
                TensorSpec(
                    f"past_key_values.{i}.{kind}",
                    dtype,
                    ("batch", spec.num_kv_heads, past, spec.head_dim),
                    f"layer {i}'s cached {kind}s, oldest first, as prefill returned them (new_key_values.{i}.{kind})",
                    i,
                    spec.layer_type,
                )
            )
    return out


def prefill_spec(cfg: ModelConfig, dtype: str, routed: bool = False) -> GraphSpec:
    """dtype: the model dtype, one of DTYPES' values. routed: the MoE is routed (dgrt.contract.experts)."""
    inputs = [
        TensorSpec("input_ids", "int64", ("batch", "seq"), "token ids of the new tokens"),
        TensorSpec(
            "position_ids",
            "int64",
            ("batch", "seq"),
            "positions of the new tokens: prompt 0..P-1; a finished canvas keeps the positions it was denoised at",
        ),
        PAD_LENGTHS,
        *_routed(routed, EXPERT_SLOTS),
        *_past(cfg, dtype),
    ]
    outputs = []
    for i, spec in enumerate(cfg.layers):
        for kind in ("key", "value"):
            outputs.append(
                TensorSpec(
                    f"new_key_values.{i}.{kind}",
                    dtype,
                    ("batch", spec.num_kv_heads, "seq", spec.head_dim),
                    f"layer {i}'s {kind}s of the new tokens: append them to past_key_values.{i}.{kind}",
                    i,
                    spec.layer_type,
                )
            )
    return GraphSpec(
        "prefill",
        tuple(inputs),
        tuple(outputs + _routed(routed, EXPERT_LOAD)),
        cuda_graph=False,
        doc="causal pass over new tokens (the prompt, then each finished canvas); returns their K/V per layer",
    )


def denoise_spec(cfg: ModelConfig, dtype: str, debug_logits: bool = False, routed: bool = False) -> GraphSpec:
    c, h = cfg.canvas_length, cfg.hidden_size
    inputs = [
        TensorSpec("canvas_ids", "int64", ("batch", c), "the current canvas"),
        TensorSpec(
            "soft_embeds",
            dtype,
            ("batch", c, h),
            "self-conditioning input: zeros on a canvas's first step, then the previous step's next_soft_embeds",
        ),
        TensorSpec("position_ids", "int64", ("batch", c), "positions of the canvas: cache length .. + canvas - 1"),
        PAD_LENGTHS,
        TensorSpec(
            "temperature",
            "float32",
            ("batch",),
            "this step's temperature: t_min + (t_max - t_min) * step / steps, step counting down from steps to 1",
        ),
        TensorSpec(
            "uniform",
            "float32",
            ("batch", c),
            "one uniform random number in [0, 1) per position, from which the sample is drawn",
        ),
        *_routed(routed, EXPERT_SLOTS),
        *_past(cfg, dtype),
    ]
    outputs = [
        TensorSpec("argmax", "int64", ("batch", c), "argmax of the logits (the draft; the final step's is emitted)"),
        TensorSpec("sample", "int64", ("batch", c), "a token drawn from softmax(logits / temperature) by inverse CDF"),
        TensorSpec("entropy", "float32", ("batch", c), "entropy of softmax(logits / temperature), in nats"),
        TensorSpec(
            "next_soft_embeds",
            dtype,
            ("batch", c, h),
            "softmax(logits / temperature) @ embedding * sqrt(hidden): the next step's soft_embeds",
        ),
        *_routed(routed, EXPERT_LOAD),
    ]
    if debug_logits:
        outputs.append(
            TensorSpec("logits", "float32", ("batch", c, cfg.vocab_size), "raw softcapped logits (debug export only)")
        )
    return GraphSpec(
        "denoise",
        tuple(inputs),
        tuple(outputs),
        cuda_graph=True,
        doc="bidirectional pass over the canvas reading the cache; returns the sampler's per-position values",
    )
