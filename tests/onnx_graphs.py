"""Test helper: run an export directory's two graphs on ONNX Runtime CPU, fed by name from its manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from dgrt.contract import manifest as manifest_mod

NP_DTYPES = {"int64": np.int64, "float32": np.float32, "float16": np.float16}


class OrtGraphs:
    def __init__(self, export_dir: Path):
        self.manifest = manifest_mod.load(export_dir)
        options = ort.SessionOptions()
        self.sessions = {
            name: ort.InferenceSession(str(export_dir / g.file), options, providers=["CPUExecutionProvider"])
            for name, g in self.manifest.graphs.items()
        }

    def _run(self, graph: str, fixed: dict[str, torch.Tensor], past: list) -> dict[str, np.ndarray]:
        spec = self.manifest.graphs[graph].spec
        ids = fixed["input_ids" if graph == "prefill" else "canvas_ids"]
        fixed = {"expert_slots": torch.arange(ids.numel())} | fixed  # routed: a slot per token, never overflows
        feed = {}
        for t in spec.inputs:
            if t.layer is not None:
                layer_past = past[t.layer]
                value = layer_past[0] if t.name.endswith(".key") else layer_past[1]
            else:
                value = fixed[t.name]
            feed[t.name] = value.numpy().astype(NP_DTYPES[t.dtype])
        outputs = self.sessions[graph].run(None, feed)
        return {t.name: o for t, o in zip(spec.outputs, outputs, strict=True)}

    def prefill(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, past: list, pad_lengths: torch.Tensor | None = None
    ) -> list:
        if pad_lengths is None:
            pad_lengths = torch.zeros(input_ids.shape[0], dtype=torch.int64)
        inputs = {"input_ids": input_ids, "position_ids": position_ids, "pad_lengths": pad_lengths}
        out = self._run("prefill", inputs, past)
        n = len(past)
        return [(out[f"new_key_values.{i}.key"], out[f"new_key_values.{i}.value"]) for i in range(n)]

    def denoise(self, **inputs: torch.Tensor) -> dict[str, np.ndarray]:
        past = inputs.pop("past")
        inputs.setdefault("pad_lengths", torch.zeros(inputs["canvas_ids"].shape[0], dtype=torch.int64))
        return self._run("denoise", inputs, past)
