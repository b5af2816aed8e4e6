"""dgrt: export, build and run DiffusionGemma block-diffusion models."""

__version__ = "0.1.0"
