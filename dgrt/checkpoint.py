"""A DiffusionGemma checkpoint folder in Hugging Face layout, read lazily.

`Checkpoint.open(path)` parses config.json and generation_config.json and reads only the safetensors
headers; it checks that every tensor the text model needs is there with the right shape and a float dtype,
that nothing unexpected is there, and skips the vision tower. Tensors are read one at a time, on demand
(`tensor(key)`), so opening a 26B checkpoint costs no RAM; `load_model` maps them instead.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePath
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from dgrt.config import ModelConfig, read_generation_config, read_json
from dgrt.errors import CheckpointError
from dgrt.mapped import FileMaps

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# Bits per element of every dtype the safetensors format defines (0.8), to check each tensor's byte range.
_DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8}
_DTYPE_BITS |= {"F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16}
_DTYPE_BITS |= {"I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64}
# Image-input weights of the encoder role: present in every checkpoint, not used for text.
VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
_ENCODER_SCALAR = re.compile(r"layers\.(\d+)\.encoder_layer_scalar")


def checkpoint_key(param_name: str) -> str:
    """The checkpoint key of a dgrt.model parameter (the decoder side is canonical in HF checkpoints)."""
    m = _ENCODER_SCALAR.fullmatch(param_name)
    if m:
        return f"model.encoder.language_model.layers.{m.group(1)}.layer_scalar"
    return f"model.decoder.{param_name}"


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """checkpoint key -> (dgrt parameter name, shape) for every tensor the text model needs."""
    from dgrt.model import DiffusionGemma

    with torch.device("meta"):
        model = DiffusionGemma(cfg)
    return {checkpoint_key(n): (n, tuple(p.shape)) for n, p in model.named_parameters()}


@dataclass(frozen=True)
class TensorInfo:
    key: str
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: F32, F16, BF16, ...
    start: int  # absolute byte range in the file
    end: int


def _headers(path: Path) -> dict[str, TensorInfo]:
    """The tensors a safetensors file holds, from its header alone (8-byte length, then a JSON object),
    checked as the safetensors library checks them: each tensor's byte range matches its shape and dtype,
    and the ranges tile the data section exactly (no overlaps, no gaps, nothing after)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= size - 8:
                raise CheckpointError(
                    f"{path}: not a readable safetensors file (header length {n} does not fit {size} bytes)."
                )
            header = json.loads(f.read(n).decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found.") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror}).") from None
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON
        raise CheckpointError(f"{path}: not a readable safetensors file (its header is not UTF-8 JSON: {e}).") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a readable safetensors file (its header is not a JSON object).")
    infos = [_tensor_info(path, key, entry, 8 + n) for key, entry in header.items() if key != "__metadata__"]
    end, before = 8 + n, "the header"
    for info in sorted(infos, key=lambda t: (t.start, t.end)):
        if info.start != end:
            what = "overlaps" if info.start < end else f"leaves bytes {end}-{info.start} unused after"
            raise CheckpointError(f"{path}: tensor '{info.key}' (bytes {info.start}-{info.end}) {what} {before}.")
        end, before = info.end, f"tensor '{info.key}'"
    if end != size:
        raise CheckpointError(f"{path}: the tensors end at byte {end}, but the file has {size} bytes.")
    return {info.key: info for info in infos}


