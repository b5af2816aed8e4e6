"""`dgrt export`: the ONNX graphs run by ONNX Runtime reproduce the torch modules, teacher-forced."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from conftest import Cli
from onnx_graphs import OrtGraphs

from dgrt.checkpoint import Checkpoint, checkpoint_key, load_model
from dgrt.compare import export_logits
from dgrt.errors import DgrtError
from dgrt.exporter import tracing
from dgrt.exporter import weights as weights_module
from dgrt.exporter.lint import lint_export, lint_model
from dgrt.exporter.onnx_export import ExportOptions, export
from dgrt.exporter.quantize import Recipe
from dgrt.model import Denoise
from dgrt.runtime.backends import DenoiseInputs

TOL = 1e-4


def max_err(a: np.ndarray, b: torch.Tensor) -> float:
    assert a.shape == tuple(b.shape), (a.shape, tuple(b.shape))
    return float(np.abs(a.astype(np.float64) - b.double().numpy()).max()) if a.size else 0.0


def check_prefill(ort_new: list, torch_new: list, what: str) -> None:
    for i, ((ok, ov), (tk, tv)) in enumerate(zip(ort_new, torch_new, strict=True)):
        assert max_err(ok, tk) <= TOL and max_err(ov, tv) <= TOL, f"{what}: layer {i} K/V differ"


@pytest.mark.parametrize("name", ["tiny", "narrow", "wide"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("prompt_len", ["one", "short", "long"])
@torch.inference_mode()
def test_onnx_runtime_matches_torch(
    exports: dict[str, Path], checkpoints: dict[str, Path], name: str, batch: int, prompt_len: str
) -> None:
    """Prompt prefill from an empty past, then 3 canvases: a first step, a self-conditioned step fed the
    graph's own next_soft_embeds, and the prefill of the finished canvas, both sides on the same inputs."""
    model, graphs = load_model(checkpoints[name]), OrtGraphs(exports[name])
    cfg = model.config
    p = {"one": 1, "short": max(2, cfg.sliding_window // 2), "long": cfg.sliding_window + 3}[prompt_len]
    c = cfg.canvas_length
    gen = torch.Generator().manual_seed(p * 10 + batch)
    ids = torch.randint(0, cfg.vocab_size, (batch, p), generator=gen)
    positions = torch.arange(p)[None].expand(batch, -1)
    past = model.empty_past(batch)
    new = model.prefill(ids, positions, past)
    check_prefill(graphs.prefill(ids, positions, past), new, "prompt prefill")
    past = new

    for k in range(3):
        positions = torch.arange(p + k * c, p + (k + 1) * c)[None].expand(batch, -1)
        soft = torch.zeros(batch, c, cfg.hidden_size)
        for step in range(2):
            inputs = dict(
                canvas_ids=torch.randint(0, cfg.vocab_size, (batch, c), generator=gen),
                soft_embeds=soft,
                position_ids=positions,
                pad_lengths=torch.zeros(batch, dtype=torch.int64),
                temperature=torch.linspace(0.8, 0.5, batch),
                uniform=torch.rand(batch, c, generator=gen),
            )
            argmax, sample, entropy, next_soft, logits = Denoise(model, debug_logits=True)(
                *inputs.values(), *[t for kv in past for t in kv]
            )
            out = graphs.denoise(**inputs, past=past)
            what = f"canvas {k} step {step}"
            assert max_err(out["logits"], logits) <= TOL, what
            assert max_err(out["entropy"], entropy) <= TOL, what
            assert max_err(out["next_soft_embeds"], next_soft) <= TOL, what
            assert np.array_equal(out["argmax"], argmax.numpy()), what
            assert np.array_equal(out["sample"], sample.numpy()), what
            soft = torch.from_numpy(out["next_soft_embeds"])  # the graph feeds itself, as the runtime will

        new = model.prefill(argmax, positions, past)
        check_prefill(graphs.prefill(argmax, positions, past), new, f"canvas {k} prefill")
        past = [(torch.cat([a, b], 2), torch.cat([c_, d], 2)) for (a, c_), (b, d) in zip(past, new, strict=True)]


@torch.inference_mode()
def test_sliding_layers_may_be_fed_only_their_window(exports: dict[str, Path], checkpoints: dict[str, Path]) -> None:
    model, graphs = load_model(checkpoints["narrow"]), OrtGraphs(exports["narrow"])
    cfg = model.config
    w, p, c = cfg.sliding_window, 4 * cfg.sliding_window, cfg.canvas_length
    gen = torch.Generator().manual_seed(1)
    history = model.prefill(
        torch.randint(0, cfg.vocab_size, (1, p), generator=gen), torch.arange(p)[None], model.empty_past(1)
    )
    windowed = [
        (k[:, :, -(w - 1) :], v[:, :, -(w - 1) :]) if s.is_sliding else (k, v)
        for (k, v), s in zip(history, cfg.layers, strict=True)
    ]
    inputs = dict(
        canvas_ids=torch.randint(0, cfg.vocab_size, (1, c), generator=gen),
        soft_embeds=torch.zeros(1, c, cfg.hidden_size),
        position_ids=torch.arange(p, p + c)[None],
        temperature=torch.tensor([0.7]),
        uniform=torch.rand(1, c, generator=gen),
    )
    full, cut = graphs.denoise(**inputs, past=history), graphs.denoise(**inputs, past=windowed)
    assert np.abs(full["logits"] - cut["logits"]).max() <= TOL


@torch.inference_mode()
def test_left_padding_on_onnx_runtime(exports: dict[str, Path], checkpoints: dict[str, Path]) -> None:
    model, graphs = load_model(checkpoints["tiny"]), OrtGraphs(exports["tiny"])
    cfg = model.config
    pad = torch.tensor([6, 0])
    ids = torch.randint(3, 200, (2, 11))
    positions = (torch.arange(11)[None] - pad[:, None]).clamp(min=0)
    past = model.prefill(ids, positions, model.empty_past(2), pad)
    check_prefill(graphs.prefill(ids, positions, model.empty_past(2), pad), past, "padded prefill")
    c = cfg.canvas_length
    inputs = dict(
        canvas_ids=torch.randint(0, cfg.vocab_size, (2, c)),
        soft_embeds=torch.zeros(2, c, cfg.hidden_size),
        position_ids=torch.arange(11, 11 + c)[None] - pad[:, None],
        pad_lengths=pad,
        temperature=torch.tensor([0.8, 0.8]),
        uniform=torch.rand(2, c),
    )
    expected = Denoise(model, debug_logits=True)(*inputs.values(), *[t for kv in past for t in kv])[-1]
    assert max_err(graphs.denoise(**inputs, past=past)["logits"], expected) <= TOL


def test_graphs_pass_the_full_onnx_checker(exports: dict[str, Path]) -> None:
    for name in ("prefill", "denoise"):
        onnx.checker.check_model(str(exports["tiny"] / f"{name}.onnx"), full_check=True)


def test_weights_are_stored_once_and_none_is_dropped(exports: dict[str, Path], checkpoints: dict[str, Path]) -> None:
    out = exports["tiny"]
    manifest = json.loads((out / "manifest.json").read_text())
    locations: dict[str, tuple[str, int]] = {}
    for graph in ("prefill", "denoise"):
        model = ir.load(out / f"{graph}.onnx")
        for name, value in model.graph.initializers.items():
            if not name.startswith("model."):
                continue
            tensor = value.const_value
            assert isinstance(tensor, ir.ExternalTensor), f"{graph}: {name} is stored inside the graph"
            where = (tensor.location, tensor.offset)
            assert locations.setdefault(name, where) == where, f"{name} is stored twice"
    assert {loc for loc, _ in locations.values()} == {"weights.bin"}
    assert len(locations) == manifest["weights"]["tensors"]
    assert "model.embed_tokens.weight" in locations  # embedding and LM head: one tensor

    # Every checkpoint tensor reaches a graph, with its exact values, except the last layer's prefill
    # scalar: nothing in the cache depends on the last layer's output.
    ckpt = Checkpoint.open(checkpoints["tiny"])
    stored = {checkpoint_key(n.removeprefix("model.")): n for n in locations if "inv_freq" not in n}
    unused = {f"model.encoder.language_model.layers.{ckpt.config.num_layers - 1}.layer_scalar"}
    assert set(ckpt.tensors) - set(stored) == unused
    raw = np.memmap(out / "weights.bin", dtype=np.uint8, mode="r")
    for key, name in stored.items():
        offset = locations[name][1]
        expected = ckpt.tensor(key).numpy()
        assert np.array_equal(raw[offset : offset + expected.nbytes].view(np.float32).reshape(expected.shape), expected)


def test_manifest_is_the_io_contract(exports: dict[str, Path]) -> None:
    graphs = OrtGraphs(exports["tiny"])
    assert graphs.manifest.precision == "fp32" and graphs.manifest.graphs["denoise"].spec.cuda_graph
    m = json.loads((exports["tiny"] / "manifest.json").read_text())  # what runtimes in other languages read
    assert m["dtype"] == "fp32" and m["opset"] == 21 and m["canvas_length"] == 16
    assert m["source"]["digest"].startswith("sha256:")
    for name, session in graphs.sessions.items():
        spec = m["graphs"][name]
        got = [(i.name, i.shape) for i in session.get_inputs()]
        assert got == [(t["name"], t["shape"]) for t in spec["inputs"]]
        assert [o.name for o in session.get_outputs()] == [t["name"] for t in spec["outputs"]]
    past = [t for t in m["graphs"]["denoise"]["inputs"] if "layer" in t]
    assert past[0]["shape"] == ["batch", 2, "past_sliding", 16] and past[2]["shape"] == ["batch", 1, "past_full", 32]
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (exports["tiny"] / name).exists()


def test_lint_passes_and_lists_the_op_inventory(exports: dict[str, Path]) -> None:
    report = lint_export(exports["tiny"])
    assert report.ok, report.errors
    text = report.format()
    assert "prefill: opset 21" in text and "MatMul" in text and "lint passed" in text


def test_an_architecture_exported_again_is_not_traced_again(
    tmp_path: Path, tiny_ckpt: Path, exports: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process traced the tiny graphs for `exports`: the next exports copy them (seconds instead of
    tens of seconds), and what one export changes in its copy (Q/DQ, the debug output) stays in it."""

    monkeypatch.setattr(tracing, "_trace_both", no_tracing)
    export(tiny_ckpt, tmp_path / "int4", ExportOptions(quant=Recipe("int4", 32), accuracy="off"))
    export(tiny_ckpt, tmp_path / "plain")
    assert (tmp_path / "plain" / "prefill.onnx").read_bytes() == (exports["tiny"] / "prefill.onnx").read_bytes()
    plain, traced = (
        onnx.load(out / "denoise.onnx", load_external_data=False) for out in (tmp_path / "plain", exports["tiny"])
    )
    assert plain.graph.node == traced.graph.node  # no DequantizeLinear from the int4 copy
    assert [o.name for o in plain.graph.output] == [o.name for o in traced.graph.output][:-1]  # less "logits"


def no_tracing(*_: object) -> None:
    raise AssertionError("traced")


def _graph_with(op: str, domain: str = "") -> ir.Model:
    x = ir.Value(name="x", shape=ir.Shape([4]), type=ir.TensorType(ir.DataType.FLOAT))
    node = ir.Node(domain, op, [x], num_outputs=1)
    node.outputs[0].name = "y"
    graph = ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": 21, **({domain: 1} if domain else {})})
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize(
    ("op", "domain", "message"),
    [
        ("NonZero", "", "data-dependent shapes"),
        ("Unique", "", "does not support Unique"),
        ("SplitToSequence", "", "does not support SplitToSequence"),
        ("FusedMatMul", "com.microsoft", "domain 'com.microsoft'"),
    ],
)
def test_lint_fails_on_banned_ops(op: str, domain: str, message: str) -> None:
    report = lint_model(_graph_with(op, domain), "denoise", cuda_graph=True)
    assert any(message in e for e in report.errors), report.errors


def test_lint_fails_on_an_opset_above_the_parser() -> None:
    model = _graph_with("Relu")
    model.opset_imports[""] = 25
    assert any("opset 25 is outside" in e for e in lint_model(model, "g", cuda_graph=False).errors)


@torch.inference_mode()
def test_fp16_export_runs_on_onnx_runtime_and_stays_finite(fp16_export: Path, two_layer_ckpt: Path) -> None:
    graphs = OrtGraphs(fp16_export)
    model = load_model(two_layer_ckpt)
    p, c = 12, model.config.canvas_length
    ids = torch.randint(0, model.config.vocab_size, (2, p))
    past = [(k.half(), v.half()) for k, v in model.empty_past(2)]
    new = [
        (torch.from_numpy(k), torch.from_numpy(v))
        for k, v in graphs.prefill(ids, torch.arange(p)[None].expand(2, -1), past)
    ]
    assert all(torch.isfinite(k.float()).all() and torch.isfinite(v.float()).all() for k, v in new)
    out = graphs.denoise(
        canvas_ids=torch.randint(0, model.config.vocab_size, (2, c)),
        soft_embeds=torch.zeros(2, c, model.config.hidden_size),
        position_ids=torch.arange(p, p + c)[None].expand(2, -1),
        temperature=torch.tensor([0.8, 0.8]),
        uniform=torch.rand(2, c),
        past=new,
    )
    assert out["next_soft_embeds"].dtype == np.float16
    assert all(np.isfinite(out[k].astype(np.float32)).all() for k in ("entropy", "next_soft_embeds"))


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        (None, ["export", "/nonexistent", "-o", "{out}"], "not a checkpoint folder"),
        ("corrupt", ["export", "{ckpt}", "-o", "{out}"], "not a readable safetensors file"),
        ("copy", ["export", "{ckpt}", "-o", "{out}", "--dtype", "int8"], "invalid choice: 'int8'"),
        ("copy", ["export", "{ckpt}", "-o", "/proc/dgrt-no/out"], "cannot write here"),
        ("copy", ["export", "{ckpt}", "-o", "{out}", "--opset", "30"], "unsupported opset 30"),
        ("copy", ["export", "{ckpt}", "-o", "{out}", "--head-chunk", "17"], "from 1 to the canvas length (16)"),
        ("copy", ["export", "{ckpt}", "-o", "{out}", "--prefill-chunk", "0"], "from 1 to the max context"),
        ("copy", ["export", "{ckpt}", "-o", "{out}", "--expert-capacity-factor", "0"], "and a factor > 0"),
        ("copy", ["export", "{ckpt}", "-o", "{out}", "--moe", "sparse"], "invalid choice: 'sparse'"),
        ("existing", ["export", "{ckpt}", "-o", "{out}"], "already exists"),
    ],
)
def test_bad_input_one_error_line_nothing_half_written(
    cli: Cli,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    tiny_ckpt: Path,
    setup: str | None,
    args: list[str],
    message: str,
) -> None:
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    if setup:
        shutil.copytree(tiny_ckpt, ckpt)
    if setup == "corrupt":
        (ckpt / "model.safetensors").write_bytes(b"garbage")
    if setup == "existing":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    monkeypatch.setattr(tracing, "_trace_both", no_tracing)  # bad input is refused before the costly part
    before = sorted(p.name for p in tmp_path.iterdir())
    r = cli(*[a.format(ckpt=ckpt, out=out) for a in args])
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith("dgrt: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert message in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temporary folder left


def test_bf16_export_from_the_command_line(
    cli: Cli, tmp_path: Path, one_layer_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16 graphs are valid and lint clean (ONNX Runtime CPU has no bf16 MatMul to run them). Exported as
    on a one-CPU machine (both graphs traced in this process, one after the other) with the dense MoE, the
    formulation the other exports do not use."""
    monkeypatch.setattr(tracing, "_cpus", lambda: 1)
    r = cli("export", str(one_layer_ckpt), "-o", str(tmp_path / "out"), "--dtype", "bf16", "--moe", "dense")
    assert r.returncode == 0, r.stderr
    assert "weights.bin" in r.stdout and "lint passed" in r.stdout and "dense MoE" in r.stdout
    for name in ("prefill", "denoise"):
        onnx.checker.check_model(str(tmp_path / "out" / f"{name}.onnx"), full_check=True)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    soft = next(t for t in manifest["graphs"]["denoise"]["inputs"] if t["name"] == "soft_embeds")
    assert manifest["dtype"] == "bf16" and soft["dtype"] == "bfloat16"
    assert manifest["experts"]["formulation"] == "dense" and "expert_slots" not in json.dumps(manifest["graphs"])
    assert manifest["weights"]["bytes"] < 0.6 * Checkpoint.open(one_layer_ckpt).weight_bytes  # 2 bytes a weight
    r = cli("lint", str(tmp_path / "out"))
    assert r.returncode == 0 and "denoise: opset 21" in r.stdout


def test_export_rejects_a_max_context_below_the_canvas(tmp_path: Path, tiny_ckpt: Path) -> None:
    with pytest.raises(DgrtError, match="--max-context 8 must be larger than the canvas"):
        export(tiny_ckpt, tmp_path / "out", ExportOptions(max_context=8))


@torch.inference_mode()
def test_the_vocabulary_sized_work_in_chunks_gives_the_same_step(tmp_path: Path, one_layer_ckpt: Path) -> None:
    """--head-chunk 5 over a canvas of 16: the LM head, sampler and next soft embeddings run in four chunks
    (a fourth of the memory at 16, an eighth at the real canvas with the fp32 default), with the step outputs
    of the whole canvas at once; validate still finds the logits, the chunks' concatenated."""
    manifest = export(one_layer_ckpt, tmp_path / "out", ExportOptions(head_chunk=5)).manifest
    graph = onnx.load(str(tmp_path / "out" / "denoise.onnx"), load_external_data=False)
    assert sum(node.op_type == "LogSoftmax" for node in graph.graph.node) == 4
    assert "logits" not in [o.name for o in graph.graph.output]
    model, graphs = load_model(one_layer_ckpt), OrtGraphs(tmp_path / "out")
    cfg, gen = model.config, torch.Generator().manual_seed(0)
    c, p = cfg.canvas_length, 11
    past = model.prefill(
        torch.randint(0, cfg.vocab_size, (2, p), generator=gen), torch.arange(p)[None], model.empty_past(2)
    )
    inputs = DenoiseInputs(
        canvas_ids=torch.randint(0, cfg.vocab_size, (2, c), generator=gen),
        soft_embeds=torch.randn(2, c, cfg.hidden_size, generator=gen),
        position_ids=torch.arange(p, p + c)[None].expand(2, -1),
        pad_lengths=torch.zeros(2, dtype=torch.int64),
        temperature=torch.tensor([0.8, 0.5]),
        uniform=torch.rand(2, c, generator=gen),
    )
    argmax, sample, entropy, next_soft, logits = Denoise(model, debug_logits=True)(
        *inputs.by_name().values(), *[t for kv in past for t in kv]
    )
    out = graphs.denoise(**inputs.by_name(), past=past)
    assert np.array_equal(out["argmax"], argmax.numpy()) and np.array_equal(out["sample"], sample.numpy())
    assert max_err(out["entropy"], entropy) <= TOL and max_err(out["next_soft_embeds"], next_soft) <= TOL
    assert max_err(export_logits(tmp_path / "out", manifest)(inputs, past).numpy(), logits) <= TOL


def test_weights_are_converted_to_the_export_dtype_a_chunk_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bf16 tensor written as fp32 a few values at a time: the bytes of converting it whole, aligned."""
    monkeypatch.setattr(weights_module, "CONVERT_CHUNK", 7)
    bf16 = torch.randn(5, 9).to(torch.bfloat16)
    file = weights_module.WeightFile(tmp_path / "weights.bin")
    assert file.add(torch.ones(3)) == (0, 12)
    offset, length = file.add(bf16, torch.float32)
    file.close()
    assert (offset, length) == (64, 5 * 9 * 4)
    written = (tmp_path / "weights.bin").read_bytes()[offset : offset + length]
    assert written == bf16.float().numpy().tobytes()
