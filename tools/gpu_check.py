"""One command for a GPU machine: every GPU check dgrt has, results under a folder, a table printed last.

    python tools/gpu_check.py RESULTS_DIR [--quick] [--no-slice] [--dry-run]

Runs from the source tree (this file's parent folder is put first on sys.path, so dgrt need not be
installed, whatever torch the machine has), installs nothing and needs no network. Uses whatever the
machine has of torch (CUDA), onnxruntime-gpu and TensorRT, and says which it skipped and why. Every step
prints its progress and elapsed time; a failing step or row is recorded and the others go on. Steps:

1. `pytest -m gpu` (the GPU-marked tests; they skip themselves without TensorRT), at most 3 minutes;
2. the models: dgrt's trained model, the `bench` preset and the real-geometry slice (the 26B-A4B's first
   2 layers at their real widths, random, bf16; `--no-slice` leaves it out);
3. for each model and each backend at hand (torch CUDA fp32 and bf16 with CUDA graphs from the checkpoint;
   ONNX Runtime CUDA and TensorRT from an fp32 export where they exist): teacher-forced on the trajectory
   of dgrt's fp32 PyTorch modules on the CPU (equal to transformers in fp32; dgrt.compare), the prefill K/V
   and the step outputs on identical inputs (argmax and sample agreement, entropy and soft-embedding
   error); the trained model's task accuracy and steps per canvas; denoise-step latency (median of
   repeated steps after a warm-up) against the floor of reading every weight once at the GPU's bandwidth
   (dgrt/data/targets.json);
4. writes results.json and prints the table. Meant to finish in under 8 minutes on one H100 or H200.

--dry-run runs the same steps here, on the CPU: the torch rows on device "cpu", a narrowed slice, fewer
task questions, no pytest; it checks the script, not a GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this tree's dgrt, installed or not

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from functools import partial  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

import dgrt  # noqa: E402
from dgrt.checkpoint import load_model  # noqa: E402
from dgrt.compare import Errors, PrefillStep, TeacherForcing, TorchReference  # noqa: E402
from dgrt.exporter.onnx_export import ExportOptions, export  # noqa: E402
from dgrt.exporter.quantize import Recipe  # noqa: E402
from dgrt.plan import hardware  # noqa: E402
from dgrt.presets import write_slice, write_tiny  # noqa: E402
from dgrt.task import Task, score, shipped_checkpoint  # noqa: E402
from dgrt.tensorrt.build import build  # noqa: E402

T0 = time.perf_counter()


def progress(message: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f} s] {message}", flush=True)


def backends_at_hand(trt_ok: bool, device: str) -> list[tuple[str, dict[str, Any]]]:
    """(label, dgrt.load options) for every backend to check: torch on `device` (the checkpoint's weights),
    and where this machine has them ONNX Runtime CUDA and TensorRT (an fp32 export's graphs)."""
    out: list[tuple[str, dict[str, Any]]] = [
        (f"torch {device} fp32", {"backend": "torch", "device": device, "dtype": "fp32"}),
        (f"torch {device} bf16", {"backend": "torch", "device": device, "dtype": "bf16"}),
    ]
    if device == "cuda" and importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            cuda_first = ["CUDAExecutionProvider", "CPUExecutionProvider"]
            out.append(("onnxruntime cuda", {"backend": "onnxruntime", "export": True, "providers": cuda_first}))
    if trt_ok:
        out.append(("tensorrt", {"backend": "tensorrt", "export": True}))
    return out


def prompt_ids(gen: Any) -> torch.Tensor:
    """A one-row prompt: the chat template's where the model has a tokenizer, else fixed random ids."""
    if gen.tokenizer is not None:
        return torch.tensor([gen.tokenizer.apply_chat_template([{"role": "user", "content": "Reverse: gpucheck"}])])
    return torch.randint(3, gen.info.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))


def step_agreement(gen: Any, model: Any, steps: int) -> dict[str, float]:
    """Teacher-forced on the CPU modules' (`model`'s) own trajectory for one prompt and one canvas of `steps`
    steps: the backend's prefill K/V and its step outputs on exactly the same inputs, against theirs."""
    sampler = gen.sampler.with_overrides(steps=steps)
    plan = TeacherForcing(lambda: TorchReference(model), gen.info, [prompt_ids(gen)], sampler, canvases=1, seed=0)
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
        soft.append(Errors.from_tensors(ours.next_soft.float().cpu(), ref.next_soft.float().cpu()))
    return {"argmax_agreement": agree / positions, "sample_agreement": same_sample / positions,
            "entropy_max_abs_error": Errors.concat(entropy).max_abs, "soft_max_abs_error": Errors.concat(soft).max_abs,
            "kv_max_abs_error": Errors.concat(kv).max_abs}  # fmt: skip


def step_latency(gen: Any, runs: int, steps: int) -> dict[str, float]:
    """Denoise-step latency: one canvas with adaptive stopping off, per-step times after the first."""
    ids = prompt_ids(gen)[0].tolist()
    options = {"max_new_tokens": gen.info.canvas_length, "stability_threshold": None, "confidence_threshold": None}
    gen.generate(ids, seed=0, chat=False, steps=2, **options)  # warm-up (and the CUDA graph capture)
    times: list[float] = []
    for i in range(runs):
        times += gen.generate(ids, seed=i, chat=False, steps=steps, **options).step_seconds[1:]
    return {"median_ms": 1e3 * statistics.median(times), "low_ms": 1e3 * min(times), "high_ms": 1e3 * max(times)}


def weight_floor_ms(gen: Any, bandwidth_gbs: float | None) -> dict[str, float]:
    """The floor of a denoise step that reads every weight once (the dense MoE does) at the bandwidth."""
    model = getattr(gen.backend, "model", None)
    if model is None or bandwidth_gbs is None:
        return {}
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"weight_bytes": weight_bytes, "floor_ms": 1e3 * weight_bytes / (bandwidth_gbs * 1e9)}


