"""Train dgrt's small DiffusionGemma on string reversal (dgrt.task) and write it as an HF checkpoint.

    python tools/train_small.py -o dgrt/trained/reverse --force       # the shipped model (~40 min, 2 cores)
    python tools/train_small.py -o /tmp/smoke --steps 3 --eval 4      # a smoke run
    python tools/train_small.py -o dgrt/trained/reverse --eval-only   # re-score a trained checkpoint

The model is the project's own torch modules with every DiffusionGemma feature on (sliding and full
layers, K=V full attention, proportional RoPE, MoE next to the dense MLP, self-conditioning, separate
encoder and decoder layer scalars). The objective is uniform-state block diffusion, as the model is used:

* an example is a chat prompt and its answer cut into canvases; one canvas k is the target, and the
  prompt plus canvases 0..k-1 go through the causal prefill into the KV cache;
* the target canvas is corrupted by replacing each token, with probability t ~ U(0, 1) per example, by
  a uniformly random token of the whole vocabulary (what generation starts from and renoises with);
* the denoiser sees the corrupted canvas and the cache and is trained with cross-entropy to recover the
  clean canvas; half the time it first runs once without gradients and its (detached) soft embeddings at
  a temperature from the sampler's range condition the second, trained pass (self-conditioning).

Everything is deterministic in --seed (held-out questions come from dgrt.task.HELD_OUT_SEED). At the end
the checkpoint is written, loaded back with dgrt.load and scored on held-out questions with the default
sampler; the metrics go into dgrt_task.json next to the weights.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as HFTokenizer

import dgrt
from dgrt.checkpoint import checkpoint_key
from dgrt.config import ModelConfig
from dgrt.fsutil import atomic_write_text
from dgrt.model import DiffusionGemma
from dgrt.presets import (
    END_TURN_ID,
    PAD_ID,
    PRESETS,
    preset_config,
    random_weights,
    save_checkpoint,
    tokenizer_config,
    tokenizer_json,
)
from dgrt.runtime.tokenizer import Tokenizer
from dgrt.task import TASK_FILE, Example, Task, score

PRESET = "reverse"  # the architecture, in dgrt.presets.PRESETS
CANVAS = PRESETS[PRESET]["canvas_length"]
# The sampler defaults shipped in generation_config.json: the reference's, with room for 3 canvases.
GENERATION = {"max_new_tokens": 3 * CANVAS}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", type=Path, required=True, help="checkpoint folder to write")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps (default 3000)")
    p.add_argument("--batch", type=int, default=64, help="examples per step (default 64)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", type=int, default=500, help="held-out questions scored at the end (default 500)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--eval-only", action="store_true", help="only score the checkpoint in --output (no training)")
    return p.parse_args()


class Batcher:
    """Training batches: left-padded contexts (prompt + clean canvases) and one target canvas per row."""

    def __init__(self, task: Task, tokenizer: Tokenizer, vocab: int, seed: int):
        self.task, self.tok, self.vocab = task, tokenizer, vocab
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)

    def encode(self, ex: Example) -> tuple[list[int], list[int]]:
        prompt = self.tok.apply_chat_template([{"role": "user", "content": ex.question}])
        answer = self.tok.encode(ex.answer) + [END_TURN_ID]
        return prompt, answer + [PAD_ID] * (-len(answer) % CANVAS)

    def __call__(self, n: int) -> dict[str, torch.Tensor]:
        contexts, targets = [], []
        for _ in range(n):
            prompt, answer = self.encode(self.task.example(self.rng))
            k = self.rng.randrange(len(answer) // CANVAS)
            contexts.append(prompt + answer[: k * CANVAS])
            targets.append(answer[k * CANVAS : (k + 1) * CANVAS])
        width = max(map(len, contexts))
        pad = torch.tensor([width - len(c) for c in contexts])
        ids = torch.tensor([[PAD_ID] * (width - len(c)) + c for c in contexts])
        positions = (torch.arange(width)[None] - pad[:, None]).clamp(min=0)
        target = torch.tensor(targets)
        rate = torch.rand(n, 1, generator=self.gen)
        noise = torch.randint(0, self.vocab, target.shape, generator=self.gen)
        canvas = torch.where(torch.rand(target.shape, generator=self.gen) < rate, noise, target)
        canvas_positions = (width - pad)[:, None] + torch.arange(CANVAS)[None]
        self_condition = torch.rand((), generator=self.gen) < 0.5
        temperature = 0.4 + 0.4 * torch.rand((), generator=self.gen)
        return dict(
            ids=ids,
            positions=positions,
            pad=pad,
            canvas=canvas,
            canvas_positions=canvas_positions,
            target=target,
            self_condition=self_condition,
            temperature=temperature,
        )


def loss_and_accuracy(model: DiffusionGemma, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
    past = model.prefill(b["ids"], b["positions"], model.empty_past(len(b["ids"])), b["pad"])
    soft = torch.zeros(*b["canvas"].shape, model.config.hidden_size)
    if b["self_condition"]:
        with torch.no_grad():
            first = model.denoise(b["canvas"], soft, b["canvas_positions"], past, b["pad"])
            soft = model.soft_embeddings(first / b["temperature"])
    logits = model.denoise(b["canvas"], soft, b["canvas_positions"], past, b["pad"])
    loss = F.cross_entropy(logits.flatten(0, 1), b["target"].flatten())
    return loss, (logits.argmax(-1) == b["target"]).float().mean().item()


def learning_rate(step: int, steps: int, peak: float) -> float:
    warmup = min(200, steps // 10 + 1)
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def evaluate(checkpoint: Path, examples: int) -> None:
    """Score a trained checkpoint on held-out questions with its default sampler; record it in its task file."""
    task = Task.from_dir(checkpoint)
    if task is None:
        raise SystemExit(f"{checkpoint} has no {TASK_FILE}.")
    with dgrt.load(checkpoint, backend="torch") as gen:
        result = score(gen, task.examples(examples))
    print(result.format(), flush=True)
    task_file = json.loads((checkpoint / TASK_FILE).read_text())
    task_file["held_out"] = {
        "examples": result.examples,
        "accuracy": result.accuracy,
        "mean_steps_per_canvas": round(result.mean_steps_per_canvas, 3),
        "tokens_per_forward": round(result.tokens_per_forward, 3),
    }
    atomic_write_text(checkpoint / TASK_FILE, json.dumps(task_file, indent=2) + "\n")


def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.eval_only:
        evaluate(args.output, args.eval)
        return 0
    torch.manual_seed(args.seed)
    task = Task()
    config = preset_config(PRESET)
    cfg = ModelConfig.from_dict(config)
    model = DiffusionGemma(cfg)
    init = random_weights(cfg, args.seed, gain=1.0)
    model.load_state_dict({name: init[checkpoint_key(name)] for name, _ in model.named_parameters()})
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.2f}M parameters, canvas {CANVAS}, task {task.to_json()}", flush=True)

    if args.output.exists() and not args.force:
        raise SystemExit(f"{args.output} exists; pass --force to replace it.")
    tokenizer = Tokenizer(HFTokenizer.from_str(tokenizer_json(cfg.vocab_size)), tokenizer_config(cfg))
    batches = Batcher(task, tokenizer, cfg.vocab_size, args.seed + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.0)

    start, window = time.perf_counter(), []
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr)
        loss, acc = loss_and_accuracy(model, batches(args.batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        window.append((loss.item(), acc))
        if (step + 1) % 50 == 0 or step + 1 == args.steps:
            mean_loss = sum(w[0] for w in window) / len(window)
            mean_acc = sum(w[1] for w in window) / len(window)
            elapsed = time.perf_counter() - start
            print(
                f"step {step + 1}/{args.steps}  loss {mean_loss:.4f}  token accuracy {100 * mean_acc:.1f}%  "
                f"{elapsed / 60:.1f} min",
                flush=True,
            )
            window.clear()
    train_seconds = time.perf_counter() - start

    weights = {checkpoint_key(name): p.detach().contiguous() for name, p in model.named_parameters()}
    trained = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed}
    trained["train_minutes"] = round(train_seconds / 60, 1)
    task_file = {**task.to_json(), "trained": trained}
    save_checkpoint(
        args.output,
        config,
        weights,
        generation=GENERATION,
        metadata={"dgrt_trained": json.dumps(trained)},
        extra_files={TASK_FILE: json.dumps(task_file, indent=2) + "\n"},
        force=True,
    )
    if args.eval:
        evaluate(args.output, args.eval)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
