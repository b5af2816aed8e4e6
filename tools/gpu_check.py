"""One command for a GPU machine: every GPU check dgrt has, results under a folder, a table printed last.

    python tools/gpu_check.py RESULTS_DIR [--quick]

Installs nothing and needs no network. Uses whatever the machine has of torch (CUDA), onnxruntime-gpu and
TensorRT, and says which it skipped and why. Steps:

1. `pytest -m gpu` (the GPU-marked tests; they skip themselves without TensorRT);
2. exports dgrt's trained model and the `small` and `bench` presets (fp32) and builds TensorRT engines for
   them where TensorRT is, plus FP8 and INT4 engines of the trained model;
3. for each backend at hand (torch CUDA fp32 and bf16 with CUDA graphs, ONNX Runtime CUDA, TensorRT):
   teacher-forced on the trajectory of dgrt's fp32 PyTorch modules on the CPU (equal to transformers in
   fp32; dgrt.compare), the prefill K/V and the step outputs on identical inputs (argmax and sample
   agreement, entropy and soft-embedding error); task accuracy on the trained model (also for its FP8 /
   INT4 engines) beside ONNX Runtime CPU's; denoise-step latency (median of repeated steps after a warm-up);
4. writes results.json and prints the table. Meant to finish in well under 8 minutes on one H100.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import dgrt
from dgrt.checkpoint import load_model
from dgrt.compare import Errors, PrefillStep, TeacherForcing, TorchReference
from dgrt.errors import DgrtError
from dgrt.exporter.onnx_export import ExportOptions, export
from dgrt.exporter.quantize import Recipe
from dgrt.presets import write_tiny
from dgrt.task import Task, score, shipped_checkpoint
from dgrt.tensorrt.build import build

ROOT = Path(__file__).resolve().parents[1]


def backends_at_hand(trt_ok: bool) -> list[tuple[str, dict[str, Any]]]:
    """(label, dgrt.load options) for every GPU backend this machine can run."""
    out: list[tuple[str, dict[str, Any]]] = []
    if torch.cuda.is_available():
        out += [("torch cuda fp32", {"backend": "torch", "device": "cuda"})]
        out += [("torch cuda bf16", {"backend": "torch", "device": "cuda", "dtype": "bf16"})]
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            out.append(("onnxruntime cuda", {"backend": "onnxruntime-cuda"}))
    if trt_ok:
        out.append(("tensorrt", {"backend": "tensorrt"}))
    return out


def load(path: Path, options: dict[str, Any]) -> Any:
    if options.get("backend") == "onnxruntime-cuda":
        return dgrt.load(path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    return dgrt.load(path, **options)


def step_agreement(gen: Any, model: Any, steps: int = 8, seed: int = 0) -> dict[str, float]:
    """Teacher-forced on the CPU modules' (`model`'s) own trajectory for one prompt and one canvas of `steps`
    steps: the backend's prefill K/V and its step outputs on exactly the same inputs, against theirs."""
    ids = torch.tensor([gen.tokenizer.apply_chat_template([{"role": "user", "content": "Reverse: gpucheckdiffusion"}])])
    sampler = gen.sampler.with_overrides(steps=steps)
    plan = TeacherForcing(lambda: TorchReference(model), gen.info, [ids], sampler, canvases=1, seed=seed)
    kv, entropy, soft = [], [], []
    agree = same_sample = positions = 0
    for step in plan.run(gen.backend):
        if isinstance(step, PrefillStep):
            kv.append(step.errors())
            continue
        ours, ref = gen.backend.denoise(step.inputs, step.past), step.reference
        agree += int((ours.argmax == ref.argmax).sum())
        same_sample += int((ours.sample == ref.sample).sum())
        positions += ref.argmax.numel()
        entropy.append(Errors.from_tensors(ours.entropy[..., None], ref.entropy[..., None]))  # [B, C, 1]
        soft.append(Errors.from_tensors(ours.next_soft, ref.next_soft))
    return {"argmax_agreement": agree / positions, "sample_agreement": same_sample / positions,
            "entropy_max_abs_error": Errors.concat(entropy).max_abs, "soft_max_abs_error": Errors.concat(soft).max_abs,
            "kv_max_abs_error": Errors.concat(kv).max_abs}  # fmt: skip


