"""Is ONNX Runtime's own 4-bit kernel (com.microsoft.MatMulNBits) faster than fp32 on a denoise step's GEMMs?

    python tools/ort_int4_kernel.py [--threads 2] [--runs 30]

Times one GEMM of the denoise graph's shape (M = canvas tokens, the bench preset's linear layers) four
ways on ONNX Runtime CPU: the fp32 weight; the standard INT4 Q/DQ form dgrt exports, with the session
options that keep it exact (DQ folded to fp32 at load: the fp32 GEMM again); and MatMulNBits with
accuracy_level 0 (fp32 arithmetic) and 4 (int8 activations). Median of --runs after a warm-up, the range,
and the error against the fp32 product.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

BLOCK = 64


def model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], m: int, k: int, n: int) -> bytes:
    graph = helper.make_graph(
        nodes,
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        inits,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    proto = helper.make_model(graph, opset_imports=opsets)
    proto.ir_version = 10
    return proto.SerializeToString()


def variants(w: np.ndarray, m: int) -> dict[str, tuple[bytes, dict[str, str]]]:
    n, k = w.shape
    scale = np.abs(w.reshape(n, k // BLOCK, BLOCK)).max(-1) / 7
    q = np.clip(np.round(w.reshape(n, k // BLOCK, BLOCK) / scale[..., None]), -7, 7).astype(np.int8)
    nib = (q.reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
    packed = nib[0::2] | (nib[1::2] << 4)
    unsigned = (q + 8).astype(np.uint8).reshape(-1)  # MatMulNBits: unsigned, default zero point 8
    blob = (unsigned[0::2] | (unsigned[1::2] << 4)).reshape(n, k // BLOCK, BLOCK // 2)
    gemm = [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)]
    exact = {"session.disable_quant_qdq": "1", "session.qdq_matmulnbits_accuracy_level": "0"}
    out = {"fp32 Gemm": (model(gemm, [numpy_helper.from_array(w, "w")], m, k, n), {})}
    int4 = helper.make_tensor("wq", TensorProto.INT4, [n, k], packed.tobytes(), raw=True)
    dq = helper.make_node("DequantizeLinear", ["wq", "s"], ["w"], axis=1, block_size=BLOCK)
    inits = [int4, numpy_helper.from_array(scale.astype(np.float32), "s")]
    out["INT4 Q/DQ (dgrt, exact)"] = (model([dq, *gemm], inits, m, k, n), exact)
    for level in (0, 4):
        node = helper.make_node(
            "MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft",
            K=k, N=n, bits=4, block_size=BLOCK, accuracy_level=level,
        )  # fmt: skip
        inits = [numpy_helper.from_array(blob, "b"), numpy_helper.from_array(scale.astype(np.float32).reshape(-1), "s")]
        out[f"MatMulNBits accuracy_level {level}"] = (model([node], inits, m, k, n), {})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--tokens", type=int, default=256, help="M: canvas tokens x batch (bench preset: 256)")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    print(f"onnxruntime {ort.__version__}, {args.threads} threads, M = {args.tokens}, block {BLOCK}")
    for n, k in ((2048, 512), (512, 2048)):  # the bench preset's MLP up and down projections
        w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
        x = rng.standard_normal((args.tokens, k)).astype(np.float32)
        reference = x @ w.T
        for name, (proto, config) in variants(w, args.tokens).items():
            options = ort.SessionOptions()
            options.intra_op_num_threads = args.threads
            for key, value in config.items():
                options.add_session_config_entry(key, value)
            session = ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"])
            y = session.run(None, {"x": x})[0]
            times = []
            for _ in range(args.runs + 1):
                t0 = time.perf_counter()
                session.run(None, {"x": x})
                times.append(time.perf_counter() - t0)
            times = times[1:]
            print(
                f"[{n}x{k}] {name:<32} {1e3 * statistics.median(times):7.3f} ms "
                f"({1e3 * min(times):.3f}-{1e3 * max(times):.3f})  max abs error {np.abs(y - reference).max():.2e}"
            )


if __name__ == "__main__":
    main()
