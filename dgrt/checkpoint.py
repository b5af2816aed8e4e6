"""A DiffusionGemma checkpoint folder in Hugging Face layout, read lazily.

`Checkpoint.open(path)` parses config.json and generation_config.json and reads only the safetensors
headers; it checks that every tensor the text model needs is there with the right shape and a float dtype,
that nothing unexpected is there, and skips the vision tower. Tensors are read one at a time, on demand
(`tensor(key)`), so opening a 26B checkpoint costs no RAM.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from dgrt.config import ModelConfig
from dgrt.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}).") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object.")
    return data


def _headers(path: Path) -> dict[str, TensorInfo]:
    """The tensors a safetensors file holds, from its header alone (8-byte length, then JSON)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= size - 8:
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
        infos = {}
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            start = 8 + n + begin
            if not 8 + n <= start <= 8 + n + end <= size:
                raise ValueError(f"tensor '{key}' lies outside the file")
            infos[key] = TensorInfo(key, path, tuple(entry["shape"]), entry["dtype"], start, 8 + n + end)
        return infos
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found.") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}).") from None


class Checkpoint:
    """An opened, validated checkpoint folder. Use `Checkpoint.open(path)`."""

    def __init__(self, path: Path, config: ModelConfig, generation: dict[str, Any], tensors: dict[str, TensorInfo]):
        self.path = path
        self.config = config
        self.generation_config = generation
        self.tensors = tensors  # the text model's tensors, by checkpoint key
        self._files: dict[Path, io.BufferedReader] = {}

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a checkpoint folder (expected a directory with config.json).")
        config = ModelConfig.from_dict(_read_json(path / "config.json"), str(path / "config.json"))
        gen_path = path / "generation_config.json"
        generation = _read_json(gen_path) if gen_path.exists() else {}
        tensors = _validated_tensors(path, config)
        return cls(path, config, generation, tensors)

    @cached_property
    def dtype(self) -> torch.dtype:
        """The dtype of the embedding, which the model computes in."""
        return FLOAT_DTYPES[self.tensors["model.decoder.embed_tokens.weight"].dtype]

    @property
    def weight_bytes(self) -> int:
        return sum(torch.finfo(FLOAT_DTYPES[t.dtype]).bits // 8 * _numel(t.shape) for t in self.tensors.values())

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

    def state_dict(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(dgrt parameter name, tensor) pairs, one tensor read at a time."""
        for key, (name, _) in expected_tensors(self.config).items():
            t = self.tensor(key)
            yield name, t if dtype is None else t.to(dtype)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _weight_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: missing or empty 'weight_map'.")
        return sorted({path / str(f) for f in weight_map.values()})
    single = path / SINGLE_FILE
    if not single.exists():
        raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} found.")
    return [single]


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

    Built on the meta device, then each parameter is assigned from the checkpoint, so peak memory is the
    weights once (in `dtype`, default the checkpoint's).
    """
    from dgrt.model import DiffusionGemma

    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.open(checkpoint)
    with torch.device("meta"):
        model = DiffusionGemma(ckpt.config)
    state = dict(ckpt.state_dict(dtype or ckpt.dtype))
    # strict=False only because the RoPE buffers are not in checkpoints; they are built on the CPU even
    # under the meta device (dgrt.model.layers.rope_inv_freq). Every parameter is checked below.
    missing, _ = model.load_state_dict(state, strict=False, assign=True)
    assert not [m for m in missing if not m.startswith("inv_freq_")], missing
    return model.eval().requires_grad_(False)
