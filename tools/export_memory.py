"""Peak RSS of `dgrt export` against the checkpoint's weight bytes.

    python tools/export_memory.py [--preset bench] [--set hidden_size=1024 ...] [--dtype fp32] [--workdir DIR]

Makes the preset's random checkpoint (text_config values changed by --set; skipped if the work folder has
it), exports it in a fresh process and reports that process's peak resident set size (VmHWM, which
counts only after exec, unlike ru_maxrss) next to the text weights' size on disk.
"""

from __future__ import annotations

import argparse
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from dgrt.checkpoint import Checkpoint
from dgrt.presets import preset_config, write_checkpoint

CHILD = """
import re, sys
from dgrt.cli import main
code = main(sys.argv[1:])
print("VmHWM_kB", re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
sys.exit(code)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="bench")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=INT", help="text_config overrides")
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="dgrt-export-memory-"))
    ckpt_dir = work / f"{args.preset}-ckpt"
    if not ckpt_dir.exists():
        config = preset_config(args.preset)
        config["text_config"].update({k: int(v) for k, v in (kv.split("=") for kv in args.set)})
        write_checkpoint(ckpt_dir, config, tag=args.preset)
    weight_bytes = Checkpoint.open(ckpt_dir).weight_bytes

    t0 = time.perf_counter()
    cmd = [
        sys.executable,
        "-c",
        CHILD,
        "export",
        str(ckpt_dir),
        "-o",
        str(work / "export"),
        "--force",
        "--dtype",
        args.dtype,
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    seconds = time.perf_counter() - t0
    peak = int(re.search(r"VmHWM_kB (\d+)", out).group(1)) * 1024

    print(f"{date.today()} {platform.machine()}, {args.preset} {' '.join(args.set)}, export dtype {args.dtype}")
    print(f"export time              {seconds:8.1f} s")
    print(f"checkpoint text weights  {weight_bytes / 2**20:8.1f} MiB")
    print(f"export peak RSS          {peak / 2**20:8.1f} MiB  ({peak / weight_bytes:.2f}x the weights)")


if __name__ == "__main__":
    main()
