"""Resident memory and step time of dgrt's ONNX Runtime backend under different session settings.

    python tools/ort_memory.py EXPORT_DIR [--threads 2]

Each setting runs in a fresh process: load the two sessions, run a prompt prefill and 5 denoise steps of a
full canvas; report RSS (anonymous and file-backed) and the median step time. The weights file's pages
are file-backed and shared between the sessions; an anonymous copy of the weights shows as extra
anonymous memory.
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
from dgrt.runtime.backends import DenoiseInputs, OnnxRuntimeBackend
from dgrt.runtime.kv_cache import KVCache
from dgrt.runtime.load import _info

def rss():
    s = open("/proc/self/status").read()
    g = lambda k: int(re.search(k + r":\s+(\d+)", s).group(1)) / 1024
    return {"rss": g("VmRSS"), "anon": g("RssAnon"), "file": g("RssFile"), "hwm": g("VmHWM")}

path, setting, threads = Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
import onnxruntime  # noqa: F401 (counted in the baseline)
base = rss()
m = mf.load(path)
backend = OnnxRuntimeBackend(path, m, threads=threads, prepack=setting)
loaded = rss()
info = _info(m.config, m.max_context, m.prefill_chunk)
c, p = info.canvas_length, 128
cache = KVCache(info.layers, 1, p + c, torch.float32)
zero = torch.zeros(1, dtype=torch.int64)
cache.append(backend.prefill(torch.randint(0, info.vocab_size, (1, p)), torch.arange(p)[None], zero, cache.past()))
soft = torch.zeros(1, c, info.hidden_size)
times = []
for step in range(6):
    t = time.perf_counter()
    inputs = DenoiseInputs(torch.randint(0, info.vocab_size, (1, c)), soft, torch.arange(p, p + c)[None], zero,
                           torch.tensor([0.7]), torch.rand(1, c))
    out = backend.denoise(inputs, cache.past())
    times.append(time.perf_counter() - t)
    soft = out.next_soft
times = sorted(times[1:])
print(json.dumps({"base": base, "loaded": loaded, "after": rss(), "step_ms": 1e3 * times[len(times) // 2],
                  "step_ms_range": [1e3 * times[0], 1e3 * times[-1]]}))
"""

SETTINGS = {"shared weights (default)": False, "prepacked denoise": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from dgrt.contract import manifest

    weights = manifest.load(args.export_dir).weights.bytes / 2**20
    print(
        f"{date.today()}, {args.export_dir}: weights.bin {weights:.0f} MiB, {args.threads} threads, "
        "batch 1, 128 cached tokens, median of 5 denoise steps after one warm-up"
    )
    print(f"{'setting':<26}{'RSS after load':>16}{'anon':>8}{'file':>8}{'peak':>8}{'step ms':>10}  (MiB)")
    for name, setting in SETTINGS.items():
        out = subprocess.run(
            [sys.executable, "-c", CHILD, args.export_dir, json.dumps(setting), str(args.threads)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        r = json.loads(out)
        a, base = r["after"], r["base"]
        print(
            f"{name:<16}{a['rss'] - base['rss']:>16.0f}{a['anon'] - base['anon']:>8.0f}"
            f"{a['file'] - base['file']:>8.0f}{a['hwm'] - base['rss']:>8.0f}{r['step_ms']:>10.1f}"
            f"  ({r['step_ms_range'][0]:.1f}-{r['step_ms_range'][1]:.1f})"
        )


if __name__ == "__main__":
    main()
