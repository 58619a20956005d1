"""kiln/codegen/cuda_gemv.py: symbolic-M linears dispatch small row counts to a low-batch GEMV.

The structure of the specialised PrimFunc is checked here (a host-side branch per ``LOW_BATCH`` limit,
tightest first, each a thread-bound GEMV schedule, the GEMM last), then ``tools/gpu/gemm.py build``
compiles the bundle's kernel benchmark through nvcc: every variant of every Llama-3-8B linear shape
must become machine code, the dispatched one as one kernel per branch. Numerics and speed need the
GPU: ``gemm.py run`` checks every variant against torch at every small m, and the demo model's CUDA
greedy tokens are compared with the CPU's (tools/gpu/run_all.sh).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.codegen.cuda_gemv import LOW_BATCH, low_batch_specialize, specialize
from kiln.codegen.cuda_matmul import PASS_CONFIG, MatmulMMA
from kiln.codegen.targets import resolve_target
from kiln.ir.tvm import dlight, te, tirx, tvm
from test_cuda_compile import NVCC

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "gpu"))
from gemm import LOW_BATCH_SHAPES, linear  # noqa: E402


def i64(v):
    return tirx.IntImm("int64", v)


@pytest.fixture(scope="module")
def target():
    return resolve_target("cuda", "sm_90").tvm_target()


def run_specialize(func, target, rules):
    with target, tvm.transform.PassContext(config=PASS_CONFIG):
        return specialize(func, target, rules)


def branches(func):
    """[(limit, then-statement)] of the dispatch chain, and the final else."""
    from tvm.s_tir.stmt import SBlockRealize

    stmt = func.body
    assert isinstance(stmt, SBlockRealize)
    stmt = stmt.block.body
    out = []
    while isinstance(stmt, tirx.IfThenElse):
        cond = stmt.condition
        assert cond.op.name == "tirx.tvm_thread_invariant"
        le = cond.args[0]
        assert isinstance(le, tirx.LE) and le.a.name == "seq_len"
        out.append((int(le.b), stmt.then_case))
        stmt = stmt.else_case
    return out, stmt


def thread_tags(stmt):
    return set(re.findall(r'thread="(\w+\.\w)"', str(stmt)))


def test_fp16_linear_dispatches_small_m_to_the_gemv_and_the_rest_to_the_mma_gemm(target):
    func = linear(4096, 4096)
    new = run_specialize(func, target, [MatmulMMA()])
    assert new is not None and bool(new.attrs["tirx.is_scheduled"])
    assert list(new.params) == list(func.params)
    chain, gemm = branches(new)
    assert [limit for limit, _ in chain] == [limit for limit, _ in LOW_BATCH]
    assert [limit for limit, _ in LOW_BATCH] == sorted(limit for limit, _ in LOW_BATCH)  # tightest first
    for (_, bucket), (_, stmt) in zip(LOW_BATCH, chain):
        assert {"blockIdx.x", "threadIdx.x"} <= thread_tags(stmt)
        assert "m16n8k16" not in str(stmt)
        if bucket > 1:  # rows padded to the bucket: one blockIdx.y per bucket of rows
            assert f"(seq_len + T.int64({bucket - 1})) // T.int64({bucket})" in str(stmt)
    assert "m16n8k16" in str(gemm) and "ldmatrix" in str(gemm)  # tensorized: mma.sync fragments


def test_fp32_linear_gets_dlight_matmul_for_large_m(target):
    new = run_specialize(linear_f32(), target, [MatmulMMA(), dlight.gpu.Matmul()])
    assert new is not None
    chain, gemm = branches(new)
    assert len(chain) == len(LOW_BATCH)
    assert "m16n8k16" not in str(gemm) and "blockIdx" in str(gemm)


def linear_f32():
    m = tirx.Var("seq_len", "int64")
    A = te.placeholder((i64(1), m, i64(256)), "float32", name="A")
    W = te.placeholder((i64(512), i64(256)), "float32", name="W")
    k = te.reduce_axis((i64(0), i64(256)), name="k")
    C = te.compute((i64(1), m, i64(512)), lambda b, i, j: te.sum(A[b, i, k] * W[j, k], axis=k), name="C")
    return te.create_prim_func([A, W, C])


def test_leaves_static_m_elementwise_and_refused_funcs_alone(target):
    m = tirx.Var("seq_len", "int64")
    A = te.placeholder((i64(1), i64(4096)), "float16", name="A")
    W = te.placeholder((i64(4096), i64(4096)), "float16", name="W")
    k = te.reduce_axis((i64(0), i64(4096)), name="k")
    static = te.create_prim_func([A, W, te.compute((i64(1), i64(4096)), lambda i, j: te.sum(
        A[i, k].astype("float32") * W[j, k].astype("float32"), axis=k), name="C")])
    assert run_specialize(static, target, [MatmulMMA()]) is None  # batch-1 decode: dlight's GEMV rule
    X = te.placeholder((m, i64(64)), "float16", name="X")
    assert run_specialize(te.create_prim_func([X, te.compute((m, i64(64)), lambda i, j: X[i, j] * 2)]), target,
                          [MatmulMMA()]) is None
    # fp32 with only the MMA rule for large m: no GEMM schedule, so no dispatch either
    assert run_specialize(linear_f32(), target, [MatmulMMA()]) is None


def test_module_pass_replaces_only_what_it_specialises_and_keeps_its_input(target):
    mod = tvm.IRModule({"lin": linear(4096, 4096), "f32": linear_f32()})
    with target, tvm.transform.PassContext(config=PASS_CONFIG):
        out = low_batch_specialize([MatmulMMA()])(mod)
    assert "tirx.is_scheduled" in out["lin"].attrs
    assert out["f32"].same_as(mod["f32"])
    assert "tirx.is_scheduled" not in (mod["lin"].attrs or {})


@pytest.mark.cuda_compile
@pytest.mark.skipif(NVCC is None, reason="nvcc (the CUDA toolkit) is not on PATH")
def test_gpu_bundle_kernel_benchmark_builds_every_variant(tmp_path):
    dump = tmp_path / "dump"
    proc = subprocess.run([sys.executable, "tools/gpu/gemm.py", "build", str(tmp_path / "gemm"), "--arch", "sm_90"],
                          cwd=ROOT, env={**os.environ, "TVM_KERNEL_DUMP": str(dump)}, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for variant in ("wait", "inflight1", "n128s6"):  # kiln/codegen/cuda_wgmma.py's
        assert (tmp_path / "gemm" / f"wgmma_{variant}_sm_90a.cubin").stat().st_size > 0
    info = json.loads((tmp_path / "gemm" / "lowbatch_sm_90.json").read_text())
    assert info["variants"] == ["mma", *(f"gemv{b}" for _, b in LOW_BATCH), "kiln"]
    # TVM_KERNEL_DUMP keeps the last nvcc run's files: the low-batch module
    ptx = (dump / "tvm_kernels.ptx").read_text()
    assert ".target sm_90" in ptx
    entries = set(re.findall(r"\.visible \.entry (\w+)\(", ptx))
    for n, k in LOW_BATCH_SHAPES:
        for v in info["variants"][:-1]:
            assert f"{v}_{n}x{k}_kernel" in entries
        # the dispatched linear: one kernel per low-batch branch plus the GEMM
        kiln = {e for e in entries if e.startswith(f"kiln_{n}x{k}_kernel")}
        assert len(kiln) == len(LOW_BATCH) + 1, sorted(kiln)
    assert re.search(r"mma\.sync\.aligned\.m16n8k16", ptx) and "cp.async" in ptx
