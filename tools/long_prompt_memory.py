"""Memory and time of a long prompt's chunked prefill and the denoise steps after it, on ONNX Runtime.

    python tools/long_prompt_memory.py EXPORT_DIR [--prompts 2048 32768] [--steps 2] [--threads 2] [--arena]

Each prompt length runs in a fresh process: load the export, prefill a random prompt the way `generate`
does (in chunks of the export's prefill_chunk, into a KV cache sized for the prompt and one canvas), then
run denoise steps of a full canvas over it. Reported per phase (the peak is reset between them), in MiB:
the peak RSS, and "beyond": the peak less the weights' file-backed pages, the KV cache and the process
before loading (what the calls themselves needed: activations and ONNX Runtime's buffers). --arena turns ONNX
Runtime's CPU memory arena back on (dgrt turns it off), to measure what it costs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import date

CHILD = r"""
import json, re, sys, time, torch
from pathlib import Path
from dgrt.contract import manifest as mf
from dgrt.runtime import backends
from dgrt.runtime.backends import DenoiseInputs, OnnxRuntimeBackend
from dgrt.runtime.generator import prefill
from dgrt.runtime.kv_cache import KVCache
from dgrt.runtime.load import _info

def status():
    s = open("/proc/self/status").read()
    return {k: int(re.search(k + r":\s+(\d+)", s).group(1)) / 1024 for k in ("VmHWM", "RssAnon", "RssFile")}

path, prompt, steps, threads = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if sys.argv[5] == "arena":
    plain = backends.session_options
    def with_arena(*args, **kwargs):
        options = plain(*args, **kwargs)
        options.enable_cpu_mem_arena = True
        return options
    backends.session_options = with_arena
import onnxruntime  # noqa: F401 (counted in the baseline)
base = status()
m = mf.load(path)
backend = OnnxRuntimeBackend(path, m, threads=threads)
info = _info(m.config, m.max_context, m.prefill_chunk)
c = info.canvas_length
cache = KVCache(info.layers, 1, prompt + c, torch.float32)
cache_mib = cache.nbytes / 2**20
zero = torch.zeros(1, dtype=torch.int64)
ids = torch.randint(0, info.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
t = time.perf_counter()
prefill(backend, cache, ids, torch.arange(prompt)[None], zero, info.prefill_chunk)
prefill_s = time.perf_counter() - t
after_prefill = status()
Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM): the steps' own from here
soft, times = torch.zeros(1, c, info.hidden_size), []
for _ in range(steps):
    inputs = DenoiseInputs(torch.randint(0, info.vocab_size, (1, c)), soft, torch.arange(prompt, prompt + c)[None],
                           zero, torch.tensor([0.7]), torch.rand(1, c))
    t = time.perf_counter()
    soft = backend.denoise(inputs, cache.past()).next_soft
    times.append(time.perf_counter() - t)
print(json.dumps({"base": base, "prefill": after_prefill, "denoise": status(), "cache_mib": cache_mib,
                  "prefill_s": prefill_s, "step_s": times, "chunk": info.prefill_chunk}))
"""


def beyond(phase: dict[str, float], base: dict[str, float], cache: float) -> float:
    """A phase's peak less the weights' pages (file-backed: all the file pages it holds), the KV cache and
    the process's own memory before loading."""
    return phase["VmHWM"] - phase["RssFile"] - base["RssAnon"] - cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir")
    parser.add_argument("--prompts", type=int, nargs="+", default=[2048, 32768])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arena", action="store_true", help="ONNX Runtime's CPU memory arena on")
    args = parser.parse_args()
    arena = "arena on" if args.arena else "no arena"
    print(f"{date.today()}, {args.export_dir}, {args.threads} threads, {arena}, batch 1, {args.steps} steps (MiB)")
    print(
        f"{'prompt':>7}{'chunk':>7}{'KV cache':>10}{'prefill s':>11}{'prefill peak':>14}{'beyond':>8}"
        f"{'step s':>8}{'denoise peak':>14}{'beyond':>8}"
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
                "arena" if args.arena else "none",
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        r = json.loads(out)
        base, cache = r["base"], r["cache_mib"]
        steps = sorted(r["step_s"])
        print(
            f"{prompt:>7}{r['chunk']:>7}{cache:>10.0f}{r['prefill_s']:>11.1f}{r['prefill']['VmHWM']:>14.0f}"
            f"{beyond(r['prefill'], base, cache):>8.0f}{steps[len(steps) // 2]:>8.1f}{r['denoise']['VmHWM']:>14.0f}"
            f"{beyond(r['denoise'], base, cache):>8.0f}"
        )


if __name__ == "__main__":
    main()