def _tensor_info(path: Path, key: str, entry: Any, data_start: int) -> TensorInfo:
    """One header entry ({"dtype", "shape", "data_offsets"}), checked; byte offsets made absolute."""
    if not isinstance(entry, dict):
        raise CheckpointError(f"{path}: header entry '{key}' is {entry!r:.60}, expected an object.")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _DTYPE_BITS:
        raise CheckpointError(f"{path}: tensor '{key}' has dtype {dtype!r:.60}, not a safetensors dtype.")
    if not isinstance(shape, list) or not all(_is_index(d) for d in shape):
        raise CheckpointError(f"{path}: tensor '{key}' has shape {shape!r:.60}, expected a list of integers >= 0.")
    if (
        not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_index, offsets)))
        or offsets[0] > offsets[1]
    ):
        raise CheckpointError(
            f"{path}: tensor '{key}' has data_offsets {offsets!r:.60}, expected [begin, end] with 0 <= begin <= end."
        )
    bits = math.prod(shape) * _DTYPE_BITS[dtype]
    if bits % 8 or offsets[1] - offsets[0] != bits // 8:
        needs = f"{bits // 8} bytes" if bits % 8 == 0 else f"{bits} bits (not whole bytes)"
        raise CheckpointError(
            f"{path}: tensor '{key}' spans {offsets[1] - offsets[0]} bytes, but shape {shape} of {dtype} needs {needs}."
        )
    return TensorInfo(key, path, tuple(shape), dtype, data_start + offsets[0], data_start + offsets[1])


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class Checkpoint:
    """An opened, validated checkpoint folder. Use `Checkpoint.open(path)`."""

    def __init__(self, path: Path, config: ModelConfig, generation: dict[str, Any], tensors: dict[str, TensorInfo]):
        self.path = path
        self.config = config
        self.generation_config = generation
        self.tensors = tensors  # the text model's tensors, by checkpoint key
        self._files: dict[Path, io.BufferedReader] = {}
        self._maps = FileMaps()

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a checkpoint folder (expected a directory with config.json).")
        config = ModelConfig.from_dict(read_json(path / "config.json"), str(path / "config.json"))
        generation = read_generation_config(path, config.vocab_size)
        tensors = _validated_tensors(path, config)
        return cls(path, config, generation, tensors)

    @cached_property
    def dtype(self) -> torch.dtype:
        """The dtype of the embedding, which the model computes in."""
        return FLOAT_DTYPES[self.tensors["model.decoder.embed_tokens.weight"].dtype]

    @property
    def weight_bytes(self) -> int:
        return sum(torch.finfo(FLOAT_DTYPES[t.dtype]).bits // 8 * math.prod(t.shape) for t in self.tensors.values())

    def digest(self) -> str:
        """sha256 of config.json, generation_config.json and every weight file's header (names, dtypes,
        shapes, offsets): identifies the checkpoint without reading its tensors' data."""
        h = hashlib.sha256()
        for name in ("config.json", "generation_config.json"):
            if (self.path / name).exists():
                h.update((self.path / name).read_bytes())
        for file in sorted({t.file for t in self.tensors.values()}):
            with open(file, "rb") as f:
                size = f.read(8)
                h.update(size + f.read(int.from_bytes(size, "little")))
            h.update(str(file.stat().st_size).encode())
        return "sha256:" + h.hexdigest()

    def tensor(self, key: str) -> torch.Tensor:
        """One tensor, read from its file on demand.

        Plain positioned reads, not a memory map: an export streaming a 26B checkpoint then holds one
        tensor at a time instead of accumulating the file's pages in its resident set.
        """
        info = self.tensors[key]
        handle = self._files.get(info.file)
        if handle is None:
            handle = self._files[info.file] = open(info.file, "rb")  # noqa: SIM115 (kept for later reads)
        data = bytearray(info.end - info.start)
        if not data:
            return torch.empty(info.shape, dtype=FLOAT_DTYPES[info.dtype])
        handle.seek(info.start)
        if handle.readinto(data) != len(data):
            raise CheckpointError(f"{info.file}: tensor '{key}' is truncated.")
        return torch.frombuffer(data, dtype=FLOAT_DTYPES[info.dtype]).reshape(info.shape)

    def mapped(self, key: str) -> torch.Tensor:
        """One tensor as a view of its file (dgrt.mapped): its bytes stay in the page cache instead of in this
        process's memory. A model built on such views holds no copy of the checkpoint (a 26B bf16 one is
        larger than this machine's RAM)."""
        info = self.tensors[key]
        view = self._maps.tensor(info.file, info.start, FLOAT_DTYPES[info.dtype], info.shape)
        return self.tensor(key) if view is None else view

    def state_dict(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(dgrt parameter name, tensor) pairs, each a view of its file (see `mapped`), as stored."""
        for key, (name, _) in expected_tensors(self.config).items():
            yield name, self.mapped(key)


def _weight_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: missing or empty 'weight_map'.")
        return sorted({path / _shard_name(index, key, name) for key, name in weight_map.items()})
    single = path / SINGLE_FILE
    if not single.exists():
        raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} found.")
    return [single]


def _shard_name(index: Path, key: str, name: Any) -> str:
    """A weight_map file name, confined to the checkpoint folder.

    Checked by its parts, not by resolving links: a Hugging Face cache snapshot links every file to a blob
    outside the folder, and that is fine; a name that climbs out of the folder or is absolute is not.
    """
    if isinstance(name, str) and name and "\0" not in name:
        relative = PurePath(name)
        if not relative.is_absolute() and ".." not in relative.parts:
            return name
    raise CheckpointError(
        f"{index}: weight_map['{key}'] is {name!r:.80}, expected the name of a file in the checkpoint folder."
    )


def _validated_tensors(path: Path, config: ModelConfig) -> dict[str, TensorInfo]:
    found: dict[str, TensorInfo] = {}
    for file in _weight_files(path):
        for key, info in _headers(file).items():
            if key in found:
                raise CheckpointError(f"{file}: tensor '{key}' is also stored in {found[key].file.name}.")
            found[key] = info

    expected = expected_tensors(config)
    for key, info in found.items():
        if key.startswith(VISION_PREFIXES):
            continue
        if key not in expected:
            raise CheckpointError(
                f"{info.file}: unexpected tensor '{key}' (not part of the DiffusionGemma text model dgrt "
                "implements; refusing to ignore it)."
            )
        _, shape = expected[key]
        if info.shape != shape:
            raise CheckpointError(f"{info.file}: tensor '{key}' has shape {list(info.shape)}, expected {list(shape)}.")
        if info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{info.file}: tensor '{key}' has dtype {info.dtype}, expected one of {sorted(FLOAT_DTYPES)}."
            )
    missing = [k for k in expected if k not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(
            f"{path}: missing tensor '{missing[0]}'{more}, expected shape {list(expected[missing[0]][1])}."
        )
    return {k: found[k] for k in expected}


def load_model(checkpoint: Checkpoint | str | Path, dtype: torch.dtype | None = None) -> Any:
    """The DiffusionGemma torch module with the checkpoint's weights (CPU, eval mode, no grad).

    Built on the meta device, then each parameter stored in the dtype it computes in is a view of the
    checkpoint's mapped files (`Checkpoint.mapped`): the weights stay in the page cache. Without `dtype` the
    model computes in the checkpoint's (its embedding's), and a tensor stored otherwise is converted once.
    With `dtype`, a tensor stored otherwise stays mapped and is converted each time it is read: the real
    bf16 checkpoint runs in fp32 without an fp32 copy (103 GB for the 26B), at the price of the conversions.
    Such a model reads its weights in `dtype` whatever a later cast does to the stored tensors.
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.open(checkpoint)
    target = dtype or ckpt.dtype
    tensors = ckpt.state_dict()
    if dtype is None:
        tensors = ((name, t if t.dtype == target else t.to(target)) for name, t in tensors)
    model = build_model(ckpt.config, tensors)
    for name in [name for name, p in model.named_parameters() if p.dtype != target]:  # only with `dtype`
        owner, _, attr = name.rpartition(".")
        parametrize.register_parametrization(model.get_submodule(owner), attr, _ConvertOnUse(target), unsafe=True)
    return model


class _ConvertOnUse(nn.Module):
    """A parametrization: the stored tensor, read in the dtype the model computes in."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.to(self.dtype)


def model_sharing(reference: Any, config: ModelConfig) -> Any:
    """The DiffusionGemma torch module on the weights of transformers' model of the same checkpoint: its
    tensors themselves, no second copy of the weights in memory."""
    tensors = reference.state_dict()  # named as in checkpoints
    return build_model(config, ((name, tensors[key]) for key, (name, _) in expected_tensors(config).items()))


def build_model(config: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]]) -> Any:
    """The DiffusionGemma torch module holding `tensors` ((dgrt parameter name, tensor) pairs) as its
    parameters, not copies."""
    from dgrt.model import DiffusionGemma

    with torch.device("meta"):
        model = DiffusionGemma(config)
    # strict=False only because the RoPE buffers are not in checkpoints; they are built on the CPU even
    # under the meta device (dgrt.model.layers.rope_inv_freq). Every parameter is checked below.
    missing, _ = model.load_state_dict(dict(tensors), strict=False, assign=True)
    assert not [m for m in missing if not m.startswith("inv_freq_")], missing
    return model.eval().requires_grad_(False)