def step_latency(gen: Any, runs: int) -> dict[str, float]:
    """Denoise-step latency: a 2-canvas generation with adaptive stopping off, per-step times after the first."""
    gen.generate("Describe the sea.", seed=0, max_new_tokens=gen.info.canvas_length, steps=4)  # warm-up
    times: list[float] = []
    for i in range(runs):
        out = gen.generate("Describe the sea.", seed=i, max_new_tokens=gen.info.canvas_length, steps=16,
                           stability_threshold=None, confidence_threshold=None)  # fmt: skip
        times += out.step_seconds[1:]
    return {"median_ms": 1e3 * statistics.median(times), "low_ms": 1e3 * min(times), "high_ms": 1e3 * max(times)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path)
    p.add_argument("--quick", action="store_true", help="skip pytest and the random presets")
    args = p.parse_args()
    args.results.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results: dict[str, Any] = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    results["torch"] = torch.__version__
    trt_ok = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()
    if trt_ok:
        import tensorrt

        trt_ok = hasattr(tensorrt, "Builder")
        results["tensorrt"] = getattr(tensorrt, "__version__", None)
    print(f"gpu {results['gpu']}, torch {torch.__version__}, TensorRT {results.get('tensorrt', 'absent')}", flush=True)

    if not args.quick:
        r = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", str(ROOT / "tests")],
                           capture_output=True, text=True)  # fmt: skip
        (args.results / "pytest_gpu.log").write_text(r.stdout + r.stderr)
        results["pytest_gpu"] = {"returncode": r.returncode, "summary": (r.stdout.strip().splitlines() or [""])[-1]}
        print(f"pytest -m gpu: {results['pytest_gpu']['summary']}", flush=True)

    models = {"trained": shipped_checkpoint()}
    if not args.quick:
        for preset in ("small", "bench"):
            models[preset] = write_tiny(args.results / f"{preset}-ckpt", preset=preset, force=True)
    rows = []
    for model, ckpt in models.items():
        onnx = args.results / f"{model}-onnx"
        export(ckpt, onnx, ExportOptions(), force=True)
        if trt_ok:
            try:
                engines = build(onnx, timing_cache=args.results / "timing.cache")  # shared: later builds are faster
                results.setdefault("builds", {})[model] = str(engines)
            except DgrtError as e:
                results.setdefault("builds", {})[model] = f"failed: {e}"
        reference = load_model(ckpt)  # fp32 on the CPU: the teacher-forced reference
        ref = dgrt.load(onnx)  # ONNX Runtime CPU, fp32: the task and latency reference
        task = Task.from_dir(ckpt)
        ref_score = score(ref, task.examples(100)) if task else None
        runs = [(label, onnx, options) for label, options in backends_at_hand(trt_ok)]
        if trt_ok and task is not None:  # the quantized engines, judged by the task they must still solve
            for recipe in ("fp8", "int4"):
                q_onnx = args.results / f"{model}-{recipe}-onnx"
                export(ckpt, q_onnx, ExportOptions(quant=Recipe(recipe), measure_accuracy=False), force=True)
                runs.append((f"tensorrt {recipe}", q_onnx, {"backend": "tensorrt", "build": True}))
        for label, path, options in runs:
            row: dict[str, Any] = {"model": model, "backend": label}
            try:
                if options.pop("build", False):
                    build(path, timing_cache=args.results / "timing.cache")
                gen = load(path, options)
                row |= step_agreement(gen, reference)
                if task and ref_score:
                    s = score(gen, task.examples(100))
                    row |= {"task_accuracy": s.accuracy, "reference_task_accuracy": ref_score.accuracy,
                            "steps_per_canvas": s.mean_steps_per_canvas}  # fmt: skip
                row |= step_latency(gen, runs=3)
                gen.close()
            except Exception as e:  # one backend failing must not hide the others' results
                row["error"] = f"{type(e).__name__}: {e}"
            rows.append(row)
            print(json.dumps(row), flush=True)
        row = {"model": model, "backend": "onnxruntime cpu (reference)"} | step_latency(ref, runs=1)
        rows.append(row)
        ref.close()
    results["rows"] = rows
    results["seconds"] = round(time.perf_counter() - t0, 1)
    (args.results / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    print(f"\n{'model':<8} {'backend':<28} {'argmax':>7} {'sample':>7} {'soft err':>9} {'task':>6} {'step ms':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<8} {r['backend']:<28} error: {r['error'][:80]}")
            continue
        task = f"{100 * r['task_accuracy']:.0f}%" if "task_accuracy" in r else "-"
        argmax = f"{r['argmax_agreement']:.3f}" if "argmax_agreement" in r else "-"
        sample = f"{r['sample_agreement']:.3f}" if "sample_agreement" in r else "-"
        soft = f"{r['soft_max_abs_error']:.1e}" if "soft_max_abs_error" in r else "-"
        print(f"{r['model']:<8} {r['backend']:<28} {argmax:>7} {sample:>7} {soft:>9} {task:>6} {r['median_ms']:>9.2f}")
    print(f"({results['seconds']} s; results in {args.results})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
