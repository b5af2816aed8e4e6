"""manifest.json: everything a runtime needs to drive an export directory, and nothing it must guess.

Written at export, read by every runtime (dgrt's own and others, in any language). The I/O contract comes
from dgrt.exporter.io_spec; docs/export-format.md describes the file.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dgrt import __version__
from dgrt.checkpoint import Checkpoint
from dgrt.errors import DgrtError
from dgrt.exporter.io_spec import DIMS, GraphSpec
from dgrt.fsutil import atomic_write_text

FILE = "manifest.json"
FORMAT = "dgrt-export"
FORMAT_VERSION = 1


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def build(
    *,
    ckpt: Checkpoint,
    specs: dict[str, GraphSpec],
    files: dict[str, str],
    out: Path,
    dtype: str,
    opset: int,
    max_context: int,
    weights: dict[str, Any],
    side_files: list[str],
    quantization: dict[str, Any] | None = None,
) -> dict[str, Any]:
    cfg = ckpt.config
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dgrt_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": {
            "checkpoint": str(ckpt.path),
            "digest": ckpt.digest(),
            "dtype": str(ckpt.dtype).removeprefix("torch."),
        },
        "dtype": dtype,
        "opset": opset,
        "targets": ["onnxruntime", "tensorrt"],
        "canvas_length": cfg.canvas_length,
        "max_context": max_context,
        "layers": [
            {"index": i, "type": s.layer_type, "head_dim": s.head_dim, "num_kv_heads": s.num_kv_heads}
            for i, s in enumerate(cfg.layers)
        ],
        "sliding_window": cfg.sliding_window,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "tokens": {"pad": cfg.pad_token_id, "eos": list(cfg.eos_token_id), "bos": cfg.bos_token_id},
        "dims": DIMS,
        "graphs": {
            name: {
                "file": files[name],
                "sha256": file_sha256(out / files[name]),
                "doc": spec.doc,
                "cuda_graph": spec.cuda_graph,
                "inputs": [t.to_json() for t in spec.inputs],
                "outputs": [t.to_json() for t in spec.outputs],
            }
            for name, spec in specs.items()
        },
        "weights": weights,
        "files": side_files,
        "config": cfg.raw,
    }
    if quantization is not None:
        manifest["quantization"] = quantization
        # ONNX Runtime's CPU optimizer rewrites Q/DQ into kernels that are not what the graph says: FP8
        # activation pairs into an invalid MatMulIntegerToFloat (session creation fails), INT4 weight DQ into
        # MatMulNBits with int8 activations (1e-2 error). These entries keep the graph's own arithmetic.
        manifest["onnxruntime"] = {
            "session_config": {"session.disable_quant_qdq": "1", "session.qdq_matmulnbits_accuracy_level": "0"}
        }
    return manifest


def write(out: Path, manifest: dict[str, Any]) -> None:
    """Write manifest.json atomically (temp file + rename)."""
    atomic_write_text(out / FILE, json.dumps(manifest, indent=2) + "\n")


def load(export_dir: str | Path) -> dict[str, Any]:
    """Read and check an export directory's manifest: format, version, and the files it names."""
    export_dir = Path(export_dir)
    path = export_dir / FILE
    if not path.exists():
        raise DgrtError(f"{export_dir}: no {FILE} (not a dgrt export directory).")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DgrtError(f"{path}: not valid JSON ({e}).") from None
    if manifest.get("format") != FORMAT:
        raise DgrtError(f"{path}: format is {manifest.get('format')!r}, expected {FORMAT!r}.")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DgrtError(
            f"{path}: format_version {manifest.get('format_version')} is not supported by dgrt {__version__} "
            f"(expected {FORMAT_VERSION})."
        )
    for name in [g["file"] for g in manifest["graphs"].values()] + [manifest["weights"]["file"]]:
        if not (export_dir / name).exists():
            raise DgrtError(f"{export_dir}: {name} is missing (named in {FILE}).")
    return manifest
