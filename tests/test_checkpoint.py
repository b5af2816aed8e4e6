"""Opening checkpoint folders: everything mapped, or one error that names the key and the file."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dgrt
from dgrt.checkpoint import Checkpoint, expected_tensors, load_model
from dgrt.cli import main
from dgrt.errors import CheckpointError, ConfigError, DgrtError
from dgrt.mapped import FileMaps
from dgrt.runtime.backends import TorchBackend
from dgrt.runtime.tokenizer import Tokenizer
from dgrt.sampler import SamplerConfig

EMBED = "model.decoder.embed_tokens.weight"  # F32 [256, 64], the first tensor in the file
NORM = "model.decoder.norm.weight"  # F32 [64]


def broken_copy(tiny_ckpt: Path, tmp_path: Path, damage) -> Path:
    """A copy of the tiny checkpoint after `damage(folder)`."""
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, path)
    damage(path)
    return path


def edit_json(file: Path, **changes) -> None:
    file.write_text(json.dumps(json.loads(file.read_text()) | changes))


def edit_header(edit):
    """A damage that rewrites model.safetensors' header with `edit(header)` (in place, returning None, or
    returning a new header), keeping the data bytes as they are."""

    def damage(path: Path) -> None:
        file = path / "model.safetensors"
        raw = file.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + n])
        header = header if (edited := edit(header)) is None else edited
        text = json.dumps(header).encode()
        file.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])

    return damage


def write_index(path: Path, weight_map: dict) -> None:
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


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
    write_index(shard, {k: name for name, ks in halves.items() for k in ks})
    a, b = load_model(tiny_ckpt), load_model(shard)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_bfloat16_checkpoint_loads_in_its_dtype(tmp_path: Path, tiny_ckpt: Path) -> None:
    bf16 = copy_with_weights(tiny_ckpt, tmp_path / "bf16", lambda w: {k: v.bfloat16() for k, v in w.items()})
    model = load_model(bf16)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert load_model(bf16, dtype=torch.float32).embed_tokens.weight.dtype == torch.float32


def file_mappings(file: Path) -> list[tuple[int, int]]:
    """The address ranges this process has mapped from `file` (Linux)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(file.resolve()):
            lo, hi = fields[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def test_a_model_maps_its_checkpoint_and_never_writes_to_it(tmp_path: Path, tiny_ckpt: Path) -> None:
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, path)
    before = (path / "model.safetensors").read_bytes()
    model = load_model(path)
    mapped = file_mappings(path / "model.safetensors")
    # Every weight lies in the file's mapping: the page cache holds it, not a copy in this process.
    assert all(any(lo <= p.data_ptr() < hi for lo, hi in mapped) for p in model.parameters())
    model.norm.weight.add_(1.0)  # copy-on-write: the model changes, the file does not
    assert torch.equal(model.norm.weight, Checkpoint.open(path).tensor(NORM) + 1)
    assert (path / "model.safetensors").read_bytes() == before


def test_a_checkpoint_of_mixed_dtypes_computes_in_its_embeddings(tmp_path: Path, tiny_ckpt: Path) -> None:
    mixed = copy_with_weights(
        tiny_ckpt, tmp_path / "mixed", lambda w: {k: v if "norm" in k else v.bfloat16() for k, v in w.items()}
    )
    model = load_model(mixed)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # the fp32 norms converted once
    assert {p.dtype for p in model.float().parameters()} == {torch.float32}  # and a cast reaches them all


def test_the_torch_backend_maps_an_exports_weights(exports: dict[str, Path]) -> None:
    model = dgrt.load(exports["tiny"], backend="torch").backend.model
    mapped = file_mappings(exports["tiny"] / "weights.bin")
    # The one weight an export lacks (the last layer's unused prefill scalar) is filled in, not mapped.
    unmapped = [n for n, p in model.named_parameters() if not any(lo <= p.data_ptr() < hi for lo, hi in mapped)]
    assert unmapped == [f"layers.{model.config.num_layers - 1}.encoder_layer_scalar"]


def test_a_weights_file_larger_than_memory_maps(tmp_path: Path) -> None:
    """weights.bin of the 26B in fp32 is 103 GB: mapping it must not need that much memory to commit."""
    meminfo = dict(line.split(":") for line in Path("/proc/meminfo").read_text().splitlines())
    memory = sum(int(meminfo[k].split()[0]) * 1024 for k in ("MemTotal", "SwapTotal"))
    big = tmp_path / "weights.bin"
    with open(big, "wb") as f:  # sparse: takes no disk
        f.truncate(memory + 2**30)
        f.seek(memory)
        f.write(torch.arange(4, dtype=torch.float32).numpy().tobytes())
    view = FileMaps().tensor(big, memory, torch.float32, (2, 2))
    assert view is not None and view.flatten().tolist() == [0.0, 1.0, 2.0, 3.0]


