"""The text model and its two graphs, prefill and denoise, over one set of weights.

* prefill (the "encoder" role): causal over the new tokens, reads the past K/V, returns the new tokens'
  K/V per layer. Runs over the prompt, then over every finished canvas at the decoder's positions.
* denoise (the "decoder" role): bidirectional over the canvas, reads the past K/V without writing it,
  takes the self-conditioning soft embeddings, returns fp32 softcapped logits.

The past K/V of each layer is [B, kv_heads, P, head_dim]; P may differ between layers (a sliding layer's
past may hold the whole history or only its last sliding_window - 1 tokens: the masks count slots back
from the end, so both give the same result). Positions are explicit inputs, used for RoPE only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dgrt.config import ModelConfig
from dgrt.model.layers import ExpertSlots, Layer, RMSNorm, SelfConditioning, rope_cos_sin, rope_inv_freq
from dgrt.sampler import step_outputs

KV = tuple[torch.Tensor, torch.Tensor]


class DiffusionGemma(nn.Module):
    """The DiffusionGemma text stack. Parameter names are the checkpoint's `model.decoder.*` keys."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)  # also the LM head (tied)
        self.blocks = [Layer(cfg, spec) for spec in cfg.layers]  # typed view of the modules in self.layers
        self.layers = nn.ModuleList(self.blocks)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_conditioning = SelfConditioning(cfg)
        for layer_type, rope in cfg.rope.items():
            head_dim = next(s.head_dim for s in cfg.layers if s.layer_type == layer_type)
            self.register_buffer(f"inv_freq_{layer_type}", rope_inv_freq(rope, head_dim), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in, read off a small weight: reading the embedding of a model that
        converts its weights on use (dgrt.checkpoint.load_model) would convert all of it."""
        return self._small_weight.dtype

    @property
    def device(self) -> torch.device:
        return self._small_weight.device

    @property
    def _small_weight(self) -> torch.Tensor:
        weight = self.norm.weight
        assert weight is not None  # the final norm has a scale
        return weight

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids)
        # embed_scale is rounded to the weight dtype before the multiply, as in transformers.
        return x * torch.tensor(self.config.embed_scale).to(x.dtype)

    def _rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {lt: rope_cos_sin(getattr(self, f"inv_freq_{lt}"), position_ids, dtype) for lt in self.config.rope}

    def _history(self, past: list[KV]) -> int:
        """Cached slots in all: the past length of a full layer (the last layer always is one)."""
        return past[-1][0].shape[2]

    def unread_parameters(self) -> set[str]:
        """Parameters neither graph reads: prefill skips the last layer's output (only its K/V are cached),
        so that layer's encoder scalar is read by no graph and no export writes it."""
        return {f"layers.{len(self.blocks) - 1}.encoder_layer_scalar"}

    def prefill(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        past: list[KV],
        pad_lengths: torch.Tensor | None = None,
        slots: ExpertSlots | None = None,
    ) -> list[KV]:
        """K/V of the new tokens [B, S] at positions [B, S], for every layer.

        pad_lengths [B]: cache slots at the start of each row that are left padding (never attended to).
        slots: run the experts routed, with this capacity (else dense; see layers.Experts).
        """
        x = self._embed(input_ids)
        rope = self._rope(position_ids, x.dtype)
        history = self._history(past)
        new: list[KV] = []
        last = len(self.blocks) - 1
        for i, (layer, (past_k, past_v)) in enumerate(zip(self.blocks, past, strict=True)):
            cos, sin = rope[layer.spec.layer_type]
            if i == last:  # the last layer's output feeds no cache: skip its attention and MLPs
                new.append(layer.key_value(x, cos, sin))
            else:
                x, k, v = layer(x, cos, sin, past_k, past_v, causal=True, pad_lengths=pad_lengths, history=history,
                                slots=slots)  # fmt: skip
                new.append((k, v))
        return new

    def denoise(
        self,
        canvas_ids: torch.Tensor,
        soft_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        past: list[KV],
        pad_lengths: torch.Tensor | None = None,
        slots: ExpertSlots | None = None,
    ) -> torch.Tensor:
        """fp32 softcapped logits [B, C, V] for the canvas, given the previous step's soft embeddings."""
        return self.lm_head(self.denoise_hidden(canvas_ids, soft_embeds, position_ids, past, pad_lengths, slots))

    def denoise_hidden(
        self,
        canvas_ids: torch.Tensor,
        soft_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        past: list[KV],
        pad_lengths: torch.Tensor | None = None,
        slots: ExpertSlots | None = None,
    ) -> torch.Tensor:
        """The canvas's final normed hidden states [B, C, H]: what the LM head reads."""
        x = self.self_conditioning(self._embed(canvas_ids), soft_embeds)
        rope = self._rope(position_ids, x.dtype)
        history = self._history(past)
        for layer, (past_k, past_v) in zip(self.blocks, past, strict=True):
            cos, sin = rope[layer.spec.layer_type]
            x, _, _ = layer(x, cos, sin, past_k, past_v, causal=False, pad_lengths=pad_lengths, history=history,
                            slots=slots)  # fmt: skip
        return self.norm(x)

    def lm_head(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 softcapped logits [B, n, V] of hidden states [B, n, H]. The head is the tied embedding,
        applied as a 2-D linear (see layers.Linear). No -1 beside the batch in a reshape: a graph with
        batch 0 (the idle graph of dgrt.tensorrt.one_engine) could not infer it."""
        weight = self.embed_tokens.weight
        logits = F.linear(h.reshape(-1, h.shape[-1]), weight).reshape(*h.shape[:-1], weight.shape[0]).float()
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def soft_embeddings(self, processed_logits: torch.Tensor) -> torch.Tensor:
        """Self-conditioning input for the next step: softmax(logits / T) @ E * embed_scale, [B, C, H].

        `processed_logits` are the step's logits divided by its temperature. As in transformers, the
        probabilities are computed in fp32 from logits rounded to the weight dtype, then cast to it.
        """
        w = self.embed_tokens.weight
        probs = torch.softmax(processed_logits.to(w.dtype), dim=-1, dtype=torch.float32).to(w.dtype)
        return torch.matmul(probs, w) * torch.tensor(self.config.embed_scale).to(w.dtype)

    def empty_past(self, batch: int, dtype: torch.dtype | None = None) -> list[KV]:
        """Zero-length past K/V for every layer."""
        dtype = dtype or self.dtype
        device = self.device
        return [
            (
                torch.zeros(batch, s.num_kv_heads, 0, s.head_dim, dtype=dtype, device=device),
                torch.zeros(batch, s.num_kv_heads, 0, s.head_dim, dtype=dtype, device=device),
            )
            for s in self.config.layers
        ]


def _pairs(flat: tuple[torch.Tensor, ...]) -> list[KV]:
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def _routing(routed: bool, rest: tuple[torch.Tensor, ...]) -> tuple[ExpertSlots | None, list[KV]]:
    """Split a graph's trailing inputs into the expert slots (routed graphs take them first) and the past."""
    return (ExpertSlots(rest[0]), _pairs(rest[1:])) if routed else (None, _pairs(rest))


class Prefill(nn.Module):
    """The prefill graph with a flat signature: (input_ids, position_ids, pad_lengths[, expert_slots],
    past_k_0, past_v_0, ...) -> (new_k_0, new_v_0, ...[, expert_load]). `routed`: the MoE runs routed with
    as many slots per expert as expert_slots is long, and the graph returns the busiest expert's load."""

    def __init__(self, model: DiffusionGemma, routed: bool = False):
        super().__init__()
        self.model = model
        self.routed = routed

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, pad_lengths: torch.Tensor, *rest: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        slots, past = _routing(self.routed, rest)
        new = self.model.prefill(input_ids, position_ids, past, pad_lengths, slots)
        return tuple(t for kv in new for t in kv) + ((slots.load(),) if slots else ())


class Denoise(nn.Module):
    """The denoise graph with a flat signature and the sampler's per-position work inside:

    (canvas_ids [B, C], soft_embeds [B, C, H], position_ids [B, C], pad_lengths [B], temperature [B],
    uniform [B, C][, expert_slots [capacity]], past_k_0, past_v_0, ...) -> (argmax [B, C], sample [B, C],
    entropy [B, C], next_soft_embeds [B, C, H][, expert_load [1]][, logits [B, C, V] with debug_logits]).
    See dgrt.sampler, and Prefill for `routed`.

    The vocabulary-sized work (LM head, sampler, next soft embeddings: about a dozen [B, n, V] fp32
    temporaries) runs over the canvas in chunks of `head_chunk` positions, one after the other, so its
    memory is that of one chunk; each chunk reads the embedding again (see dgrt.exporter's head_chunk).
    """

    def __init__(
        self, model: DiffusionGemma, debug_logits: bool = False, head_chunk: int | None = None, routed: bool = False
    ):
        super().__init__()
        self.model = model
        self.debug_logits = debug_logits
        self.head_chunk = head_chunk or model.config.canvas_length
        self.routed = routed

    def forward(
        self,
        canvas_ids: torch.Tensor,
        soft_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        pad_lengths: torch.Tensor,
        temperature: torch.Tensor,
        uniform: torch.Tensor,
        *rest: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        slots, past = _routing(self.routed, rest)
        h = self.model.denoise_hidden(canvas_ids, soft_embeds, position_ids, past, pad_lengths, slots)
        chunks = []
        for start in range(0, h.shape[1], self.head_chunk):
            part = slice(start, start + self.head_chunk)
            logits = self.model.lm_head(h[:, part])
            processed, argmax, sample, entropy = step_outputs(logits, temperature, uniform[:, part])
            chunks.append((argmax, sample, entropy, self.model.soft_embeddings(processed), logits))
        outputs = [torch.cat(parts, dim=1) if len(parts) > 1 else parts[0] for parts in zip(*chunks, strict=True)]
        load = [slots.load()] if slots else []
        return tuple(outputs[:4] + load + outputs[4:] if self.debug_logits else outputs[:4] + load)
