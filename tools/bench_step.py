"""One denoise step at real widths: dgrt's exports on ONNX Runtime against transformers doing the same step.

    python tools/bench_step.py CHECKPOINT EXPORT [EXPORT ...] [--prompt 128] [--runs 3] [--threads 2]

After a prompt of `--prompt` random tokens is prefilled, each side times one denoise step over a canvas of
random tokens, one warm-up then `--runs` timed runs, medians and ranges:
* each export (e.g. one routed and one dense), on ONNX Runtime's CPU provider, through dgrt's backend:
  the step's graph includes the LM head, the sampler's draw and entropy and the next soft embeddings;
* transformers (fp32): the decoder's forward with self-conditioning logits (as on every step of a canvas
  but its first) and what its sampler does with the logits per step (softmax at a temperature, a
  multinomial draw and the entropy).
Each side runs in its own process (a real-width slice's weights fit once in memory, not three times) with
the same thread count, one after the other, so one does not slow another.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parents[1]


def run_export(path: str, prompt: int, runs: int, threads: int) -> dict[str, object]:
    import torch

    from dgrt.bench import peak_rss_bytes, timed_runs
    from dgrt.contract import manifest as manifest_mod
    from dgrt.runtime.backends import DenoiseInputs, OnnxRuntimeBackend
    from dgrt.runtime.generator import prefill
    from dgrt.runtime.kv_cache import KVCache
    from dgrt.runtime.load import _info

    manifest = manifest_mod.load(path)
    backend = OnnxRuntimeBackend(Path(path), manifest, threads=threads)
    info = _info(manifest.config, manifest.max_context, manifest.prefill_chunk)
    gen = torch.Generator().manual_seed(0)
    c, zero = info.canvas_length, torch.zeros(1, dtype=torch.int64)
    cache = KVCache(info.layers, 1, prompt + c, backend.dtype)
    ids = torch.randint(0, info.vocab_size, (1, prompt), generator=gen)
    prefill(backend, cache, ids, torch.arange(prompt)[None], zero, info.prefill_chunk)
    canvas, soft = torch.randint(0, info.vocab_size, (1, c), generator=gen), torch.zeros(1, c, info.hidden_size)
    positions = torch.arange(prompt, prompt + c)[None]
    inputs = DenoiseInputs(canvas, soft, positions, zero, torch.tensor([0.8]), torch.rand(1, c, generator=gen))
    times = timed_runs(lambda: backend.denoise(inputs, cache.past()), runs)
    routed = backend.routed
    return {
        "side": f"dgrt {manifest.experts.describe()}, ONNX Runtime ({Path(path).name})",  # several exports: by folder
        "step_s": times,
        "redos": None if routed is None else f"{routed.redos} of {routed.calls} calls",
        "peak_rss_gb": peak_rss_bytes() / 2**30,
    }


def run_reference(checkpoint: str, prompt: int, runs: int, threads: int) -> dict[str, object]:
    import torch
    import transformers
    from transformers.cache_utils import DynamicCache

    from dgrt.bench import peak_rss_bytes, timed_runs

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(threads)
    hf = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(checkpoint, dtype=torch.float32).eval()
    cfg = hf.config
    c, vocab, gen = cfg.canvas_length, cfg.text_config.vocab_size, torch.Generator().manual_seed(0)
    with torch.inference_mode():
        cache = DynamicCache(config=cfg.text_config)
        ids = torch.randint(0, vocab, (1, prompt), generator=gen)
        hf.model.encoder(input_ids=ids, past_key_values=cache, position_ids=torch.arange(prompt)[None])
        canvas = torch.randint(0, vocab, (1, c), generator=gen)
        # A step after the canvas's first: the previous step's logits / temperature condition this one.
        conditioning = torch.randn(1, c, vocab, generator=gen)

        def step() -> None:
            logits = hf(decoder_input_ids=canvas, past_key_values=cache, self_conditioning_logits=conditioning,
                        decoder_position_ids=torch.arange(prompt, prompt + c)[None]).logits  # fmt: skip
            probs = torch.softmax(logits.float() / 0.8, dim=-1)
            torch.multinomial(probs.reshape(-1, vocab), 1)
            torch.distributions.Categorical(probs=probs).entropy()

        times = timed_runs(step, runs)
    return {"side": "transformers (self-conditioned forward + softmax, multinomial, entropy)", "step_s": times,
            "peak_rss_gb": peak_rss_bytes() / 2**30}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("exports", nargs="+")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--side", help=argparse.SUPPRESS)  # internal: run one side in this process
    args = parser.parse_args()
    if args.side:
        fn, path = (run_reference, args.checkpoint) if args.side == "reference" else (run_export, args.side)
        print(json.dumps(fn(path, args.prompt, args.runs, args.threads)))
        return
    results = []
    for side in [*args.exports, "reference"]:
        command = [sys.executable, __file__, args.checkpoint, *args.exports, "--side", side,
                   "--prompt", str(args.prompt), "--runs", str(args.runs), "--threads", str(args.threads)]  # fmt: skip
        out = subprocess.run(
            command, check=True, capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(ROOT)}
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        times = result.pop("step_s")
        result |= {"median_s": median(times), "min_s": min(times), "max_s": max(times)}
        print(json.dumps(result), flush=True)
        results.append(result)
    reference = results[-1]["median_s"]
    print(json.dumps({
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {args.threads} threads",
        "prompt": args.prompt,
        "speedup_vs_transformers": {r["side"]: reference / r["median_s"] for r in results[:-1]},
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
