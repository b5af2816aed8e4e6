"""`dgrt bench`: how fast an export runs, measured, next to what the machine allows and the reference.

Every time is the median of `runs` repetitions after one warm-up, with the range. Measured:
* prefill latency by prompt length, denoise step latency by cached (past) length;
* generation: tokens per second at fixed step counts and with adaptive stopping, steps per canvas, time to
  the first canvas;
* the denoise step's weight traffic (weight bytes / step time) against a memory bandwidth measured in the
  same run (a large array copy): a step that must read every weight cannot beat that roofline;
* peak resident memory of the process (and the peak CUDA memory torch allocated, when a backend used it).
Everything runs on token ids, so a model without tokenizer files is timed too; only the task metrics of a
model trained on dgrt's task need one (they score text answers) and are skipped without it.
With a reference checkpoint, transformers runs the same measurements in the same process and thread count.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dgrt.errors import DgrtError, check_ints
from dgrt.progress import Progress
from dgrt.runtime.backends import Backend, DenoiseInputs
from dgrt.runtime.generator import CanvasEvent, Generator, prefill
from dgrt.runtime.kv_cache import KVCache
from dgrt.task import TASK_EXAMPLES, Task, score

DEFAULT_PROMPT_LENGTHS = (16, 128, 512)
DEFAULT_PAST_LENGTHS = (0, 256, 1024, 4096)


@dataclass
class Timing:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, fn: Callable[[], object], runs: int) -> Timing:
        return cls.from_times(timed_runs(fn, runs))

    @classmethod
    def from_times(cls, times: list[float]) -> Timing:
        return cls(statistics.median(times), min(times), max(times))


def timed_runs(fn: Callable[[], object], runs: int) -> list[float]:
    """Seconds of each of `runs` calls of fn, after one warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def interleaved_runs(fns: dict[str, Callable[[], object]], runs: int) -> dict[str, list[float]]:
    """timed_runs of several functions taken in turn, one call of each per round, so that a machine
    getting slower or faster during the measurement moves every side alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


@dataclass
class SideResult:
    prefill_seconds: dict[int, Timing] = field(default_factory=dict)  # by prompt length
    step_seconds: dict[int, Timing] = field(default_factory=dict)  # by past length
    generation: dict[str, dict[str, float]] = field(default_factory=dict)  # by "K=8" / "adaptive"


def memory_bandwidth(nbytes: int = 256 << 20, runs: int = 5) -> float:
    """Bytes per second of a large array copy (each byte read once and written once)."""
    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    t = Timing.of(lambda: np.copyto(dst, src), runs)
    return 2 * nbytes / t.median


def peak_rss_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+)", status)
    return int(match.group(1)) * 1024 if match else 0


def _prefill_prompt(backend: Backend, cache: KVCache, ids: torch.Tensor, pad: torch.Tensor, chunk: int) -> None:
    """A prompt's prefill as generate runs it: into an empty cache, in chunks."""
    cache.reset()
    prefill(backend, cache, ids, torch.arange(ids.shape[1])[None], pad, chunk)


def bench_generator(gen: Generator, prompt_lengths: list[int], past_lengths: list[int], step_counts: list[int],
                    runs: int, progress: Progress) -> SideResult:  # fmt: skip
    info, backend = gen.info, gen.backend
    c, rng = info.canvas_length, torch.Generator().manual_seed(0)
    result = SideResult()
    pad, device = torch.zeros(1, dtype=torch.int64), backend.device
    for p in prompt_lengths:
        progress.update(f"prefill of {p} tokens")
        ids = torch.randint(0, info.vocab_size, (1, p), generator=rng)
        cache = KVCache(info.layers, 1, p, backend.dtype, device)
        prompt_prefill = partial(_prefill_prompt, backend, cache, ids, pad, info.prefill_chunk)
        result.prefill_seconds[p] = Timing.of(prompt_prefill, runs)
    for past_len in past_lengths:
        progress.update(f"denoise step over {past_len} cached tokens")
        past = [
            tuple(torch.randn(1, s.num_kv_heads, _kept(past_len, s.window), s.head_dim, generator=rng)
                  .to(device=device, dtype=backend.dtype) for _ in range(2))
            for s in info.layers
        ]  # fmt: skip
        inputs = DenoiseInputs(
            torch.randint(0, info.vocab_size, (1, c), generator=rng),
            torch.zeros(1, c, info.hidden_size, dtype=backend.dtype, device=device),
            torch.arange(past_len, past_len + c)[None],
            pad,
            torch.tensor([0.6]),
            torch.rand(1, c, generator=rng),
        )
        result.step_seconds[past_len] = Timing.of(partial(backend.denoise, inputs, past), runs)  # type: ignore[arg-type]
    prompt = torch.randint(3, info.vocab_size, (min(128, max(prompt_lengths)),), generator=rng).tolist()
    for label, options in [(f"K={k}", {"steps": k, "stability_threshold": None, "confidence_threshold": None})
                           for k in step_counts] + [("adaptive", {})]:  # fmt: skip
        progress.update(f"generating 2 canvases, {label}")
        result.generation[label] = _generation(gen, prompt, options, runs)
    return result


