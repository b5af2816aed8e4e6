"""Continuous batching for block diffusion: many requests share each denoise and prefill call.

    batcher = Batcher(dgrt.load("export-dir"), max_batch=8)
    job = batcher.submit(Job.create(gen, "Reverse 'abc'.", seed=0, max_new_tokens=64, listener=print))
    job.wait()                                       # or cancel() it; `listener` gets each Update
    batcher.close()

One worker thread runs the loop. Requests join at canvas boundaries and leave as soon as they finish (EOS,
`max_new_tokens`, a stop string, or cancel()), without waiting for the others. Within a batch each row has
its own seed stream (drawn only while it denoises), its own sampler settings (steps, temperature schedule,
entropy bound, adaptive stopping), its own length, EOS and stop strings. The loop is the Generator's own
canvas loop (`_denoise`, under its lock), so it is in this package, not beside it.

A request's tokens are those `Generator.generate` gives it alone with the same seed, up to the float
rounding of attention over a longer, masked past: rows share one cache timeline, each row's history
right-aligned to it (the prompts joining at a boundary are prefilled together, left-padded, then placed),
and the graphs mask what lies before it. A prompt longer than the timeline so far waits for it to grow (a
canvas at a time) or for the batch to drain.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from dgrt.errors import DgrtError
from dgrt.runtime.generator import (
    GENERATE_OPTIONS,
    Generator,
    RowDraws,
    StepEvent,
    _Request,
    _Rows,
    drain,
    prefill,
)
from dgrt.runtime.kv_cache import KVCache
from dgrt.runtime.tokenizer import Tokenizer
from dgrt.sampler import RowSettings

PROMPT_BUCKET = 32  # joining prompts are prefilled padded to a multiple of this many tokens


@dataclass(frozen=True)
class Update:
    """What a job's listener receives: a draft after a step (when asked for), then after each canvas the
    committed text so far; `finish_reason` on the last one ("stop", "length", "cancelled" or "error")."""

    kind: str  # "draft", "canvas" or "done"
    text: str  # the draft's text, or everything committed so far
    canvas_index: int
    step: int | None = None
    pieces: list[str] | None = None  # a draft's canvas, each position's token decoded alone
    accepted: list[bool] | None = None  # a draft's positions the sampler kept at this step
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Job:
    """One request: its checked options (a generate request of one row), and what the loop tracks of it."""

    request: _Request
    stop: list[str]
    listener: Callable[[Update], object]
    drafts: bool = False
    tokens: list[int] = field(default_factory=list)  # committed; EOS, a stop string and after cut off
    text: str = ""
    canvases: int = 0
    steps_per_canvas: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    submitted: float = field(default_factory=time.perf_counter)
    first_canvas_seconds: float | None = None
    _done: threading.Event = field(default_factory=threading.Event)
    _cancelled: bool = False
    _rng: torch.Generator = field(default_factory=torch.Generator)  # seeded when the job joins a batch
    _pad: int = 0  # the row's left padding in the shared timeline

    @classmethod
    def create(
        cls,
        gen: Generator,
        prompt: Any,
        *,
        listener: Callable[[Update], object],
        stop: list[str] | None = None,
        drafts: bool = False,
        **options: Any,
    ) -> Job:
        """A job for one prompt; `options` are Generator.generate's (max_new_tokens, seed, chat, eos_token_id,
        pad_token_id, sampler and the sampler settings), checked now."""
        known = {"max_new_tokens", "seed", "chat", "eos_token_id", "pad_token_id", "sampler"}
        settings: Any = {k: v for k, v in options.items() if k not in known}
        request = gen._request(
            prompt,
            None,
            GENERATE_OPTIONS,
            options.get("max_new_tokens"),
            options.get("seed"),
            options.get("chat", True),
            options.get("eos_token_id", ...),
            options.get("pad_token_id", ...),
            options.get("sampler"),
            settings,
        )
        if len(request.rows) != 1:
            raise DgrtError(f"a job is one prompt; got a batch of {len(request.rows)}.")
        return cls(request, [s for s in (stop or []) if s], listener, drafts)

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.rows[0])

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Leave at the next canvas boundary (waiting or running)."""
        self._cancelled = True

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def _notify(self, update: Update) -> None:
        """Tell the listener; a listener that fails (its client gone) must not stop the loop."""
        try:
            self.listener(update)
        except Exception:  # noqa: BLE001
            self._cancelled = True

    def _finish(self, reason: str, error: str | None = None) -> None:
        self.finish_reason = reason
        self._done.set()  # before the listener hears it: whoever handles "done" sees `finished`
        self._notify(Update("done", self.text, self.canvases, finish_reason=reason, error=error))


