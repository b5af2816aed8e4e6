"""manifest.json as a typed, validated `Manifest`: everything a runtime needs to drive an export directory.

Written at export (dgrt.exporter), read by dgrt's runtime, TensorRT, validate and bench, and by runtimes in
any language (docs/export-format.md describes the file). `load(export_dir)` is the one place an export is
read and checked: the JSON against this schema (one sentence naming the first problem), the graphs' I/O
against the contract its own config implies (dgrt.contract.io_spec), every file name confined to the
folder, the graphs' digests, and the weights' size and sha256 (hashed once, then cached by size, mtime
and inode).
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from dgrt import __version__
from dgrt.config import ModelConfig
from dgrt.contract.experts import DENSE, FORMULATIONS, ExpertRouting
from dgrt.contract.io_spec import DIMS, DTYPES, GraphSpec, denoise_spec, prefill_spec, torch_dtype
from dgrt.errors import DgrtError, DgrtWarning
from dgrt.fsutil import atomic_write_text

FILE = "manifest.json"
FORMAT = "dgrt-export"
FORMAT_VERSION = 1
GRAPHS = ("prefill", "denoise")
TARGETS = ("onnxruntime", "tensorrt")
# Prompts are prefilled in chunks of at most this many tokens: prefill memory (and the TensorRT profile's
# seq range) grows with the chunk, not the prompt. Exports before the field was written get this value.
DEFAULT_PREFILL_CHUNK = 1024
RECIPES = ("fp8", "int4", "int4-experts")


def default_prefill_chunk(max_context: int) -> int:
    """The prefill chunk of an export (or checkpoint) that names none: DEFAULT_PREFILL_CHUNK, within its context."""
    return min(DEFAULT_PREFILL_CHUNK, max_context)  # quantization recipes; dgrt.exporter.quantize implements them


# Beside weights.bin once its sha256 matched: (size, mtime, inode) that were hashed, so loads stay fast.
VERIFIED_FILE = ".weights-verified.json"
_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class GraphEntry:
    file: str
    sha256: str
    spec: GraphSpec  # inputs, outputs, cuda_graph, doc: exactly what the export's config implies


@dataclass(frozen=True)
class WeightsEntry:
    file: str
    bytes: int
    tensors: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    config: ModelConfig  # parsed from the checkpoint's config.json, stored verbatim (config.raw)
    dtype: str  # fp32, fp16, bf16
    opset: int
    max_context: int
    graphs: dict[str, GraphEntry]  # prefill, denoise
    weights: WeightsEntry
    files: tuple[str, ...] = ()  # side files: the checkpoint's tokenizer and generation config, Polygraphy's loader
    source: dict[str, str] = field(default_factory=dict)
    targets: tuple[str, ...] = TARGETS
    quantization: dict[str, Any] | None = None
    session_config: dict[str, str] = field(default_factory=dict)  # ONNX Runtime entries to set
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK  # most tokens one prefill call takes (at most max_context)
    experts: ExpertRouting = DENSE  # how the graphs compute the MoE (exports before the field: dense)
    dgrt_version: str = __version__
    created: str = ""

    @property
    def canvas_length(self) -> int:
        return self.config.canvas_length

    @property
    def precision(self) -> str:
        """What the graphs compute in: the quantization recipe, else the dtype."""
        return str(self.quantization["recipe"]) if self.quantization else self.dtype

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)

    def to_json(self) -> dict[str, Any]:
        cfg = self.config
        data: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dgrt_version": self.dgrt_version,
            "created": self.created,
            "source": self.source,
            "dtype": self.dtype,
            "opset": self.opset,
            "targets": list(self.targets),
            "max_context": self.max_context,
            "prefill_chunk": self.prefill_chunk,
            "experts": self.experts.to_json(),
            **_model_fields(cfg, self.experts),
            "graphs": {
                name: {
                    "file": g.file,
                    "sha256": g.sha256,
                    "doc": g.spec.doc,
                    "cuda_graph": g.spec.cuda_graph,
                    "inputs": [t.to_json() for t in g.spec.inputs],
                    "outputs": [t.to_json() for t in g.spec.outputs],
                }
                for name, g in self.graphs.items()
            },
            "weights": vars(self.weights).copy(),
            "files": list(self.files),
            "config": cfg.raw,
        }
        if self.quantization is not None:
            data["quantization"] = self.quantization
        if self.session_config:
            data["onnxruntime"] = {"session_config": self.session_config}
        return data

    @classmethod
    def from_json(cls, data: Any, where: str = FILE) -> Manifest:
        """Validate parsed manifest.json; a DgrtError names the first problem and what was expected."""
        return _parse(data, where)


def _model_fields(cfg: ModelConfig, experts: ExpertRouting) -> dict[str, Any]:
    """What the manifest repeats from the config for runtimes that do not parse HF configs."""
    return {
        "canvas_length": cfg.canvas_length,
        "layers": [
            {"index": i, "type": s.layer_type, "head_dim": s.head_dim, "num_kv_heads": s.num_kv_heads}
            for i, s in enumerate(cfg.layers)
        ],
        "sliding_window": cfg.sliding_window,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "tokens": {"pad": cfg.pad_token_id, "eos": list(cfg.eos_token_id), "bos": cfg.bos_token_id},
        "dims": {name: doc for name, doc in DIMS.items() if name != "expert_capacity" or experts.routed},
    }


# -- validation ---------------------------------------------------------------------------------------


def _get(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, expected: str) -> Any:
    if key not in obj:
        raise DgrtError(f"{where}: '{key}' is missing, expected {expected}.")
    value = obj[key]
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise DgrtError(f"{where}: '{key}' is {_show(value)}, expected {expected}.")
    return value


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _object(obj: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    return dict(_get(obj, key, dict, where, "an object"))


def _count(obj: dict[str, Any], key: str, where: str, minimum: int = 0) -> int:
    value = _get(obj, key, int, where, f"an integer >= {minimum}")
    if value < minimum:
        raise DgrtError(f"{where}: '{key}' is {value}, expected an integer >= {minimum}.")
    return int(value)


def _file_name(obj: dict[str, Any], key: str, where: str) -> str:
    """A plain file name inside the export directory: no folders, no way out of it."""
    name = _get(obj, key, str, where, "a file name inside the export directory")
    if name in ("", ".", "..") or PurePosixPath(name).name != name or "\\" in name or "\0" in name:
        raise DgrtError(f"{where}: '{key}' is {name!r}, expected a plain file name inside the export directory.")
    return str(name)


def _digest(obj: dict[str, Any], key: str, where: str) -> str:
    value = _get(obj, key, str, where, "'sha256:' and 64 hex digits")
    if not _SHA256.fullmatch(value):
        raise DgrtError(f"{where}: '{key}' is {_show(value)}, expected 'sha256:' and 64 hex digits.")
    return str(value)


def _parse(data: Any, where: str) -> Manifest:
    if not isinstance(data, dict):
        raise DgrtError(f"{where}: expected a JSON object, got {type(data).__name__}.")
    if data.get("format") != FORMAT:
        raise DgrtError(f"{where}: format is {_show(data.get('format'))}, expected {FORMAT!r}.")
    if data.get("format_version") != FORMAT_VERSION:
        raise DgrtError(
            f"{where}: format_version {_show(data.get('format_version'))} is not supported by dgrt {__version__} "
            f"(expected {FORMAT_VERSION})."
        )
    cfg = ModelConfig.from_dict(_object(data, "config", where), f"{where} config")
    dtype = _get(data, "dtype", str, where, f"one of {', '.join(DTYPES)}")
    if dtype not in DTYPES:
        raise DgrtError(f"{where}: 'dtype' is {dtype!r}, expected one of {', '.join(DTYPES)}.")
    opset = _count(data, "opset", where, minimum=1)
    max_context = _count(data, "max_context", where, minimum=1)
    if not cfg.canvas_length < max_context <= cfg.max_position_embeddings:
        raise DgrtError(
            f"{where}: 'max_context' is {max_context}, expected more than the canvas ({cfg.canvas_length}) and at "
            f"most max_position_embeddings ({cfg.max_position_embeddings})."
        )
    prefill_chunk = _count(data, "prefill_chunk", where, minimum=1) if "prefill_chunk" in data else None
    if prefill_chunk is not None and prefill_chunk > max_context:
        raise DgrtError(f"{where}: 'prefill_chunk' is {prefill_chunk}, expected at most max_context ({max_context}).")
    experts = _experts(data, where)
    for key, derived in _model_fields(cfg, experts).items():
        if key not in data:
            raise DgrtError(f"{where}: '{key}' is missing, expected {_show(derived)} (from its config).")
        if data[key] != derived:
            raise DgrtError(f"{where}: '{key}' is {_show(data[key])}, but its config implies {_show(derived)}.")

    graphs_json = _object(data, "graphs", where)
    if sorted(graphs_json) != sorted(GRAPHS):
        raise DgrtError(f"{where}: 'graphs' names {sorted(graphs_json)}, expected {list(GRAPHS)}.")
    graphs = {name: _graph(graphs_json, name, cfg, DTYPES[dtype], experts, f"{where} graphs") for name in GRAPHS}
    if graphs["prefill"].file == graphs["denoise"].file:
        raise DgrtError(f"{where}: both graphs name the file {graphs['prefill'].file!r}, expected two files.")

    w = _object(data, "weights", where)
    weights = WeightsEntry(
        _file_name(w, "file", f"{where} weights"),
        _count(w, "bytes", f"{where} weights"),
        _count(w, "tensors", f"{where} weights"),
        _digest(w, "sha256", f"{where} weights"),
    )
    files = _get(data, "files", list, where, "a list of file names")
    side_files = tuple(_file_name({"files[]": f}, "files[]", where) for f in files)
    targets = _get(data, "targets", list, where, f"a list of {', '.join(TARGETS)}")
    if not all(t in TARGETS for t in targets):
        raise DgrtError(f"{where}: 'targets' is {_show(targets)}, expected some of {', '.join(TARGETS)}.")
    source = data.get("source", {})
    if not isinstance(source, dict) or not all(isinstance(v, str) for v in source.values()):
        raise DgrtError(f"{where}: 'source' is {_show(source)}, expected an object of strings.")
    quantization = data.get("quantization")
    if quantization is not None:
        q = _object(data, "quantization", where)
        if q.get("recipe") not in RECIPES:
            raise DgrtError(
                f"{where}: quantization.recipe is {_show(q.get('recipe'))}, expected one of {', '.join(RECIPES)}."
            )
    session_config = (_object(data, "onnxruntime", where) if "onnxruntime" in data else {}).get("session_config", {})
    if not isinstance(session_config, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in session_config.items()
    ):
        raise DgrtError(f"{where}: onnxruntime.session_config is {_show(session_config)}, expected string entries.")
    return Manifest(
        config=cfg,
        dtype=dtype,
        opset=opset,
        max_context=max_context,
        graphs=graphs,
        weights=weights,
        files=side_files,
        source=dict(source),
        targets=tuple(targets),
        quantization=quantization,
        session_config=dict(session_config),
        prefill_chunk=default_prefill_chunk(max_context) if prefill_chunk is None else prefill_chunk,
        experts=experts,
        dgrt_version=str(data.get("dgrt_version", "")),
        created=str(data.get("created", "")),
    )


def _experts(data: dict[str, Any], where: str) -> ExpertRouting:
    if "experts" not in data:
        return DENSE
    e = _object(data, "experts", where)
    formulation = _get(e, "formulation", str, f"{where} experts", f"one of {', '.join(FORMULATIONS)}")
    if formulation not in FORMULATIONS:
        raise DgrtError(f"{where}: experts.formulation is {formulation!r}, expected one of {', '.join(FORMULATIONS)}.")
    factor = _get(e, "capacity_factor", (int, float), f"{where} experts", "a number > 0")
    if not factor > 0:
        raise DgrtError(f"{where}: experts.capacity_factor is {factor}, expected a number > 0.")
    return ExpertRouting(formulation, float(factor))


def _graph(
    graphs: dict[str, Any], name: str, cfg: ModelConfig, dtype: str, experts: ExpertRouting, where: str
) -> GraphEntry:
    g = _object(graphs, name, where)
    where = f"{where}.{name}"
    outputs = _get(g, "outputs", list, where, "a list of tensors")
    debug_logits = (
        name == "denoise" and bool(outputs) and isinstance(outputs[-1], dict) and (outputs[-1].get("name") == "logits")
    )
    routed = experts.routed
    spec = prefill_spec(cfg, dtype, routed) if name == "prefill" else denoise_spec(cfg, dtype, debug_logits, routed)
    for key, expected in (("inputs", spec.inputs), ("outputs", spec.outputs)):
        got, want = _get(g, key, list, where, "a list of tensors"), [t.to_json() for t in expected]
        if got != want:
            i = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
            found = _show(got[i]) if i < len(got) else "nothing"
            wanted = _show(want[i]) if i < len(want) else "nothing"
            raise DgrtError(
                f"{where}: {key}[{i}] is {found}, but the contract of its config and dtype expects {wanted}."
            )
    if g.get("cuda_graph") != spec.cuda_graph:
        raise DgrtError(f"{where}: 'cuda_graph' is {_show(g.get('cuda_graph'))}, expected {_show(spec.cuda_graph)}.")
    return GraphEntry(_file_name(g, "file", where), _digest(g, "sha256", where), spec)


# -- reading and checking an export directory ---------------------------------------------------------


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def load(export_dir: str | Path, verify: bool = True) -> Manifest:
    """Read, validate and check an export directory: its manifest, the files it names, the graphs' digests,
    the weights' size and (unless verify=False, which warns) sha256."""
    export_dir = Path(export_dir)
    path = export_dir / FILE
    if not path.is_file():
        raise DgrtError(f"{export_dir}: no {FILE} (not a dgrt export directory).")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise DgrtError(f"{path}: not UTF-8 text (expected the JSON that dgrt export writes).") from None
    except (json.JSONDecodeError, ValueError) as e:
        raise DgrtError(f"{path}: not valid JSON ({e}).") from None
    except OSError as e:
        raise DgrtError(f"{path}: cannot read it ({e.strerror}).") from None
    manifest = Manifest.from_json(data, str(path))
    for name, graph in manifest.graphs.items():
        file = export_dir / graph.file
        if not file.is_file():
            raise DgrtError(f"{export_dir}: {graph.file} is missing (the {name} graph named in {FILE}).")
        if file_sha256(file) != graph.sha256:
            raise DgrtError(f"{file} does not match the {name} graph {FILE} describes (its sha256 differs).")
    weights = export_dir / manifest.weights.file
    if not weights.is_file():
        raise DgrtError(f"{export_dir}: {manifest.weights.file} is missing (named in {FILE}).")
    size = weights.stat().st_size
    if size != manifest.weights.bytes:
        raise DgrtError(f"{weights} has {size} bytes; {FILE} says {manifest.weights.bytes}.")
    if verify:
        _verify_weights(export_dir, manifest.weights)
    else:
        warnings.warn(
            f"{weights} was not checked against {FILE}'s sha256 (verification turned off): a corrupt file "
            "would give wrong text without an error.",
            DgrtWarning,
            stacklevel=2,
        )
    return manifest


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _stamp(export_dir: Path, weights: WeightsEntry) -> dict[str, Any]:
    st = (export_dir / weights.file).stat()
    return {"file": weights.file, "sha256": weights.sha256, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
            "inode": st.st_ino}  # fmt: skip


def mark_verified(export_dir: Path, weights: WeightsEntry) -> None:
    """Record that the weights file, as it is now, has the manifest's sha256 (the exporter hashed it while
    writing). Best effort: a read-only export is hashed again on each load."""
    try:
        atomic_write_text(export_dir / VERIFIED_FILE, json.dumps(_stamp(export_dir, weights)) + "\n")
    except (DgrtError, OSError):
        pass


def _verify_weights(export_dir: Path, weights: WeightsEntry) -> None:
    try:
        if json.loads((export_dir / VERIFIED_FILE).read_text()) == _stamp(export_dir, weights):
            return
    except (OSError, ValueError):
        pass  # no stamp, or an unreadable one: hash
    path = export_dir / weights.file
    if file_sha256(path) != weights.sha256:
        raise DgrtError(
            f"{path} does not match the sha256 in {FILE}: the file is corrupt or changed since export; export "
            "again (or, at your own risk, turn verification off with --no-verify / verify=False)."
        )
    mark_verified(export_dir, weights)


def write(out: Path, manifest: Manifest) -> None:
    """Write manifest.json atomically (temp file + rename)."""
    atomic_write_text(out / FILE, json.dumps(manifest.to_json(), indent=2, allow_nan=False) + "\n")