def _kept(past_len: int, window: int | None) -> int:
    return past_len if window is None else min(past_len, window - 1)


def _generation(gen: Generator, prompt: list[int], options: dict[str, Any], runs: int) -> dict[str, float]:
    new_tokens = 2 * gen.info.canvas_length
    kwargs = dict(seed=0, max_new_tokens=new_tokens, eos_token_id=None, **options)
    timing = Timing.of(lambda: gen.generate(prompt, **kwargs), runs)
    first_canvas: list[float] = []
    start = time.perf_counter()

    def on_event(event: object) -> None:
        if isinstance(event, CanvasEvent) and not first_canvas:
            first_canvas.append(time.perf_counter() - start)

    result = gen.generate(prompt, on_event=on_event, **kwargs)
    return {
        "tokens_per_second": new_tokens / timing.median,
        "seconds": timing.median,
        "seconds_low": timing.low,
        "seconds_high": timing.high,
        "steps_per_canvas": result.mean_steps_per_canvas,
        "time_to_first_canvas": first_canvas[0],
    }


def bench_reference(checkpoint: Path, prompt_lengths: list[int], past_lengths: list[int], step_counts: list[int],
                    runs: int, threads: int, progress: Progress) -> SideResult:  # fmt: skip
    try:
        import transformers
        from transformers.cache_utils import DynamicCache
    except ImportError:
        raise DgrtError("--reference needs transformers: pip install 'dgrt[reference]'.") from None
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(threads)
    hf = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(checkpoint, dtype=torch.float32).eval()
    cfg = hf.config
    c, vocab, rng = cfg.canvas_length, cfg.text_config.vocab_size, torch.Generator().manual_seed(0)
    result = SideResult()

    def encoded(length: int) -> Any:
        """A DynamicCache holding `length` random tokens."""
        cache = DynamicCache(config=cfg.text_config)
        if length:
            ids = torch.randint(0, vocab, (1, length), generator=rng)
            hf.model.encoder(input_ids=ids, past_key_values=cache, position_ids=torch.arange(length)[None])
        return cache

    with torch.inference_mode():
        for p in prompt_lengths:
            progress.update(f"reference prefill of {p} tokens")
            ids = torch.randint(0, vocab, (1, p), generator=rng)
            result.prefill_seconds[p] = Timing.of(partial(hf.model.encoder, input_ids=ids), runs)
        for past_len in past_lengths:
            progress.update(f"reference denoise step over {past_len} cached tokens")
            cache = encoded(max(past_len, 1))  # transformers' decoder needs at least one cached token
            step = partial(hf, decoder_input_ids=torch.randint(0, vocab, (1, c), generator=rng), past_key_values=cache,
                           decoder_position_ids=torch.arange(past_len, past_len + c)[None])  # fmt: skip
            result.step_seconds[past_len] = Timing.of(step, runs)
        prompt = torch.randint(3, vocab, (1, min(128, max(prompt_lengths))), generator=rng)
        fixed = [(f"K={k}", {"max_denoising_steps": k, "stability_threshold": None, "confidence_threshold": None})
                 for k in step_counts]  # fmt: skip
        for label, options in [*fixed, ("adaptive", {})]:
            progress.update(f"reference generating 2 canvases, {label}")
            generate = partial(hf.generate, input_ids=prompt, max_new_tokens=2 * c, eos_token_id=None,
                               pad_token_id=None, **options)  # fmt: skip
            timing = Timing.of(generate, runs)
            passes = 2 * c / float(generate().tokens_per_forward[0])  # without a pad id every token counts
            result.generation[label] = {
                "tokens_per_second": 2 * c / timing.median,
                "seconds": timing.median,
                "seconds_low": timing.low,
                "seconds_high": timing.high,
                "steps_per_canvas": passes / 2,
            }
    return result


