"""Opening checkpoint folders: everything mapped, or one error that names the key and the file."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dgrt.checkpoint import Checkpoint, expected_tensors, load_model
from dgrt.errors import CheckpointError


def copy_with_weights(src: Path, dst: Path, edit) -> Path:
    """A copy of checkpoint `src` whose tensors went through `edit(dict) -> dict`."""
    shutil.copytree(src, dst)
    weights = edit(load_file(src / "model.safetensors"))
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_open_maps_every_text_tensor_and_skips_vision(tiny_ckpt: Path) -> None:
    ckpt = Checkpoint.open(tiny_ckpt)
    assert set(ckpt.tensors) == set(expected_tensors(ckpt.config))
    assert not any("vision" in k for k in ckpt.tensors)
    assert ckpt.dtype == torch.float32
    assert ckpt.generation_config["eos_token_id"] == [1, 5]
    # 4 layers x 2 roles of layer scalars: the encoder's come from their own keys.
    scalars = [k for k in ckpt.tensors if k.endswith("layer_scalar")]
    assert len(scalars) == 8 and sum("model.encoder.language_model" in k for k in scalars) == 4


def test_encoder_and_decoder_layer_scalars_load_from_their_own_keys(tiny_ckpt: Path) -> None:
    ckpt = Checkpoint.open(tiny_ckpt)
    model = load_model(ckpt)
    layer = model.layers[2]
    assert torch.equal(layer.layer_scalar, ckpt.tensor("model.decoder.layers.2.layer_scalar"))
    assert torch.equal(layer.encoder_layer_scalar, ckpt.tensor("model.encoder.language_model.layers.2.layer_scalar"))
    assert not torch.equal(layer.layer_scalar, layer.encoder_layer_scalar)


def test_missing_tensor_is_named(tmp_path: Path, tiny_ckpt: Path) -> None:
    key = "model.decoder.layers.1.experts.down_proj"
    bad = copy_with_weights(tiny_ckpt, tmp_path / "bad", lambda w: {k: v for k, v in w.items() if k != key})
    with pytest.raises(CheckpointError, match=re.escape(f"missing tensor '{key}'")):
        Checkpoint.open(bad)


def test_missing_encoder_layer_scalar_is_named(tmp_path: Path, tiny_ckpt: Path) -> None:
    """transformers would load uninitialised memory here; dgrt refuses."""
    key = "model.encoder.language_model.layers.3.layer_scalar"
    bad = copy_with_weights(tiny_ckpt, tmp_path / "bad", lambda w: {k: v for k, v in w.items() if k != key})
    with pytest.raises(CheckpointError, match=re.escape(key)):
        Checkpoint.open(bad)


def test_wrong_shape_is_named_with_file_and_expected_shape(tmp_path: Path, tiny_ckpt: Path) -> None:
    key = "model.decoder.layers.0.self_attn.q_proj.weight"
    bad = copy_with_weights(tiny_ckpt, tmp_path / "bad", lambda w: w | {key: torch.zeros(32, 64)})
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: tensor '.*q_proj.weight' has shape \[32, 64\], expected \[64, 64\]",
    ):
        Checkpoint.open(bad)


def test_wrong_dtype_is_named(tmp_path: Path, tiny_ckpt: Path) -> None:
    key = "model.decoder.norm.weight"
    bad = copy_with_weights(tiny_ckpt, tmp_path / "bad", lambda w: w | {key: torch.ones(64, dtype=torch.int32)})
    with pytest.raises(CheckpointError, match=r"'model\.decoder\.norm\.weight' has dtype I32"):
        Checkpoint.open(bad)


def test_unexpected_text_tensor_is_refused(tmp_path: Path, tiny_ckpt: Path) -> None:
    key = "model.decoder.layers.1.self_attn.v_proj.weight"  # full layers have K = V, no v_proj
    bad = copy_with_weights(tiny_ckpt, tmp_path / "bad", lambda w: w | {key: torch.zeros(32, 64)})
    with pytest.raises(CheckpointError, match=re.escape(f"unexpected tensor '{key}'")):
        Checkpoint.open(bad)


def test_sharded_checkpoint(tmp_path: Path, tiny_ckpt: Path) -> None:
    shard = tmp_path / "sharded"
    shutil.copytree(tiny_ckpt, shard)
    (shard / "model.safetensors").unlink()
    weights = load_file(tiny_ckpt / "model.safetensors")
    keys = sorted(weights)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in halves.items():
        save_file({k: weights[k] for k in ks}, str(shard / name), metadata={"format": "pt"})
    index = {"weight_map": {k: name for name, ks in halves.items() for k in ks}}
    (shard / "model.safetensors.index.json").write_text(json.dumps(index))
    a, b = load_model(tiny_ckpt), load_model(shard)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_bfloat16_checkpoint_loads_in_its_dtype(tmp_path: Path, tiny_ckpt: Path) -> None:
    bf16 = copy_with_weights(tiny_ckpt, tmp_path / "bf16", lambda w: {k: v.bfloat16() for k, v in w.items()})
    model = load_model(bf16)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert load_model(bf16, dtype=torch.float32).embed_tokens.weight.dtype == torch.float32


def test_tensors_are_read_lazily(tiny_ckpt: Path) -> None:
    """Opening reads headers only; a tensor is read when asked for."""
    ckpt = Checkpoint.open(tiny_ckpt)
    assert ckpt._files == {}
    t = ckpt.tensor("model.decoder.norm.weight")
    assert t.shape == (64,) and len(ckpt._files) == 1


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: shutil.rmtree(p), "not a checkpoint folder"),
        (lambda p: (p / "config.json").unlink(), "config.json: file not found"),
        (lambda p: (p / "config.json").write_text("{not json"), "config.json: not valid JSON"),
        (
            lambda p: (p / "model.safetensors").unlink(),
            "no model.safetensors or model.safetensors.index.json",
        ),
        (lambda p: (p / "model.safetensors").write_bytes(b"\x00" * 100), "not a readable safetensors file"),
    ],
)
def test_broken_folders_give_one_clear_error(tmp_path: Path, tiny_ckpt: Path, damage, message: str) -> None:
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, path)
    damage(path)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        Checkpoint.open(path)
