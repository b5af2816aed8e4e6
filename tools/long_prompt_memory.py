"""Memory and time of a long prompt's chunked prefill and the denoise steps after it, on ONNX Runtime,
against `dgrt plan`'s estimate of each graph's activations.

    python tools/long_prompt_memory.py EXPORT_DIR [--prompts 2048 32768] [--steps 3] [--threads 2]
                                       [--arena] [--glibc-malloc]

Each prompt length runs in a fresh process: load the export, prefill a random prompt the way `generate`
does (in chunks of the export's prefill_chunk, into a KV cache sized for the prompt and one canvas) once
as a warm-up and once measured, then run denoise steps of a full canvas over it. Each measured call's
kernel peak RSS is reset before it; reported in MiB: the peak RSS, and "beyond": the peak less the
weights' file-backed pages and the anonymous memory before the call (what the call itself needed:
activations and ONNX Runtime's buffers), next to `dgrt plan`'s activation estimate for that graph at the
expert capacity the call ran with. Steps: the median of those after the first. --arena turns ONNX
Runtime's CPU memory arena back on (dgrt turns it off), to measure what it costs; --glibc-malloc leaves
glibc's mmap threshold as glibc moves it (dgrt sets it to 1 MiB during ONNX Runtime's calls, see
dgrt.runtime.heap).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import date

from dgrt.config import ModelConfig
from dgrt.contract.experts import ExpertRouting
from dgrt.plan import resolve, sizes, weights_of

CHILD = r"""
import ctypes, json, re, sys, time, torch
from pathlib import Path
from dgrt.contract import manifest as mf
from dgrt.runtime import backends, heap
from dgrt.runtime.backends import DenoiseInputs, OnnxRuntimeBackend
from dgrt.runtime.generator import prefill
from dgrt.runtime.kv_cache import KVCache
from dgrt.runtime.load import _info

def status():
    s = open("/proc/self/status").read()
    return {k: int(re.search(k + r":\s+(\d+)", s).group(1)) / 1024 for k in ("VmHWM", "RssAnon", "RssFile")}

def measured(fn):  # fn()'s peak RSS less the file pages and the anonymous memory before it (MiB), seconds, peak
    # Return the heap's free pages first: memory an earlier call freed but glibc kept would otherwise be
    # counted before the call and reused by it, or trimmed during it, and the difference would drift.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = status()
    Path("/proc/self/clear_refs").write_text("5")  # reset the kernel's peak (VmHWM)
    t = time.perf_counter()
    fn()
    seconds, after = time.perf_counter() - t, status()
    return after["VmHWM"] - after["RssFile"] - before["RssAnon"], seconds, after["VmHWM"]

path, prompt, steps, threads = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if "arena" in sys.argv[5]:
    plain = backends.session_options
    def with_arena(*args, **kwargs):
        options = plain(*args, **kwargs)
        options.enable_cpu_mem_arena = True
        return options
    backends.session_options = with_arena
if "glibc" in sys.argv[5]:
    heap.tunable = lambda: False  # and so never call mallopt, which ends glibc's own moving threshold
m = mf.load(path)
backend = OnnxRuntimeBackend(path, m, threads=threads)
capacity = {}  # tokens of a routed call -> the slots per expert it last ran with (after any redo)
if backend.routed is not None:
    routed_run = backend.routed.run
    def recording(tokens, call):
        def call_at(slots):
            capacity[tokens] = slots
            return call(slots)
        return routed_run(tokens, call_at)
    backend.routed.run = recording
