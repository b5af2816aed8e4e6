"""The TensorRT path: its pure logic on any machine; building and running engines where TensorRT and a GPU
are (skipped otherwise, saying which is missing); the torch backend's GPU path where CUDA is."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import dgrt
from dgrt.contract import manifest as manifest_mod
from dgrt.contract.manifest import GRAPHS, Manifest
from dgrt.errors import DgrtError
from dgrt.tensorrt.options import (
    BuildOptions,
    builder_flags,
    check_version,
    cleared_flags,
    dim_ranges,
    engine_key,
    max_shapes,
    network_flags,
    outside_profile,
    profiles,
)
from dgrt.tensorrt.targets import TARGETS, check_precision, resolve

HAS_CUDA = torch.cuda.is_available()
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None and HAS_CUDA
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
needs_tensorrt = pytest.mark.skipif(not HAS_TENSORRT, reason="needs TensorRT and a CUDA GPU")
# TensorRT 11.1's BuilderFlag members (NvInfer.h, research/onnx_trt.md §6): no precision flags any more.
TRT11_BUILDER_FLAGS = {
    "DEBUG", "GPU_FALLBACK", "REFIT", "DISABLE_TIMING_CACHE", "TF32", "SPARSE_WEIGHTS", "VERSION_COMPATIBLE",
    "EXCLUDE_LEAN_RUNTIME", "ERROR_ON_TIMING_CACHE_MISS", "DISABLE_COMPILATION_CACHE", "STRIP_PLAN",
    "REFIT_IDENTICAL", "WEIGHT_STREAMING", "REFIT_INDIVIDUAL", "STRICT_NANS", "MONITOR_MEMORY",
    "EDITABLE_TIMING_CACHE", "DISTRIBUTIVE_INDEPENDENCE",
}  # fmt: skip


def manifest_of(export_dir: Path) -> Manifest:
    return manifest_mod.load(export_dir)


# -- targets -----------------------------------------------------------------------------------------------


def test_targets_know_what_each_device_runs() -> None:
    for name in ("h100", "h200", "thor", "l40s", "b200"):
        check_precision(TARGETS[name], "fp8")
    for name in TARGETS:
        check_precision(TARGETS[name], "int4")
    with pytest.raises(DgrtError, match="Jetson AGX Orin .*cannot run fp8 engines.*--quant int4"):
        check_precision(TARGETS["orin"], "fp8")
    with pytest.raises(DgrtError, match="cannot run int4-experts"):
        check_precision(TARGETS["a100"], "int4-experts")  # its other GEMMs are FP8


def test_target_resolution_against_the_gpu_at_hand() -> None:
    assert resolve("auto", "NVIDIA H200", (9, 0)).name == "h200"
    assert resolve("auto", "NVIDIA H100 80GB HBM3", (9, 0)).name == "h100"
    assert resolve("auto", "Some New GPU", (12, 0)).name == "sm_120"
    assert resolve("orin", None, None).name == "orin"  # naming a target checks recipes without a GPU
    with pytest.raises(DgrtError, match="--target h100 is compute capability sm_90, but this GPU .*A100.* is sm_80"):
        resolve("h100", "NVIDIA A100", (8, 0))
    with pytest.raises(DgrtError, match="needs a CUDA GPU"):
        resolve("auto", None, None)
    with pytest.raises(DgrtError, match="unknown target 'v100'"):
        resolve("v100", None, None)


# -- build plan --------------------------------------------------------------------------------------------


def test_profiles_come_from_the_manifest_dims(exports: dict[str, Path]) -> None:
    manifest = manifest_of(exports["tiny"])  # canvas 16, window 8, max_context 4096
    options = BuildOptions(max_batch=4, max_context=512).checked(manifest.max_context, 16)
    assert options.opt_context == 496  # min(1024, 512 - canvas)
    assert dim_ranges(manifest, "prefill", options) == {
        "batch": (1, 1, 4),
        "seq": (1, 16, 512),
        "past_full": (0, 496, 511),
        "past_sliding": (0, 7, 7),  # the runtime keeps window - 1 tokens
        # routed experts: up to every token of a call (4 rows of 512); opt: a canvas's default capacity
        "expert_capacity": (1, 16, 2048),
    }
    prefill = profiles(manifest, "prefill", options)
    assert prefill["expert_slots"] == ((1,), (16,), (2048,))
    assert prefill["input_ids"] == ((1, 1), (1, 16), (4, 512))
    assert prefill["past_key_values.1.key"][2] == (4, 1, 511, 32)  # a full layer: 1 KV head of 32
    denoise = profiles(manifest, "denoise", options)
    assert denoise["canvas_ids"] == ((1, 16), (1, 16), (4, 16))  # the canvas is static
    assert denoise["past_key_values.1.key"][2] == (4, 1, 496, 32)  # room left for the canvas
    assert "temperature" in denoise and all(len(v) == 3 for v in denoise.values())
    assert max_shapes(manifest, "denoise", options)["next_soft_embeds"] == (4, 16, 64)
    assert denoise["expert_slots"] == ((1,), (16,), (64,))  # 4 canvases of 16 tokens


def test_the_prefill_profile_and_buffers_take_one_chunk_not_the_context(exports: dict[str, Path]) -> None:
    manifest = replace(manifest_of(exports["tiny"]), prefill_chunk=64)
    options = BuildOptions(max_context=4096).checked(manifest.max_context, 16)
    assert dim_ranges(manifest, "prefill", options)["seq"] == (1, 16, 64)
    assert dim_ranges(manifest, "prefill", options)["past_full"][2] == 4095  # the cache still reaches the context
    assert max_shapes(manifest, "prefill", options)["new_key_values.1.key"] == (1, 1, 64, 32)


def test_build_options_are_checked() -> None:
    with pytest.raises(DgrtError, match="--max-batch is 0"):
        BuildOptions(max_batch=0).checked(4096, 16)
    with pytest.raises(DgrtError, match="--max-context 8 must exceed the canvas"):
        BuildOptions(max_context=8).checked(4096, 16)
    with pytest.raises(DgrtError, match="--opt-context 5000"):
        BuildOptions(opt_context=5000).checked(4096, 16)
    with pytest.raises(DgrtError, match="cannot be combined"):
        BuildOptions(strip_weights=True, weight_streaming=True).checked(4096, 16)


def test_shapes_outside_the_profile_are_named_before_tensorrt_sees_them(exports: dict[str, Path]) -> None:
    manifest = manifest_of(exports["tiny"])
    prefill = profiles(manifest, "prefill", BuildOptions(max_batch=2).checked(manifest.max_context, 16))
    assert outside_profile("prefill", "input_ids", (2, 16), prefill["input_ids"]) is None
    refused = outside_profile("prefill", "input_ids", (8, 16), prefill["input_ids"])
    assert refused == (
        "the prefill engine takes input_ids of shapes (1, 1) to (2, 1024) (its optimization profile), not (8, 16); "
        "rebuild with dgrt build --max-batch / --max-context to cover it."
    )


def test_fp32_engines_are_fp32_unless_tf32_is_asked_for() -> None:
    assert cleared_flags(BuildOptions()) == ["TF32"]  # TensorRT enables TF32 by default
    assert cleared_flags(BuildOptions(tf32=True)) == []


def test_flags_per_tensorrt_major() -> None:
    assert network_flags(10) == ["STRONGLY_TYPED"] and network_flags(11) == []
    everything = BuildOptions(refit=True, weight_streaming=True)
    assert builder_flags(10, everything) == ["REFIT", "WEIGHT_STREAMING"]
    assert set(builder_flags(11, BuildOptions(strip_weights=True))) == {"STRIP_PLAN", "REFIT_IDENTICAL"}
    assert builder_flags(11, BuildOptions()) == []  # precision comes from the ONNX: no FP16/FP8/INT4 flags
    for options in (everything, BuildOptions(strip_weights=True)):
        assert set(builder_flags(11, options)) <= TRT11_BUILDER_FLAGS


def test_tensorrt_versions_are_checked_per_precision(exports: dict[str, Path]) -> None:
    manifest = manifest_of(exports["tiny"])
    assert check_version("10.0.1.6", manifest) == 10 and check_version("11.4.0.106", manifest) == 11
    fp8 = replace(manifest, quantization={"recipe": "fp8"})
    with pytest.raises(DgrtError, match="TensorRT 10.5.0 cannot build fp8 engines; 10.6 or newer"):
        check_version("10.5.0", fp8)


def test_engine_key_changes_with_anything_that_changes_the_engine(exports: dict[str, Path]) -> None:
    manifest = manifest_of(exports["tiny"])
    options = BuildOptions().checked(manifest.max_context, 16)
    key = engine_key(manifest, options, "10.13.0", "NVIDIA H100", (9, 0))
    assert key.startswith("sm90-fp32-") and key == engine_key(manifest, options, "10.13.0", "NVIDIA H100", (9, 0))
    other_weights = replace(manifest, weights=replace(manifest.weights, sha256="sha256:0"))
    assert len({
        key,
        engine_key(manifest, options, "11.4.0", "NVIDIA H100", (9, 0)),
        engine_key(manifest, options, "10.13.0", "NVIDIA H200", (9, 0)),
        engine_key(manifest, replace(options, max_batch=2), "10.13.0", "NVIDIA H100", (9, 0)),
        engine_key(other_weights, options, "10.13.0", "NVIDIA H100", (9, 0)),
    }) == 5  # fmt: skip


# -- without TensorRT or a GPU -------------------------------------------------------------------------------


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_the_engine_build_to_run_is_found_or_must_be_chosen(exports: dict[str, Path], tmp_path: Path) -> None:
    """find_engines over engine.json files as `dgrt build` writes them: the one build for this TensorRT and
    GPU is taken; several are named, with how to choose; builds for other versions say to rebuild."""
    from dataclasses import asdict

    from dgrt.tensorrt.backend import find_engines
    from dgrt.tensorrt.options import onnx_digest

    manifest = manifest_of(exports["tiny"])

    def built(key: str, version: str, options: BuildOptions) -> Path:
        folder = tmp_path / "engines" / key
        folder.mkdir(parents=True)
        info = {"onnx": onnx_digest(manifest), "tensorrt": version, "gpu": "NVIDIA H200", "options": asdict(options)}
        (folder / "engine.json").write_text(json.dumps(info))
        return folder

    with pytest.raises(DgrtError, match="has no TensorRT engines; build them with: dgrt build"):
        find_engines(tmp_path, manifest, "10.13.0", "NVIDIA H200")
    built("old", "10.8.0", BuildOptions())
    with pytest.raises(DgrtError, match=r"engines for old \(TensorRT 10.8.0, NVIDIA H200\), none for TensorRT 10.13"):
        find_engines(tmp_path, manifest, "10.13.0", "NVIDIA H200")
    two = built("two", "10.13.0", BuildOptions())
    assert find_engines(tmp_path, manifest, "10.13.0", "NVIDIA H200") == two
    built("one", "10.13.0", BuildOptions(one_engine=True, max_batch=8))
    with pytest.raises(DgrtError, match=r"2 engine builds .*one \(one engine, max batch 8\), .*two \(two engines, "
                       r"max batch 1\); choose one with dgrt.load\(..., engines=PATH\) or --engines PATH"):  # fmt: skip
        find_engines(tmp_path, manifest, "10.13.0", "NVIDIA H200")
    with pytest.raises(DgrtError, match="engines chooses the TensorRT engine build; it needs backend='tensorrt'"):
        dgrt.load(exports["tiny"], engines=two)


def test_without_tensorrt_build_and_backend_say_what_is_missing(
    exports: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from dgrt.cli import main

    assert main(["build", str(exports["tiny"])]) == 2
    assert capsys.readouterr().err.count("\n") == 1  # one line
    with pytest.raises(DgrtError, match="TensorRT is not installed|no CUDA GPU"):
        dgrt.load(exports["tiny"], backend="tensorrt")


@pytest.mark.skipif(HAS_CUDA, reason="a CUDA GPU is present")
def test_torch_on_cuda_without_a_gpu_is_one_clear_error(tiny_ckpt: Path) -> None:
    with pytest.raises(DgrtError, match="torch sees no CUDA GPU"):
        dgrt.load(tiny_ckpt, backend="torch", device="cuda")


# -- on a GPU --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
def test_torch_gpu_path_answers_like_the_cpu() -> None:
    from dgrt.task import Task, shipped_checkpoint

    questions = [e.question for e in Task().examples(8, seed=5)]
    cpu = dgrt.load(shipped_checkpoint(), backend="torch").generate(questions, seed=0)
    gpu = dgrt.load(shipped_checkpoint(), backend="torch", device="cuda").generate(questions, seed=0)
    assert gpu.texts == cpu.texts  # fp32 on both; the denoise step replays a captured CUDA graph
    bf16 = dgrt.load(shipped_checkpoint(), backend="torch", device="cuda", dtype="bf16").generate(questions, seed=0)
    assert sum(a == b for a, b in zip(bf16.texts, cpu.texts, strict=True)) >= 7


@pytest.mark.gpu
@needs_tensorrt
def test_tensorrt_engines_answer_like_onnxruntime(tmp_path: Path) -> None:
    from dgrt.exporter.onnx_export import export
    from dgrt.task import Task, shipped_checkpoint
    from dgrt.tensorrt.build import build

    export(shipped_checkpoint(), tmp_path / "onnx")
    engines = build(tmp_path / "onnx")
    assert build(tmp_path / "onnx") == engines  # reused, not rebuilt
    questions = [e.question for e in Task().examples(8, seed=5)]
    ort = dgrt.load(tmp_path / "onnx").generate(questions, seed=0)
    trt = dgrt.load(tmp_path / "onnx", backend="tensorrt").generate(questions, seed=0)
    assert sum(a == b for a, b in zip(trt.texts, ort.texts, strict=True)) >= 7


@pytest.mark.gpu
@needs_tensorrt
def test_one_engine_answers_like_two_and_holds_the_weights_once(tmp_path: Path) -> None:
    """`dgrt build --one-engine`: the tokens of two engines, and loading it takes device memory for one
    copy of the weights where two engines take two (the bench preset: 0.3 GB of fp32 weights, far above
    the allocators' rounding)."""
    from dgrt.exporter.onnx_export import export
    from dgrt.presets import write_tiny
    from dgrt.tensorrt.build import build

    export_dir = tmp_path / "onnx"
    export(write_tiny(tmp_path / "ckpt", preset="bench", seed=0), export_dir)
    manifest = manifest_of(export_dir)
    prompts = [list(range(3, 40)), list(range(50, 60))]
    tokens, taken = {}, {}
    for layout, options in (("two", BuildOptions()), ("one", BuildOptions(one_engine=True))):
        engines = build(export_dir, options)
        torch.cuda.synchronize()
        free = torch.cuda.mem_get_info()[0]
        gen = dgrt.load(export_dir, backend="tensorrt", engines=engines)
        taken[layout] = free - torch.cuda.mem_get_info()[0]
        tokens[layout] = gen.generate(prompts, seed=0, max_new_tokens=512).tokens
        gen.close()
        del gen
        torch.cuda.empty_cache()
    assert tokens["one"] == tokens["two"]
    assert taken["two"] - taken["one"] > 0.8 * manifest.weights.bytes  # the second copy is gone


def test_the_gpu_check_runs_here_as_a_dry_run(tmp_path: Path) -> None:
    """tools/gpu_check.py from the source tree, on the CPU (--dry-run), the trained model only (--quick):
    every row runs, agrees with the CPU reference in fp32, and lands in results.json."""
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [sys.executable, str(root / "tools" / "gpu_check.py"), str(tmp_path), "--dry-run", "--quick"],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # not the source tree: the script finds dgrt itself
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [row["backend"] for row in rows] == ["torch cpu fp32", "torch cpu bf16"]
    assert not any("error" in row for row in rows)
    assert rows[0]["argmax_agreement"] == 1.0 and rows[0]["task_accuracy"] == 1.0


# -- one engine for both graphs --------------------------------------------------------------------------------


def test_one_engine_holds_each_weight_once_and_answers_like_the_two_graphs(
    exports: dict[str, Path], tmp_path: Path
) -> None:
    """The model `dgrt build --one-engine` hands TensorRT, run by ONNX Runtime on the recorded calls of a real
    generation: each graph answers as its own ONNX file does while the other graph's inputs are empty, and
    every weight is in it once (those of weights.bin, nothing more)."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from dgrt.interop.polygraphy import record
    from dgrt.tensorrt.one_engine import combine, idle_graph, idle_shapes, prefixed

    export_dir = exports["tiny"]
    manifest = manifest_of(export_dir)
    model = combine(export_dir, manifest)

    def regions(model: onnx.ModelProto) -> list[tuple[str, ...]]:  # the parts of weights.bin a model reads
        return [tuple(e.value for e in t.external_data) for t in model.graph.initializer if t.external_data]

    separate = [onnx.load(export_dir / manifest.graphs[g].file, load_external_data=False) for g in GRAPHS]
    assert len(regions(model)) == len(set(regions(model)))  # each weight once
    assert set(regions(model)) == set(regions(separate[0]) + regions(separate[1]))
    assert len(regions(model)) < len(regions(separate[0]) + regions(separate[1]))  # which two engines hold twice
    assert all(n.name.startswith(("prefill/", "denoise/")) for n in model.graph.node)

    shutil.copy(export_dir / "weights.bin", tmp_path)  # ONNX Runtime refuses external data by a symlink
    onnx.save(model, tmp_path / "model.onnx")
    session = ort.InferenceSession(tmp_path / "model.onnx", providers=["CPUExecutionProvider"])
    recording = record(export_dir, steps=2)
    for graph in GRAPHS:
        other = idle_graph(graph)
        idle = {
            prefixed(other, spec.name): np.zeros(idle_shapes(manifest, other)[spec.name], spec.dtype)
            for spec in manifest.graphs[other].spec.inputs
        }
        names = [prefixed(graph, s.name) for s in manifest.graphs[graph].spec.outputs]
        names += [prefixed(other, s.name) for s in manifest.graphs[other].spec.outputs]
        for feeds, expected in zip(recording.feeds[graph], recording.outputs[graph], strict=True):
            outputs = session.run(names, {prefixed(graph, k): v.numpy() for k, v in feeds.items()} | idle)
            got = dict(zip(names, outputs, strict=True))
            for name, value in expected.items():
                np.testing.assert_allclose(got[prefixed(graph, name)], value.numpy(), atol=1e-5, err_msg=name)
            idle_outputs = {s.name: got[prefixed(other, s.name)] for s in manifest.graphs[other].spec.outputs}
            assert {name: v.tolist() for name, v in idle_outputs.items() if v.size} == {"expert_load": [0]}


def test_one_engine_profiles_leave_the_other_graph_empty(exports: dict[str, Path]) -> None:
    from dgrt.tensorrt.one_engine import one_engine_profiles

    manifest = manifest_of(exports["tiny"])
    options = BuildOptions(max_batch=4, max_context=512).checked(manifest.max_context, 16)
    prefill, denoise = one_engine_profiles({g: profiles(manifest, g, options) for g in GRAPHS}, manifest)
    assert prefill["prefill/input_ids"] == ((1, 1), (1, 16), (4, 512))
    assert prefill["denoise/canvas_ids"] == ((0, 16),) * 3  # the canvas is static, the batch empty
    assert prefill["denoise/past_key_values.1.key"] == ((0, 1, 0, 32),) * 3
    assert prefill["denoise/expert_slots"] == ((0,),) * 3
    assert denoise["denoise/canvas_ids"] == ((1, 16), (1, 16), (4, 16))
    assert denoise["prefill/input_ids"] == ((0, 1),) * 3
    assert set(prefill) == set(denoise)
