"""Activation calibration for FP8: run the real block-diffusion loop and record, per graph and per GEMM,
the largest |input| seen.

The checkpoint runs in dgrt's PyTorch modules in its own dtype, on its mapped files (dgrt.checkpoint.
load_model: the weights stay in the page cache), inside the runtime's own generate loop, so the denoise
GEMMs see real denoising inputs (canvases of noise being refined, self-conditioning embeddings at every
temperature of the schedule) and the prefill GEMMs see the prompts and the committed canvases. Statistics
are kept separately for the two graphs, since each gets its own activation Q/DQ pairs.

Its own dtype, not the export's: for the real bf16 checkpoint and an fp32 export, calibrating in fp32 (the
weights converted as they are read) took the real-width slice's FP8 export 910 s and 6.24 GiB, against
284 s and 2.84 GiB in bf16 (2026-12-01), and an FP8 scale's 3 mantissa bits do not resolve what bf16
changes in a max |x|.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dgrt.checkpoint import load_model
from dgrt.errors import DgrtError
from dgrt.model.layers import Experts, Linear
from dgrt.progress import Progress
from dgrt.runtime.backends import DenoiseInputs, StepOutputs, TorchBackend
from dgrt.task import Task

Prompt = str | list[dict[str, str]]
# Calibration runs at most this many denoise steps per canvas: the schedule's temperatures are all visited
# (it is linear in step / steps), at a fraction of the cost of 48 steps on random-weight models.
MAX_CALIBRATION_STEPS = 16
CALIBRATION_SEED = 7


def builtin_prompts() -> list[str]:
    """The shipped set of varied text prompts (dgrt/data/calibration.txt)."""
    text = resources.files("dgrt").joinpath("data/calibration.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def read_prompts(source: str, checkpoint_dir: Path) -> tuple[list[Prompt], str]:
    """(prompts, description) for --calibration: 'builtin', 'task' (the checkpoint's dgrt_task.json), 'auto'
    (task if the checkpoint has one, else builtin) or a file with one prompt per line, or JSONL of strings /
    {"prompt"|"text": str} / {"messages": [...]}."""
    if source == "auto":
        source = "task" if Task.from_dir(checkpoint_dir) is not None else "builtin"
    if source == "builtin":
        return list(builtin_prompts()), "builtin (dgrt/data/calibration.txt)"
    if source == "task":
        task = Task.from_dir(checkpoint_dir)
        if task is None:
            raise DgrtError(f"--calibration task: {checkpoint_dir} has no dgrt_task.json.")
        return [e.question for e in task.examples(64, seed=CALIBRATION_SEED)], f"task {task.to_json()['task']}"
    path = Path(source)
    if not path.is_file():
        raise DgrtError(f"--calibration {source}: expected 'builtin', 'task' or a prompt file that exists.")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return list(lines), f"file {path.name}"
    prompts: list[Prompt] = []
    for number, line in enumerate(lines, 1):
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise DgrtError(f"{path}:{number}: not JSON ({e.msg}).") from None
        text = item.get("prompt", item.get("text")) if isinstance(item, dict) else item
        if isinstance(text, str):
            prompts.append(text)
        elif isinstance(item, dict) and isinstance(item.get("messages"), list):
            prompts.append(item["messages"])
        else:
            raise DgrtError(
                f'{path}:{number}: expected a string, {{"prompt": ...}}, {{"text": ...}} or {{"messages": [...]}}.'
            )
    return prompts, f"file {path.name}"


class _Recorder:
    """Forward hooks that keep max |input| per (graph, weight parameter); the running graph is set by
    the backend below."""

    def __init__(self, model: nn.Module):
        self.graph = "prefill"
        self.amax: dict[str, dict[str, float]] = {"prefill": {}, "denoise": {}}
        self.handles = []
        for name, module in model.named_modules():
            if isinstance(module, Linear):
                self.handles.append(module.register_forward_pre_hook(self._pre(f"{name}.weight")))
            elif isinstance(module, Experts):
                self.handles.append(module.register_forward_pre_hook(self._pre(f"{name}.gate_up_proj")))
                self.handles.append(module.down_input.register_forward_pre_hook(self._pre(f"{name}.down_proj")))

    def _pre(self, key: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            seen = self.amax[self.graph]
            seen[key] = max(seen.get(key, 0.0), float(args[0].detach().abs().max()))

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _RecordingBackend(TorchBackend):
    def __init__(self, model: Any, recorder: _Recorder):
        super().__init__(model)
        self.recorder = recorder

    def prefill(self, ids: torch.Tensor, positions: torch.Tensor, pad: torch.Tensor, past: Any) -> Any:
        self.recorder.graph = "prefill"
        return super().prefill(ids, positions, pad, past)

    def denoise(self, inputs: DenoiseInputs, past: Any) -> StepOutputs:
        self.recorder.graph = "denoise"
        return super().denoise(inputs, past)


def check_samples(samples: int) -> None:
    if samples < 1:
        raise DgrtError(f"--calibration-samples is {samples}; expected at least 1.")


def calibrate(
    checkpoint_dir: Path, prompts: list[Prompt], samples: int, progress: Progress, batch_size: int = 8
) -> dict[str, dict[str, float]]:
    """{graph: {weight parameter: max |GEMM input|}} over `samples` prompts, each generating two canvases."""
    import dgrt

    check_samples(samples)
    chosen = [prompts[i % len(prompts)] for i in range(samples)]
    model = load_model(checkpoint_dir)
    recorder = _Recorder(model)
    gen = dgrt.load(checkpoint_dir, backend=_RecordingBackend(model, recorder))
    steps = min(gen.sampler.steps, MAX_CALIBRATION_STEPS)
    max_new_tokens = 2 * gen.info.canvas_length
    try:
        for start in range(0, samples, batch_size):
            progress.update("calibrating activations", start, samples)
            batch = chosen[start : start + batch_size]
            gen.generate(batch, seed=CALIBRATION_SEED + start, max_new_tokens=max_new_tokens, steps=steps)
    finally:
        recorder.remove()
        gen.close()
    return recorder.amax