class Batcher:
    """Runs jobs on a Generator's backend in shared batches of at most `max_batch` rows (see the module
    docstring). The KV cache holds `max_batch` rows of `max_context` tokens (default the model's)."""

    def __init__(
        self, gen: Generator, max_batch: int = 8, max_context: int | None = None, observer: Observer | None = None
    ):
        limit = getattr(gen.backend, "max_batch", None)
        if not 1 <= max_batch <= (limit or max_batch):
            raise DgrtError(f"max_batch is {max_batch}; expected 1 to {limit or 'any'} for this backend.")
        self.gen, self.max_batch = gen, max_batch
        info = gen.info
        self.capacity = min(max_context or info.max_context, info.max_context)
        self.cache = KVCache(info.layers, max_batch, self.capacity, gen.backend.dtype, gen.backend.device)
        self.cache.set_batch(0)
        self.rows: list[Job] = []  # the batch, in cache row order
        self.waiting: list[Job] = []
        self.observer = observer or Observer()
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="dgrt-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Job:
        c = self.gen.info.canvas_length
        if job.prompt_tokens + _canvases(job, c) * c > self.capacity:
            raise DgrtError(
                f"the prompt ({job.prompt_tokens} tokens) plus {_canvases(job, c)} canvas(es) "
                f"of {c} exceeds the {self.capacity} tokens this server holds per request; shorten the prompt "
                "or lower max_tokens."
            )
        with self._wake:
            if self._closed:
                raise DgrtError("the batcher is closed.")
            self.waiting.append(job)
            self._wake.notify()
        return job

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def occupancy(self) -> int:
        return len(self.rows)

    def close(self) -> None:
        """Stop after the current canvas; jobs not finished end with finish_reason "cancelled"."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    # -- the loop ------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self.rows and not self.waiting:
                    self._wake.wait()
                if self._closed:
                    break
            try:
                with self.gen._exclusive():
                    self._admit()
                    if self.rows:
                        self._canvas()
            except Exception as e:  # a failing call ends the batch's jobs, not the server
                for job in self.rows:
                    job._finish("error", str(e))
                self.rows = []
                self.cache.set_batch(0)
        for job in self.rows + self.waiting:
            job._finish("cancelled")

    def _admit(self) -> None:
        """At a canvas boundary: waiting jobs join while the batch has room and the timeline holds their
        prompt and their canvases."""
        with self._wake:
            for job in [j for j in self.waiting if j._cancelled]:
                self.waiting.remove(job)
                job._finish("cancelled")
            candidates = list(self.waiting)
        c, cache = self.gen.info.canvas_length, self.cache
        if not candidates:
            return
        if not self.rows:
            fresh = candidates[: self.max_batch]
            length = max((j.prompt_tokens for j in fresh), default=0)
            fresh = [j for j in fresh if length + _canvases(j, c) * c <= self.capacity]
            cache.start(max((j.prompt_tokens for j in fresh), default=0))
        else:
            # First come, first served, except that a prompt longer than the timeline so far lets the jobs
            # behind it pass (the timeline grows a canvas at a time); a job that needs more timeline than is
            # left waits for the batch to drain, and stops everyone behind it joining meanwhile.
            fresh = []
            for job in candidates:
                if cache.length + _canvases(job, c) * c > self.capacity:
                    break
                if job.prompt_tokens <= cache.length and len(self.rows) + len(fresh) < self.max_batch:
                    fresh.append(job)
        if fresh:
            with self._wake:
                for job in fresh:
                    self.waiting.remove(job)
            try:
                self._place(fresh)
            except Exception as e:
                for job in fresh:
                    if job not in self.rows:
                        job._finish("error", str(e))
                raise

    def _place(self, jobs: list[Job]) -> None:
        """Prefill the joining prompts (one call, left-padded to the longest, as generate prefills a batch),
        then put each in the next row, right-aligned to the timeline."""
        gen, cache = self.gen, self.cache
        # Padded up to a multiple of PROMPT_BUCKET: a runtime reuses the plans of shapes it has seen.
        p = -(-max(j.prompt_tokens for j in jobs) // PROMPT_BUCKET) * PROMPT_BUCKET
        pad = torch.tensor([p - j.prompt_tokens for j in jobs], dtype=torch.int64)
        ids = torch.zeros(len(jobs), p, dtype=torch.int64)
        for i, job in enumerate(jobs):
            ids[i, pad[i] :] = torch.tensor(job.request.rows[0], dtype=torch.int64)
        joining = KVCache(gen.info.layers, len(jobs), p, gen.backend.dtype, gen.backend.device)
        positions = (torch.arange(p)[None] - pad[:, None]).clamp(min=0)
        t0 = time.perf_counter()
        prefill(gen.backend, joining, ids, positions, pad, gen.info.prefill_chunk)
        self.observer.prefill(time.perf_counter() - t0, len(jobs))
        for i, job in enumerate(jobs):
            row = len(self.rows)
            cache.set_batch(row + 1)
            cache.place_row(row, joining, i, job.prompt_tokens)
            job._pad = cache.length - job.prompt_tokens
            job._rng.manual_seed(job.request.seed)
            self.rows.append(job)

    def _canvas(self) -> None:
        """Denoise one canvas for every row, commit it, let finished rows leave, prefill the rest."""
        gen, rows, c = self.gen, self.rows, self.gen.info.canvas_length
        b = len(rows)
        state = _Rows(
            pad=torch.tensor([j._pad for j in rows], dtype=torch.int64),
            cache=self.cache,
            draws=RowDraws([j._rng for j in rows]),
            settings=RowSettings([j.request.sampler for j in rows]),
            finished=torch.zeros(b, dtype=torch.bool),  # finished rows left at the last commit
        )
        positions = state.positions(c)
        draft = drain(gen._denoise(state, 0, positions), lambda e: self._drafts(e, state.settings.most_steps - e.step))
        for seconds in state.step_seconds:
            self.observer.step(seconds, b)
        for i, job in enumerate(rows):
            self._commit(job, draft[i : i + 1], state.steps_per_canvas[i])
        staying = [j for j in rows if not j.finished and not j._cancelled]
        for job in rows:
            if job._cancelled and not job.finished:
                job._finish("cancelled")
        if len(staying) < len(rows):
            self._compact(staying)
        if staying:
            t0 = time.perf_counter()
            kept = [i for i, j in enumerate(rows) if j in staying]  # rows going on have no EOS: draft = commit
            pad = torch.tensor([j._pad for j in staying], dtype=torch.int64)
            prefill(gen.backend, self.cache, draft[kept], positions[kept], pad, gen.info.prefill_chunk)
            self.observer.prefill(time.perf_counter() - t0, len(kept))

    def _drafts(self, event: StepEvent, iteration: int) -> None:
        tok = self.gen.tokenizer
        for i, job in enumerate(self.rows):
            if job.drafts and tok is not None and bool(event.active[i]):
                ids = event.draft[i].tolist()
                text = job.text + tok.decode(_until_eos(ids, job.request.eos))
                step = job.request.sampler.steps - iteration
                pieces, accepted = [tok.decode([t]) for t in ids], event.accepted[i].tolist()
                job._notify(Update("draft", text, job.canvases, step=step, pieces=pieces, accepted=accepted))

    def _commit(self, job: Job, draft: torch.Tensor, passes: list[int]) -> None:
        """The row's canvas as generate commits it (its tokens up to an EOS); the job finishes on EOS, its
        length or a stop string."""
        c, request = self.gen.info.canvas_length, job.request
        reached = (job.canvases + 1) * c >= request.max_new_tokens
        job.canvases += 1
        job.steps_per_canvas += passes
        self.observer.canvas(passes[0] if passes else 0)
        row = draft[0].tolist()
        cut = _until_eos(row, request.eos)
        room = request.max_new_tokens - len(job.tokens)
        job.tokens += cut[:room]
        eos = len(cut) < len(row) and len(cut) < room  # an EOS within the tokens the request may have
        tok = self.gen.tokenizer
        text = tok.decode(job.tokens) if tok is not None else ""
        if job.first_canvas_seconds is None:
            job.first_canvas_seconds = time.perf_counter() - job.submitted
        stop_at = min((i for i in (text.find(s) for s in job.stop) if i >= 0), default=-1)
        if stop_at >= 0 and tok is not None:  # (without a tokenizer there is no text to find it in)
            job.text = text[:stop_at]
            job.tokens = job.tokens[: _tokens_for(tok, job.tokens, stop_at)]  # what usage counts
            job._finish("stop")
        elif eos or reached:
            job.text = text
            job._finish("stop" if eos else "length")
        else:
            job.text = _settled(text, job.stop)
            job._notify(Update("canvas", job.text, job.canvases - 1))

    def _compact(self, staying: list[Job]) -> None:
        """Rows that stay move up over the ones that left, keeping their order; the timeline then drops the
        padding all of them have (a long prompt that left frees its length for new ones)."""
        for dst, job in enumerate(staying):
            src = self.rows.index(job)
            if src != dst:
                self.cache.move_row(src, dst)
        self.rows = staying
        self.cache.set_batch(len(staying))
        unused = min((j._pad for j in staying), default=0)
        if unused:
            self.cache.trim(unused)
            for job in staying:
                job._pad -= unused


class Observer:
    """What the loop reports as it runs (for a server's metrics); the default records nothing. Called on
    the loop's thread."""

    def prefill(self, seconds: float, rows: int) -> None: ...

    def step(self, seconds: float, rows: int) -> None: ...

    def canvas(self, steps: int) -> None: ...


def _canvases(job: Job, canvas: int) -> int:
    return math.ceil(job.request.max_new_tokens / canvas)


def _until_eos(row: list[int], eos: list[int]) -> list[int]:
    return row[: next((i for i, t in enumerate(row) if t in eos), len(row))]


def _tokens_for(tok: Tokenizer, tokens: list[int], chars: int) -> int:
    """The fewest leading tokens whose text holds the first `chars` characters of the tokens' text."""
    lo, hi = 0, len(tokens)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if len(tok.decode(tokens[:mid])) < chars else (lo, mid)
    return lo


def _settled(text: str, stops: list[str]) -> str:
    """What of a growing text can be shown for good: without a character still being decoded (U+FFFD)
    or an ending that may be the start of a stop string."""
    text = text.rstrip("\ufffd")
    hold = max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
    return text[: len(text) - hold]