def test_a_bfloat16_checkpoint_runs_in_float32_without_a_float32_copy(tmp_path: Path, tiny_ckpt: Path) -> None:
    bf16 = copy_with_weights(tiny_ckpt, tmp_path / "bf16", lambda w: {k: v.bfloat16() for k, v in w.items()})
    on_use = load_model(bf16, dtype=torch.float32)
    assert {p.dtype for p in on_use.parameters()} == {torch.bfloat16}  # stored once, as in the file
    assert on_use.embed_tokens.weight.dtype == torch.float32  # read in the dtype it computes in
    converted = load_model(bf16).float()
    runs = [dgrt.load(bf16, backend=TorchBackend(m)).generate("Hello", seed=3) for m in (on_use, converted)]
    assert runs[0].tokens == runs[1].tokens


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
        (
            lambda p: (p / "model.safetensors").write_bytes(b"\x00" * 100),
            "model.safetensors: not a readable safetensors file",
        ),
        (lambda p: (p / "config.json").write_bytes(b'{"model_type": "\xff"}'), "config.json: not UTF-8 text (byte 16"),
        (lambda p: (p / "config.json").write_text("[]"), "config.json: expected a JSON object, found []"),
    ],
)
def test_broken_folders_give_one_clear_error(tmp_path: Path, tiny_ckpt: Path, damage, message: str) -> None:
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, path)
    damage(path)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        Checkpoint.open(path)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            edit_header(lambda h: list(h.values())),
            "model.safetensors: not a readable safetensors file (its header is not a JSON",
        ),
        # byte ranges that do not match shape x dtype: `inspect` used to pass these, then export crashed
        (
            edit_header(lambda h: h[NORM].update(dtype="F16")),
            f"tensor '{NORM}' spans 256 bytes, but shape [64] of F16 needs 128 bytes",
        ),
        (
            edit_header(lambda h: h[NORM].update(shape=[32])),
            f"tensor '{NORM}' spans 256 bytes, but shape [32] of F32 needs 128 bytes",
        ),
        (edit_header(lambda h: h[NORM].update(shape=[-64])), f"tensor '{NORM}' has shape [-64], expected a list of"),
        (edit_header(lambda h: h[NORM].update(shape=["64"])), f"tensor '{NORM}' has shape ['64'], expected a list of"),
        (edit_header(lambda h: h[NORM].update(shape=64)), f"tensor '{NORM}' has shape 64, expected a list of integers"),
        (
            edit_header(lambda h: h[EMBED].update(data_offsets=[0])),
            f"tensor '{EMBED}' has data_offsets [0], expected [begin, end] with 0 <= begin <= end",
        ),
        (
            edit_header(lambda h: h[EMBED].update(data_offsets=[65536, 0])),
            f"tensor '{EMBED}' has data_offsets [65536, 0], expected [begin, end]",
        ),
        (
            edit_header(lambda h: h[EMBED].update(data_offsets=["0", "65536"])),
            f"tensor '{EMBED}' has data_offsets ['0', '65536'], expected [begin, end]",
        ),
        (
            edit_header(lambda h: h.update({NORM: {"dtype": "F32", "shape": [64]}})),
            f"tensor '{NORM}' has data_offsets None, expected",
        ),
        (edit_header(lambda h: h[NORM].update(dtype="F7")), f"tensor '{NORM}' has dtype 'F7', not a safetensors dtype"),
        (edit_header(lambda h: h[NORM].update(dtype=["F32"])), f"tensor '{NORM}' has dtype ['F32'], not a"),
        (edit_header(lambda h: h.update({NORM: [0, 256]})), f"header entry '{NORM}' is [0, 256], expected an object"),
        (
            lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes() + bytes(4)),
            "model.safetensors: the tensors end at byte ",
        ),
    ],
)
def test_malformed_safetensors_header_is_named(tmp_path: Path, tiny_ckpt: Path, damage, message: str) -> None:
    with pytest.raises(CheckpointError, match=re.escape(message)):
        Checkpoint.open(broken_copy(tiny_ckpt, tmp_path, damage))