def run_bench(
    path: Path,
    backends: list[str] | None,
    reference: Path | None,
    step_counts: list[int],
    prompt_lengths: list[int] | None,
    past_lengths: list[int] | None,
    runs: int,
    threads: int,
) -> dict[str, Any]:
    """Every measurement for each backend (default: the path's default backend), and the reference.
    Lengths default to DEFAULT_PROMPT_LENGTHS / DEFAULT_PAST_LENGTHS, those the model's context allows."""
    import dgrt

    check_ints("--steps", step_counts, 1)
    check_ints("--prompt-lengths", prompt_lengths or [], 1)
    check_ints("--past-lengths", past_lengths or [], 0)
    check_ints("--runs", runs, 1)
    check_ints("--threads", threads, 1)
    progress = Progress()
    bandwidth = memory_bandwidth()
    report: dict[str, Any] = {
        "path": str(path),
        "threads": threads,
        "runs": runs,
        "memory_bandwidth_bytes_per_second": bandwidth,
        "backends": {},
    }
    sides = {}
    task_skipped = False  # a task model without a tokenizer: its metrics need text
    names: list[str | None] = list(backends) if backends else [None]  # None: the path's default backend
    for name in names:
        with dgrt.load(path, backend=name, threads=threads) as gen:
            longest = gen.info.max_context - gen.info.canvas_length
            prompt_lengths = prompt_lengths or [n for n in DEFAULT_PROMPT_LENGTHS if n <= gen.info.max_context]
            past_lengths = past_lengths or [n for n in DEFAULT_PAST_LENGTHS if n <= longest]
            if max(past_lengths) > longest or max(prompt_lengths) > gen.info.max_context:
                raise DgrtError(
                    f"{path} supports a context of {gen.info.max_context} tokens: prompt lengths must be at most "
                    f"that and cached lengths at most {longest} (the canvas needs the rest)."
                )
            side = bench_generator(gen, prompt_lengths, past_lengths, step_counts, runs, progress)
            weight_bytes = _weight_bytes(path)
            report["canvas_length"] = gen.info.canvas_length
            traffic = weight_bytes / side.step_seconds[min(past_lengths)].median
            sides[gen.backend.name] = side
            report["backends"][gen.backend.name] = _side_json(side) | {
                "weight_bytes": weight_bytes,
                "denoise_weight_bytes_per_second": traffic,
                "fraction_of_bandwidth": traffic / bandwidth,
            }
            task = Task.from_dir(path)
            task_skipped = task is not None and gen.tokenizer is None
            if task is not None and not task_skipped:  # a model trained on dgrt's task: what its speed buys
                progress.update(f"scoring the task on {gen.backend.name}")
                t0 = time.perf_counter()
                scored = score(gen, task.examples(TASK_EXAMPLES))
                report["backends"][gen.backend.name]["task"] = vars(scored) | {"seconds": time.perf_counter() - t0}
    assert prompt_lengths and past_lengths  # set in the loop, which runs at least once
    if reference is not None:
        ref = bench_reference(reference, prompt_lengths, past_lengths, step_counts, runs, threads, progress)
        report["reference"] = _side_json(ref)
        for name, side in sides.items():
            report["backends"][name]["speedup"] = {  # reference time / dgrt time
                "denoise_step": {str(k): ref.step_seconds[k].median / s.median for k, s in side.step_seconds.items()},
                "prefill": {str(k): ref.prefill_seconds[k].median / s.median for k, s in side.prefill_seconds.items()},
                "generation": {k: ref.generation[k]["seconds"] / g["seconds"] for k, g in side.generation.items()},
            }
    report["notes"] = ["no tokenizer: the task metrics were skipped (they score text answers)"] if task_skipped else []
    report["peak_rss_bytes"] = peak_rss_bytes()
    if torch.cuda.is_initialized():  # a backend ran on CUDA through torch (TensorRT's own engine memory is not in it)
        report["torch_cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    progress.close()
    return report


def _weight_bytes(path: Path) -> int:
    """Bytes of weights a denoise step reads, as stored (every backend here loads them in their dtype): the
    export's weights file, or the checkpoint's text weights."""
    if (path / "manifest.json").exists():
        from dgrt.contract import manifest as manifest_mod

        return manifest_mod.load(path).weights.bytes
    from dgrt.checkpoint import Checkpoint

    return Checkpoint.open(path).weight_bytes


def _side_json(side: SideResult) -> dict[str, Any]:
    return {
        "prefill_seconds": {str(k): vars(t) for k, t in side.prefill_seconds.items()},
        "denoise_step_seconds": {str(k): vars(t) for k, t in side.step_seconds.items()},
        "generation": side.generation,
    }


def format_report(r: dict[str, Any]) -> str:
    def t(x: dict[str, float]) -> str:
        return f"{1e3 * x['median']:9.1f} ms ({1e3 * x['low']:.1f}-{1e3 * x['high']:.1f})"

    ref = r.get("reference")
    lines = [f"bench {r['path']}, {r['threads']} threads, median (range) of {r['runs']} runs after a warm-up"]
    for name, side in r["backends"].items():
        speedup = side.get("speedup")
        lines.append(f"[dgrt on {name}]" + ("                          [transformers]" if ref else ""))
        lines.append("prefill latency by prompt length")
        for k, v in side["prefill_seconds"].items():
            extra = f"   {t(ref['prefill_seconds'][k])}  x{speedup['prefill'][k]:.2f}" if ref else ""
            lines.append(f"  {k:>6} tokens {t(v)}{extra}")
        lines.append("denoise step latency by cached length")
        for k, v in side["denoise_step_seconds"].items():
            extra = f"   {t(ref['denoise_step_seconds'][k])}  x{speedup['denoise_step'][k]:.2f}" if ref else ""
            lines.append(f"  {k:>6} cached {t(v)}{extra}")
        lines.append("generation of 2 canvases: tokens/s, steps per canvas, time to first canvas")
        for k, v in side["generation"].items():
            extra = ""
            if ref:
                g = ref["generation"][k]
                extra = (f"   [transformers {g['tokens_per_second']:.1f} tok/s, {g['steps_per_canvas']:.1f} steps]"
                         f"  x{speedup['generation'][k]:.2f}")  # fmt: skip
            lines.append(f"  {k:>9} {v['tokens_per_second']:8.1f} tok/s {v['steps_per_canvas']:5.1f} steps "
                         f"{v['time_to_first_canvas']:.2f} s{extra}")  # fmt: skip
        if "task" in side:
            task = side["task"]
            lines.append(
                f"task: {100 * task['accuracy']:.1f}% exact on {task['examples']} held-out questions, "
                f"{task['mean_steps_per_canvas']:.2f} steps per canvas (limit {task['max_steps']}), "
                f"{task['tokens_per_forward']:.2f} tokens per forward, {task['seconds']:.1f} s"
            )
        lines.append(
            f"denoise weight traffic {side['denoise_weight_bytes_per_second'] / 1e9:.2f} GB/s = "
            f"{100 * side['fraction_of_bandwidth']:.1f}% of the measured memory bandwidth "
            f"({r['memory_bandwidth_bytes_per_second'] / 1e9:.1f} GB/s; "
            f"{side['weight_bytes'] / 2**20:.0f} MiB of weights)"
        )
    lines.append(f"peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB")
    if "torch_cuda_peak_bytes" in r:
        lines.append(f"peak CUDA memory allocated by torch {r['torch_cuda_peak_bytes'] / 2**20:.0f} MiB")
    lines += [f"note: {note}" for note in r["notes"]]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DgrtError("--plot needs matplotlib: pip install 'dgrt[bench]'.") from None
    fig, ax = plt.subplots(figsize=(6, 4))
    curves = [(f"dgrt on {name}", side) for name, side in report["backends"].items()]
    if "reference" in report:
        curves.append(("transformers", report["reference"]))
    for label, side in curves:
        xs = [int(k) for k in side["denoise_step_seconds"]]
        ys = [1e3 * v["median"] for v in side["denoise_step_seconds"].values()]
        lo = [1e3 * (v["median"] - v["low"]) for v in side["denoise_step_seconds"].values()]
        hi = [1e3 * (v["high"] - v["median"]) for v in side["denoise_step_seconds"].values()]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=label)
    ax.set_xlabel("cached tokens (past length)")
    ax.set_ylabel("denoise step latency (ms)")
    ax.set_title(f"denoise step, canvas {report['canvas_length']}, {report['threads']} threads")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    import io

    from dgrt.fsutil import atomic_write_bytes

    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())  # a unique temporary file: a planted symlink is not followed
