"""The building blocks of the DiffusionGemma text stack, written for export.

Every shape is static or follows from input shapes (no data-dependent shapes, no Python-side state), masks
are explicit, and the MoE runs dense or routed with a capacity per expert (Experts). Parameter names follow
the checkpoint's decoder keys, so a state dict maps onto them one to one (see dgrt.checkpoint).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dgrt.config import LayerSpec, ModelConfig, RopeConfig


class RMSNorm(nn.Module):
    """Gemma 4 RMSNorm: computed in fp32, `x * (mean(x^2) + eps)^-0.5 * w` (w, not 1 + w), cast back."""

    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        # torch.pow, not rsqrt: the same op transformers uses, so the rounding matches.
        y = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            y = y * self.weight.float()
        return y.to(x.dtype)


class Linear(nn.Linear):
    """A bias-free linear layer applied to the tokens as one 2-D matrix. It exports as a single Gemm that
    reads the weight as stored; a 3-D input would export as MatMul after a Transpose of the weight, which
    ONNX Runtime constant-folds into a private copy of every weight in every session."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], self.out_features)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies exactly as transformers computes them (same fp32 ops, same order).

    Always real CPU tensors, also while a model is being built on the meta device: they are not weights.
    """
    cpu = torch.device("cpu")
    if rope.rope_type == "default":
        return 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=cpu) / head_dim))
    rotated = int(rope.partial_rotary_factor * head_dim // 2)
    exponents = torch.arange(0, 2 * rotated, 2, dtype=torch.int64, device=cpu).float() / head_dim
    zeros = torch.zeros(head_dim // 2 - rotated, device=cpu)
    inv_freq = torch.cat([1.0 / (rope.theta**exponents), zeros])
    return inv_freq / rope.factor


def rope_cos_sin(
    inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [B, S, head_dim] for integer positions [B, S]."""
    freqs = position_ids[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, S, heads, D]; cos/sin: [B, S, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def attention_mask(
    num_queries: int,
    past_len: int,
    window: int | None,
    causal: bool,
    device: torch.device,
    pad_lengths: torch.Tensor | None = None,
    history: int = 0,
) -> torch.Tensor:
    """Boolean [1 or B, S, P + S] mask over (past, new) keys, in DynamicCache semantics (docs/reference.md).

    Causal (prefill): query i sees past and new keys up to itself; with a window W, only keys less than W
    slots behind it. Bidirectional (denoise): every query sees the whole canvas; with a window W, only the
    last W - 1 past keys. Distances are counted in cache slots, so the past may hold the whole history or
    just its last W - 1 tokens: both give the same result.

    Left padding: row b's first pad_lengths[b] cache slots are padding and never attended to. `history` is
    the number of cached slots in all (a full layer's past length), which places a shorter past in it.
    """
    q = torch.arange(num_queries, device=device) + past_len
    k = torch.arange(past_len + num_queries, device=device)
    if causal:
        visible = k[None, :] <= q[:, None]
        if window is not None:
            visible = visible & (k[None, :] > q[:, None] - window)
    else:
        oldest = 0 if window is None else past_len - (window - 1)
        visible = (k >= oldest)[None, :].expand(num_queries, -1)
    if pad_lengths is None:
        return visible[None]
    not_padding = (k + (history - past_len))[None, :] >= pad_lengths[:, None]  # [B, T] by absolute slot
    return visible[None] & not_padding[:, None, :]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: LayerSpec):
        super().__init__()
        self.head_dim = spec.head_dim
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = spec.num_kv_heads
        h = cfg.hidden_size
        self.q_proj = Linear(h, self.num_heads * self.head_dim, bias=False)
        self.k_proj = Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = Linear(h, self.num_kv_heads * self.head_dim, bias=False) if spec.has_v_proj else None
        self.o_proj = Linear(self.num_heads * self.head_dim, h, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.v_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, with_scale=False)

    def key_value(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the tokens in h, [B, kv_heads, S, D]: what the cache stores."""
        b, s, _ = h.shape
        raw_k = self.k_proj(h).view(b, s, self.num_kv_heads, self.head_dim)
        # Full layers have no v_proj: the value is the raw k_proj output (before k_norm and RoPE).
        raw_v = raw_k if self.v_proj is None else self.v_proj(h).view(b, s, self.num_kv_heads, self.head_dim)
        k = apply_rope(self.k_norm(raw_k), cos, sin)
        return k.transpose(1, 2), self.v_norm(raw_v).transpose(1, 2)

    def forward(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Attend from h's tokens to keys/values [B, kv_heads, T, D] under a boolean mask [1 or B, S, T]."""
        b, s, _ = h.shape
        q = apply_rope(self.q_norm(self.q_proj(h).view(b, s, self.num_heads, self.head_dim)), cos, sin)
        # GQA without repeating K/V: group the query heads that share a KV head.
        groups = self.num_heads // self.num_kv_heads
        q = q.transpose(1, 2).reshape(b, self.num_kv_heads, groups, s, self.head_dim)
        scores = torch.matmul(q, keys[:, :, None].transpose(-1, -2))  # scaling is 1.0 in Gemma 4
        # The mask is added in fp32, as 0 or float32's lowest: x + lowest rounds to lowest, so this equals
        # filling the masked scores, and a padding query that sees nothing stays finite (its output is never
        # used). Not a masked_fill: ONNX Runtime's Where over the scores took a second buffer of their size
        # and 3x an Add's time ([2, 8, 256, 8448] fp32 on 2 threads: 360 ms against 120).
        bias = torch.where(mask, 0.0, torch.finfo(torch.float32).min)[:, None, None]
        probs = torch.softmax(scores.float() + bias, dim=-1).to(q.dtype)
        out = torch.matmul(probs, values[:, :, None])  # [B, kv, groups, S, D]
        out = out.reshape(b, self.num_heads, s, self.head_dim).transpose(1, 2)
        return self.o_proj(out.reshape(b, s, self.num_heads * self.head_dim))  # no -1 beside a batch of 0


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=False)
        self.up_proj = Linear(hidden, intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.top_k_experts
        self.root_size = cfg.hidden_size**-0.5
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, with_scale=False)
        self.proj = Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(cfg.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's top-k experts [N, k] and their weights [N, k] (fp32: renormalised, per-expert-scaled)."""
        scores = self.proj(self.norm(x) * self.scale * self.root_size)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        top_w, top_i = torch.topk(probs, k=self.top_k, dim=-1)
        return top_w / top_w.sum(dim=-1, keepdim=True) * self.per_expert_scale[top_i], top_i


class ExpertSlots:
    """The routed MoE of one graph call: each expert computes at most `capacity` of the call's tokens.

    `slots` is arange(capacity), a graph input whose length sets the capacity (a dynamic dimension, so one
    graph serves every capacity). Each layer records its busiest expert's token count; where
    one exceeds the capacity, tokens were dropped and the caller runs the call again with more slots
    (dgrt.runtime.experts), so results never differ from computing every routed pair.
    """

    def __init__(self, slots: torch.Tensor):
        self.slots = slots
        self.busiest: torch.Tensor | None = None

    def record(self, load: torch.Tensor) -> None:
        """One layer's per-expert token counts [E]."""
        top = load.max().reshape(1)
        self.busiest = top if self.busiest is None else torch.maximum(self.busiest, top)

    def load(self) -> torch.Tensor:
        """The most tokens any expert of any layer received, [1] int64 (0 where no layer ran its experts: a
        one-layer model's prefill computes only the layer's K/V)."""
        if self.busiest is None:
            return torch.zeros(1, dtype=torch.int64, device=self.slots.device)
        return self.busiest


class Experts(nn.Module):
    """All experts as 3-D weights, run one of two ways over the same weights and with the same result:

    * dense (slots None): every expert on every token, mixed by a dense [N, E] routing matrix (static
      shapes, no gathers; E / k times the routed work);
    * routed: each expert gathers up to `capacity` of the tokens routed to it (TopK over the assignment
      matrix), runs on them as one batched GEMM [E, capacity], and each token gathers its k results back.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts = e
        self.intermediate = i
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))  # gate = first i rows, up = last i
        self.down_proj = nn.Parameter(torch.empty(e, h, i))
        self.down_input = nn.Identity()  # where quantization calibration observes the down projection's input

    def _run(self, x_t: torch.Tensor) -> torch.Tensor:
        """Every expert on its own tokens: x_t [E or 1, H, T] -> [E, H, T]. Weights times transposed
        activations: batched MatMuls that read the weights as stored (no weight Transpose for a runtime to
        fold into a copy), and slices instead of split. Quantized exports turn these GEMMs around to read
        the weight as the right operand (dgrt.exporter.quantize.layout)."""
        gate_up = torch.matmul(self.gate_up_proj, x_t)  # [E, 2I, T]
        gate, up = gate_up[:, : self.intermediate], gate_up[:, self.intermediate :]
        return torch.matmul(self.down_proj, self.down_input(gelu_tanh(gate) * up))

    def forward(
        self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, slots: ExpertSlots | None = None
    ) -> torch.Tensor:
        """x [N, H]; each token's experts [N, k] and their fp32 weights [N, k]. Mixing is in fp32."""
        if slots is None:
            routing = torch.zeros(x.shape[0], self.num_experts, device=x.device).scatter(-1, experts, weights)
            out = self._run(x.t())  # [E, H, N]
            mixed = torch.matmul(routing[:, None, :], out.float().permute(2, 0, 1))  # [N, 1, E] @ [N, E, H]
            return mixed.squeeze(1).to(x.dtype)
        n, capacity = x.shape[0], slots.slots.shape[0]
        all_experts = torch.arange(self.num_experts, device=x.device)
        assigned = (experts[:, :, None] == all_experts).any(dim=1).t()  # [E, N]
        slots.record(assigned.sum(dim=1))
        # Each expert's tokens first (TopK over 0/1), then tokens it does not take, whose weight is never read.
        _, tokens = torch.topk(assigned.float(), capacity, dim=1)  # [E, capacity]
        out = self._run(x[tokens].transpose(1, 2))  # [E, H, capacity]
        # Where each token's result lies: the slot its expert gave it (a slot of a token the expert does not
        # take lands on an unrouted (token, expert) pair, which no token reads).
        slot_of = torch.zeros(self.num_experts, n, dtype=torch.int64, device=x.device)
        slot_of = slot_of.scatter(1, tokens, slots.slots.expand(self.num_experts, -1))  # [E, N]
        slot = slot_of.t().gather(1, experts)  # [N, k]
        results = out.transpose(1, 2).reshape(-1, out.shape[1])[experts * capacity + slot]  # [N, k, H]
        return (results.float() * weights[:, :, None]).sum(dim=1).to(x.dtype)


class Layer(nn.Module):
    """One transformer layer. Prefill and denoise share every weight but the final layer scalar."""

    def __init__(self, cfg: ModelConfig, spec: LayerSpec):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.spec = spec
        self.window = cfg.sliding_window if spec.is_sliding else None
        self.self_attn = Attention(cfg, spec)
        self.mlp = MLP(h, cfg.intermediate_size)
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)  # before the dense MLP
        self.post_feedforward_layernorm_1 = RMSNorm(h, eps)  # after the dense MLP
        self.pre_feedforward_layernorm_2 = RMSNorm(h, eps)  # before the experts
        self.post_feedforward_layernorm_2 = RMSNorm(h, eps)  # after the experts
        self.post_feedforward_layernorm = RMSNorm(h, eps)  # after their sum
        # Not tied between roles: the decoder's scalar and the encoder's (prefill) scalar.
        self.layer_scalar = nn.Parameter(torch.ones(1))
        self.encoder_layer_scalar = nn.Parameter(torch.ones(1))

    def key_value(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Only the K/V this layer writes to the cache for x (what prefill needs of the last layer)."""
        return self.self_attn.key_value(self.input_layernorm(x), cos, sin)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        past_k: torch.Tensor,
        past_v: torch.Tensor,
        *,
        causal: bool,
        pad_lengths: torch.Tensor | None = None,
        history: int = 0,
        slots: ExpertSlots | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(layer output, K, V) for x's tokens attending to the past keys and to each other
        (`pad_lengths`, `history`: see attention_mask; `slots`: the routed MoE, else dense)."""
        h = self.input_layernorm(x)
        k, v = self.self_attn.key_value(h, cos, sin)
        mask = attention_mask(x.shape[1], past_k.shape[2], self.window, causal, x.device, pad_lengths, history)
        keys = torch.cat([past_k, k], dim=2)
        values = torch.cat([past_v, v], dim=2)
        x = x + self.post_attention_layernorm(self.self_attn(h, cos, sin, keys, values, mask))

        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(x)))
        flat = x.reshape(-1, x.shape[-1])
        # The router reads the raw residual; the experts read its pre_feedforward_layernorm_2.
        moe = self.experts(self.pre_feedforward_layernorm_2(flat), *self.router(flat), slots)
        moe = self.post_feedforward_layernorm_2(moe.reshape(x.shape))
        x = x + self.post_feedforward_layernorm(dense + moe)
        return x * (self.encoder_layer_scalar if causal else self.layer_scalar), k, v


class SelfConditioning(nn.Module):
    """Adds the previous step's soft embeddings to the canvas embeddings: post_norm(e + MLP(pre_norm(soft)))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hidden_size
        self.pre_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.post_norm = RMSNorm(h, cfg.rms_norm_eps, with_scale=False)
        self.gate_proj = Linear(h, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(h, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, h, bias=False)

    def forward(self, embeds: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        n = self.pre_norm(soft)
        return self.post_norm(embeds + self.down_proj(gelu_tanh(self.gate_proj(n)) * self.up_proj(n)))
