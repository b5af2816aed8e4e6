"""End-to-end speed: dgrt on ONNX Runtime against transformers' generate, and dgrt's runtime overhead.

    python tools/bench_generate.py [--workdir DIR] [--runs 5] [--threads 2] [--steps 16] [--new-tokens 256]

On the `bench` preset (77M parameters, canvas 256): a 128-token prompt, 256 new tokens with 16 steps and
adaptive stopping off. Each side runs in its own process with the same thread count, one warm-up then
`--runs` timed runs; medians and ranges are reported. The runtime's overhead is dgrt's time per denoise
step minus the denoise graph's own time on the same inputs (ONNX Runtime run_with_iobinding alone).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path
from statistics import median

from dgrt.bench import timed_runs

PROMPT_LEN = 128


def run_dgrt(export_dir: str, args: argparse.Namespace) -> dict[str, object]:
    import torch

    import dgrt

    gen = dgrt.load(export_dir, threads=args.threads)
    prompt = torch.randint(3, 100, (PROMPT_LEN,), generator=torch.Generator().manual_seed(0)).tolist()
    opts = dict(
        max_new_tokens=args.new_tokens,
        steps=args.steps,
        stability_threshold=None,
        confidence_threshold=None,
        eos_token_id=None,
        seed=0,
    )
    results = []
    times = timed_runs(lambda: results.append(gen.generate(prompt, **opts)), args.runs)
    last = results[-1]
    # The denoise graph alone: rerun ONNX Runtime on the inputs bound by the last step.
    backend = gen.backend
    session, binding = backend.sessions["denoise"], backend._bindings["denoise"]
    graph = timed_runs(lambda: session.run_with_iobinding(binding), args.runs * 4)
    steps = len(last.step_seconds)
    per_step = [(t - sum(last.prefill_seconds)) / steps for t in times]
    return {"total": times, "steps": steps, "prefill": last.prefill_seconds, "per_step": per_step, "graph_step": graph}


def run_reference(ckpt_dir: str, args: argparse.Namespace) -> dict[str, object]:
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    model = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(ckpt_dir, dtype=torch.float32).eval()
    ids = torch.randint(3, 100, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(0))

    def generate() -> None:
        with torch.inference_mode():
            model.generate(
                input_ids=ids,
                max_new_tokens=args.new_tokens,
                max_denoising_steps=args.steps,
                stability_threshold=None,
                confidence_threshold=None,
                eos_token_id=None,
            )

    return {"total": timed_runs(generate, args.runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--child", choices=["dgrt", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run = run_dgrt if args.child == "dgrt" else run_reference
        print(json.dumps(run(args.path, args)))
        return

    work = args.workdir or Path(tempfile.mkdtemp(prefix="dgrt-bench-"))
    ckpt, export_dir = work / "bench-ckpt", work / "bench-onnx"
    if not ckpt.exists():
        subprocess.run([sys.executable, "-m", "dgrt", "tiny", str(ckpt), "--preset", "bench"], check=True)
    if not export_dir.exists():
        subprocess.run(
            [sys.executable, "-m", "dgrt", "export", str(ckpt), "-o", str(export_dir)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    common = [
        "--runs",
        str(args.runs),
        "--threads",
        str(args.threads),
        "--steps",
        str(args.steps),
        "--new-tokens",
        str(args.new_tokens),
    ]
    out = {}
    for side, path in (("dgrt", export_dir), ("reference", ckpt)):
        r = subprocess.run(
            [sys.executable, __file__, "--child", side, "--path", str(path), *common],
            check=True,
            capture_output=True,
            text=True,
        )
        out[side] = json.loads(r.stdout.strip().splitlines()[-1])

    def fmt(xs: list[float], scale: float = 1.0, unit: str = "s") -> str:
        return f"{median(xs) * scale:.3f} {unit} ({min(xs) * scale:.3f}-{max(xs) * scale:.3f})"

    d, ref = out["dgrt"], out["reference"]
    print(
        f"{date.today()}, {platform.machine()}, {args.threads} threads: bench preset, {PROMPT_LEN}-token prompt, "
        f"{args.new_tokens} new tokens, {args.steps} steps, adaptive stop off; median (min-max) of {args.runs}"
    )
    print(f"transformers generate        {fmt(ref['total'])}")
    print(f"dgrt onnxruntime generate    {fmt(d['total'])}  -> {median(ref['total']) / median(d['total']):.2f}x faster")
    step, graph = median(d["per_step"]), median(d["graph_step"])
    print(f"dgrt time per denoise step   {fmt(d['per_step'], 1e3, 'ms')} (prefill excluded)")
    print(f"denoise graph alone          {fmt(d['graph_step'], 1e3, 'ms')}")
    print(
        f"runtime overhead per step    {(step - graph) * 1e3:.2f} ms = {100 * (step - graph) / graph:.1f}% of the graph"
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
