"""ONNX Runtime's `com.microsoft.MoE` (CPU) against dgrt's routed experts graph, one layer at real widths.

    python tools/ort_moe_contrib.py [--tokens 256] [--runs 5] [--threads 2] [--workdir DIR]

Both in fp32 on ONNX Runtime's CPU provider, one warm-up then `--runs` timed runs, medians and ranges:
* dgrt: the `Experts` module (routed, capacity 2x the mean load) exported alone with torch.onnx, the
  router's top-k ids and weights given as inputs;
* ORT's MoE contrib operator with the same widths. Its CPU kernel has no gelu-tanh GLU (Gemma's expert
  activation: it takes interleaved SwiGLU only), and routes with its own softmax over the top-k logits,
  so it cannot compute DiffusionGemma's experts: this measures its speed at the same FLOPs, not a
  replacement.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import date
from pathlib import Path
from statistics import median

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source tree

from dgrt.bench import timed_runs  # noqa: E402
from dgrt.config import ModelConfig  # noqa: E402
from dgrt.contract.experts import ExpertRouting  # noqa: E402
from dgrt.model.layers import Experts, ExpertSlots  # noqa: E402
from dgrt.presets import real_config  # noqa: E402


class RoutedBlock(torch.nn.Module):
    def __init__(self, experts: Experts):
        super().__init__()
        self.experts = experts

    def forward(
        self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor, slots: torch.Tensor
    ) -> torch.Tensor:
        return self.experts(x, weights, chosen, ExpertSlots(slots))


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def dgrt_block(cfg: ModelConfig, work: Path, feed: dict[str, np.ndarray], runs: int, threads: int) -> list[float]:
    experts = Experts(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    for p in experts.parameters():
        p.data = torch.randn(p.shape, generator=gen) * 0.02
    args = tuple(torch.from_numpy(feed[k]) for k in ("x", "weights", "chosen", "slots"))
    program = torch.onnx.export(RoutedBlock(experts), args, input_names=["x", "weights", "chosen", "slots"],
                                output_names=["out"], opset_version=21, dynamo=True)  # fmt: skip
    assert program is not None
    program.save(str(work / "dgrt.onnx"), external_data=True)
    s = session(work / "dgrt.onnx", threads)
    return timed_runs(lambda: s.run(None, feed), runs)


def contrib_moe(cfg: ModelConfig, work: Path, tokens: int, runs: int, threads: int) -> list[float]:
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
    s = session(work / "moe.onnx", threads)
    feed = {"input": rng.standard_normal((tokens, h)).astype(np.float32),
            "router_probs": rng.standard_normal((tokens, e)).astype(np.float32)}  # fmt: skip
    return timed_runs(lambda: s.run(None, feed), runs)


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
    ours = dgrt_block(cfg, work, feed, args.runs, args.threads)
    theirs = contrib_moe(cfg, work, args.tokens, args.runs, args.threads)
    print(json.dumps({
        "date": date.today().isoformat(),
        "shape": f"{args.tokens} tokens, hidden {cfg.hidden_size}, {cfg.num_experts} experts of "
                 f"{cfg.moe_intermediate_size}, top-{cfg.top_k_experts}, fp32, {args.threads} threads",
        "dgrt_routed_capacity": capacity,
        "dgrt_routed_s": {"median": median(ours), "min": min(ours), "max": max(ours)},
        "ort_contrib_moe_s": {"median": median(theirs), "min": min(theirs), "max": max(theirs)},
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
