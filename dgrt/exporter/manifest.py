"""The manifest of a new export, from the checkpoint and what the exporter wrote (dgrt.contract.manifest
defines, validates and reads it)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dgrt.checkpoint import Checkpoint
from dgrt.contract.experts import ExpertRouting
from dgrt.contract.io_spec import GraphSpec
from dgrt.contract.manifest import GraphEntry, Manifest, WeightsEntry, file_sha256

# ONNX Runtime's CPU optimizer rewrites Q/DQ into kernels that are not what the graph says: FP8 activation
# pairs into an invalid MatMulIntegerToFloat (session creation fails), INT4 weight DQ into MatMulNBits with
# int8 activations (1e-2 error). These entries keep the graph's own arithmetic.
QDQ_SESSION_CONFIG = {"session.disable_quant_qdq": "1", "session.qdq_matmulnbits_accuracy_level": "0"}


def build(
    *,
    ckpt: Checkpoint,
    specs: dict[str, GraphSpec],
    files: dict[str, str],
    out: Path,
    dtype: str,
    opset: int,
    max_context: int,
    prefill_chunk: int,
    experts: ExpertRouting,
    weights: WeightsEntry,
    side_files: list[str],
    quantization: dict[str, Any] | None = None,
) -> Manifest:
    return Manifest(
        config=ckpt.config,
        dtype=dtype,
        opset=opset,
        max_context=max_context,
        prefill_chunk=prefill_chunk,
        experts=experts,
        graphs={name: GraphEntry(files[name], file_sha256(out / files[name]), spec) for name, spec in specs.items()},
        weights=weights,
        files=tuple(side_files),
        source={
            "checkpoint": str(ckpt.path),
            "digest": ckpt.digest(),
            "dtype": str(ckpt.dtype).removeprefix("torch."),
        },
        quantization=quantization,
        session_config=QDQ_SESSION_CONFIG if quantization is not None else {},
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