def gpu_bandwidth(name: str | None) -> float | None:
    """The GPU's memory bandwidth from dgrt/data/targets.json, where its name matches a target."""
    for target, hw in hardware().items():
        if name and target.upper() in name.upper().replace(" ", ""):
            return hw.bandwidth_gbs
    return None


def attempt(record: dict[str, Any], key: str, what: str, fn: Callable[[], Any]) -> Any:
    """Run one step; a failure is recorded under `key` and printed, and the check goes on."""
    progress(what)
    try:
        return fn()
    except Exception as e:  # one step failing must not hide the others' results
        record[key] = f"{type(e).__name__}: {e}"
        progress(f"  failed: {record[key][:200]}")
        return None


def models(results_dir: Path, dry_run: bool, quick: bool, slice_: bool) -> dict[str, Path]:
    out = {"trained": shipped_checkpoint()}
    if not quick:
        out["bench"] = write_tiny(results_dir / "bench-ckpt", preset="tiny" if dry_run else "bench", force=True)
    if slice_ and not quick:
        narrow = {"vocab_size": 4096, "num_experts": 4, "top_k_experts": 2} if dry_run else {}
        out["slice"] = write_slice(results_dir / "slice-ckpt", layers=2, force=True, **narrow)
    return out


def fp32_model(ckpt: Path) -> Any:
    """The checkpoint's modules in fp32 on the CPU (the slice's checkpoint is bf16): the reference."""
    return load_model(ckpt).float()


def check_row(
    row: dict[str, Any], path: Path, options: dict[str, Any], reference: Any, examples: Any, steps: int,
    runs: int, bandwidth: float | None, timing_cache: Path,
) -> None:  # fmt: skip
    """One backend on one model: agreement with the CPU reference, the task, latency against the floor."""
    if options["backend"] == "tensorrt":
        build(path, timing_cache=timing_cache)  # reused where built before
    with dgrt.load(path, **options) as gen:
        if reference is not None:
            row.update(step_agreement(gen, reference, steps))
        if examples:
            s = score(gen, examples)
            row.update(task_accuracy=s.accuracy, steps_per_canvas=s.mean_steps_per_canvas)
        row.update(step_latency(gen, runs=runs, steps=steps + 2))
        row.update(weight_floor_ms(gen, bandwidth))


