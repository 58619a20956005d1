"""Targets are data: a name, a TVM target description and the Relax pipeline that lowers to it.

``cpu`` is LLVM for x86-64: by default ``native``, the compiling machine's own CPU (LLVM's host CPU name,
as ``-march=native``: every vector and dot-product instruction it has), recording the ISA flags the host
has so that the runtime refuses the artifact on a CPU without them; ``--arch x86-64`` is the portable
baseline (SSE2), ``x86-64-v3`` (AVX2, FMA) and ``x86-64-v4`` (AVX-512) the levels between. ``cuda``
takes an arch (sm_80, sm_86, sm_89, sm_90, sm_90a). Adding a GPU is adding an entry to CUDA_ARCHS
(plus schedules), never touching the passes.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..cpu_features import ISA_FLAGS, host_cpu_flags
from ..errors import TargetError


@dataclass(frozen=True)
class CudaArch:
    arch: str
    max_shared_memory_per_block: int  # bytes a block may use with the opt-in (TVM's runtime sets the attribute)
    gpus: str  # which GPUs, for humans
    wgmma: bool = False  # prefill linears on kiln's Hopper wgmma kernel (cuda_wgmma.py) where they match it


CUDA_ARCHS: dict[str, CudaArch] = {
    a.arch: a
    for a in (
        CudaArch("sm_80", 166912, "A100, A30"),  # 163 KiB
        CudaArch("sm_86", 101376, "A10, A40, RTX 30xx"),  # 99 KiB
        CudaArch("sm_89", 101376, "L4, L40, RTX 40xx"),
        CudaArch("sm_90", 232448, "H100, H200, GH200"),  # 227 KiB
        CudaArch("sm_90a", 232448, "H100, H200, GH200 (arch-specific features: wgmma, TMA)", wgmma=True),
    )
}


@dataclass(frozen=True)
class CpuArch:
    arch: str  # an x86-64 micro-architecture level, as LLVM's -mcpu names it
    cpu_flags: tuple[str, ...]  # /proc/cpuinfo flags the generated code needs


CPU_ARCHS: dict[str, CpuArch] = {
    a.arch: a
    for a in (
        CpuArch("native", ()),  # flags: the host's, when compiled (TargetSpec.describe)
        CpuArch("x86-64", ()),
        CpuArch("x86-64-v3", ("avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe")),
        CpuArch("x86-64-v4", ("avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe",
                              "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")),
    )
}


@dataclass(frozen=True)
class TargetSpec:
    name: str  # "cpu" or "cuda"
    arch: str | None = None  # CUDA arch; for cpu an x86-64 level, None meaning the baseline

    @property
    def device(self) -> str:
        return "cuda" if self.name == "cuda" else "cpu"

    def describe(self) -> dict:
        """The manifest's record of the target; ``cpu_flags`` lets the runtime refuse a CPU that lacks them."""
        d = {"name": self.name, "arch": self.arch, "device": self.device}
        if self.name == "cpu" and self.arch == "native":
            d["mcpu"] = self.llvm_cpu()
            d["cpu_flags"] = sorted(set(ISA_FLAGS) & (host_cpu_flags() or set()))
        elif self.name == "cpu" and self.arch:
            d["cpu_flags"] = list(CPU_ARCHS[self.arch].cpu_flags)
        return d

    def llvm_cpu(self) -> str | None:
        """LLVM's -mcpu for a cpu target: the host's CPU name for ``native``, the level's name, or None (the
        baseline)."""
        if self.arch != "native":
            return self.arch
        from ..ir.tvm import tvm

        return tvm.target.codegen.llvm_get_system_cpu()

    def tvm_target(self):
        from ..ir.tvm import Target

        if self.name == "cpu":
            return Target({"kind": "llvm", "mcpu": self.llvm_cpu()} if self.arch else {"kind": "llvm"})
        a = CUDA_ARCHS[self.arch]
        return Target({"kind": "cuda", "arch": a.arch, "max_shared_memory_per_block": a.max_shared_memory_per_block,
                       "max_threads_per_block": 1024, "thread_warp_size": 32}, host={"kind": "llvm"})


def resolve_target(name: str, arch: str | None = None) -> TargetSpec:
    if name == "cpu":
        if arch == "x86-64":
            return TargetSpec("cpu")
        arch = arch or "native"
        if arch not in CPU_ARCHS:
            raise TargetError(f"unknown CPU arch {arch!r}; kiln knows {', '.join(CPU_ARCHS)} "
                              "(--arch sm_XX is for --target cuda)")
        return TargetSpec("cpu", arch)
    if name == "cuda":
        arch = arch or "sm_90"
        if arch not in CUDA_ARCHS:
            raise TargetError(f"unknown CUDA arch {arch!r}; kiln knows {', '.join(CUDA_ARCHS)}")
        return TargetSpec("cuda", arch)
    raise TargetError(f"unknown target {name!r}; use cpu or cuda")
