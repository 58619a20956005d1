"""kiln/codegen/cuda_wgmma.py: the sm_90a wgmma GEMM compiles to Hopper machine code.

Without a GPU only the build is checked: ptxas takes the generated source for sm_90a without spilling,
and the cubin's SASS holds four ``HGMMA.64x256x16.F32`` per k-slice (BK 64 = four k16 steps), the
``cp.async`` fills (LDGSTS) and the warpgroup fences. Numerics and speed: ``tools/gpu/gemm.py run``.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from kiln.codegen.cuda_wgmma import KERNEL, WgmmaConfig, build_cubin, source
from kiln.codegen.targets import CUDA_ARCHS
from test_cuda_compile import NVCC, find_cuobjdump

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc (the CUDA toolkit) is not on PATH")


def test_config_fits_hopper_shared_memory_and_rejects_bad_tiles():
    cfg = WgmmaConfig()
    assert cfg.smem_bytes <= CUDA_ARCHS["sm_90a"].max_shared_memory_per_block
    with pytest.raises(ValueError):
        source(WgmmaConfig(bn=260))
    src = source(WgmmaConfig(bn=128, stages=3))
    assert "m64n128k16" in src and "cp.async.wait_group 1" in src


@needs_nvcc
@pytest.mark.cuda_compile
def test_cubin_holds_hgmma_without_spills(tmp_path):
    cubin = build_cubin(tmp_path / "wgmma.cubin")
    ptxas = subprocess.run([NVCC, "-cubin", "-arch=sm_90a", "-O3", "-std=c++17", "-Xptxas", "-v", "-o",
                            str(tmp_path / "again.cubin"), str(cubin.with_suffix(".cu"))],
                           capture_output=True, text=True, timeout=300)
    assert ptxas.returncode == 0, ptxas.stderr
    assert "0 bytes spill stores, 0 bytes spill loads" in ptxas.stderr, ptxas.stderr
    assert "wgmma.mma_async instructions are serialized" not in ptxas.stderr, ptxas.stderr
    tool = find_cuobjdump()
    assert tool is not None, "no cuobjdump next to nvcc, on PATH or in triton"
    sass = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True, timeout=120)
    assert sass.returncode == 0, sass.stderr
    assert f"Function : {KERNEL}" in sass.stdout and re.search(r"\.target\s+sm_90a", sass.stdout)
    assert len(re.findall(r"\bHGMMA\.64x256x16\.F32\b", sass.stdout)) == WgmmaConfig().bk // 16
    assert re.search(r"\bLDGSTS\b", sass.stdout) and re.search(r"\bWARPGROUP\.ARRIVE\b", sass.stdout)
