"""The block-diffusion loop over a backend: what `dgrt.load(...)` returns.

    gen = dgrt.load("export-dir")                       # or a checkpoint folder, backend="torch"
    result = gen.generate("Reverse 'abc'.", seed=0)     # text in (chat template applied), text out
    for event in gen.stream(["a", "b"], seed=0): ...    # drafts after each step, text after each canvas

The loop is transformers' DiffusionGemma generate (docs/reference.md): prompt prefill, canvases of uniform
random tokens denoised for up to `steps` steps with the linear temperature schedule, entropy-bound
acceptance and renoising, per-row adaptive stopping, the last step's argmax emitted (EOS/pad applied)
and prefilled at the positions it was denoised at. Random numbers come from one seeded generator in a
fixed order (canvas, then per step the sampling uniforms and the renoise tokens).
"""

from __future__ import annotations

import inspect
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from collections.abc import Generator as PyGenerator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field, fields, replace
from numbers import Integral
from types import EllipsisType
from typing import Any, TypeVar, Unpack

import numpy as np
import torch

from dgrt.errors import MAX_SEED, DgrtError
from dgrt.runtime.backends import Backend, DenoiseInputs, StepOutputs
from dgrt.runtime.kv_cache import KVCache, LayerShape
from dgrt.runtime.tokenizer import Tokenizer
from dgrt.sampler import RowSettings, SamplerConfig, SamplerSettings, accept, finalize_canvas, show

Message = dict[str, str]
Prompt = str | Sequence[Message] | Sequence[int] | np.ndarray | torch.Tensor
TokenIds = int | Sequence[int]

PROMPT_TYPES = (
    "a prompt is a str, a list of chat messages (dicts with str 'role' and 'content'), a list or tuple of int "
    "token ids, or a 1-D integer numpy array or torch tensor, and a batch is a list of prompts or a 2-D integer "
    "array or tensor"
)
SAMPLER_SETTINGS = tuple(f.name for f in fields(SamplerConfig))
E = TypeVar("E")
R = TypeVar("R")


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
    prefill_chunk: int  # most tokens one prefill call takes


@dataclass
class StepEvent:
    """After each denoise step: the current draft (argmax) of the canvas being refined."""

    canvas_index: int
    step: int  # counts down from steps to 1
    draft: torch.Tensor  # [B, C]
    active: torch.Tensor  # [B] rows this step denoised (a row that stopped earlier keeps its last draft)
    accepted: torch.Tensor  # [B, C] positions the sampler kept this step (entropy within its bound); the rest renoised


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

    @classmethod
    def concat(cls, parts: list[GenerationResult]) -> GenerationResult:
        """The results of batches run in turn, as one: rows in order, timings one after the other."""
        return cls(
            tokens=[row for p in parts for row in p.tokens],
            texts=[text for p in parts for text in p.texts],
            steps_per_canvas=[row for p in parts for row in p.steps_per_canvas],
            tokens_per_forward=[x for p in parts for x in p.tokens_per_forward],
            prefill_seconds=[t for p in parts for t in p.prefill_seconds],
            step_seconds=[t for p in parts for t in p.step_seconds],
            seed=parts[0].seed,
        )

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


@dataclass(frozen=True)
class _Request:
    """One call's arguments, checked: prompt rows as token ids, and every option resolved."""

    rows: list[list[int]]
    sampler: SamplerConfig
    max_new_tokens: int
    seed: int
    eos: list[int]
    pad_id: int | None


class Draws:
    """The random numbers of a batch, drawn in the loop's fixed order (a canvas, then per step the
    sampling uniforms and the renoise tokens): from one seeded stream for the whole batch, as transformers
    draws them. Rows not `active` still take part in the shared stream's draws."""

    def __init__(self, seed: int):
        self.rng = torch.Generator().manual_seed(seed)

    def tokens(self, shape: tuple[int, int], vocab: int, active: torch.Tensor) -> torch.Tensor:
        return torch.randint(0, vocab, shape, generator=self.rng)

    def uniform(self, shape: tuple[int, int], active: torch.Tensor) -> torch.Tensor:
        return torch.rand(shape, generator=self.rng)


