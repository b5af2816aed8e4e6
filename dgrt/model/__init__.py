"""Export-friendly torch modules for DiffusionGemma's two graphs, sharing one set of weights."""

from dgrt.model.graphs import Denoise, DiffusionGemma, Prefill

__all__ = ["DiffusionGemma", "Prefill", "Denoise"]
