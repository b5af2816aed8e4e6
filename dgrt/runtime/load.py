"""`dgrt.load(path, backend=...)`: an export directory or a checkpoint folder -> a Generator."""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Any

import torch

from dgrt.config import ModelConfig
from dgrt.errors import DgrtError
from dgrt.exporter.io_spec import DTYPES, torch_dtype
from dgrt.runtime.backends import Backend, OnnxRuntimeBackend, TorchBackend
from dgrt.runtime.generator import Generator, ModelInfo
from dgrt.runtime.kv_cache import LayerShape
from dgrt.runtime.sampler import SamplerConfig
from dgrt.runtime.tokenizer import Tokenizer

BACKENDS = ("onnxruntime", "torch", "tensorrt")


def load(
    path: str | PathLike[str],
    backend: str | None = None,
    threads: int | None = None,
    prepack: bool = False,
    device: str | None = None,
    dtype: str | None = None,
) -> Generator:
    """Load a model for generation.

    path: an export directory (manifest.json; default backend onnxruntime; torch from its weights;
    tensorrt from engines built by `dgrt build`) or a checkpoint folder in Hugging Face layout (config.json;
    torch only). threads: CPU threads for the backend. prepack (onnxruntime): pre-pack the denoise graph's
    weights, a private copy traded for speed. device, dtype (torch): e.g. "cuda" and "bf16" for the GPU
    path (the denoise step then runs as a captured CUDA graph).
    """
    path = Path(path)
    if backend is not None and backend not in BACKENDS:
        raise DgrtError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}.")
    if dtype is not None and dtype not in DTYPES:
        raise DgrtError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}.")
    if (device or dtype) and backend not in (None, "torch"):
        raise DgrtError(f"device and dtype choose where the torch backend runs; the {backend} backend has its own.")
    torch_options = {"device": device or "cpu", "dtype": torch_dtype(dtype) if dtype else None}
    if (path / "manifest.json").exists():
        default = "torch" if device or dtype else "onnxruntime"
        return _load_export(path, backend or default, threads, prepack, torch_options)
    if (path / "config.json").exists():
        if backend not in (None, "torch"):
            raise DgrtError(f"{path} is a checkpoint; the {backend} backend runs exports (make one with dgrt export).")
        return _load_checkpoint(path, threads, torch_options)
    raise DgrtError(f"{path}: neither an export directory (manifest.json) nor a checkpoint folder (config.json).")


def _generation_config(path: Path) -> dict[str, Any]:
    import json

    file = path / "generation_config.json"
    if not file.exists():
        return {}
    try:
        return dict(json.loads(file.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise DgrtError(f"{file}: not a valid generation config ({e}).") from None


def _tokenizer(path: Path) -> Tokenizer | None:
    return Tokenizer.from_dir(path) if (path / "tokenizer.json").exists() else None


def _info(cfg: ModelConfig, max_context: int) -> ModelInfo:
    return ModelInfo(
        layers=[
            LayerShape(s.num_kv_heads, s.head_dim, cfg.sliding_window if s.is_sliding else None) for s in cfg.layers
        ],
        canvas_length=cfg.canvas_length,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        max_context=max_context,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
    )


def _generator(backend: Backend, path: Path, cfg: ModelConfig, max_context: int) -> Generator:
    gen_config = _generation_config(path)
    return Generator(
        backend, _tokenizer(path), _info(cfg, max_context), SamplerConfig.from_generation_config(gen_config), gen_config
    )


def _torch_backend(model: Any, threads: int | None, options: dict[str, Any]) -> TorchBackend:
    if options["device"].startswith("cuda") and not torch.cuda.is_available():
        raise DgrtError(f"device {options['device']!r} asked for, but torch sees no CUDA GPU.")
    model = model.to(device=options["device"])
    if options["dtype"] is not None:  # parameters only: RoPE frequencies stay fp32, as in transformers
        for param in model.parameters():
            param.data = param.data.to(options["dtype"])
    return TorchBackend(model, threads)


def _load_checkpoint(path: Path, threads: int | None, torch_options: dict[str, Any]) -> Generator:
    from dgrt.checkpoint import Checkpoint, load_model

    ckpt = Checkpoint.open(path)
    backend = _torch_backend(load_model(ckpt), threads, torch_options)
    return _generator(backend, path, ckpt.config, ckpt.config.max_position_embeddings)


def _load_export(
    path: Path, backend: str, threads: int | None, prepack: bool, torch_options: dict[str, Any]
) -> Generator:
    from dgrt.exporter import manifest as manifest_mod

    manifest = manifest_mod.load(path)
    for name, graph in manifest["graphs"].items():
        if manifest_mod.file_sha256(path / graph["file"]) != graph["sha256"]:
            raise DgrtError(f"{path / graph['file']} does not match the {name} graph manifest.json describes.")
    weights = path / manifest["weights"]["file"]
    if weights.stat().st_size != manifest["weights"]["bytes"]:
        raise DgrtError(
            f"{weights} has {weights.stat().st_size} bytes; manifest.json says {manifest['weights']['bytes']}."
        )
    cfg = ModelConfig.from_dict(manifest["config"], f"{path / 'manifest.json'} config")
    runner: Backend
    if backend == "onnxruntime":
        runner = OnnxRuntimeBackend(path, manifest, threads, prepack=prepack)
    elif backend == "tensorrt":
        from dgrt.tensorrt.backend import TensorRTBackend

        runner = TensorRTBackend(path, manifest)
    else:
        runner = _torch_backend(_model_from_export(path, manifest, cfg), threads, torch_options)
    return _generator(runner, path, cfg, manifest["max_context"])


def _model_from_export(path: Path, manifest: dict[str, Any], cfg: ModelConfig) -> Any:
    """The torch model with the export's weights (read from weights.bin through the graphs' references)."""
    import onnx_ir as ir

    from dgrt.model import DiffusionGemma

    with torch.device("meta"):
        model = DiffusionGemma(cfg)
    dtype = torch_dtype(manifest["dtype"])
    state: dict[str, torch.Tensor] = {}
    for graph in manifest["graphs"].values():
        for name, value in ir.load(path / graph["file"]).graph.initializers.items():
            if name.startswith("model.") and name.removeprefix("model.") not in state and value.const_value is not None:
                state[name.removeprefix("model.")] = torch.from_numpy(value.const_value.numpy().copy())
    params = dict(model.named_parameters())
    for name in params.keys() - state.keys():
        # Only the last layer's prefill scalar is absent from exports: nothing computes with it. NaN makes
        # any use of it visible instead of silently wrong.
        if not name.endswith(f"layers.{cfg.num_layers - 1}.encoder_layer_scalar"):
            raise DgrtError(f"{path}: the export has no weight for {name}.")
        state[name] = torch.full(params[name].shape, float("nan"), dtype=dtype)
    model.load_state_dict({k: v for k, v in state.items() if k in params}, strict=False, assign=True)
    return model.eval().requires_grad_(False)