class RowDraws(Draws):
    """One seeded stream per row, drawn only while the row is active: a row's numbers are those it would
    draw alone (batch 1, same seed), whoever shares its batch and however long they denoise."""

    def __init__(self, rngs: list[torch.Generator]):
        self.rngs = rngs

    def tokens(self, shape: tuple[int, int], vocab: int, active: torch.Tensor) -> torch.Tensor:
        return self._rows(shape, active, torch.int64, lambda rng: torch.randint(0, vocab, (1, shape[1]), generator=rng))

    def uniform(self, shape: tuple[int, int], active: torch.Tensor) -> torch.Tensor:
        return self._rows(shape, active, torch.float32, lambda rng: torch.rand((1, shape[1]), generator=rng))

    def _rows(
        self,
        shape: tuple[int, int],
        active: torch.Tensor,
        dtype: torch.dtype,
        draw: Callable[[torch.Generator], torch.Tensor],
    ) -> torch.Tensor:
        out = torch.zeros(shape, dtype=dtype)  # an inactive row's numbers are never read
        for i, rng in enumerate(self.rngs):
            if active[i]:
                out[i] = draw(rng)[0]
        return out


@dataclass
class _Rows:
    """The rows being denoised and their state across canvases: where each sits in the cache, its random
    stream and sampler settings, and the tallies a result reports. `generate` makes one per call; the
    batcher one per canvas of whoever is in its batch."""

    pad: torch.Tensor  # [B] left padding of each row
    cache: KVCache
    draws: Draws
    settings: RowSettings  # each row's sampler settings (generate's rows share their request's)
    finished: torch.Tensor  # [B] rows done (EOS or max_new_tokens) in a committed canvas
    temperature: torch.Tensor = field(init=False)  # [B] one buffer, refilled at each step
    passes: torch.Tensor = field(init=False)  # [B] denoise passes each row took part in
    steps_per_canvas: list[list[int]] = field(init=False)
    step_seconds: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        b = len(self.pad)
        self.temperature = torch.empty(b, dtype=torch.float32)
        self.passes = torch.zeros(b, dtype=torch.int64)
        self.steps_per_canvas = [[] for _ in range(b)]

    def positions(self, length: int) -> torch.Tensor:
        """[B, length] positions of the next tokens: each row counts from its first real token (its left
        padding sits at 0)."""
        return (self.cache.length + torch.arange(length)[None] - self.pad[:, None]).clamp(min=0)

    def count(self, passes: torch.Tensor) -> None:
        """Tally one canvas's denoise passes per row; a row finished before did not denoise it."""
        self.passes += passes
        for i, n in enumerate(passes.tolist()):
            if not self.finished[i]:
                self.steps_per_canvas[i].append(n)


@dataclass
class _Call:
    """One `generate`/`stream` call while the loop runs it: its request, what it prefills first, its rows
    and the canvases committed so far."""

    request: _Request
    ids: torch.Tensor  # [B, P] prefilled first: the prompts left-padded, or a turn's pending canvas and prompt
    canvases: int
    eos: torch.Tensor | None
    rows: _Rows
    emitted: list[torch.Tensor] = field(default_factory=list)  # committed canvases, [B, C] each
    prefill_seconds: list[float] = field(default_factory=list)


