"""Prepare TensorRT type stubs for mypy, without installing anything that `import tensorrt` would find.

    python tools/tensorrt_stubs.py .typings     # then: mypy --config-file mypy-tensorrt.ini

Downloads tensorrt-stubs 10.13.0.35.1 from PyPI (no dependencies), extracts its .pyi files into the folder
and fixes what stops mypy from reading them (research/onnx_trt.md §5): parameters named `in`, a parameter
without a default after defaulted ones, and an import of `tensorrt_libs`. It then removes what TensorRT 11
removed (the precision builder flags), so the check accepts only API that both 10.x and 11.x have.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "tensorrt-stubs==10.13.0.35.1"
REMOVED_IN_11 = (
    "FP16",
    "BF16",
    "INT8",
    "FP8",
    "INT4",
    "FP4",
    "OBEY_PRECISION_CONSTRAINTS",
    "PREFER_PRECISION_CONSTRAINTS",
)


def fix(text: str) -> str:
    text = re.sub(r"\bin: ", "in_: ", text)  # `in` is a keyword
    text = text.replace("power: Weights = None, channel_axis: int)", "power: Weights = None, channel_axis: int = ...)")
    text = re.sub(r"^import tensorrt_libs.*$", "", text, flags=re.M)
    return text


def drop_removed_flags(text: str) -> str:
    """Delete the BuilderFlag members TensorRT 11 removed, so using one is a type error."""
    start = text.index("class BuilderFlag")
    end = text.index("\nclass ", start + 1)
    body = text[start:end]
    for name in REMOVED_IN_11:
        body = re.sub(rf"^\s+{name}: typing\.ClassVar\[BuilderFlag\].*\n", "", body, flags=re.M)
    return text[:start] + body + text[end:]


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".typings")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", PACKAGE, "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                if name.endswith(".pyi"):
                    text = fix(zf.read(name).decode())
                    if name == "tensorrt_bindings/tensorrt.pyi":
                        text = drop_removed_flags(text)
                    target = out / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(text)
    print(f"TensorRT stubs ({PACKAGE}, fixed for mypy, TensorRT 11 removals applied) in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
