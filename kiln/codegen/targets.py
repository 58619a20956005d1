"""Targets are data: a name, a TVM target description and the Relax pipeline that lowers to it.

``cpu`` is LLVM for the host; ``cuda`` takes an arch (sm_80, sm_86, sm_89, sm_90, sm_90a). Adding a
GPU is adding an entry to CUDA_ARCHS (plus schedules), never touching the passes.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import TargetError


@dataclass(frozen=True)
class CudaArch:
    arch: str
    max_shared_memory_per_block: int  # what dlight may assume without opting in to more
    gpus: str  # which GPUs, for humans


CUDA_ARCHS: dict[str, CudaArch] = {
    a.arch: a
    for a in (
        CudaArch("sm_80", 49152, "A100, A30"),
        CudaArch("sm_86", 49152, "A10, A40, RTX 30xx"),
        CudaArch("sm_89", 49152, "L4, L40, RTX 40xx"),
        CudaArch("sm_90", 49152, "H100, H200, GH200"),
        CudaArch("sm_90a", 49152, "H100, H200, GH200 (arch-specific features: wgmma, TMA)"),
    )
}


@dataclass(frozen=True)
class TargetSpec:
    name: str  # "cpu" or "cuda"
    arch: str | None = None  # CUDA arch, None for cpu

    @property
    def device(self) -> str:
        return "cuda" if self.name == "cuda" else "cpu"

    def describe(self) -> dict:
        return {"name": self.name, "arch": self.arch, "device": self.device}

    def tvm_target(self):
        from ..ir.tvm import Target

        if self.name == "cpu":
            return Target({"kind": "llvm"})
        a = CUDA_ARCHS[self.arch]
        return Target({"kind": "cuda", "arch": a.arch, "max_shared_memory_per_block": a.max_shared_memory_per_block,
                       "max_threads_per_block": 1024, "thread_warp_size": 32}, host={"kind": "llvm"})


def resolve_target(name: str, arch: str | None = None) -> TargetSpec:
    if name == "cpu":
        if arch:
            raise TargetError("--arch is for --target cuda only")
        return TargetSpec("cpu")
    if name == "cuda":
        arch = arch or "sm_90"
        if arch not in CUDA_ARCHS:
            raise TargetError(f"unknown CUDA arch {arch!r}; kiln knows {', '.join(CUDA_ARCHS)}")
        return TargetSpec("cuda", arch)
    raise TargetError(f"unknown target {name!r}; use cpu or cuda")
