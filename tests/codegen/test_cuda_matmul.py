"""kiln/codegen/cuda_matmul.py: the tensor-core GEMM rule, compiled for sm_80 and sm_90 without a GPU.

A prefill-shaped GEMM ``[seq_len, 4096] x [4096, 4096]^T`` (fp16 or bf16 in, fp32 accumulate, symbolic
seq_len) is scheduled by ``MatmulMMA`` and built through nvcc in a subprocess with TVM_KERNEL_DUMP, which
keeps the generated CUDA, PTX and cubin. The PTX must hold ``mma.sync.aligned.m16n8k16`` with fp32
accumulation, ``ldmatrix`` and ``cp.async``; the cubin's SASS (cuobjdump) must hold HMMA, LDSM and LDGSTS.
The rule must leave small static matmuls (batch-1 decode) to the GEMV rules, and fp32 alone. Numerics and speed need a
GPU (tools/gpu/run_all.sh).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_cuda_compile import NVCC, find_cuobjdump

pytestmark = [pytest.mark.cuda_compile,
              pytest.mark.skipif(NVCC is None, reason="nvcc (the CUDA toolkit) is not on PATH")]
ROOT = Path(__file__).resolve().parents[2]

_GEMM = """
import json, sys
from kiln.codegen.cuda_matmul import MatmulMMA, PASS_CONFIG, TIR_PIPELINE
from kiln.codegen.targets import resolve_target
from kiln.ir.tvm import dlight, te, tirx, tvm

arch, m_name, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
i64 = lambda v: tirx.IntImm("int64", v)
m = tirx.Var(m_name, "int64") if not m_name.isdigit() else i64(int(m_name))
N = K = i64(4096)
A = te.placeholder((i64(1), m, K), dtype, name="A")
W = te.placeholder((N, K), dtype, name="W")
k = te.reduce_axis((i64(0), K), name="k")
C = te.compute((i64(1), m, N), lambda b, i, j: te.sum(A[b, i, k].astype("float32") * W[j, k].astype("float32"),
                                                       axis=k), name="C")
D = te.compute(C.shape, lambda b, i, j: C[b, i, j].astype(dtype), name="D")
mod = tvm.IRModule({"main": te.create_prim_func([A, W, D]).with_attr("global_symbol", "main")})
target = resolve_target("cuda", arch).tvm_target()
with target, tvm.transform.PassContext(config=PASS_CONFIG):
    sch = MatmulMMA().apply(mod["main"], target, False)
    if sch is not None:
        tvm.compile(sch.mod, target=target, tir_pipeline=TIR_PIPELINE)
print("KILN_GEMM " + json.dumps({"scheduled": sch is not None}))
"""


def build_gemm(arch: str, m: str, dump: Path, dtype: str = "float16") -> bool:
    env = {**os.environ, "TVM_KERNEL_DUMP": str(dump)}
    proc = subprocess.run([sys.executable, "-c", _GEMM, arch, m, dtype], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.split("KILN_GEMM ", 1)[1])["scheduled"]


GEMMS = [("sm_80", "float16"), ("sm_90", "float16"), ("sm_80", "bfloat16"), ("sm_90", "bfloat16")]
PTX_TYPE = {"float16": "f16", "bfloat16": "bf16"}


@pytest.fixture(scope="module", params=GEMMS, ids=[f"{a}-{d}" for a, d in GEMMS])
def gemm(request, tmp_path_factory):
    arch, dtype = request.param
    dump = tmp_path_factory.mktemp(f"gemm-{arch}-{dtype}")
    assert build_gemm(arch, "seq_len", dump, dtype), "MatmulMMA refused the prefill GEMM"
    return arch, dtype, dump


def test_ptx_holds_mma_sync_ldmatrix_and_cp_async(gemm):
    arch, dtype, dump = gemm
    ptx = (dump / "tvm_kernels.ptx").read_text()
    assert f".target {arch}" in ptx
    t = PTX_TYPE[dtype]
    mma = re.findall(rf"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.{t}\.{t}\.f32", ptx)
    # block 128x128, 4 warps of 4x4 fragments, 2 k-steps of 16 per stage: 4*4*2 (16x16x16) = 64 per warp-stage,
    # each two m16n8k16 -> 128 per stage, unrolled over the pipeline's prologue/body/epilogue
    assert len(mma) >= 128, len(mma)
    assert len(re.findall(r"ldmatrix\.sync\.aligned\.m8n8\.x4", ptx)) >= 32
    assert "cp.async.cg.shared.global" in ptx and "cp.async.commit_group" in ptx and "cp.async.wait_group" in ptx
    assert "wmma" not in ptx  # not dlight's WMMA fallback


def test_sass_holds_hmma_ldsm_ldgsts(gemm):
    arch, dtype, dump = gemm
    tool = find_cuobjdump()
    assert tool is not None, "no cuobjdump next to nvcc, on PATH or in triton"
    sass = subprocess.run([tool, "-sass", str(dump / "tvm_kernels.cubin")], capture_output=True, text=True, timeout=120)
    assert sass.returncode == 0, sass.stderr
    assert f"code for {arch}" in sass.stdout
    hmma = "HMMA.16816.F32" + (".BF16" if dtype == "bfloat16" else "")
    counts = {op: len(re.findall(rf"\b{op}\b", sass.stdout)) for op in ("LDSM", "LDGSTS")}
    counts[hmma] = len(re.findall(rf"\b{re.escape(hmma)}\s", sass.stdout))  # F32 alone is fp16, F32.BF16 bf16
    print(f"\n[{arch} {dtype}] SASS {counts}")
    assert counts[hmma] >= 128 and counts["LDSM"] >= 16 and counts["LDGSTS"] >= 8, counts
    assert not re.search(r"\b(LDL|STL)\b", sass.stdout), "register spills"


@pytest.mark.parametrize("m", ["1", "16"])
def test_small_static_m_is_left_to_gemv(m, tmp_path):
    """Batch-1 decode (M = 1) or any static M under one 128-row tile would waste the tile: not this rule's."""
    assert not build_gemm("sm_90", m, tmp_path)


def test_fp32_is_left_alone(tmp_path):
    assert not build_gemm("sm_90", "seq_len", tmp_path, dtype="float32")
