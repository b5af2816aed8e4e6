"""The block-diffusion loop over a backend: what `dgrt.load(...)` returns.

    gen = dgrt.load("export-dir")                       # or a checkpoint folder, backend="torch"
    result = gen.generate("Reverse 'abc'.", seed=0)     # text in (chat template applied), text out
    for event in gen.stream(["a", "b"], seed=0): ...    # drafts after each step, text after each canvas

The loop is transformers' DiffusionGemma generate (REFERENCE.md): prompt prefill, canvases of uniform
random tokens denoised for up to `steps` steps with the linear temperature schedule, entropy-bound
acceptance and renoising, per-row adaptive stopping, the last step's argmax emitted (EOS/pad applied)
and prefilled at the positions it was denoised at. Random numbers come from one seeded generator in a
fixed order (canvas, then per step the sampling uniforms and the renoise tokens).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from collections.abc import Generator as PyGenerator
from dataclasses import dataclass, field
from typing import Any

import torch

from dgrt.errors import DgrtError
from dgrt.runtime.backends import Backend, DenoiseInputs
from dgrt.runtime.kv_cache import KVCache, LayerShape
from dgrt.runtime.sampler import AdaptiveStop, SamplerConfig, accept, finalize_canvas
from dgrt.runtime.tokenizer import Tokenizer

Message = dict[str, str]
Prompt = str | Sequence[Message] | Sequence[int]


@dataclass(frozen=True)
class ModelInfo:
    """What the loop needs to know about the model (from a manifest or a checkpoint config)."""

    layers: list[LayerShape]
    canvas_length: int
    vocab_size: int
    hidden_size: int
    max_context: int
    eos_token_id: tuple[int, ...]
    pad_token_id: int | None


@dataclass
class StepEvent:
    """After each denoise step: the current draft (argmax) of the canvas being refined."""

    canvas_index: int
    step: int  # counts down from steps to 1
    draft: torch.Tensor  # [B, C]
    active: torch.Tensor  # [B] rows still being denoised


@dataclass
class CanvasEvent:
    """After each canvas: the committed tokens (EOS/pad applied) and every row's text so far."""

    canvas_index: int
    tokens: torch.Tensor  # [B, C]
    texts: list[str]
    finished: torch.Tensor  # [B]


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per row: whole canvases, pad after EOS (as transformers returns)
    texts: list[str]  # decoded up to (not including) the first EOS, special tokens skipped
    steps_per_canvas: list[list[int]]  # per row: denoise passes of each canvas the row denoised (unfinished)
    tokens_per_forward: list[float]  # per row: non-pad new tokens / those passes
    prefill_seconds: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    seed: int | None = None

    @property
    def mean_steps_per_canvas(self) -> float:
        steps = [s for row in self.steps_per_canvas for s in row]
        return sum(steps) / len(steps) if steps else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "texts": self.texts,
            "tokens": self.tokens,
            "steps_per_canvas": self.steps_per_canvas,
            "mean_steps_per_canvas": self.mean_steps_per_canvas,
            "tokens_per_forward": self.tokens_per_forward,
            "prefill_seconds": self.prefill_seconds,
            "step_seconds": self.step_seconds,
            "seed": self.seed,
        }


Event = StepEvent | CanvasEvent