@dataclass
class _Draft:
    """A canvas being denoised: the tokens and self-conditioning embeddings the next step reads, and the
    last step's argmax (the draft) and entropy."""

    canvas: torch.Tensor  # [B, C]
    soft: torch.Tensor  # [B, C, H] on the backend's device
    argmax: torch.Tensor  # [B, C]
    entropy: torch.Tensor  # [B, C]

    def keep(self, rows: torch.Tensor, new: _Draft) -> _Draft:
        """`new`, except that `rows` [B] keep this draft's state."""
        keep = rows[:, None]
        return _Draft(
            torch.where(keep, self.canvas, new.canvas),
            torch.where(rows[:, None, None].to(self.soft.device), self.soft, new.soft),
            torch.where(keep, self.argmax, new.argmax),
            torch.where(keep, self.entropy, new.entropy),
        )


class Generator:
    """Runs block diffusion on a backend. Holds the KV cache, allocated once at the size calls need.

    Threads may share one Generator (and its sessions): calls run one at a time, each as it would alone.
    """

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
        # Calls are serialised: from its prefill to its last canvas a call owns the KV cache, the backend's
        # IO bindings and output buffers (and on a GPU its captured graphs), so giving each concurrent call
        # copies of these would multiply the memory a loaded model holds by the number of threads, for no
        # gain on a device that runs one graph at a time anyway. A plain Lock (not an RLock): a stream may
        # be closed or garbage-collected on another thread than the one that opened it, and re-entry from
        # the owning thread must be an error (see _exclusive), not a silent nested call over its cache.
        self._lock = threading.Lock()
        self._owner: threading.Thread | None = None

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of the KV cache the last call allocated (kept for the next one); 0 before the first."""
        cache = self._cache
        return 0 if cache is None else cache.nbytes

    def close(self) -> None:
        with self._exclusive():
            self.backend.close()
            self._cache = None

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public API ---------------------------------------------------------------------------------

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        *,
        max_new_tokens: int | None = None,
        seed: int | None = None,
        chat: bool = True,
        eos_token_id: TokenIds | None | EllipsisType = ...,
        pad_token_id: int | None | EllipsisType = ...,
        sampler: SamplerConfig | None = None,
        on_event: Callable[[Event], object] | None = None,
        **settings: Unpack[SamplerSettings],
    ) -> GenerationResult:
        """Generate for one prompt or a batch.

        prompts: a str (the chat template is applied unless chat=False), a list of chat messages (dicts
        with str "role" and "content"), token ids (a list or tuple of ints, or a 1-D integer numpy array or
        torch tensor), or a batch: a list of any of these, or a 2-D integer array or tensor. Anything else
        (bytes, floats, bools) is refused, as is text with a lone surrogate (the tokenizer cannot encode it).

        max_new_tokens: 1 to the model's context (None: generation_config.json's, else 256).
        seed: 0 to 2**63 - 1 (None draws one; the result says which).
        eos_token_id: an id, a list of ids, or None for no EOS; pad_token_id: an id or None. Left out
        (`...`), each is generation_config.json's.
        sampler: a SamplerConfig to run instead of the model's (`gen.sampler`), e.g.
        `gen.sampler.with_overrides(steps=16)`.
        on_event: called with every StepEvent and CanvasEvent (it must not call this Generator).
        **settings: SamplerConfig's fields, each replacing the sampler's: steps (1 to 10000), t_min, t_max
        (0 <= t_min < t_max), entropy_bound (> 0), stability_threshold (0 to steps) and
        confidence_threshold (> 0); either threshold None turns adaptive stopping off.

        Every option is range-checked; a misspelt name is refused with the list of accepted ones (and
        flagged by mypy, as is a value of the wrong type).

        A batch larger than the backend takes (its `max_batch`, e.g. a TensorRT engine's profile) runs as
        several batches in turn, each from `seed`; on_event then sees each one's events in turn.
        """
        request = self._request(
            prompts, None, GENERATE_OPTIONS, max_new_tokens, seed, chat, eos_token_id, pad_token_id, sampler, settings
        )
        limit = getattr(self.backend, "max_batch", None)
        if limit is None or len(request.rows) <= limit:
            return self._generate(request, None, on_event)
        # A batch larger than the backend takes (a TensorRT profile's max batch) runs as several in turn.
        parts = [
            self._generate(replace(request, rows=request.rows[i : i + limit]), None, on_event)
            for i in range(0, len(request.rows), limit)
        ]
        return GenerationResult.concat(parts)

    def stream(
        self,
        prompts: Prompt | Sequence[Prompt],
        *,
        max_new_tokens: int | None = None,
        seed: int | None = None,
        chat: bool = True,
        eos_token_id: TokenIds | None | EllipsisType = ...,
        pad_token_id: int | None | EllipsisType = ...,
        sampler: SamplerConfig | None = None,
        **settings: Unpack[SamplerSettings],
    ) -> PyGenerator[Event, None, GenerationResult]:
        """Yield a StepEvent after each denoise step and a CanvasEvent after each canvas; the generator's
        return value is the GenerationResult. Prompts and options as for `generate`, checked when stream
        is called (not at the first event).

        The stream holds the Generator from its first event until it is exhausted, closed or
        garbage-collected: other threads' calls wait meanwhile, and this thread's are refused.
        """
        request = self._request(
            prompts, None, STREAM_OPTIONS, max_new_tokens, seed, chat, eos_token_id, pad_token_id, sampler, settings
        )
        limit = getattr(self.backend, "max_batch", None)
        if limit is not None and len(request.rows) > limit:
            raise DgrtError(
                f"the {self.backend.name} backend takes at most {limit} rows at a time and a stream reports one "
                f"batch; stream at most {limit} prompts (generate splits larger batches itself)."
            )
        return self._serialised(request, None)

    def session(self, max_context: int | None = None) -> Session:
        """A conversation (one row) whose turns continue from the KV cache of the previous ones."""
        if max_context is not None and (not _is_int(max_context) or max_context < 1):
            raise DgrtError(f"max_context is {show(max_context)}, expected a positive integer or None (the model's).")
        capacity = min(max_context or self.info.max_context, self.info.max_context)
        return Session(self, KVCache(self.info.layers, 1, capacity, self.backend.dtype, self.backend.device))

    # -- one call, serialised -----------------------------------------------------------------------

    def _generate(self, request: _Request, session: Session | None, on_event: Any) -> GenerationResult:
        if on_event is not None and not callable(on_event):
            raise DgrtError(f"on_event is {show(on_event)}, expected a callable taking each event, or None.")
        # Closed explicitly: if on_event raises, the caller's traceback keeps this frame (and an unclosed
        # stream, which would keep holding the Generator) alive.
        with closing(self._serialised(request, session)) as events:
            return drain(events, on_event)

    def _serialised(self, request: _Request, session: Session | None) -> PyGenerator[Event, None, GenerationResult]:
        with self._exclusive():
            return (yield from self._run(request, session))

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold the Generator for one call (see __init__). The owner check needs no lock: only this
        thread can have made itself the owner."""
        me = threading.current_thread()
        if self._owner is me:
            raise DgrtError(
                "this thread has a stream open on this model (or is inside an on_event callback); "
                "finish or close() that stream before making another call."
            )
        with self._lock:
            self._owner = me
            try:
                yield
            finally:
                self._owner = None

    def _request(
        self,
        prompts: Any,
        session: Session | None,
        accepted: tuple[str, ...],
        max_new_tokens: int | None,
        seed: int | None,
        chat: bool,
        eos_token_id: TokenIds | None | EllipsisType,
        pad_token_id: int | None | EllipsisType,
        sampler: SamplerConfig | None,
        settings: SamplerSettings,
    ) -> _Request:
        """The arguments of a call (`accepted` names its options, for the error), checked and resolved."""
        unknown = sorted(set(settings) - set(SAMPLER_SETTINGS))  # every misspelt keyword lands in settings
        if unknown:
            raise DgrtError(f"unknown option(s) {unknown}; the accepted options are {', '.join(accepted)}.")
        if not isinstance(chat, bool):
            raise DgrtError(f"chat is {show(chat)}, expected True (apply the chat template to text) or False.")
        rows = [self._encode(p, chat) for p in _as_batch(prompts)]
        if session is not None and len(rows) != 1:
            raise DgrtError("a session continues one conversation; pass one prompt.")
        if sampler is not None and not isinstance(sampler, SamplerConfig):
            raise DgrtError(
                f"sampler is {show(sampler)}, expected a SamplerConfig (e.g. gen.sampler.with_overrides(steps=16)) "
                "or None (the model's)."
            )
        eos = self.eos_token_id if eos_token_id is ... else eos_token_id
        pad_id = self.pad_token_id if pad_token_id is ... else pad_token_id
        return _Request(
            rows=rows,
            sampler=(self.sampler if sampler is None else sampler).with_overrides(**settings),  # checks a given one
            max_new_tokens=self.max_new_tokens if max_new_tokens is None else self._max_new_tokens(max_new_tokens),
            seed=int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else _seed(seed),
            eos=[
                self._token_id("eos_token_id", t, ", a list of them, or None")
                for t in ([] if eos is None else eos if isinstance(eos, (list, tuple)) else [eos])
            ],
            pad_id=None if pad_id is None else self._token_id("pad_token_id", pad_id, ", or None"),
        )

    def _max_new_tokens(self, value: Any) -> int:
        top = self.info.max_context
        if not _is_int(value) or not 1 <= value <= top:
            raise DgrtError(
                f"max_new_tokens is {show(value)}, expected an integer from 1 to {top} (the model's context)."
            )
        return int(value)

    def _token_id(self, name: str, value: Any, alternatives: str) -> int:
        top = self.info.vocab_size - 1
        if not _is_int(value) or not 0 <= value <= top:
            raise DgrtError(f"{name} is {show(value)}, expected a token id (an integer from 0 to {top}){alternatives}.")
        return int(value)

    # -- the loop: prepare, prefill, then per canvas denoise and commit ------------------------------

    def _run(self, request: _Request, session: Session | None) -> PyGenerator[Event, None, GenerationResult]:
        call = self._prepare(request, session)
        self._prefill(call, call.ids, call.rows.positions(call.ids.shape[1]))
        for k in range(call.canvases):
            positions = call.rows.positions(self.info.canvas_length)
            draft = yield from self._denoise(call.rows, k, positions)
            yield self._commit(call, k, draft)
            # The last canvas is not prefilled (as in transformers).
            if call.rows.finished.all() or k == call.canvases - 1:
                break
            self._prefill(call, call.emitted[-1], positions)
        return self._result(call, session)

    def _prepare(self, request: _Request, session: Session | None) -> _Call:
        """The batch to prefill and its cache, with the context checked. Prompts are left-padded to the
        longest; a session's turn is its pending canvas (not cached yet), then the new prompt."""
        rows, b, c = request.rows, len(request.rows), self.info.canvas_length
        canvases = math.ceil(request.max_new_tokens / c)
        if session is None:
            p = max(len(r) for r in rows)
            pad = torch.tensor([p - len(r) for r in rows], dtype=torch.int64)
            ids = torch.full((b, p), request.pad_id if request.pad_id is not None else 0, dtype=torch.int64)
            for i, r in enumerate(rows):
                ids[i, p - len(r) :] = torch.tensor(r, dtype=torch.int64)
            cache = self._cache_for(b, min(p + canvases * c, self.info.max_context))
        else:
            ids = torch.tensor([session.pending + rows[0]], dtype=torch.int64)
            pad, cache = torch.zeros(1, dtype=torch.int64), session.cache
        limit = min(self.info.max_context, cache.capacity)
        if cache.length + ids.shape[1] + canvases * c > limit:
            raise DgrtError(
                f"the context ({cache.length} cached + {ids.shape[1]} prompt tokens) plus {canvases} canvas(es) "
                f"of {c} exceeds the {limit} tokens this model supports; shorten the prompt or lower max_new_tokens."
            )
        settings, finished = RowSettings([request.sampler] * b), torch.zeros(b, dtype=torch.bool)
        state = _Rows(pad, cache, Draws(request.seed), settings, finished)
        eos = torch.tensor(request.eos, dtype=torch.int64) if request.eos else None
        return _Call(request, ids, canvases, eos, state)

    def _denoise(self, rows: _Rows, k: int, positions: torch.Tensor) -> PyGenerator[StepEvent, None, torch.Tensor]:
        """Canvas k, from uniform random tokens, for up to `steps` steps: yields each step's draft and
        returns the last. A row that stops adaptively, or whose own steps are over, keeps its state while
        the others go on (rows' settings may differ: see RowSettings)."""
        settings, vocab, (b, c) = rows.settings, self.info.vocab_size, positions.shape
        canvas = rows.draws.tokens((b, c), vocab, ~rows.finished)
        soft = torch.zeros(b, c, self.info.hidden_size, dtype=self.backend.dtype, device=self.backend.device)
        draft = _Draft(canvas, soft, canvas, torch.zeros(b, c))
        stop = settings.adaptive_stop(c)
        done = torch.zeros(b, dtype=torch.bool)  # rows stopped in this canvas
        passes = torch.zeros(b, dtype=torch.int64)
        most = settings.most_steps
        for i in range(most):
            done |= i >= settings.steps
            if done.all():  # every row stopped adaptively or ran its steps
                break
            active = ~(done | rows.finished)
            passes += active
            settings.fill_temperature(rows.temperature, i)
            uniform = rows.draws.uniform((b, c), active)
            inputs = DenoiseInputs(draft.canvas, draft.soft, positions, rows.pad, rows.temperature, uniform)
            out = self._step(rows, inputs)
            noise = rows.draws.tokens((b, c), vocab, active)
            kept = accept(out.entropy, settings.entropy_bound)
            renoised = torch.where(kept, out.sample, noise)
            new = _Draft(renoised, out.next_soft, out.argmax.clone(), out.entropy.clone())
            draft = draft.keep(done, new) if done.any() else new  # stopped rows keep their state
            if stop is not None:
                done |= stop(draft.argmax, draft.entropy)
            yield StepEvent(k, most - i, draft.argmax, active, kept)
        rows.count(passes)
        return draft.argmax

    def _commit(self, call: _Call, k: int, draft: torch.Tensor) -> CanvasEvent:
        """Canvas k's tokens as transformers emits them (EOS and pad applied); marks the rows finished now."""
        reached = (k + 1) * self.info.canvas_length >= call.request.max_new_tokens
        rows = call.rows
        tokens, rows.finished = finalize_canvas(draft, rows.finished, reached, call.eos, call.request.pad_id)
        call.emitted.append(tokens)
        return CanvasEvent(k, tokens, self._texts(call.emitted, call.request.eos), rows.finished)

    def _result(self, call: _Call, session: Session | None) -> GenerationResult:
        if session is not None:  # its last canvas is prefilled at the start of the next turn
            session.pending = call.emitted[-1][0].tolist()
        tokens, pad_id = torch.cat(call.emitted, dim=1), call.request.pad_id
        valid = (tokens != pad_id).sum(dim=1) if pad_id is not None else torch.full((len(tokens),), tokens.shape[1])
        return GenerationResult(
            tokens=tokens.tolist(),
            texts=self._texts(call.emitted, call.request.eos),
            steps_per_canvas=call.rows.steps_per_canvas,
            tokens_per_forward=(valid / call.rows.passes.clamp(min=1)).tolist(),
            prefill_seconds=call.prefill_seconds,
            step_seconds=call.rows.step_seconds,
            seed=call.request.seed,
        )

    def _prefill(self, call: _Call, ids: torch.Tensor, positions: torch.Tensor) -> None:
        t0 = time.perf_counter()
        prefill(self.backend, call.rows.cache, ids, positions, call.rows.pad, self.info.prefill_chunk)
        call.prefill_seconds.append(time.perf_counter() - t0)

    def _step(self, rows: _Rows, inputs: DenoiseInputs) -> StepOutputs:
        t0 = time.perf_counter()
        out = self.backend.denoise(inputs, rows.cache.past())
        rows.step_seconds.append(time.perf_counter() - t0)
        return out

    # -- helpers ------------------------------------------------------------------------------------

    def _cache_for(self, batch: int, length: int) -> KVCache:
        """The cache, reset; reallocated only when a call needs a larger one or another batch size."""
        cache = self._cache
        if cache is None or cache.batch != batch or cache.capacity < length:
            self._cache = None  # free the old buffers first
            cache = KVCache(self.info.layers, batch, length, self.backend.dtype, self.backend.device)
            self._cache = cache
        cache.reset()
        return cache

    def _encode(self, prompt: Any, chat: bool) -> list[int]:
        """One prompt (see `stream`) -> token ids within the vocabulary."""
        if isinstance(prompt, str):
            if not prompt:
                raise DgrtError("the prompt is empty.")
            _check_text(prompt, "the prompt")
            tok = self._require_tokenizer()
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}]) if chat else tok.encode(prompt)
        elif isinstance(prompt, (np.ndarray, torch.Tensor)) and prompt.ndim == 1 and _integer_array(prompt):
            ids = prompt.tolist()
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            for i, message in enumerate(prompt):
                if not ({"role", "content"} <= message.keys() and all(isinstance(v, str) for v in message.values())):
                    raise DgrtError(
                        f"chat message {i} is {show(message)}, expected a dict with str 'role' and 'content'."
                    )
                _check_text(message["content"], f"chat message {i}")
            ids = self._require_tokenizer().apply_chat_template(list(prompt))
        elif isinstance(prompt, (list, tuple)) and all(_is_int(t) for t in prompt):
            ids = [int(t) for t in prompt]
        else:
            raise DgrtError(f"{PROMPT_TYPES}; got {_describe(prompt)}.")
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


