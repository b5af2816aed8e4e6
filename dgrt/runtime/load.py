"""`dgrt.load(path, backend=...)`: an export directory or a checkpoint folder -> a Generator."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from os import PathLike
from pathlib import Path
from typing import Any

import torch

from dgrt.config import ModelConfig, read_generation_config
from dgrt.contract.experts import ROUTED, ExpertRouting
from dgrt.contract.io_spec import DTYPES, torch_dtype
from dgrt.contract.manifest import Manifest, default_prefill_chunk
from dgrt.errors import DgrtError
from dgrt.mapped import FileMaps
from dgrt.runtime.backends import Backend, OnnxRuntimeBackend, TorchBackend
from dgrt.runtime.generator import Generator, ModelInfo
from dgrt.runtime.kv_cache import LayerShape
from dgrt.runtime.tokenizer import Tokenizer
from dgrt.sampler import SamplerConfig

BACKENDS = ("onnxruntime", "torch", "tensorrt")


def load(
    path: str | PathLike[str],
    backend: str | Backend | None = None,
    threads: int | None = None,
    prepack: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    verify: bool = True,
    providers: Sequence[str] | None = None,
    capacity_factor: float | None = None,
    revision: str | None = None,
    engines: str | Path | None = None,
) -> Generator:
    """Load a model for generation.

    path: an export directory (manifest.json; default backend onnxruntime; torch from its weights;
    tensorrt from engines built by `dgrt build`) or a checkpoint folder in Hugging Face layout (config.json;
    torch only). backend: a name, or a Backend instance of your own to run the loop on (the path then
    gives the tokenizer, the generation config and the model's shapes). threads: CPU threads for the
    backend. prepack (onnxruntime): pre-pack the denoise graph's weights, a private copy traded for speed (its
    GEMMs round differently: tokens may differ from the default's).
    providers (onnxruntime): its execution providers, e.g. ["CUDAExecutionProvider", "CPUExecutionProvider"]
    (default CPU). device, dtype (torch): e.g. "cuda" and "bf16" for the GPU path (the denoise step then
    runs as a captured CUDA graph). verify (exports): check weights.bin against the manifest's sha256
    (hashed once, then cached by size, mtime and inode); False skips it with a warning. capacity_factor
    (routed MoE): each expert's slots per call as a multiple of its mean load, instead of the export's (more:
    fewer calls run again after an overflow, up to the cap of dgrt.contract.experts.ExpertRouting.capacity;
    fewer: less work per call). A Hugging Face Hub model id (owner/name) in place of a checkpoint folder is
    fetched into the Hub cache first (dgrt.hub), at `revision` if given. engines (tensorrt): the engine build
    to run (EXPORT/engines/<key>), where `dgrt build` made several for this export, TensorRT and GPU.
    """
    from dgrt.hub import is_model_id, resolve

    if revision is not None and not is_model_id(path):
        raise DgrtError(f"revision {revision!r} pins a Hugging Face Hub model id; {path} is a local path.")
    path = resolve(path, revision)
    name, custom = (backend, None) if isinstance(backend, str) or backend is None else (None, backend)
    if name is not None and name not in BACKENDS:
        raise DgrtError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}.")
    if custom is not None and not all(hasattr(custom, m) for m in ("prefill", "denoise", "close")):
        raise DgrtError(f"backend is a {type(custom).__name__}; expected a name ({', '.join(BACKENDS)}) or a Backend.")
    if dtype is not None and dtype not in DTYPES:
        raise DgrtError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}.")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise DgrtError(f"threads is {threads!r}, expected a positive integer (or None for the backend's default).")
    if (device or dtype) and name not in (None, "torch"):
        raise DgrtError(f"device and dtype choose where the torch backend runs; the {name} backend has its own.")
    if engines is not None and name != "tensorrt":
        raise DgrtError(
            f"engines chooses the TensorRT engine build; it needs backend='tensorrt' (--backend tensorrt), not "
            f"{repr(name) if name else 'the default backend'}."
        )
    if providers is not None and name not in (None, "onnxruntime"):
        raise DgrtError(f"providers choose where ONNX Runtime runs; the {name} backend has its own.")
    if capacity_factor is not None and (isinstance(capacity_factor, bool) or not capacity_factor > 0):
        raise DgrtError(f"capacity_factor is {capacity_factor!r}, expected a number > 0.")
    torch_options = {"device": device or "cpu", "dtype": torch_dtype(dtype) if dtype else None}
    if (path / "manifest.json").exists():
        from dgrt.contract import manifest as manifest_mod

        manifest = manifest_mod.load(path, verify=verify)
        if capacity_factor is not None:
            if not manifest.experts.routed:
                raise DgrtError(f"{path}: its MoE is dense; capacity_factor applies to routed exports only.")
            manifest = replace(manifest, experts=replace(manifest.experts, capacity_factor=capacity_factor))
        cfg, max_context, chunk = manifest.config, manifest.max_context, manifest.prefill_chunk
        name = name or ("torch" if device or dtype else "onnxruntime")
        runner = custom or _export_backend(path, manifest, name, threads, prepack, providers, torch_options, engines)
    elif (path / "config.json").exists():
        from dgrt.checkpoint import Checkpoint, load_model

        if name not in (None, "torch"):
            raise DgrtError(f"{path} is a checkpoint; the {name} backend runs exports (make one with dgrt export).")
        ckpt = Checkpoint.open(path)
        cfg, max_context = ckpt.config, ckpt.config.max_position_embeddings
        chunk = default_prefill_chunk(max_context)
        runner = custom or _torch_backend(
            load_model(ckpt),
            threads,
            torch_options,
            replace(ROUTED, capacity_factor=capacity_factor or ROUTED.capacity_factor),
        )
    else:
        raise DgrtError(f"{path}: neither an export directory (manifest.json) nor a checkpoint folder (config.json).")
    return Generator(
        runner,
        _tokenizer(path),
        _info(cfg, max_context, chunk),
        SamplerConfig.from_generation_config(generation := read_generation_config(path, cfg.vocab_size)),
        generation,
    )


def _tokenizer(path: Path) -> Tokenizer | None:
    return Tokenizer.from_dir(path) if (path / "tokenizer.json").exists() else None


def _info(cfg: ModelConfig, max_context: int, prefill_chunk: int) -> ModelInfo:
    return ModelInfo(
        layers=LayerShape.of(cfg),
        canvas_length=cfg.canvas_length,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        max_context=max_context,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        prefill_chunk=prefill_chunk,
    )


def _torch_backend(model: Any, threads: int | None, options: dict[str, Any], experts: ExpertRouting) -> TorchBackend:
    if options["device"].startswith("cuda") and not torch.cuda.is_available():
        raise DgrtError(f"device {options['device']!r} asked for, but torch sees no CUDA GPU.")
    device, dtype = options["device"], options["dtype"]
    # One parameter at a time, cast as it moves: the device never holds the model in two precisions (an
    # fp32 export loaded as bf16 would otherwise land on the GPU at twice its final size first).
    for param in model.parameters():
        param.data = param.data.to(device=device, dtype=dtype or param.dtype)
    # buffers: RoPE frequencies stay fp32, as in transformers
    return TorchBackend(model.to(device=device), threads, experts=experts)


def _export_backend(
    path: Path,
    manifest: Manifest,
    name: str,
    threads: int | None,
    prepack: bool,
    providers: Sequence[str] | None,
    torch_options: dict[str, Any],
    engines: str | Path | None,
) -> Backend:
    if name == "onnxruntime":
        return OnnxRuntimeBackend(path, manifest, threads, list(providers) if providers else None, prepack)
    if name == "tensorrt":
        from dgrt.tensorrt.backend import TensorRTBackend

        return TensorRTBackend(path, manifest, Path(engines) if engines is not None else None)
    if manifest.quantization is not None:
        raise DgrtError(
            f"{path} is a {manifest.quantization['recipe']} export; the torch backend runs unquantized exports "
            "and checkpoints (run this one on onnxruntime or tensorrt)."
        )
    return _torch_backend(_model_from_export(path, manifest), threads, torch_options, manifest.experts)


def _model_from_export(path: Path, manifest: Manifest) -> Any:
    """The torch model with the export's weights: views of weights.bin (dgrt.mapped: the page cache holds
    them, as ONNX Runtime's mapping of the same file does), else copies."""
    import onnx_ir as ir

    from dgrt.model import DiffusionGemma

    cfg = manifest.config
    with torch.device("meta"):
        model = DiffusionGemma(cfg)
    dtype = manifest.torch_dtype
    maps = FileMaps()
    state: dict[str, torch.Tensor] = {}
    for graph in manifest.graphs.values():
        for name, value in ir.load(path / graph.file).graph.initializers.items():
            stored = value.const_value
            if not name.startswith("model.") or name.removeprefix("model.") in state or stored is None:
                continue
            view = None
            # Only the export's own weights file is mapped, and only weights in the export's dtype; any other
            # reference is read by onnx_ir, which checks that it stays inside the export folder.
            if (
                isinstance(stored, ir.ExternalTensor)
                and stored.location == manifest.weights.file
                and stored.dtype.numpy().name == DTYPES[manifest.dtype]
            ):
                view = maps.tensor(path / manifest.weights.file, stored.offset or 0, dtype, stored.shape.numpy())
            state[name.removeprefix("model.")] = torch.from_numpy(stored.numpy().copy()) if view is None else view
    params = dict(model.named_parameters())
    for name in params.keys() - state.keys():
        # Only the last layer's prefill scalar is absent from exports: nothing computes with it. NaN makes
        # any use of it visible instead of silently wrong.
        if not name.endswith(f"layers.{cfg.num_layers - 1}.encoder_layer_scalar"):
            raise DgrtError(f"{path}: the export has no weight for {name}.")
        state[name] = torch.full(params[name].shape, float("nan"), dtype=dtype)
    model.load_state_dict({k: v for k, v in state.items() if k in params}, strict=False, assign=True)
    return model.eval().requires_grad_(False)
