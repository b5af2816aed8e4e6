"""One command for a GPU machine: every GPU check dgrt has, results under a folder, a table printed last.

    python tools/gpu_check.py RESULTS_DIR [--quick]

Installs nothing and needs no network. Uses whatever the machine has of torch (CUDA), onnxruntime-gpu and
TensorRT, and says which it skipped and why. Steps:

1. `pytest -m gpu` (the GPU-marked tests; they skip themselves without TensorRT);
2. exports dgrt's trained model and the `small` and `bench` presets (fp32) and builds TensorRT engines for
   them where TensorRT is, plus FP8 and INT4 engines of the trained model;
3. for each backend at hand (torch CUDA fp32 and bf16 with CUDA graphs, ONNX Runtime CUDA, TensorRT),
   against the CPU reference (dgrt's fp32 modules on ONNX Runtime CPU, equal to transformers in fp32):
   teacher-forced step outputs on identical inputs (argmax and sample agreement, entropy and
   soft-embedding error), task accuracy on the trained model (also for its FP8 / INT4 engines), denoise-step
   latency on the bench preset (median of repeated steps after a warm-up);
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
from dgrt.errors import DgrtError
from dgrt.exporter.onnx_export import ExportOptions, export
from dgrt.exporter.quantize import Recipe
from dgrt.runtime.backends import Backend, DenoiseInputs
from dgrt.runtime.kv_cache import KVCache
from dgrt.task import Task, score, shipped_checkpoint
from dgrt.tensorrt.build import build
from dgrt.tiny import write_tiny

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


def step_agreement(gen: Any, ref: Any, steps: int = 8, seed: int = 0) -> dict[str, float]:
    """Feed both backends identical inputs (the reference's trajectory) for one prompt and `steps` denoise
    steps; compare their step outputs."""
    info, tok = ref.info, ref.tokenizer
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "Reverse: gpucheckdiffusion"}])])
    p, c = ids.shape[1], info.canvas_length
    caches = {}
    for name, g in (("test", gen), ("ref", ref)):
        b: Backend = g.backend
        caches[name] = KVCache(info.layers, 1, p + c, p, b.dtype, b.device)
        caches[name].append(
            b.prefill(ids, torch.arange(p)[None], torch.zeros(1, dtype=torch.int64), caches[name].past())
        )
    rng = torch.Generator().manual_seed(seed)
    canvas = torch.randint(0, info.vocab_size, (1, c), generator=rng)
    soft = torch.zeros(1, c, info.hidden_size)
    agree = same_sample = 0
    entropy_err = soft_err = 0.0
    for step in range(steps, 0, -1):
        uniform = torch.rand(1, c, generator=rng)
        temperature = ref.sampler.temperature(step).reshape(1)
        outs = {}
        for name, g in (("test", gen), ("ref", ref)):
            b = g.backend
            inputs = DenoiseInputs(
                canvas, soft.to(b.dtype).to(b.device), torch.arange(p, p + c)[None], torch.zeros(1, dtype=torch.int64),
                temperature, uniform,
            )  # fmt: skip
            outs[name] = b.denoise(inputs, caches[name].past())
        t, r = outs["test"], outs["ref"]
        agree += int((t.argmax == r.argmax).sum())
        same_sample += int((t.sample == r.sample).sum())
        entropy_err = max(entropy_err, float((t.entropy.float() - r.entropy.float()).abs().max()))
        soft_err = max(soft_err, float((t.next_soft.float().cpu() - r.next_soft.float()).abs().max()))
        canvas, soft = r.argmax, r.next_soft.float()
    n = steps * c
    return {"argmax_agreement": agree / n, "sample_agreement": same_sample / n, "entropy_max_abs_error": entropy_err,
            "soft_max_abs_error": soft_err}  # fmt: skip


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
        ref = dgrt.load(onnx)  # ONNX Runtime CPU, fp32: the reference
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
                row |= step_agreement(gen, ref)
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
