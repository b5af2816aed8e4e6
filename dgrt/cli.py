"""The `dgrt` command line."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from dgrt import __version__
from dgrt.errors import DgrtError, DgrtWarning


def _cmd_tiny(args: argparse.Namespace) -> None:
    from dgrt.presets import REAL_MODELS, write_slice, write_tiny

    if args.preset in REAL_MODELS:
        out = write_slice(args.out_dir, args.preset, layers=args.layers or 2, seed=args.seed, force=args.force)
        print(f"wrote the first {args.layers or 2} layers of {args.preset} (random, bf16, sharded) to {out}")
        return
    if args.layers is not None:
        raise DgrtError(f"--layers cuts a real model ({', '.join(REAL_MODELS)}), not the {args.preset} preset.")
    out = write_tiny(args.out_dir, preset=args.preset, seed=args.seed, force=args.force)
    print(f"wrote {args.preset} checkpoint (seed {args.seed}) to {out}")


def _cmd_inspect(args: argparse.Namespace) -> None:
    from dgrt.checkpoint import Checkpoint

    ckpt = Checkpoint.open(args.checkpoint)
    cfg = ckpt.config
    kinds = "".join("S" if s.is_sliding else "F" for s in cfg.layers)
    print(f"checkpoint     {ckpt.path}")
    print(f"text tensors   {len(ckpt.tensors)} ({ckpt.weight_bytes / 2**20:.1f} MiB, {ckpt.dtype})")
    print(f"layers         {cfg.num_layers} ({kinds}), sliding window {cfg.sliding_window}")
    print(f"hidden         {cfg.hidden_size}, vocab {cfg.vocab_size}, canvas {cfg.canvas_length}")
    for kind, spec in (
        ("sliding", next((s for s in cfg.layers if s.is_sliding), None)),
        ("full", cfg.layers[-1]),
    ):
        if spec is not None:
            print(f"{kind:<14} {cfg.num_attention_heads} heads x {spec.head_dim}, {spec.num_kv_heads} KV heads")
    print(f"experts        {cfg.num_experts} (top {cfg.top_k_experts}), expert width {cfg.moe_intermediate_size}")


def _cmd_export(args: argparse.Namespace) -> None:
    from dgrt.contract.experts import ExpertRouting
    from dgrt.exporter.onnx_export import ExportOptions, export
    from dgrt.exporter.quantize import Recipe

    options = ExportOptions(
        dtype=args.dtype,
        opset=args.opset,
        max_context=args.max_context,
        prefill_chunk=args.prefill_chunk,
        head_chunk=args.head_chunk,
        experts=ExpertRouting(args.moe, args.expert_capacity_factor),
        debug_logits=args.debug_logits,
        quant=Recipe(args.quant, args.block_size) if args.quant else None,
        calibration=args.calibration,
        calibration_samples=args.calibration_samples,
        accuracy="off" if args.no_accuracy else args.accuracy,
    )
    t0 = time.perf_counter()
    exported = export(args.checkpoint, args.output, options, force=args.force)
    manifest = exported.manifest
    weights = manifest.weights
    print(f"exported {args.checkpoint} to {args.output} in {time.perf_counter() - t0:.1f} s")
    print(
        f"  {', '.join(g.file for g in manifest.graphs.values())}, manifest.json, "
        f"{weights.file} ({weights.tensors} tensors, {weights.bytes / 2**20:.1f} MiB, stored once)"
    )
    print(
        f"  dtype {manifest.dtype}, opset {manifest.opset}, canvas {manifest.canvas_length}, "
        f"max context {manifest.max_context}, prefill chunks of {manifest.prefill_chunk}, {manifest.experts.describe()}"
    )
    print(exported.lint.format())
    quantization = manifest.quantization
    if quantization and "accuracy" in quantization:
        from dgrt.exporter.accuracy import format_summary

        print(format_summary(quantization["recipe"], quantization["accuracy"]))


def _cmd_build(args: argparse.Namespace) -> None:
    import json

    from dgrt.progress import Progress
    from dgrt.tensorrt.build import ENGINE_FILE, build
    from dgrt.tensorrt.options import BuildOptions

    options = BuildOptions(
        target=args.target,
        max_batch=args.max_batch,
        max_context=args.max_context,
        opt_context=args.opt_context,
        workspace_gb=args.workspace,
        refit=args.refit,
        strip_weights=args.strip_weights,
        weight_streaming=args.weight_streaming,
        tf32=args.tf32,
        one_engine=args.one_engine,
    )
    out = build(
        args.export_dir,
        options,
        timing_cache=args.timing_cache,
        force=args.force,
        progress=Progress(),
        verify=not args.no_verify,
    )
    engine = json.loads((out / ENGINE_FILE).read_text())
    sm = "".join(map(str, engine["compute_capability"]))
    print(
        f"engines in {out}: TensorRT {engine['tensorrt']}, {engine['gpu']} (sm_{sm}), {engine['precision']}, "
        f"built in {engine['build_seconds']} s (reused if that was earlier)"
    )


def _cmd_lint(args: argparse.Namespace) -> int:
    from dgrt.exporter.lint import lint_export

    report = lint_export(args.export_dir)
    print(report.format())
    return 0 if report.ok else 1


def _cmd_generate(args: argparse.Namespace) -> None:
    import json

    import dgrt
    from dgrt.runtime.display import CanvasDisplay, summary

    gen = dgrt.load(
        args.path, backend=args.backend, threads=args.threads, verify=not args.no_verify, engines=args.engines
    )
    options: dict[str, Any] = {"seed": args.seed, "chat": not args.raw}
    for name in ("max_new_tokens", "steps", "t_min", "t_max", "entropy_bound", "stability_threshold",
                 "confidence_threshold"):  # fmt: skip
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.no_adaptive:
        options.update(stability_threshold=None, confidence_threshold=None)
    if args.eos_id is not None:
        options["eos_token_id"] = args.eos_id
    if args.stream:
        options["on_event"] = CanvasDisplay(gen.tokenizer, len(args.prompt))
    result = gen.generate(args.prompt if len(args.prompt) > 1 else args.prompt[0], **options)
    if args.json:
        steps = result.step_seconds
        stats = {
            "backend": gen.backend.name,
            "mean_step_seconds": sum(steps) / len(steps) if steps else None,
            "total_prefill_seconds": sum(result.prefill_seconds),
        }
        print(json.dumps(result.to_json() | stats, indent=2))
        return
    if len(result.texts) == 1:
        print(result.texts[0])
    else:  # texts may hold newlines: a header line starts each row (--json is the format to parse)
        for i, text in enumerate(result.texts):
            print(f"--- [{i}]\n{text}")
    print(summary(result, gen.backend.name), file=sys.stderr)


def _cmd_serve(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from dgrt.serve.app import create_app
    except ImportError as e:
        raise DgrtError(f"dgrt serve needs its extra ({e.name} is missing): pip install 'dgrt[serve]'.") from None
    import dgrt

    if args.max_batch < 1:
        raise DgrtError(f"--max-batch is {args.max_batch}; expected a positive number of rows.")
    if not 1 <= args.port <= 65535:
        raise DgrtError(f"--port is {args.port}; expected a TCP port from 1 to 65535.")
    gen = dgrt.load(
        args.path, backend=args.backend, threads=args.threads, verify=not args.no_verify, engines=args.engines
    )
    name = args.served_model_name or args.model_ids.get("path") or Path(args.path).resolve().name
    app = create_app(gen, name, max_batch=args.max_batch, max_context=args.max_context, api_key=args.api_key,
                     owns_generator=True)  # fmt: skip
    print(f"serving {args.path} as '{name}' on http://{args.host}:{args.port}/v1 (batches of up to {args.max_batch})",
          file=sys.stderr)  # fmt: skip
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


def _cmd_validate(args: argparse.Namespace) -> int:
    import json

    from dgrt.fsutil import atomic_write_text
    from dgrt.validate import validate

    report = validate(
        args.path,
        args.reference,
        backend=args.backend,
        prompts=args.prompts,
        canvases=args.canvases,
        steps=args.steps,
        seed=args.seed,
    )
    print(report.format())
    if args.json:
        atomic_write_text(args.json, json.dumps(report.to_json(), indent=2) + "\n")
    return 0 if report.ok else 1


def _cmd_bench(args: argparse.Namespace) -> None:
    import json

    from dgrt.bench import format_report, plot, run_bench
    from dgrt.fsutil import atomic_write_text

    report = run_bench(
        args.path,
        args.backend,
        args.reference,
        step_counts=args.steps,
        prompt_lengths=args.prompt_lengths,
        past_lengths=args.past_lengths,
        runs=args.runs,
        threads=args.threads,
    )
    print(format_report(report))
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(report, args.plot)
        print(f"plot written to {args.plot}")


def _cmd_plan(args: argparse.Namespace) -> None:
    import json

    from dgrt.exporter.quantize import Recipe
    from dgrt.fsutil import atomic_write_text
    from dgrt.plan import make_plan

    recipe = Recipe(args.quant, args.block_size) if args.quant else None
    plan = make_plan(args.source, args.dtype, recipe, args.target, args.batch, args.context, args.prompt, args.steps)
    print(plan.format())
    if args.json:
        atomic_write_text(args.json, json.dumps(plan.to_json(), indent=2) + "\n")


def _int_list(text: str) -> list[int]:
    """Comma-separated integers; their ranges are checked where they are used (validate, run_bench)."""
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _backend_list(text: str) -> list[str]:
    from dgrt.runtime.load import BACKENDS

    names = text.split(",")
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown backend {unknown[0]!r}; expected some of {', '.join(BACKENDS)}")
    return names


def _demo_validation(export_dir: Path, checkpoint: Path, prompt: str) -> str:
    """One line on the export's accuracy against transformers, or why it was skipped."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return "accuracy: not checked (transformers is not installed: pip install 'dgrt[reference]')"
    from dgrt.validate import validate

    report = validate(export_dir, checkpoint, prompts=(prompt,), canvases=1, steps=8, task_examples=0)
    checks = {c.name: c.measured for c in report.checks}
    return (
        f"accuracy against transformers: {'passed' if report.ok else 'FAILED'}; logits max abs error "
        f"{checks['denoise logits max abs error']:.1e}, argmax agreement {checks['denoise argmax agreement']:.3f}, "
        f"token agreement with shared noise {checks['end to end token agreement (shared noise)']:.3f}"
    )