def test_overlapping_tensors_are_refused(tmp_path: Path, tiny_ckpt: Path) -> None:
    """A vision key (skipped by dgrt) that points at a text tensor's bytes: used to be accepted."""
    bad = broken_copy(tiny_ckpt, tmp_path, edit_header(lambda h: h.update({"model.encoder.vision_tower.x": h[NORM]})))
    message = (
        r"tensor 'model\.encoder\.vision_tower\.x' \(bytes \d+-\d+\) overlaps tensor 'model\.decoder\.norm\.weight'"
    )
    with pytest.raises(CheckpointError, match=message):
        Checkpoint.open(bad)


def every_tensor_in(file: str):
    """A damage: an index that maps every tensor of the folder's model.safetensors to `file`."""

    def damage(path: Path) -> None:
        write_index(path, dict.fromkeys(load_file(path / "model.safetensors"), file))

    return damage


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (every_tensor_in("../outside.safetensors"), "is '../outside.safetensors', expected the name of a file"),
        (every_tensor_in("shards/../../outside.safetensors"), "'shards/../../outside.safetensors', expected the name"),
        (every_tensor_in(5), "is 5, expected the name of a file in the checkpoint folder"),
        (every_tensor_in(""), "is '', expected the name of a file in the checkpoint folder"),
        (lambda p: write_index(p, []), "model.safetensors.index.json: missing or empty 'weight_map'"),
        (
            lambda p: (p / "model.safetensors.index.json").write_bytes(b'{"weight_map": {"\xe9": 1}}'),
            "model.safetensors.index.json: not UTF-8 text",
        ),
    ],
)
def test_weight_map_stays_in_the_checkpoint_folder(tmp_path: Path, tiny_ckpt: Path, damage, message: str) -> None:
    # A valid weights file just outside the folder: a weight_map naming it must not be read.
    shutil.copy(tiny_ckpt / "model.safetensors", tmp_path / "outside.safetensors")
    with pytest.raises(CheckpointError, match=re.escape(message)):
        Checkpoint.open(broken_copy(tiny_ckpt, tmp_path, damage))


def test_weight_map_with_an_absolute_path_is_refused(tmp_path: Path, tiny_ckpt: Path) -> None:
    outside = str(tiny_ckpt / "model.safetensors")  # readable and valid, but not in the folder
    bad = broken_copy(tiny_ckpt, tmp_path, every_tensor_in(outside))
    with pytest.raises(CheckpointError, match=re.escape(f"is '{outside}', expected the name of a file in the")):
        Checkpoint.open(bad)


def test_shard_in_a_subfolder_and_symlinked_shards_are_fine(tmp_path: Path, tiny_ckpt: Path) -> None:
    """Hugging Face cache snapshots link each file to a blob outside the folder: only names are confined."""
    path = broken_copy(tiny_ckpt, tmp_path, every_tensor_in("shards/part.safetensors"))
    (path / "model.safetensors").rename(tmp_path / "blob")
    (path / "shards").mkdir()
    (path / "shards" / "part.safetensors").symlink_to(tmp_path / "blob")
    assert torch.equal(Checkpoint.open(path).tensor(NORM), Checkpoint.open(tiny_ckpt).tensor(NORM))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"max_new_tokens": "abc"}, "generation_config.json: 'max_new_tokens' is 'abc', expected a positive integer"),
        ({"eos_token_id": [1, 300]}, "generation_config.json: 'eos_token_id' is [1, 300], expected a token id or a"),
        ({"pad_token_id": 256}, "generation_config.json: 'pad_token_id' is 256, expected an integer from 0 to 255"),
        ({"sampler_config": 5}, "generation_config.json: 'sampler_config' is 5, expected an object"),
    ],
)
def test_malformed_generation_config_is_named(tmp_path: Path, tiny_ckpt: Path, changes: dict, message: str) -> None:
    bad = broken_copy(tiny_ckpt, tmp_path, lambda p: edit_json(p / "generation_config.json", **changes))
    with pytest.raises(ConfigError, match=re.escape(message)):
        Checkpoint.open(bad)
    with pytest.raises(ConfigError, match=re.escape(message)):
        dgrt.load(bad, backend="torch")


