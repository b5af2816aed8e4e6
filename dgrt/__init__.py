"""dgrt: export, build and run DiffusionGemma block-diffusion models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dgrt.runtime.load import load as load

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """`dgrt.load` (dgrt.runtime.load.load), imported on first use so `import dgrt` stays light."""
    if name == "load":
        from dgrt.runtime.load import load

        return load
    raise AttributeError(f"module 'dgrt' has no attribute {name!r}")