DEMO_QUESTION = "Reverse: blockdiffusionrefinesinparallel"


def _cmd_demo(args: argparse.Namespace) -> None:
    import dgrt
    from dgrt.exporter.onnx_export import export
    from dgrt.presets import write_tiny
    from dgrt.progress import Progress
    from dgrt.runtime.display import CanvasDisplay, summary
    from dgrt.task import Task, score, shipped_checkpoint

    with tempfile.TemporaryDirectory(prefix="dgrt-demo-") as tmp:
        t0 = time.perf_counter()
        if args.random:
            ckpt, what = write_tiny(Path(tmp) / args.random, preset=args.random, seed=0), f"a '{args.random}' random"
        else:
            ckpt, what = shipped_checkpoint(), "dgrt's trained string-reversal"
        task = Task.from_dir(ckpt)
        exported = export(ckpt, Path(tmp) / "onnx", progress=Progress())
        nodes = sum(sum(g.ops.values()) for g in exported.lint.graphs)
        print(
            f"exported {what} checkpoint to ONNX in {time.perf_counter() - t0:.1f} s "
            f"(weights {exported.manifest.weights.bytes / 2**20:.1f} MiB; TensorRT lint of {nodes} nodes: "
            f"{'passed' if exported.lint.ok else 'failed'})"
        )
        prompt = args.prompt or (DEMO_QUESTION if task else "Reverse the string 'diffusion'.")
        accuracy = _demo_validation(Path(tmp) / "onnx", ckpt, prompt)
        with dgrt.load(Path(tmp) / "onnx") as gen:
            print(f"prompt: {prompt!r} (chat template applied)")
            result = gen.generate(prompt, seed=0, on_event=CanvasDisplay(gen.tokenizer, 1))
            print(summary(result, gen.backend.name))
            expected = task.answer(prompt) if task is not None else None
            if expected is not None:
                right = result.texts[0].strip() == expected
                print("answer correct" if right else f"answer WRONG (expected {expected})")
            if task is not None:
                t0 = time.perf_counter()
                scored = score(gen, task.examples(100))
                print(f"{scored.format()} ({time.perf_counter() - t0:.1f} s on {gen.backend.name})")
    print(accuracy)
    if task is None:
        print(
            "random weights: the text is noise, and entropies stay too high for adaptive stopping to end a canvas early"
        )


