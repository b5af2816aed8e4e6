"""What each deployment target can run: compute capability, and which precisions its tensor cores take.

Sources (../shared/research/onnx_trt.md §2.2, §6): FP8 needs sm_89+ (Ada, Hopper, Blackwell, Thor); Jetson
Orin (sm_87) runs FP16/BF16/INT8/INT4 only; INT4 weight-only runs everywhere TensorRT 10+ does; bf16
needs sm_80+. Thor reports compute capability 11.0 with CUDA 13 and 10.1 with CUDA 12.8.
"""

from __future__ import annotations

from dataclasses import dataclass

from dgrt.errors import DgrtError

FP8_MIN_CC = (8, 9)
BF16_MIN_CC = (8, 0)


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    compute_capabilities: tuple[tuple[int, int], ...]
    jetson: bool = False

    def supports(self, precision: str) -> bool:
        """precision: an export's dtype (fp32, fp16, bf16) or quantization recipe (fp8, int4, int4-experts)."""
        cc = min(self.compute_capabilities)
        if precision in ("fp8", "int4-experts"):  # int4-experts runs its other GEMMs in FP8
            return cc >= FP8_MIN_CC and self.name != "orin"
        if precision == "bf16":
            return cc >= BF16_MIN_CC
        return precision in ("fp32", "fp16", "int4")


TARGETS = {
    t.name: t
    for t in (
        Target("h100", "NVIDIA H100 (Hopper)", ((9, 0),)),
        Target("h200", "NVIDIA H200 (Hopper)", ((9, 0),)),
        Target("a100", "NVIDIA A100 (Ampere)", ((8, 0),)),
        Target("l40s", "NVIDIA L40S (Ada)", ((8, 9),)),
        Target("b200", "NVIDIA B200 (Blackwell)", ((10, 0),)),
        Target("orin", "Jetson AGX Orin", ((8, 7),), jetson=True),
        Target("thor", "Jetson Thor", ((11, 0), (10, 1)), jetson=True),
    )
}


def resolve(name: str, gpu_name: str | None, compute_capability: tuple[int, int] | None) -> Target:
    """The target for --target NAME; 'auto' describes the GPU at hand. A named target must match it."""
    if name == "auto":
        if compute_capability is None:
            raise DgrtError("--target auto needs a CUDA GPU; none was found (name a target to check a recipe).")
        for target in TARGETS.values():
            if compute_capability in target.compute_capabilities and _same_gpu(target, gpu_name):
                return target
        return Target(f"sm_{compute_capability[0]}{compute_capability[1]}", gpu_name or "GPU", (compute_capability,))
    if name not in TARGETS:
        raise DgrtError(f"unknown target {name!r}; expected auto or one of {', '.join(TARGETS)}.")
    target = TARGETS[name]
    if compute_capability is not None and compute_capability not in target.compute_capabilities:
        have = f"sm_{compute_capability[0]}{compute_capability[1]}"
        raise DgrtError(
            f"--target {name} is compute capability {_ccs(target)}, but this GPU ({gpu_name}) is {have}: "
            "TensorRT engines run only on the GPU they are built for; build on the target."
        )
    return target


def check_precision(target: Target, precision: str) -> None:
    if not target.supports(precision):
        raise DgrtError(
            f"{target.description} ({_ccs(target)}) cannot run {precision} engines"
            + (
                "; FP8 needs compute capability 8.9 or newer and Orin has none: export with --quant int4."
                if precision in ("fp8", "int4-experts")
                else "."
            )
        )


def _same_gpu(target: Target, gpu_name: str | None) -> bool:
    """Targets sharing a compute capability (H100, H200) are told apart by the name the driver reports."""
    model = target.name.upper()
    return gpu_name is None or model in gpu_name.upper() or target.jetson


def _ccs(target: Target) -> str:
    return " or ".join(f"sm_{a}{b}" for a, b in target.compute_capabilities)
