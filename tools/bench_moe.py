"""The MoE block alone, routed against dense, at a model's real widths; and how the router loads experts.

    python tools/bench_moe.py [--preset gemma4-26b-a4b] [--tokens 256] [--runs 5] [--threads 2]
                              [--checkpoint DIR] [--capacity-factor 2.0]

One layer's router and experts (dgrt.model.layers, the modules the graphs are traced from), fp32, on the
CPU: the dense formulation (every expert on every token) against the routed one at the default capacity,
one warm-up then `--runs` timed runs each, medians and ranges; their outputs compared. With --checkpoint
(a real-width slice), its routers' weights and per-layer expert loads over random prompts of `--tokens`
tokens are used and reported: what the default capacity is chosen from (dgrt.contract.experts).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from datetime import date
from pathlib import Path
from statistics import median

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source tree

from dgrt.bench import timed_runs  # noqa: E402
from dgrt.config import ModelConfig  # noqa: E402
from dgrt.contract.experts import ExpertRouting  # noqa: E402
from dgrt.model.layers import Experts, ExpertSlots, Router  # noqa: E402
from dgrt.presets import real_config  # noqa: E402
from dgrt.runtime.experts import slot_ids  # noqa: E402


def block(cfg: ModelConfig, checkpoint: Path | None) -> tuple[Router, Experts]:
    router, experts = Router(cfg).eval(), Experts(cfg).eval()
    if checkpoint is None:
        gen = torch.Generator().manual_seed(0)
        for p in [*router.parameters(), *experts.parameters()]:
            p.data = torch.randn(p.shape, generator=gen) * 0.02
        return router, experts
    from dgrt.checkpoint import Checkpoint, expected_tensors

    ckpt = Checkpoint.open(checkpoint)
    key = {name: key for key, (name, _) in expected_tensors(cfg).items()}
    for module, prefix in ((router, "layers.0.router."), (experts, "layers.0.experts.")):
        for name, p in module.named_parameters():
            p.data = ckpt.tensor(key[prefix + name]).float()
    return router, experts


def loads(checkpoint: Path, tokens: int, prompts: int) -> list[list[int]]:
    """Busiest expert per layer and canvas: the slice's routers on its own hidden states (a denoise pass
    over random token ids through every layer, routed with every token as capacity so nothing is dropped)."""
    from dgrt.checkpoint import load_model

    model = load_model(checkpoint).float()
    out: list[list[int]] = [[] for _ in model.blocks]
    hooks = [
        layer.experts.register_forward_pre_hook(
            lambda _m, args, i=i: out[i].append(int(torch.bincount(args[2].reshape(-1)).max()))
        )
        for i, layer in enumerate(model.blocks)
    ]
    gen = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for _ in range(prompts):
            ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=gen)
            soft = torch.zeros(1, tokens, model.config.hidden_size)
            slots = ExpertSlots(slot_ids(tokens))
            model.denoise_hidden(ids, soft, torch.arange(tokens)[None], model.empty_past(1), None, slots)
    for h in hooks:
        h.remove()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="gemma4-26b-a4b")
    parser.add_argument("--checkpoint", type=Path, help="a real-width checkpoint slice: its weights and loads")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--capacity-factor", type=float, default=ExpertRouting().capacity_factor)
    parser.add_argument("--load-prompts", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    raw = json.loads((args.checkpoint / "config.json").read_text()) if args.checkpoint else real_config(args.preset)[0]
    cfg = ModelConfig.from_dict(raw)
    router, experts = block(cfg, args.checkpoint)
    x = torch.randn(args.tokens, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    routing = ExpertRouting(capacity_factor=args.capacity_factor)
    capacity = routing.capacity(cfg, args.tokens)
    with torch.inference_mode():
        weights, chosen = router(x)
        busiest = int(torch.bincount(chosen.reshape(-1)).max())
        slots = slot_ids(max(capacity, busiest))  # this input's busiest expert fits: what a call that fits does
        dense_out = experts(x, weights, chosen)
        routed_out = experts(x, weights, chosen, ExpertSlots(slots))
        dense = timed_runs(lambda: experts(x, weights, chosen), args.runs)
        routed = timed_runs(lambda: experts(x, weights, chosen, ExpertSlots(slots)), args.runs)
    e, k, h, i = cfg.num_experts, cfg.top_k_experts, cfg.hidden_size, cfg.moe_intermediate_size
    flops = 2 * 3 * h * i  # one (token, expert) pair: gate, up and down
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "shape": f"{args.tokens} tokens, hidden {h}, {e} experts of {i}, top-{k}",
        "capacity": int(slots.numel()),
        "busiest_expert": busiest,
        "dense_s": {"median": median(dense), "min": min(dense), "max": max(dense)},
        "routed_s": {"median": median(routed), "min": min(routed), "max": max(routed)},
        "speedup": median(dense) / median(routed),
        "flops_dense": args.tokens * e * flops,
        "flops_routed_minimum": args.tokens * k * flops,
        "flops_routed_at_capacity": e * int(slots.numel()) * flops,
        "max_abs_difference": float((dense_out - routed_out).abs().max()),
    }
    if args.checkpoint:
        per_layer = loads(args.checkpoint, args.tokens, args.load_prompts)
        mean = args.tokens * k / e
        result["loads"] = {
            "mean": mean,
            "busiest_per_layer": per_layer,
            "busiest_over_mean": max(max(v) for v in per_layer) / mean,
            "default_capacity": capacity,
            "calls_over_default_capacity": sum(
                any(v[j] > capacity for v in per_layer) for j in range(args.load_prompts)
            ),
        }
    result["flop_ratio"] = result["flops_dense"] / result["flops_routed_at_capacity"]
    assert math.isfinite(result["max_abs_difference"])
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