NO_VERIFY_HELP = (
    "skip checking weights.bin against the manifest's sha256 (checked once per file otherwise, then cached; "
    "for huge exports on slow disks: a corrupt file then gives wrong text without an error)"
)
ENGINES_HELP = "with --backend tensorrt: the engine build to run (EXPORT/engines/<key>), where there are several"


# The arguments of each command that take a checkpoint folder, and so also a Hub model id (with --revision).
_CHECKPOINT_ARGUMENTS = {
    "generate": ("path",),
    "serve": ("path",),
    "validate": ("reference",),
    "plan": ("source",),
    "bench": ("path", "reference"),
    "export": ("checkpoint",),
    "inspect": ("checkpoint",),
}
REVISION_HELP = "with a Hugging Face Hub model id: its branch, tag or commit (default main)"


class _Parser(argparse.ArgumentParser):
    """argparse with dgrt's error format: one line, `dgrt: error: ...`, exit status 2."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("dgrt").strip()
        self.exit(2, f"dgrt: error: {command + ': ' if command else ''}{message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dgrt", description="Export, build and run DiffusionGemma models.")
    parser.add_argument("--version", action="version", version=f"dgrt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    checkpoint_or_id = "or a Hugging Face Hub model id (owner/name)"

    from dgrt.contract.experts import DEFAULT_CAPACITY_FACTOR, FORMULATIONS, LOAD_SPREAD
    from dgrt.contract.io_spec import DTYPES
    from dgrt.contract.manifest import DEFAULT_PREFILL_CHUNK
    from dgrt.exporter.accuracy import MODES as ACCURACY_MODES
    from dgrt.exporter.accuracy import QUICK_ABOVE_BYTES
    from dgrt.exporter.onnx_export import DEFAULT_HEAD_CHUNK, DEFAULT_OPSET
    from dgrt.exporter.quantize import BLOCK_SIZES, RECIPES
    from dgrt.presets import PRESETS, REAL_MODELS
    from dgrt.runtime.load import BACKENDS

    p = sub.add_parser(
        "demo", help="export dgrt's trained model, check it, answer a question with the canvas shown live, score it"
    )
    p.add_argument("--random", choices=sorted(PRESETS), help="use a random checkpoint of this preset instead")
    p.add_argument("--prompt", help=f"default: {DEMO_QUESTION!r}")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("generate", help="generate text from an export directory or a checkpoint folder")
    p.add_argument("path", type=Path, help=f"an export directory, a checkpoint folder {checkpoint_or_id}")
    p.add_argument("prompt", nargs="+", help="one or more prompts (several make a batch)")
    p.add_argument("--backend", choices=BACKENDS, help="default: onnxruntime for exports")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--steps", type=int, help="denoising steps per canvas (max_denoising_steps)")
    p.add_argument("--t-min", type=float)
    p.add_argument("--t-max", type=float)
    p.add_argument("--entropy-bound", type=float)
    p.add_argument("--stability-threshold", type=int)
    p.add_argument("--confidence-threshold", type=float)
    p.add_argument("--no-adaptive", action="store_true", help="always run every step")
    p.add_argument("--eos-id", type=int, nargs="*", help="EOS token ids (default: the checkpoint's)")
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--engines", help=ENGINES_HELP)
    p.add_argument("--no-verify", action="store_true", help=NO_VERIFY_HELP)
    p.add_argument("--stream", action="store_true", help="show the canvas being refined, step by step")
    p.add_argument(
        "--json",
        action="store_true",
        help="print ids, text and statistics as JSON, the format to parse (plain output prints a '--- [i]' line "
        "before each row of a batch, but a text may hold any line)",
    )
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("serve", help="serve an export (or checkpoint) over the OpenAI API, batching requests")
    p.add_argument("path", type=Path, help=f"an export directory, a checkpoint folder {checkpoint_or_id}")
    p.add_argument("--host", default="127.0.0.1", help="default: loopback only")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", choices=BACKENDS, help="default: onnxruntime for exports")
    p.add_argument("--max-batch", type=int, default=8, help="most requests in one batch (default 8)")
    p.add_argument(
        "--max-context", type=int, help="tokens a request's prompt and answer may hold (default: the model's)"
    )
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* and /metrics")
    p.add_argument("--served-model-name", help="the model id clients pass (default: the folder's name)")
    p.add_argument("--threads", type=int)
    p.add_argument("--engines", help=ENGINES_HELP)
    p.add_argument("--no-verify", action="store_true", help=NO_VERIFY_HELP)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("validate", help="compare an export with the PyTorch reference (transformers)")
    p.add_argument("path", type=Path, help="an export directory")
    p.add_argument(
        "--reference", type=Path, required=True, help=f"the export's checkpoint: a folder {checkpoint_or_id}"
    )
    p.add_argument("--backend", choices=["onnxruntime", "torch"], default="onnxruntime")
    p.add_argument(
        "--prompt",
        dest="prompts",
        action="append",
        help="a validation prompt, chat template applied (repeatable; default: three built in, or without "
        "tokenizer files three random token-id prompts)",
    )
    p.add_argument(
        "--prompt-ids",
        dest="prompts",
        type=_int_list,
        action="append",
        help="a validation prompt as comma-separated token ids, used as given (repeatable)",
    )
    p.add_argument("--canvases", type=int, default=2, help="canvases per prompt, >= 1 (default 2)")
    p.add_argument("--steps", type=int, help="denoising steps per canvas, >= 1 (default: generation_config)")
    p.add_argument("--seed", type=int, default=0, help="0 to 2**63-1 (default 0)")
    p.add_argument("--json", type=Path, help="also write the full report as JSON to this file")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser(
        "plan", help="will it fit, how fast can it go: memory and speed floors per GPU target, without running it"
    )
    p.add_argument(
        "source",
        help=f"an export directory, a checkpoint folder {checkpoint_or_id}, or gemma4-26b-a4b (the real model's "
        "config, shipped)",
    )
    p.add_argument("--dtype", choices=list(DTYPES), help="default: an export's own, else fp32 (as dgrt export)")
    p.add_argument("--quant", choices=RECIPES, help="plan a quantized export: fp8, int4, int4-experts")
    p.add_argument("--block-size", type=int, choices=BLOCK_SIZES, default=64, help="INT4 block size (default 64)")
    p.add_argument("--target", help="one of h100, h200, a100, l40s, b200, orin, thor (default: a table of all)")
    p.add_argument("--batch", type=int, default=1, help="rows generated together (default 1)")
    p.add_argument("--prompt", type=int, default=1024, help="prompt tokens (default 1024)")
    p.add_argument(
        "--context", type=int, help="tokens of one row in all (default: prompt + max_new_tokens in canvases)"
    )
    p.add_argument("--steps", type=float, help="denoise steps per canvas (default: generation_config's maximum)")
    p.add_argument("--json", type=Path, help="also write the plan as JSON to this file")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("bench", help="measure prefill, denoise and generation speed (optionally against transformers)")
    p.add_argument("path", type=Path, help=f"an export directory, a checkpoint folder {checkpoint_or_id}")
    p.add_argument("--backend", type=_backend_list, help="onnxruntime, torch, tensorrt, or several comma-separated")
    p.add_argument(
        "--reference", type=Path, help=f"a checkpoint folder {checkpoint_or_id}: measure transformers the same way"
    )
    p.add_argument("--steps", type=_int_list, default=[8, 16, 48], help="fixed step counts, >= 1 (default 8,16,48)")
    p.add_argument("--prompt-lengths", type=_int_list, help=">= 1; default 16,128,512 (those the context allows)")
    p.add_argument("--past-lengths", type=_int_list, help=">= 0; default 0,256,1024,4096 (those the context allows)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per measurement after one warm-up, >= 1")
    p.add_argument("--threads", type=int, default=2, help=">= 1 (default 2)")
    p.add_argument("--json", type=Path, help="write every measurement as JSON to this file")
    p.add_argument("--plot", type=Path, help="write a PNG of step latency against past length")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("tiny", help="write a random HF-layout DiffusionGemma checkpoint")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--preset", choices=[*sorted(PRESETS), *REAL_MODELS], default="tiny")
    p.add_argument("--layers", type=int, help="with a real model: its first N layers at its real widths (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_cmd_tiny)

    p = sub.add_parser("export", help="export the prefill and denoise graphs of a checkpoint to ONNX")
    p.add_argument(
        "checkpoint", type=Path, help=f"a DiffusionGemma checkpoint folder (Hugging Face layout) {checkpoint_or_id}"
    )
    p.add_argument("-o", "--output", type=Path, required=True, help="the export directory to write")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--max-context", type=int, help="longest context (cached + new tokens) to support")
    p.add_argument(
        "--prefill-chunk",
        type=int,
        help="most tokens one prefill call takes; longer prompts are prefilled in chunks, so prefill memory and "
        f"the TensorRT profile grow with the chunk, not the prompt (default {DEFAULT_PREFILL_CHUNK})",
    )
    p.add_argument(
        "--head-chunk",
        type=int,
        help="canvas positions per chunk of the denoise step's vocabulary-sized work (LM head, sampler, next soft "
        "embeddings): its memory is one chunk's, and each chunk reads the embedding again (default "
        f"{DEFAULT_HEAD_CHUNK} for fp32, the ONNX Runtime CPU dtype; the whole canvas for fp16/bf16)",
    )
    p.add_argument(
        "--moe",
        choices=FORMULATIONS,
        default="routed",
        help="routed: each expert computes only its tokens, up to a capacity per call (a call that overflows it "
        "is run again with more, so results equal dense); dense: every expert computes every token (default routed)",
    )
    p.add_argument(
        "--expert-capacity-factor",
        type=float,
        default=DEFAULT_CAPACITY_FACTOR,
        help="routed MoE: slots per expert as a multiple of the mean load, tokens x top_k / experts, but never "
        f"more than the mean plus {LOAD_SPREAD:g} standard deviations of a uniform router's load (few experts or "
        f"many tokens; default {DEFAULT_CAPACITY_FACTOR})",
    )
    p.add_argument("--debug-logits", action="store_true", help="also output the denoise graph's raw logits")
    p.add_argument("--quant", choices=RECIPES, help="quantize: fp8 (W8A8), int4 (weight-only), int4-experts")
    p.add_argument("--block-size", type=int, choices=BLOCK_SIZES, default=64, help="INT4 block size (default 64)")
    p.add_argument(
        "--calibration",
        default="auto",
        help="FP8 calibration prompts: builtin, task (the checkpoint's task), or a file (lines or JSONL); "
        "default: task if the checkpoint has one, else builtin",
    )
    p.add_argument("--calibration-samples", type=int, default=32, help="prompts to calibrate on (default 32)")
    p.add_argument(
        "--accuracy",
        choices=ACCURACY_MODES,
        default="auto",
        help="measure the quantized export against fp32: full (teacher-forced over 3 prompts, 2 canvases, 16 steps, "
        "then both generate), quick (1 prompt, 1 canvas, 4 steps), off; default auto: quick for checkpoints over "
        f"{QUICK_ABOVE_BYTES / 2**30:.0f} GiB, whose every step is slow on a CPU, else full",
    )
    p.add_argument("--no-accuracy", action="store_true", help="the same as --accuracy off")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=_cmd_export)

    from dgrt.tensorrt.targets import TARGETS

    p = sub.add_parser("build", help="build TensorRT engines for an export (needs TensorRT and an NVIDIA GPU)")
    p.add_argument("export_dir", type=Path)
    p.add_argument("--target", default="auto", choices=["auto", *TARGETS], help="default: the GPU at hand")
    p.add_argument("--max-batch", type=int, default=1)
    p.add_argument("--max-context", type=int, help="default: the export's max_context")
    p.add_argument("--opt-context", type=int, help="cached length the kernels are tuned for (default min(1024, max))")
    p.add_argument("--workspace", type=float, help="builder workspace limit in GB")
    p.add_argument("--timing-cache", type=Path, help="timing cache file, read and updated (reused across builds)")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--refit", action="store_true", help="refittable engines")
    weights.add_argument("--strip-weights", action="store_true", help="weight-stripped plans, refilled at load")
    p.add_argument("--weight-streaming", action="store_true", help="stream weights from host memory")
    p.add_argument("--tf32", action="store_true", help="let fp32 GEMMs use TF32 (off: an fp32 engine computes in fp32)")
    p.add_argument(
        "--one-engine",
        action="store_true",
        help="both graphs in one engine: one copy of the weights on the GPU, not two",
    )
    p.add_argument("--force", action="store_true", help="rebuild even if engines with this key exist")
    p.add_argument("--no-verify", action="store_true", help=NO_VERIFY_HELP)
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("lint", help="check an export's graphs against TensorRT's ONNX parser support matrix")
    p.add_argument("export_dir", type=Path)
    p.set_defaults(func=_cmd_lint)

    p = sub.add_parser("inspect", help="validate a checkpoint folder and summarise its text model")
    p.add_argument("checkpoint", type=Path, help=f"a checkpoint folder {checkpoint_or_id}")
    p.set_defaults(func=_cmd_inspect)

    for command in _CHECKPOINT_ARGUMENTS:
        sub.choices[command].add_argument("--revision", help=REVISION_HELP)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        python_format = warnings.showwarning

        def show(message: Warning | str, category: type[Warning], *rest: Any, **kwargs: Any) -> None:
            """dgrt's own warnings as one line, like its errors; anything else as Python prints it."""
            if issubclass(category, DgrtWarning):
                print(f"dgrt: warning: {message}", file=sys.stderr)
            else:
                python_format(message, category, *rest, **kwargs)

        warnings.showwarning = show
        return _run(args)


