"""Real inputs for `polygraphy run`: every export carries a data-loader script (DATA_LOADER) that records
the graph calls of a short generation and hands them to Polygraphy, so that

    polygraphy run denoise.onnx --onnxrt --trt --data-loader-script polygraphy_data.py:load_denoise

compares backends on what the runtime really feeds each graph (a prompt's K/V cache, a canvas, the
self-conditioning embeddings, the sampler's uniforms, the routed experts' slots), not on random values
that no step ever sees (token ids outside the vocabulary, a cache of noise).

The generation runs on ONNX Runtime (CPU unless DGRT_POLYGRAPHY_PROVIDERS names others, e.g.
CUDAExecutionProvider for a bf16 export), over two canvases of a few steps each, so the calls cover both
a prefill from an empty cache and one that extends it, and denoise steps with and without
self-conditioning. Feeds are CPU torch tensors: Polygraphy's runners take them, bf16 included.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import torch

DATA_LOADER = "polygraphy_data.py"
PROMPT = "Explain in one sentence how a block-diffusion model writes text."
STEPS = 3  # denoise steps per canvas recorded
CANVASES = 2

_SCRIPT = '''"""Polygraphy's data loader for this dgrt export: real inputs of a short generation.

    polygraphy run prefill.onnx --onnxrt --trt --data-loader-script polygraphy_data.py:load_prefill
    polygraphy run denoise.onnx --onnxrt --trt --data-loader-script polygraphy_data.py:load_denoise
"""

from pathlib import Path

from dgrt.interop.polygraphy import recorded

EXPORT = Path(__file__).resolve().parent


def load_prefill():
    return recorded(EXPORT).feeds["prefill"]


def load_denoise():
    return recorded(EXPORT).feeds["denoise"]
'''


@dataclass
class Recording:
    """The graph calls of one generation, in order: inputs and outputs by graph tensor name."""

    feeds: dict[str, list[dict[str, torch.Tensor]]] = field(default_factory=lambda: {"prefill": [], "denoise": []})
    outputs: dict[str, list[dict[str, torch.Tensor]]] = field(default_factory=lambda: {"prefill": [], "denoise": []})

    def add(self, graph: str, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        self.feeds[graph].append({name: t.detach().cpu().clone() for name, t in inputs.items()})
        self.outputs[graph].append({name: t.detach().cpu().clone() for name, t in outputs.items()})


def record(export_dir: str | Path, prompt: str = PROMPT, steps: int = STEPS, seed: int = 0) -> Recording:
    """Generate CANVASES canvases of `steps` denoise steps from `prompt` (random token ids where the export
    has no tokenizer), recording every graph call."""
    import dgrt

    providers = [p for p in os.environ.get("DGRT_POLYGRAPHY_PROVIDERS", "").split(",") if p] or None
    gen = dgrt.load(export_dir, backend="onnxruntime", providers=providers)
    recording = Recording()
    gen.backend.on_run = recording.add  # type: ignore[attr-defined]
    canvas = gen.info.canvas_length
    text: str | list[int] = prompt
    if gen.tokenizer is None:
        text = torch.randint(gen.info.vocab_size, (16,), generator=torch.Generator().manual_seed(seed)).tolist()
    try:
        gen.generate(
            text,
            seed=seed,
            steps=steps,
            max_new_tokens=CANVASES * canvas,
            stability_threshold=None,
            confidence_threshold=None,
            eos_token_id=None,  # all CANVASES canvases, whatever the model writes
        )
    finally:
        gen.close()
    return recording


@cache
def recorded(export_dir: Path) -> Recording:
    """`record(export_dir)`, once per process (Polygraphy asks for each graph's data separately)."""
    return record(export_dir)


def write_data_loader(export_dir: Path) -> str:
    """Write DATA_LOADER into an export directory; returns its name."""
    (export_dir / DATA_LOADER).write_text(_SCRIPT, encoding="utf-8")
    return DATA_LOADER
