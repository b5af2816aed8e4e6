"""One loaded model shared by threads: every call gives what it gives alone, and a thread that re-enters
the Generator it is streaming from gets an error instead of a deadlock."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import dgrt
from dgrt.errors import DgrtError
from dgrt.runtime.generator import Generator, StepEvent

OPTIONS: dict[str, Any] = {"steps": 2, "max_new_tokens": 32}
PROMPTS: list[Any] = [
    "Hi",
    "Reverse the string 'diffusion'.",
    [5, 6, 7],
    ["a", "a longer second row"],  # a batch of two: another cache shape than its neighbours
    [{"role": "user", "content": "Sort: cba"}],
    "x" * 40,
]
THREADS, CALLS = 8, 3


@pytest.fixture(params=["torch", "onnxruntime"])
def gen(request: pytest.FixtureRequest, tiny_ckpt: Path) -> Generator:
    path = tiny_ckpt if request.param == "torch" else request.getfixturevalue("exports")["tiny"]
    return dgrt.load(path, backend=request.param)


def call(gen: Generator, thread: int, index: int) -> list[Any]:
    """Thread `thread`'s call number `index`: generate or stream, each with its own prompt and seed."""
    prompt, seed = PROMPTS[(thread * CALLS + index) % len(PROMPTS)], 100 * thread + index
    if (thread + index) % 2:
        return gen.generate(prompt, seed=seed, **OPTIONS).tokens
    events = gen.stream(prompt, seed=seed, **OPTIONS)
    return [(e.draft if isinstance(e, StepEvent) else e.tokens).tolist() for e in events]


def conversation(gen: Generator) -> list[list[list[int]]]:
    """Three turns of one session (each continues from the previous turns' cache)."""
    session = gen.session()
    return [session.generate(text, seed=seed, **OPTIONS).tokens for seed, text in enumerate(["Hi", "And?", "Bye"])]


def test_threads_sharing_a_generator_get_what_each_call_gets_alone(gen: Generator) -> None:
    alone = {(t, i): call(gen, t, i) for t in range(THREADS) for i in range(CALLS)}
    alone_conversation = conversation(gen)
    start = threading.Barrier(THREADS + 1)

    def worker(thread: int) -> list[Any]:
        start.wait()
        return [call(gen, thread, i) for i in range(CALLS)]

    def talker() -> list[list[list[int]]]:
        start.wait()
        return conversation(gen)

    with ThreadPoolExecutor(THREADS + 1) as pool:
        workers = [pool.submit(worker, t) for t in range(THREADS)]
        talk = pool.submit(talker)
        together = {(t, i): out for t, w in enumerate(workers) for i, out in enumerate(w.result(timeout=120))}
        assert talk.result(timeout=120) == alone_conversation
    assert together == alone


def test_reentering_from_an_open_stream_is_an_error_not_a_deadlock(exports: dict[str, Path]) -> None:
    gen = dgrt.load(exports["tiny"])
    events = gen.stream("Hi", seed=0, **OPTIONS)
    next(events)  # the stream now holds the model
    with pytest.raises(DgrtError, match="this thread has a stream open on this model"):
        gen.generate("Hi", seed=0, **OPTIONS)
    events.close()
    assert gen.generate("Hi", seed=0, **OPTIONS).tokens


def test_an_on_event_callback_cannot_reenter_and_a_failed_call_releases_the_model(exports: dict[str, Path]) -> None:
    gen = dgrt.load(exports["tiny"])
    with pytest.raises(DgrtError, match="this thread has a stream open on this model") as err:
        gen.generate("Hi", seed=0, on_event=lambda event: gen.generate("again"), **OPTIONS)
    assert err.value.__traceback__ is not None  # the failed call's frames are still referenced, yet:
    assert gen.generate("Hi", seed=0, **OPTIONS).tokens


def test_an_abandoned_stream_releases_the_model_for_other_threads(exports: dict[str, Path]) -> None:
    gen = dgrt.load(exports["tiny"])
    expected = gen.generate("Hi", seed=1, **OPTIONS).tokens
    events = gen.stream("Hi", seed=0, **OPTIONS)
    next(events)
    other = ThreadPoolExecutor(1)
    waiting = other.submit(lambda: gen.generate("Hi", seed=1, **OPTIONS).tokens)
    with pytest.raises(TimeoutError):  # blocked while the stream is open
        waiting.result(timeout=0.5)
    del events  # garbage-collected without being closed
    assert waiting.result(timeout=60) == expected
    other.shutdown()