def _resolve_model_ids(args: argparse.Namespace) -> None:
    """Hub model ids among the command's checkpoint arguments -> their snapshot folders (args.model_ids keeps
    the ids)."""
    from dgrt.hub import is_model_id, resolve

    args.model_ids = {}
    for option in _CHECKPOINT_ARGUMENTS.get(args.command, ()):
        if (value := getattr(args, option)) is not None and is_model_id(value):
            args.model_ids[option] = str(value)
            setattr(args, option, resolve(value, args.revision))
    if getattr(args, "revision", None) is not None and not args.model_ids:
        raise DgrtError(f"--revision {args.revision} pins a Hugging Face Hub model id, and no argument is one.")


def _run(args: argparse.Namespace) -> int:
    from dgrt.fsutil import check_output_file

    try:
        for option in ("json", "plot", "timing_cache"):  # files written after the work: refuse bad ones now
            if isinstance(path := getattr(args, option, None), Path):
                check_output_file(path)
        _resolve_model_ids(args)
        return args.func(args) or 0
    except DgrtError as e:
        print(f"dgrt: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into a command that stopped reading (head, less)
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:  # outputs are written atomically: nothing half-written is left to report
        print("dgrt: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno is None:  # not from the system (disk full, permissions, read-only...): a bug, show it all
            raise
        where = f"{e.filename}: " if e.filename is not None else ""
        print(f"dgrt: error: {where}{e.strerror}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