def drain(events: PyGenerator[E, None, R], on_event: Callable[[E], object] | None) -> R:
    """Run a generator of events to its end, handing each event to `on_event`; returns its return value."""
    while True:
        try:
            event = next(events)
        except StopIteration as done:
            return done.value
        if on_event is not None:
            on_event(event)


def prefill(
    backend: Backend, cache: KVCache, ids: torch.Tensor, positions: torch.Tensor, pad: torch.Tensor, chunk: int
) -> None:
    """Prefill tokens [B, S] at positions [B, S] into the cache, at most `chunk` tokens per call: each
    chunk attends to the cache so far (sliding layers to their last window - 1 tokens), so the K/V are
    those of one call over all S tokens, and a call's memory grows with the chunk, not the prompt."""
    for start in range(0, ids.shape[1], chunk):
        part = slice(start, start + chunk)
        # Not kept in a variable: a chunk's K/V is freed before the next chunk's call, not during it.
        cache.append(backend.prefill(ids[:, part].contiguous(), positions[:, part].contiguous(), pad, cache.past()))


class Session:
    """Turns of one conversation. The cache keeps every turn; the last canvas of a turn is prefilled at
    the start of the next, before the new prompt (transformers' multi-turn semantics). A session may be
    used from several threads: its turns run one at a time, like every call on its Generator."""

    def __init__(self, generator: Generator, cache: KVCache):
        self.generator, self.cache = generator, cache
        self.pending: list[int] = []

    def generate(
        self,
        prompt: Prompt,
        *,
        max_new_tokens: int | None = None,
        seed: int | None = None,
        chat: bool = True,
        eos_token_id: TokenIds | None | EllipsisType = ...,
        pad_token_id: int | None | EllipsisType = ...,
        sampler: SamplerConfig | None = None,
        on_event: Callable[[Event], object] | None = None,
        **settings: Unpack[SamplerSettings],
    ) -> GenerationResult:
        """The next turn; prompt and options as for Generator.generate (one prompt, not a batch)."""
        gen = self.generator
        request = gen._request(
            prompt, self, GENERATE_OPTIONS, max_new_tokens, seed, chat, eos_token_id, pad_token_id, sampler, settings
        )
        return gen._generate(request, self, on_event)

    def stream(
        self,
        prompt: Prompt,
        *,
        max_new_tokens: int | None = None,
        seed: int | None = None,
        chat: bool = True,
        eos_token_id: TokenIds | None | EllipsisType = ...,
        pad_token_id: int | None | EllipsisType = ...,
        sampler: SamplerConfig | None = None,
        **settings: Unpack[SamplerSettings],
    ) -> PyGenerator[Event, None, GenerationResult]:
        """The next turn's events; prompt and options as for Generator.stream (one prompt, not a batch)."""
        gen = self.generator
        request = gen._request(
            prompt, self, STREAM_OPTIONS, max_new_tokens, seed, chat, eos_token_id, pad_token_id, sampler, settings
        )
        return gen._serialised(request, self)