def test_null_sampler_settings_keep_the_defaults(tmp_path: Path, tiny_ckpt: Path) -> None:
    nulls = dict.fromkeys(("t_min", "t_max", "max_denoising_steps", "sampler_config", "max_new_tokens"))
    path = broken_copy(tiny_ckpt, tmp_path, lambda p: edit_json(p / "generation_config.json", **nulls))
    gen = dgrt.load(path, backend="torch")
    assert gen.sampler == SamplerConfig() and gen.max_new_tokens == 256


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p / "tokenizer.json").write_text("[]"), "tokenizer.json: not a tokenizer the tokenizers library"),
        (lambda p: (p / "tokenizer.json").write_bytes(b"\xff"), "tokenizer.json: not a tokenizer the tokenizers"),
        (
            lambda p: edit_json(p / "tokenizer_config.json", chat_template=5),
            "tokenizer_config.json: 'chat_template' is 5, expected a Jinja template string",
        ),
        (
            lambda p: edit_json(p / "tokenizer_config.json", chat_template="{% for %}"),
            "tokenizer_config.json: 'chat_template' is not a valid Jinja template",
        ),
        (
            lambda p: edit_json(p / "tokenizer_config.json", bos_token=2),
            "tokenizer_config.json: 'bos_token' is 2, expected a string",
        ),
        (
            lambda p: (p / "tokenizer_config.json").write_text('["<bos>"]'),
            "tokenizer_config.json: expected a JSON object, found ['<bos>']",
        ),
        (
            lambda p: (p / "tokenizer_config.json").write_bytes(b'{"bos_token": "\xff"}'),
            "tokenizer_config.json: not UTF-8 text (byte 15",
        ),
    ],
)
def test_broken_tokenizer_files_are_one_sentence(tmp_path: Path, tiny_ckpt: Path, damage, message: str) -> None:
    bad = broken_copy(tiny_ckpt, tmp_path, damage)
    with pytest.raises(DgrtError, match=re.escape(message)):
        Tokenizer.from_dir(bad)


def test_tokenizer_config_in_transformers_other_layouts(tmp_path: Path, tiny_ckpt: Path) -> None:
    """Special tokens as AddedToken objects and a list of named chat templates render as the plain form does."""
    config = json.loads((tiny_ckpt / "tokenizer_config.json").read_text())
    named = [{"name": "tool_use", "template": "{{ 0 }}"}, {"name": "default", "template": config["chat_template"]}]
    other = broken_copy(
        tiny_ckpt,
        tmp_path,
        lambda p: edit_json(p / "tokenizer_config.json", chat_template=named, bos_token={"content": "<bos>"}),
    )
    messages = [{"role": "user", "content": "hi"}]
    expected = Tokenizer.from_dir(tiny_ckpt).apply_chat_template(messages)
    assert Tokenizer.from_dir(other).apply_chat_template(messages) == expected


def test_chat_template_that_fails_on_messages_is_one_sentence(tmp_path: Path, tiny_ckpt: Path) -> None:
    path = broken_copy(
        tiny_ckpt, tmp_path, lambda p: edit_json(p / "tokenizer_config.json", chat_template="{{ messages + 1 }}")
    )
    with pytest.raises(DgrtError, match=r"the chat template failed on these messages \(TypeError: "):
        Tokenizer.from_dir(path).apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    ("command", "damage", "message"),
    [
        (
            ["inspect", "{ckpt}"],
            lambda p: edit_json(p / "config.json", canvas_length=None),
            "config.json: 'canvas_length' is None",
        ),
        (
            ["inspect", "{ckpt}"],
            lambda p: edit_json(p / "generation_config.json", eos_token_id="x"),
            "generation_config.json: 'eos_token_id' is 'x'",
        ),
        (["inspect", "{ckpt}"], edit_header(lambda h: list(h)), "model.safetensors: not a readable safetensors file"),
        (
            ["export", "{ckpt}", "-o", "{tmp}/out"],
            edit_header(lambda h: h[NORM].update(dtype="BF16")),
            f"tensor '{NORM}' spans",
        ),
        (
            ["generate", "{ckpt}", "hello"],
            lambda p: edit_json(p / "tokenizer_config.json", chat_template=["x"]),
            "tokenizer_config.json: 'chat_template' is ['x'], expected a Jinja template string",
        ),
    ],
)
def test_cli_prints_one_error_line(tmp_path: Path, tiny_ckpt: Path, capsys, command, damage, message: str) -> None:
    bad = broken_copy(tiny_ckpt, tmp_path, damage)
    assert main([arg.format(ckpt=bad, tmp=tmp_path) for arg in command]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1 and err.startswith(f"dgrt: error: {bad}")
    assert message in err
    assert not (tmp_path / "out").exists()  # nothing half-written
