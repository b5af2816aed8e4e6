"""The MoE block on ONNX Runtime, one layer at real widths: dgrt's dense and routed graphs, and ORT's
`com.microsoft.MoE` contrib operator.

    python tools/bench_moe_ort.py [--tokens 256] [--runs 5] [--threads 2] [--workdir DIR]

All in fp32 on ONNX Runtime's CPU provider with dgrt's session options, one warm-up each then `--runs`
rounds of one call of each, medians and ranges:
* dgrt dense and routed: the `Experts` module (dgrt.model.layers) exported alone with torch.onnx in each
  formulation (routed at dgrt's default capacity, ExpertRouting.capacity, or the busiest expert's load if
  higher), the router's top-k ids and weights given as inputs, the same weights; their outputs compared;
* ORT's MoE contrib operator with the same widths. Its CPU kernel has no gelu-tanh GLU (Gemma's expert
  activation: it takes interleaved SwiGLU only), and routes with its own softmax over the top-k logits,
  so it cannot compute DiffusionGemma's experts: this measures its speed at the same FLOPs, not a
  replacement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from collections.abc import Callable
from datetime import date
from pathlib import Path
from statistics import median

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source tree

from dgrt.bench import interleaved_runs  # noqa: E402
from dgrt.config import ModelConfig  # noqa: E402
from dgrt.contract.experts import ExpertRouting  # noqa: E402
from dgrt.model.layers import Experts, ExpertSlots  # noqa: E402
from dgrt.presets import real_config  # noqa: E402
from dgrt.runtime.backends import session_options  # noqa: E402
from dgrt.runtime.heap import large_blocks_mapped  # noqa: E402


class Block(torch.nn.Module):
    """The experts with the routing as inputs; routed when given the slots."""

    def __init__(self, experts: Experts):
        super().__init__()
        self.experts = experts

    def forward(
        self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor, slots: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.experts(x, weights, chosen, None if slots is None else ExpertSlots(slots))


def session(path: Path, threads: int, feed: dict[str, np.ndarray]) -> Callable[[], np.ndarray]:
    """A call of the graph at `path` on `feed`, as dgrt's ONNX Runtime backend runs one (its session options,
    glibc's threshold during the call)."""
    s = ort.InferenceSession(str(path), session_options(None, threads), providers=["CPUExecutionProvider"])

    def call() -> np.ndarray:
        with large_blocks_mapped():
            return s.run(None, feed)[0]

    return call


def dgrt_block(experts: Experts, work: Path, feed: dict[str, np.ndarray], threads: int) -> Callable[[], np.ndarray]:
    """Export the block for these inputs (routed when the feed has slots); a call runs it on them."""
    names = [k for k in ("x", "weights", "chosen", "slots") if k in feed]
    args = tuple(torch.from_numpy(feed[k]) for k in names)
    program = torch.onnx.export(Block(experts), args, input_names=names, output_names=["out"], opset_version=21,
                                dynamo=True)  # fmt: skip
    assert program is not None
    path = work / ("routed.onnx" if "slots" in feed else "dense.onnx")
    program.save(str(path), external_data=True)
    return session(path, threads, feed)


def contrib_moe(cfg: ModelConfig, work: Path, tokens: int, threads: int) -> Callable[[], np.ndarray]:
    """ORT's MoE operator at these widths, random weights and inputs; a call runs it."""
    e, h, i, k = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.top_k_experts
    rng = np.random.default_rng(0)
    fc1 = (rng.standard_normal((e, 2 * i, h)) * 0.02).astype(np.float32)
    fc2 = (rng.standard_normal((e, h, i)) * 0.02).astype(np.float32)
    node = helper.make_node("MoE", ["input", "router_probs", "fc1", "", "fc2"], ["output"], domain="com.microsoft",
                            k=k, activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1)  # fmt: skip
    graph = helper.make_graph(
        [node],
        "moe",
        [
            helper.make_tensor_value_info("input", TensorProto.FLOAT, [tokens, h]),
            helper.make_tensor_value_info("router_probs", TensorProto.FLOAT, [tokens, e]),
        ],  # fmt: skip
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [tokens, h])],
        [onnx.numpy_helper.from_array(fc1, "fc1"), onnx.numpy_helper.from_array(fc2, "fc2")],
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), work / "moe.onnx", save_as_external_data=True)
    feed = {"input": rng.standard_normal((tokens, h)).astype(np.float32),
            "router_probs": rng.standard_normal((tokens, e)).astype(np.float32)}  # fmt: skip
    return session(work / "moe.onnx", threads, feed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = ModelConfig.from_dict(real_config("gemma4-26b-a4b")[0])
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dgrt-moe-"))
    work.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(args.tokens, cfg.num_experts, generator=gen).softmax(-1)
    top_w, top_i = scores.topk(cfg.top_k_experts, dim=-1)
    busiest = int(torch.bincount(top_i.reshape(-1)).max())
    capacity = max(ExpertRouting().capacity(cfg, args.tokens), busiest)
    feed = {
        "x": torch.randn(args.tokens, cfg.hidden_size, generator=gen).numpy(),
        "weights": (top_w / top_w.sum(-1, keepdim=True)).numpy(),
        "chosen": top_i.numpy(),
        "slots": np.arange(capacity, dtype=np.int64),
    }
    experts = Experts(cfg).eval()
    weights = torch.Generator().manual_seed(0)
    for p in experts.parameters():
        p.data = torch.randn(p.shape, generator=weights) * 0.02
    blocks = {
        "routed": dgrt_block(experts, work, feed, args.threads),
        "dense": dgrt_block(experts, work, {k: v for k, v in feed.items() if k != "slots"}, args.threads),
        "contrib": contrib_moe(cfg, work, args.tokens, args.threads),
    }
    times = interleaved_runs(blocks, args.runs)
    routed, dense, theirs = times["routed"], times["dense"], times["contrib"]
    difference = float(np.abs(blocks["routed"]() - blocks["dense"]()).max())

    def summary(times: list[float]) -> dict[str, float]:
        return {"median": median(times), "min": min(times), "max": max(times)}

    print(json.dumps({
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, onnxruntime {ort.__version__}",
        "shape": f"{args.tokens} tokens, hidden {cfg.hidden_size}, {cfg.num_experts} experts of "
                 f"{cfg.moe_intermediate_size}, top-{cfg.top_k_experts}, fp32, {args.threads} threads",
        "dgrt_routed_capacity": capacity,
        "dgrt_dense_s": summary(dense),
        "dgrt_routed_s": summary(routed),
        "routed_speedup": median(dense) / median(routed),
        "max_abs_difference": difference,
        "ort_contrib_moe_s": summary(theirs),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