def _options(method: Callable[..., Any]) -> tuple[str, ...]:
    """The option names a call accepts, for its error message: its keyword-only parameters, then the
    sampler settings its **settings takes."""
    params = inspect.signature(method).parameters.values()
    return (*(p.name for p in params if p.kind is p.KEYWORD_ONLY), *SAMPLER_SETTINGS)


GENERATE_OPTIONS = _options(Generator.generate)
STREAM_OPTIONS = _options(Generator.stream)


def _as_batch(prompts: Any) -> list[Any]:
    """One prompt or a batch (see Generator.stream) -> the list of prompts; each is checked by _encode."""
    if isinstance(prompts, (np.ndarray, torch.Tensor)) and prompts.ndim == 2:
        if not len(prompts):
            raise DgrtError("no prompt given.")
        return list(prompts)
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise DgrtError("no prompt given.")
        if all(isinstance(p, (str, list, tuple, np.ndarray, torch.Tensor)) for p in prompts):
            return list(prompts)  # a batch (a list of chat messages or token ids holds dicts or ints)
    return [prompts]


def _is_int(value: Any) -> bool:
    """An integer (numpy's too), not a bool: True is not token 1."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def _integer_array(array: np.ndarray | torch.Tensor) -> bool:
    if isinstance(array, torch.Tensor):
        return not (array.dtype.is_floating_point or array.dtype.is_complex or array.dtype == torch.bool)
    return bool(np.issubdtype(array.dtype, np.integer))


def _describe(value: Any) -> str:
    """What a refused prompt is, for the error: its type, and what a list or array holds."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        kind = "numpy array" if isinstance(value, np.ndarray) else "torch tensor"
        return f"a {value.ndim}-D {str(value.dtype).removeprefix('torch.')} {kind}"
    if isinstance(value, (list, tuple)):
        held = sorted({type(v).__name__ for v in value})
        return f"a {type(value).__name__} of {', '.join(held)}" if held else f"an empty {type(value).__name__}"
    return type(value).__name__


def _check_text(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DgrtError(
            f"{what} holds {text[e.start]!r} at character {e.start}, a lone surrogate that the tokenizer cannot "
            "encode (a command-line argument that is not valid UTF-8 arrives as one); pass valid Unicode text."
        ) from None


def _seed(value: Any) -> int:
    if not _is_int(value) or not 0 <= value <= MAX_SEED:
        raise DgrtError(f"seed is {show(value)}, expected an integer from 0 to 2**63 - 1 (or None for a random one).")
    return int(value)
