"""The task of dgrt's shipped trained model: reverse a string of lowercase letters.

Answers have an exact value and are long enough to span several canvases (the model's canvas is 16
tokens; an answer is 16 to 32 letters plus the end-of-turn token), so scoring a model on it exercises
block chaining, the incremental prefill of finished canvases, and EOS.

A checkpoint (or export) trained on the task carries `dgrt_task.json`; `Task.from_dir` finds it, and
`validate` / `bench` then report the task's metrics alongside their own.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dgrt.runtime.generator import Generator

TASK_FILE = "dgrt_task.json"
SHIPPED = "trained/reverse"  # the trained checkpoint inside the package (tools/train_small.py)
LETTERS = "abcdefghijklmnopqrstuvwxyz"
QUESTION = "Reverse: "  # then the letters
HELD_OUT_SEED = 20261128  # training draws from other seeds; see tools/train_small.py
TASK_EXAMPLES = 200  # held-out questions a trained model is scored on (validate, bench, the quantization report)


def shipped_checkpoint() -> Path:
    """The checkpoint folder of dgrt's trained reversal model (Hugging Face layout, fp32, ~4 MiB)."""
    from importlib import resources

    return Path(str(resources.files("dgrt").joinpath(SHIPPED)))


@dataclass(frozen=True)
class Example:
    question: str
    answer: str


@dataclass(frozen=True)
class Task:
    """String reversal with lengths in [min_length, max_length]."""

    min_length: int = 16
    max_length: int = 32

    def example(self, rng: random.Random) -> Example:
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(self.min_length, self.max_length)))
        return Example(QUESTION + word, word[::-1])

    def answer(self, question: str) -> str | None:
        """The exact answer to a question of the task's form, or None for any other prompt."""
        return question.removeprefix(QUESTION)[::-1] if question.startswith(QUESTION) else None

    def examples(self, n: int, seed: int = HELD_OUT_SEED) -> list[Example]:
        rng = random.Random(seed)
        return [self.example(rng) for _ in range(n)]

    def to_json(self) -> dict[str, Any]:
        return {"task": "reverse", "min_length": self.min_length, "max_length": self.max_length}

    @classmethod
    def from_dir(cls, path: str | Path) -> Task | None:
        """The task a checkpoint or export folder was trained on, or None."""
        file = Path(path) / TASK_FILE
        if not file.exists():
            return None
        spec = json.loads(file.read_text())
        return cls(int(spec["min_length"]), int(spec["max_length"]))


@dataclass(frozen=True)
class TaskScore:
    """Exact-match accuracy and the sampler's work on a set of examples, generated as a user would."""

    examples: int
    accuracy: float  # fraction of answers exactly right
    mean_steps_per_canvas: float  # denoise passes per canvas, adaptive stopping on
    tokens_per_forward: float  # mean over rows
    max_steps: int  # the sampler's step limit

    def format(self) -> str:
        return (
            f"task accuracy {100 * self.accuracy:.1f}% on {self.examples} held-out questions, "
            f"{self.mean_steps_per_canvas:.2f} steps per canvas (limit {self.max_steps}), "
            f"{self.tokens_per_forward:.2f} tokens per forward"
        )


def score(gen: Generator, examples: list[Example], seed: int = 0, batch_size: int = 32) -> TaskScore:
    """Answer every question with the generator's default sampler and score the answers."""
    correct, steps, tpf = 0, [], []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        result = gen.generate([e.question for e in batch], seed=seed + start)
        correct += sum(text.strip() == e.answer for text, e in zip(result.texts, batch, strict=True))
        steps += [s for row in result.steps_per_canvas for s in row]
        tpf += result.tokens_per_forward
    return TaskScore(
        examples=len(examples),
        accuracy=correct / len(examples),
        mean_steps_per_canvas=sum(steps) / len(steps),
        tokens_per_forward=sum(tpf) / len(tpf),
        max_steps=gen.sampler.steps,
    )
