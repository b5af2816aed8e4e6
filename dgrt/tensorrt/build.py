"""`dgrt build`: TensorRT engines for an export's two graphs, cached under OUT/engines/<key>/.

Networks are strongly typed: the precision is the ONNX's (its dtype and Q/DQ), so the same code builds on
TensorRT 10.x and 11.x (11 removed the precision builder flags). One optimization profile per graph from
the manifest's dims (dgrt.tensorrt.options): an engine per graph (prefill.plan, denoise.plan), or with
--one-engine both graphs in one engine with a profile each (model.plan, dgrt.tensorrt.one_engine), which
holds one copy of the weights instead of two. The timing cache is read and written back when given. An
engine directory whose key exists is reused unless forced: the key covers the TensorRT version, GPU,
precision, profiles, flags and the ONNX digest.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from dgrt.contract import manifest as manifest_mod
from dgrt.contract.manifest import GRAPHS
from dgrt.errors import DgrtError
from dgrt.fsutil import atomic_dir, atomic_write_bytes
from dgrt.progress import Progress
from dgrt.tensorrt.one_engine import ONE_ENGINE_PLAN, combine, one_engine_profiles, parse_path
from dgrt.tensorrt.options import (
    BuildOptions,
    builder_flags,
    check_version,
    cleared_flags,
    engine_key,
    network_flags,
    onnx_digest,
    profiles,
)
from dgrt.tensorrt.targets import check_precision, resolve

if TYPE_CHECKING:  # typed against TensorRT's stubs by `mypy --config-file mypy-tensorrt.ini`
    import tensorrt as trt

ENGINE_FILE = "engine.json"


def require_tensorrt() -> str:
    """The TensorRT version, or one sentence on what is missing."""
    try:
        import tensorrt as trt
    except ImportError:
        raise DgrtError(
            "TensorRT is not installed; on a machine with an NVIDIA GPU: pip install 'dgrt[tensorrt]'."
        ) from None
    if not hasattr(trt, "Builder"):  # e.g. only type stubs installed
        raise DgrtError(f"the 'tensorrt' package at {trt.__path__} is not TensorRT (no Builder); install TensorRT.")
    return str(trt.__version__)


def require_gpu() -> tuple[str, tuple[int, int]]:
    """(GPU name, compute capability) of the current CUDA device, or one sentence on what is missing."""
    import torch

    if not torch.cuda.is_available():
        raise DgrtError("no CUDA GPU is visible to torch (torch.cuda.is_available() is False); TensorRT needs one.")
    return torch.cuda.get_device_name(), torch.cuda.get_device_capability()


def build(
    export_dir: str | Path,
    options: BuildOptions | None = None,
    timing_cache: Path | None = None,
    force: bool = False,
    progress: Progress | None = None,
    verify: bool = True,
) -> Path:
    """Build (or reuse) the engines of an export; returns their directory. verify: check the weights'
    sha256 against the manifest first (see dgrt.contract.manifest.load)."""
    export_dir, progress = Path(export_dir), progress or Progress()
    manifest = manifest_mod.load(export_dir, verify=verify)
    if "tensorrt" not in manifest.targets:
        raise DgrtError(f"{export_dir} is not meant for TensorRT (manifest targets: {list(manifest.targets)}).")
    options = (options or BuildOptions()).checked(manifest.max_context, manifest.canvas_length)
    version = require_tensorrt()
    import tensorrt as trt

    gpu, cc = require_gpu()
    target = resolve(options.target, gpu, cc)
    check_precision(target, manifest.precision)
    major = check_version(version, manifest)
    key = engine_key(manifest, options, version, gpu, cc)
    out = export_dir / "engines" / key
    if (out / ENGINE_FILE).exists() and not force:
        return out

    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.exists() else b""
    # No inputs=: the engines live inside the export by design (EXPORT/engines/<key>); only this key's
    # folder is ever replaced, never the export or the ONNX files it is built from.
    per_graph = {g: profiles(manifest, g, options) for g in GRAPHS}
    with atomic_dir(out, force=True) as tmp:
        if options.one_engine:
            progress.update(f"building one engine for both graphs (TensorRT {version}, {gpu})")
            model, path = combine(export_dir, manifest).SerializeToString(), parse_path(export_dir, manifest)
            plan, cache_bytes = _build_engine(
                builder,
                logger,
                lambda parser: parser.parse(model, path),
                one_engine_profiles(per_graph, manifest),
                options,
                major,
                cache_bytes,
                f"one engine of {export_dir}",
            )
            (tmp / ONE_ENGINE_PLAN).write_bytes(plan)
        else:
            for graph in GRAPHS:
                progress.update(f"building the {graph} engine (TensorRT {version}, {gpu})")
                onnx_file = str(export_dir / manifest.graphs[graph].file)  # weights.bin next to it (external data)
                plan, cache_bytes = _build_engine(
                    builder,
                    logger,
                    partial(_parse_file, onnx_file),
                    [per_graph[graph]],
                    options,
                    major,
                    cache_bytes,
                    onnx_file,
                )
                (tmp / f"{graph}.plan").write_bytes(plan)
        description = {
            "key": key,
            "tensorrt": version,
            "gpu": gpu,
            "compute_capability": list(cc),
            "target": target.name,
            "precision": manifest.precision,
            "network_flags": network_flags(major),
            "builder_flags": builder_flags(major, options),
            "cleared_flags": cleared_flags(options),
            "options": options.__dict__,
            "profiles": per_graph,
            "onnx": onnx_digest(manifest),
            "build_seconds": round(time.perf_counter() - t0, 1),
        }
        (tmp / ENGINE_FILE).write_text(json.dumps(description, indent=2) + "\n")
    if timing_cache is not None:
        atomic_write_bytes(timing_cache, cache_bytes)
    progress.close()
    return out


def _parse_file(onnx_file: str, parser: trt.OnnxParser) -> bool:
    return parser.parse_from_file(onnx_file)


def _build_engine(
    builder: trt.Builder,
    logger: trt.ILogger,
    parse: Callable[[trt.OnnxParser], bool],
    engine_profiles: list[dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]],
    options: BuildOptions,
    major: int,
    cache_bytes: bytes,
    source: str,
) -> tuple[bytes, bytes]:
    """(serialized engine, updated timing cache) for the network `parse` reads, with these optimization
    profiles (input name -> min, opt, max shapes) in order."""
    import tensorrt as trt

    flags = 0
    for name in network_flags(major):
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parse(parser):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise DgrtError(f"TensorRT's ONNX parser refused {source}: {errors}")
    config = builder.create_builder_config()
    if options.workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * 2**30))
    for name in builder_flags(major, options):
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in cleared_flags(options):
        config.clear_flag(getattr(trt.BuilderFlag, name))
    config.set_timing_cache(config.create_timing_cache(cache_bytes), False)
    for shapes in engine_profiles:
        profile = builder.create_optimization_profile()
        # No weight memory beyond the first profile's: by default TensorRT may give each further profile
        # weights of its own (laid out for its kernels), a second copy where one engine is meant to hold one.
        profile.extra_memory_target = 0.0
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, trt.Dims(list(lo)), trt.Dims(list(opt)), trt.Dims(list(hi)))
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise DgrtError(f"TensorRT could not build an engine from {source} (its log above says why).")
    return bytes(plan), bytes(config.get_timing_cache().serialize())