info = _info(m.config, m.max_context, m.prefill_chunk)
c = info.canvas_length
zero = torch.zeros(1, dtype=torch.int64)
ids = torch.randint(0, info.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
run_prefill = lambda cache: prefill(backend, cache, ids, torch.arange(prompt)[None], zero, info.prefill_chunk)
# A session's first call allocates more. One cache for both: a warm-up cache freed during the measured
# call (the backend holds its last call's inputs until the next) would hide that much of its peak.
cache = KVCache(info.layers, 1, prompt + c, torch.float32)
run_prefill(cache)
cache.reset()
prefill_peak, prefill_s, prefill_rss = measured(lambda: run_prefill(cache))
soft, rows = torch.zeros(1, c, info.hidden_size), []
for _ in range(steps):
    inputs = DenoiseInputs(torch.randint(0, info.vocab_size, (1, c)), soft, torch.arange(prompt, prompt + c)[None],
                           zero, torch.tensor([0.7]), torch.rand(1, c))
    rows.append(measured(lambda: backend.denoise(inputs, cache.past())))
print(json.dumps({"cache_mib": cache.nbytes / 2**20, "prefill": [prefill_peak, prefill_s, prefill_rss],
                  "steps": rows, "chunk": info.prefill_chunk, "capacity": capacity}))
"""


@dataclass(frozen=True)
class RoutedAt(ExpertRouting):
    """The export's routing at the capacities its calls actually ran with (a random router's busiest
    expert often overflows the default, and the call is redone with more slots)."""

    used: dict[int, int] = field(default_factory=dict)  # tokens of a call -> its slots per expert

    def capacity(self, cfg: ModelConfig, tokens: int) -> int:
        return self.used.get(tokens) or super().capacity(cfg, tokens)


def estimates(export_dir: str, prompt: int, used: dict[int, int]) -> tuple[float, float]:
    """`dgrt plan`'s (prefill, denoise) activations in MiB for this prompt and one canvas after it, at the
    capacities the calls ran with."""
    cfg, _, _, exported = resolve(export_dir)
    assert exported is not None
    dtype, recipe, routing = exported
    s = sizes(cfg, weights_of(cfg, dtype, recipe), dtype, 1, prompt + cfg.canvas_length, prompt,
              RoutedAt(routing.formulation, routing.capacity_factor, used) if routing.routed else routing)  # fmt: skip
    return s.prefill_activations / 2**20, s.denoise_activations / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir")
    parser.add_argument("--prompts", type=int, nargs="+", default=[2048, 32768])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arena", action="store_true", help="ONNX Runtime's CPU memory arena on")
    parser.add_argument(
        "--glibc-malloc", action="store_true", help="leave glibc's dynamic mmap threshold (see dgrt.runtime.heap)"
    )
    args = parser.parse_args()
    mode = [name for name, on in (("arena", args.arena), ("glibc", args.glibc_malloc)) if on]
    setup = ", ".join(["arena on" if args.arena else "no arena"] + ["glibc's own mmap threshold"] * args.glibc_malloc)
    print(
        f"{date.today()}, {args.export_dir}, {args.threads} threads, {setup}, batch 1, a warm-up prefill, then "
        f"the prefill and {args.steps} steps measured (MiB; steps: the median of those after the first)"
    )
    print(
        f"{'prompt':>7}{'chunk':>7}{'slots':>12}{'KV cache':>10}{'prefill s':>11}{'peak RSS':>10}{'beyond':>8}"
        f"{'plan':>6}{'ratio':>7}{'step s':>8}{'peak RSS':>10}{'beyond':>8}{'plan':>6}{'ratio':>7}{'1st step':>10}"
    )
    for prompt in args.prompts:
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                CHILD,
                args.export_dir,
                str(prompt),
                str(args.steps),
                str(args.threads),
                ",".join(mode) or "none",
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        r = json.loads(out)
        used = {int(tokens): slots for tokens, slots in r["capacity"].items()}
        prefill_plan, denoise_plan = estimates(args.export_dir, prompt, used)
        prefill_beyond, prefill_s, prefill_rss = r["prefill"]
        later = sorted(r["steps"][1:] or r["steps"])
        step_beyond, step_s, step_rss = later[len(later) // 2]
        slots = "/".join(str(used[t]) for t in sorted(used)) or "dense"
        print(
            f"{prompt:>7}{r['chunk']:>7}{slots:>12}{r['cache_mib']:>10.0f}{prefill_s:>11.1f}{prefill_rss:>10.0f}"
            f"{prefill_beyond:>8.0f}{prefill_plan:>6.0f}{prefill_beyond / prefill_plan:>7.2f}{step_s:>8.1f}"
            f"{step_rss:>10.0f}{step_beyond:>8.0f}{denoise_plan:>6.0f}{step_beyond / denoise_plan:>7.2f}"
            f"{r['steps'][0][0]:>10.0f}"
        )


if __name__ == "__main__":
    main()