class Generator:
    """Runs block diffusion on a backend. Holds the KV cache, allocated once at the size calls need."""

    def __init__(
        self,
        backend: Backend,
        tokenizer: Tokenizer | None,
        info: ModelInfo,
        sampler: SamplerConfig,
        generation_config: dict[str, Any],
    ):
        self.backend, self.tokenizer, self.info, self.sampler = backend, tokenizer, info, sampler
        self.max_new_tokens = int(generation_config.get("max_new_tokens") or 256)
        eos = generation_config.get("eos_token_id", list(info.eos_token_id))
        self.eos_token_id: list[int] = [eos] if isinstance(eos, int) else list(eos or [])
        self.pad_token_id: int | None = generation_config.get("pad_token_id", info.pad_token_id)
        self._cache: KVCache | None = None

    def close(self) -> None:
        self.backend.close()
        self._cache = None

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public API ---------------------------------------------------------------------------------

    def generate(self, prompts: Prompt | Sequence[Prompt], **options: Any) -> GenerationResult:
        """Generate for one prompt or a batch. See `stream` for the options; `on_event` is called with
        every StepEvent and CanvasEvent."""
        on_event: Callable[[Event], None] | None = options.pop("on_event", None)
        stream = self._run(prompts, **options)
        while True:
            try:
                event = next(stream)
            except StopIteration as done:
                return done.value
            if on_event is not None:
                on_event(event)

    def stream(self, prompts: Prompt | Sequence[Prompt], **options: Any) -> Iterator[Event]:
        """Yield a StepEvent after each denoise step and a CanvasEvent after each canvas.

        options: max_new_tokens, seed, chat (apply the chat template to str prompts, default True),
        eos_token_id, pad_token_id, and the sampler settings steps, t_min, t_max, entropy_bound,
        stability_threshold, confidence_threshold (None disables adaptive stopping).
        """
        yield from self._run(prompts, **options)

    # -- the loop -----------------------------------------------------------------------------------

    def _run(
        self,
        prompts: Prompt | Sequence[Prompt],
        *,
        max_new_tokens: int | None = None,
        seed: int | None = None,
        chat: bool = True,
        eos_token_id: int | Sequence[int] | None = ...,  # type: ignore[assignment]
        pad_token_id: int | None = ...,  # type: ignore[assignment]
        session: Session | None = None,
        **sampler_options: Any,
    ) -> PyGenerator[Event, None, GenerationResult]:
        sampler = self.sampler.with_overrides(**sampler_options) if sampler_options else self.sampler
        rows = [self._encode(p, chat) for p in _as_batch(prompts)]
        eos = self.eos_token_id if eos_token_id is ... else _id_list(eos_token_id)
        pad_id = self.pad_token_id if pad_token_id is ... else pad_token_id
        max_new = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        if max_new < 1:
            raise DgrtError(f"max_new_tokens is {max_new}, expected a positive integer.")
        info, c, b = self.info, self.info.canvas_length, len(rows)
        n_canvases = math.ceil(max_new / c)
        if session is None:
            # Left-padded to the longest prompt; real tokens sit at positions 0.. in every row.
            p = max(len(r) for r in rows)
            pad = torch.tensor([p - len(r) for r in rows], dtype=torch.int64)
            ids = torch.full((b, p), pad_id if pad_id is not None else 0, dtype=torch.int64)
            for i, r in enumerate(rows):
                ids[i, p - len(r) :] = torch.tensor(r, dtype=torch.int64)
            cache = self._cache_for(b, min(p + n_canvases * c, info.max_context))
        else:  # continue the conversation: the last canvas (not cached yet), then the new prompt
            if b != 1:
                raise DgrtError("a session continues one conversation; pass one prompt.")
            ids = torch.tensor([session.pending + rows[0]], dtype=torch.int64)
            pad, cache = torch.zeros(1, dtype=torch.int64), session.cache
        needed = cache.length + ids.shape[1] + n_canvases * c
        if needed > min(info.max_context, cache.capacity):
            raise DgrtError(
                f"the context ({cache.length} cached + {ids.shape[1]} prompt tokens) plus {n_canvases} canvas(es) "
                f"of {c} exceeds the {min(info.max_context, cache.capacity)} tokens this model supports; "
                "shorten the prompt or lower max_new_tokens."
            )
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
        gen = torch.Generator().manual_seed(seed)

        positions = (cache.length + torch.arange(ids.shape[1])[None] - pad[:, None]).clamp(min=0)
        t0 = time.perf_counter()
        cache.append(self.backend.prefill(ids, positions, pad, cache.past()))
        prefill_seconds, step_seconds = [time.perf_counter() - t0], []

        eos_tensor = torch.tensor(eos, dtype=torch.int64) if eos else None
        finished = torch.zeros(b, dtype=torch.bool)
        passes = torch.zeros(b, dtype=torch.int64)
        steps_per_canvas: list[list[int]] = [[] for _ in range(b)]
        emitted: list[torch.Tensor] = []
        temperature = torch.empty(b, dtype=torch.float32)
        for k in range(n_canvases):
            positions = (cache.length + torch.arange(c))[None] - pad[:, None]
            canvas = torch.randint(0, info.vocab_size, (b, c), generator=gen)
            soft = torch.zeros(b, c, info.hidden_size, dtype=self.backend.dtype, device=self.backend.device)
            argmax, entropy = canvas, torch.zeros(b, c)
            done = torch.zeros(b, dtype=torch.bool)
            stop = (
                AdaptiveStop(sampler.stability_threshold, sampler.confidence_threshold, b, c)  # type: ignore[arg-type]
                if sampler.adaptive
                else None
            )
            canvas_passes = torch.zeros(b, dtype=torch.int64)
            for step in range(sampler.steps, 0, -1):
                canvas_passes += ~(done | finished)
                temperature.fill_(sampler.temperature(step).item())
                uniform = torch.rand((b, c), generator=gen)
                t0 = time.perf_counter()
                inputs = DenoiseInputs(canvas, soft, positions, pad, temperature, uniform)
                out = self.backend.denoise(inputs, cache.past())
                step_seconds.append(time.perf_counter() - t0)
                noise = torch.randint(0, info.vocab_size, (b, c), generator=gen)
                new_canvas = torch.where(accept(out.entropy, sampler.entropy_bound), out.sample, noise)
                new_argmax, new_entropy, new_soft = out.argmax.clone(), out.entropy.clone(), out.next_soft
                if stop is not None:
                    if done.any():  # stopped rows keep their state
                        new_argmax = torch.where(done[:, None], argmax, new_argmax)
                        new_canvas = torch.where(done[:, None], canvas, new_canvas)
                        new_entropy = torch.where(done[:, None], entropy, new_entropy)
                        new_soft = torch.where(done[:, None, None].to(soft.device), soft, new_soft)
                    done |= stop(new_argmax, new_entropy)
                canvas, argmax, entropy, soft = new_canvas, new_argmax, new_entropy, new_soft
                yield StepEvent(k, step, argmax, ~(done | finished))
                if done.all():
                    break
            passes += canvas_passes
            for i in range(b):
                if not finished[i]:  # a row that finished earlier does not denoise this canvas
                    steps_per_canvas[i].append(int(canvas_passes[i]))
            reached = (k + 1) * c >= max_new
            tokens, now_finished = finalize_canvas(argmax, finished, reached, eos_tensor, pad_id)
            emitted.append(tokens)
            yield CanvasEvent(k, tokens, self._texts(emitted, eos), now_finished)
            finished = now_finished
            if finished.all() or k == n_canvases - 1:  # the last canvas is not prefilled (as in transformers)
                break
            t0 = time.perf_counter()
            cache.append(self.backend.prefill(tokens, positions, pad, cache.past()))
            prefill_seconds.append(time.perf_counter() - t0)

        if session is not None:
            session.pending = emitted[-1][0].tolist()
        new_tokens = torch.cat(emitted, dim=1)
        valid = (new_tokens != pad_id).sum(dim=1) if pad_id is not None else torch.full((b,), new_tokens.shape[1])
        return GenerationResult(
            tokens=new_tokens.tolist(),
            texts=self._texts(emitted, eos),
            steps_per_canvas=steps_per_canvas,
            tokens_per_forward=(valid / passes.clamp(min=1)).tolist(),
            prefill_seconds=prefill_seconds,
            step_seconds=step_seconds,
            seed=seed,
        )

    def session(self, max_context: int | None = None) -> Session:
        """A conversation (one row) whose turns continue from the KV cache of the previous ones."""
        capacity = min(max_context or self.info.max_context, self.info.max_context)
        return Session(self, KVCache(self.info.layers, 1, capacity, capacity, self.backend.dtype, self.backend.device))

    # -- helpers ------------------------------------------------------------------------------------

    def _cache_for(self, batch: int, length: int) -> KVCache:
        """The cache, reset; reallocated only when a call needs a larger one or another batch size."""
        cache = self._cache
        if cache is None or cache.batch != batch or cache.capacity < length:
            self._cache = None  # free the old buffers first
            max_new = max(length, self.info.canvas_length)
            cache = KVCache(self.info.layers, batch, length, max_new, self.backend.dtype, self.backend.device)
            self._cache = cache
        cache.reset()
        return cache

    def _encode(self, prompt: Prompt, chat: bool) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise DgrtError("the prompt is empty.")
            tok = self._require_tokenizer()
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}]) if chat else tok.encode(prompt)
        elif prompt and all(isinstance(m, dict) for m in prompt):
            ids = self._require_tokenizer().apply_chat_template(list(prompt))  # type: ignore[arg-type]
        elif all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)  # type: ignore[arg-type]
        else:
            raise DgrtError("a prompt must be a string, a list of chat messages, or a list of token ids.")
        if not ids:
            raise DgrtError("the prompt is empty.")
        bad = [t for t in ids if not 0 <= t < self.info.vocab_size]
        if bad:
            raise DgrtError(f"token id {bad[0]} is outside the vocabulary (0 to {self.info.vocab_size - 1}).")
        return ids

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise DgrtError("this model has no tokenizer files; pass token ids instead of text.")
        return self.tokenizer

    def _texts(self, emitted: list[torch.Tensor], eos: list[int]) -> list[str]:
        if self.tokenizer is None:
            return []
        texts = []
        for row in torch.cat(emitted, dim=1).tolist():
            cut = next((i for i, t in enumerate(row) if t in eos), len(row))
            texts.append(self.tokenizer.decode(row[:cut]))
        return texts


class Session:
    """Turns of one conversation. The cache keeps every turn; the last canvas of a turn is prefilled at
    the start of the next, before the new prompt (transformers' multi-turn semantics)."""

    def __init__(self, generator: Generator, cache: KVCache):
        self.generator, self.cache = generator, cache
        self.pending: list[int] = []

    def generate(self, prompt: Prompt, **options: Any) -> GenerationResult:
        return self.generator.generate(prompt, session=self, **options)

    def stream(self, prompt: Prompt, **options: Any) -> Iterator[Event]:
        return self.generator.stream(prompt, session=self, **options)


def _as_batch(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """One prompt (text, chat messages, token ids) or a list of them."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, Sequence) and prompts and all(isinstance(p, dict) for p in prompts):
        return [prompts]  # type: ignore[list-item]
    if isinstance(prompts, Sequence) and prompts and all(isinstance(p, int) for p in prompts):
        return [prompts]  # type: ignore[list-item]
    if isinstance(prompts, Sequence) and prompts:
        return list(prompts)  # type: ignore[arg-type]
    raise DgrtError("no prompt given.")


def _id_list(ids: int | Sequence[int] | None) -> list[int]:
    return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