def check_model(
    name: str, ckpt: Path, args: argparse.Namespace, device: str, trt_ok: bool, bandwidth: float | None,
    results: dict[str, Any],
) -> list[dict[str, Any]]:  # fmt: skip
    task = Task.from_dir(ckpt)
    examples = task.examples(20 if args.dry_run else 100) if task else None
    steps = 2 if name == "slice" else 8  # the CPU reference of the slice is the slow part
    reference = attempt(results, f"{name}_reference", f"{name}: the CPU reference", partial(fp32_model, ckpt))
    onnx = args.results / f"{name}-onnx"
    runs = [(label, ckpt, options) for label, options in backends_at_hand(trt_ok, device)]
    if any([options.pop("export", False) for _, _, options in runs]):  # a list: pop from every one
        attempt(
            results, f"{name}_export", f"{name}: fp32 export", partial(export, ckpt, onnx, ExportOptions(), force=True)
        )
        runs = [(label, ckpt if options["backend"] == "torch" else onnx, options) for label, _, options in runs]
    if trt_ok and task is not None:  # the quantized engines, judged by the task they must still solve
        for recipe in ("fp8", "int4"):
            q_onnx = args.results / f"{name}-{recipe}-onnx"
            quantize = ExportOptions(quant=Recipe(recipe), accuracy="off")
            if attempt(
                results,
                f"{name}_{recipe}",
                f"{name}: {recipe} export",
                partial(export, ckpt, q_onnx, quantize, force=True),
            ):
                runs.append((f"tensorrt {recipe}", q_onnx, {"backend": "tensorrt"}))
    rows = []
    for label, path, options in runs:
        row: dict[str, Any] = {"model": name, "backend": label}
        check = partial(check_row, row, path, options, reference, examples, steps, 1 if args.dry_run else 3,
                        bandwidth, args.results / "timing.cache")  # fmt: skip
        attempt(row, "error", f"{name}: {label}", check)
        rows.append(row)
        progress(json.dumps(row))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path)
    p.add_argument("--quick", action="store_true", help="skip pytest and the random models")
    p.add_argument("--no-slice", action="store_true", help="leave out the real-geometry slice")
    p.add_argument("--dry-run", action="store_true", help="run every step on the CPU, to check the script")
    args = p.parse_args()
    args.results.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.dry_run else "cuda"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.dry_run else None
    results: dict[str, Any] = {"gpu": gpu, "torch": torch.__version__, "dry_run": args.dry_run}
    trt_ok = not args.dry_run and importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()
    if trt_ok:
        import tensorrt

        trt_ok = hasattr(tensorrt, "Builder")
        results["tensorrt"] = getattr(tensorrt, "__version__", None)
    progress(f"gpu {gpu}, torch {torch.__version__}, TensorRT {results.get('tensorrt', 'absent')}")
    if device == "cuda" and not torch.cuda.is_available():
        progress("no CUDA GPU: nothing to check (use --dry-run to check the script on the CPU)")
        return 1
    bandwidth = gpu_bandwidth(gpu)
    if not args.quick and not args.dry_run:
        attempt(results, "pytest_gpu", "pytest -m gpu", partial(gpu_tests, args.results, results))
    make = partial(models, args.results, args.dry_run, args.quick, not args.no_slice)
    rows = []
    for name, ckpt in (attempt(results, "models", "writing the models", make) or {}).items():
        rows += check_model(name, ckpt, args, device, trt_ok, bandwidth, results)
    results["rows"] = rows
    results["seconds"] = round(time.perf_counter() - T0, 1)
    (args.results / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print_table(rows)
    progress(f"done; results in {args.results}")
    return 0


def gpu_tests(results_dir: Path, results: dict[str, Any]) -> None:
    r = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", str(ROOT / "tests")],
                       capture_output=True, text=True, timeout=180, cwd=ROOT)  # fmt: skip
    (results_dir / "pytest_gpu.log").write_text(r.stdout + r.stderr)
    results["pytest_gpu"] = {"returncode": r.returncode, "summary": (r.stdout.strip().splitlines() or [""])[-1]}
    progress(f"pytest -m gpu: {results['pytest_gpu']['summary']}")


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    return format(row[key], fmt) if key in row else "-"


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'model':<8} {'backend':<20} {'argmax':>7} {'sample':>7} {'soft err':>9} {'task':>6} {'steps':>6}"
          f" {'step ms':>9} {'floor ms':>9}")  # fmt: skip
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<8} {r['backend']:<20} error: {r['error'][:80]}")
            continue
        task = f"{100 * r['task_accuracy']:.0f}%" if "task_accuracy" in r else "-"
        print(f"{r['model']:<8} {r['backend']:<20} {_cell(r, 'argmax_agreement', '.3f'):>7}"
              f" {_cell(r, 'sample_agreement', '.3f'):>7} {_cell(r, 'soft_max_abs_error', '.1e'):>9} {task:>6}"
              f" {_cell(r, 'steps_per_canvas', '.2f'):>6} {_cell(r, 'median_ms', '.2f'):>9}"
              f" {_cell(r, 'floor_ms', '.3f'):>9}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
