"""How far a quantized export is from full precision, measured as `dgrt export --quant` reports it.

The fp32 side is dgrt's fp32 PyTorch modules on the same checkpoint: the same math as the fp32 export
(the two agree to 1e-4, tests/test_export.py), without writing a second export. The quantized side runs
on ONNX Runtime's CPU provider with the session options its manifest names, so its Q/DQ arithmetic is the
graph's own.

* teacher-forced: the fp32 model samples its own trajectory; at every prefill and denoise step the
  quantized graphs get exactly its inputs (dgrt.compare.TeacherForcing): K/V error, logits error,
  cosine, argmax agreement;
* end to end: both generate for the same prompts with the checkpoint's sampler (adaptive stopping on):
  mean denoise steps per canvas, and, for a checkpoint trained on dgrt's task, exact-match accuracy on
  held-out questions.

Both sides run the whole model at every step, so the report's time grows with the model: `full` on the
real-width 2-layer slice of the 26B (4.8 GB) had not finished its teacher-forced part after 29 minutes on
a 2-core CPU. `quick` is the teacher-forced part over one prompt, one canvas and four steps, without the
end-to-end runs; `auto` picks it for checkpoints of more than QUICK_ABOVE_BYTES.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dgrt.checkpoint import load_model
from dgrt.compare import DEFAULT_PROMPTS, TeacherForcing, TorchReference, export_logits
from dgrt.contract import manifest as manifest_mod
from dgrt.errors import DgrtError
from dgrt.runtime.backends import TorchBackend
from dgrt.task import TASK_EXAMPLES, Task, score

MODES = ("auto", "full", "quick", "off")  # `dgrt export --accuracy`
QUICK_ABOVE_BYTES = 2 * 2**30  # `auto`: checkpoints larger than this get the quick report


@dataclass(frozen=True)
class Scope:
    prompts: int
    canvases: int
    steps: int  # teacher-forced denoise steps per canvas (at most the sampler's); its temperatures spread over them
    end_to_end: bool  # also generate on both sides: steps per canvas, task accuracy


SCOPES = {"full": Scope(3, 2, 16, True), "quick": Scope(1, 1, 4, False)}


def resolve_mode(mode: str, checkpoint_bytes: int) -> str:
    """`auto` as `full` or `quick` for a checkpoint of this many bytes of weights; other modes as given."""
    if mode not in MODES:
        raise DgrtError(f"accuracy mode {mode!r} is not one of {', '.join(MODES)}.")
    if mode != "auto":
        return mode
    return "quick" if checkpoint_bytes > QUICK_ABOVE_BYTES else "full"


def measure(
    export_dir: Path, checkpoint_dir: Path, mode: str = "full", task_examples: int = TASK_EXAMPLES, seed: int = 0
) -> dict[str, Any]:
    """The report of `mode` (`full` or `quick`, see the module docstring), as the manifest stores it."""
    import dgrt

    scope = SCOPES[mode]
    # fp32 whatever the checkpoint stores (the real one is bf16): the reference, and the fp32 side end to end.
    model = load_model(checkpoint_dir, torch.float32)
    quantized = dgrt.load(export_dir, backend="onnxruntime")
    task = Task.from_dir(checkpoint_dir)
    prompts = [e.question for e in task.examples(3, seed=seed + 1)] if task else list(DEFAULT_PROMPTS)
    prompts = prompts[: scope.prompts]
    tok = quantized.tokenizer
    assert tok is not None
    sampler = quantized.sampler.with_overrides(steps=min(quantized.sampler.steps, scope.steps))
    ids = [torch.tensor([tok.apply_chat_template([{"role": "user", "content": text}])]) for text in prompts]
    plan = TeacherForcing(lambda: TorchReference(model), quantized.info, ids, sampler, scope.canvases, seed)
    with torch.inference_mode():
        compared = plan.errors(quantized.backend, export_logits(export_dir, manifest_mod.load(export_dir)))
    kv, logits = compared.kv, compared.logits
    result: dict[str, Any] = {
        "mode": mode,
        "reference": "dgrt's fp32 PyTorch modules, same checkpoint",
        "backend": "onnxruntime CPU",
        "prompts": prompts,
        "teacher_forced": {
            "steps_per_canvas": sampler.steps,
            "canvases": scope.canvases,
            "kv_max_abs_error": kv.max_abs,
            "kv_mean_abs_error": kv.mean_abs,
            "logits_max_abs_error": logits.max_abs,
            "logits_mean_abs_error": logits.mean_abs,
            "logits_cosine_p1": logits.cosine_p1,
            "argmax_agreement": logits.agreement,
            "positions": logits.positions,
        },
    }
    if scope.end_to_end:
        full = dgrt.load(checkpoint_dir, backend=TorchBackend(model))
        sides = (("fp32", full), ("quantized", quantized))
        new_tokens = scope.canvases * quantized.info.canvas_length
        steps = {
            name: gen.generate(prompts, seed=seed, max_new_tokens=new_tokens).mean_steps_per_canvas
            for name, gen in sides
        }
        result["steps_per_canvas"] = steps | {"limit": quantized.sampler.steps}
        if task is not None and task_examples:
            examples = task.examples(task_examples)
            result["task"] = {name: vars(score(gen, examples, seed=seed)) for name, gen in sides}
        full.close()
    quantized.close()
    return result


def format_summary(recipe: str, accuracy: dict[str, Any]) -> str:
    """One screen: the quantized export against fp32."""
    tf = accuracy["teacher_forced"]
    lines = [
        f"accuracy of {recipe} against fp32 ({accuracy['reference']}; {accuracy['backend']}):",
        f"  denoise logits, teacher-forced over {tf['positions']} positions: "
        f"max abs error {tf['logits_max_abs_error']:.4g}, mean {tf['logits_mean_abs_error']:.4g}, "
        f"cosine 1st pct {tf['logits_cosine_p1']:.6f}, "
        f"argmax agreement {100 * tf['argmax_agreement']:.2f}%",
        f"  prefill K/V: max abs error {tf['kv_max_abs_error']:.4g}, mean {tf['kv_mean_abs_error']:.4g}",
    ]
    if "steps_per_canvas" in accuracy:
        steps = accuracy["steps_per_canvas"]
        lines.append(
            f"  steps per canvas (adaptive stopping on, limit {steps['limit']}): fp32 {steps['fp32']:.2f}, "
            f"{recipe} {steps['quantized']:.2f}"
        )
    else:
        lines.append(
            f"  quick report ({len(accuracy['prompts'])} prompt, {tf['canvases']} canvas, {tf['steps_per_canvas']} "
            "steps; no end-to-end runs): `dgrt export --accuracy full` for the whole one"
        )
    if "task" in accuracy:
        full, quantized = accuracy["task"]["fp32"], accuracy["task"]["quantized"]
        lines.append(
            f"  task accuracy on {full['examples']} held-out questions: fp32 {100 * full['accuracy']:.1f}%, "
            f"{recipe} {100 * quantized['accuracy']:.1f}% (steps per canvas {full['mean_steps_per_canvas']:.2f} / "
            f"{quantized['mean_steps_per_canvas']:.2f})"
        )
    return "\n".join(lines)
