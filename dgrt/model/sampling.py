"""The per-position part of the EntropyBound sampler, computed inside the denoise graph.

Everything vocab-sized stays here: from the step's raw logits and temperature it returns, per canvas
position, the argmax, a token sampled from softmax(logits / T), the entropy of that distribution, and the
next step's self-conditioning soft embeddings. Acceptance, renoising and stopping act on [B, C] tensors
and live in the runtime.

Sampling is by inverse CDF from one uniform number per position, given as an input: a seed on the host
makes runs repeatable, and two backends fed the same numbers draw the same tokens. (transformers draws
with torch.multinomial instead, so its samples differ under the same seed; tests feed both sides the
same draws.)
"""

from __future__ import annotations

import torch


def sample_from_uniform(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The token i with cdf[i-1] <= u * total < cdf[i], for probabilities [..., V] and uniforms [...] in [0, 1).

    Counting the cdf entries at or below the threshold is the inverse CDF with static shapes; it never
    picks a zero-probability token. The last entry (the total) is left out of the count: it is above any
    u < 1, and leaving it out bounds the result by V - 1 without a clamp (TensorRT has no integer Clip).
    """
    cdf = torch.cumsum(probs, dim=-1)
    at_or_below = cdf[..., :-1] <= (uniform * cdf[..., -1])[..., None]
    return at_or_below.sum(dim=-1)


def step_outputs(
    logits: torch.Tensor, temperature: torch.Tensor, uniform: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(processed logits, argmax, sample, entropy) for raw fp32 logits [B, C, V], temperatures [B], uniforms [B, C].

    The entropy is the one transformers' Categorical(logits=lg).entropy() computes: -sum(p * log p).
    """
    processed = logits / temperature[:, None, None]
    log_probs = torch.log_softmax(processed, dim=-1)
    probs = log_probs.exp()
    entropy = -(probs * log_probs).sum(dim=-1)
    return processed, processed.argmax(dim=-1), sample_from_uniform(probs, uniform), entropy
