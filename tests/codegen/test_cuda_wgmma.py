"""kiln/codegen/cuda_wgmma.py: the sm_90a wgmma GEMM, its build and its place in the compiler.

Without a GPU only the build is checked: ptxas takes the generated source for sm_90a without spilling,
and the cubin's SASS holds four ``HGMMA.64x256x16.F32`` per k-slice (BK 64 = four k16 steps), the
``cp.async`` fills (LDGSTS) and the warpgroup fences. In the compiler (sm_90a targets): which fused
linears it takes (``match_linear``), the host code that launches it (lowered TIR: the right buffers,
sizes and grid after the low-batch branches), and a model whose library carries its cubin.
Numerics and speed: ``tools/gpu/gemm.py run`` on the GPU.
"""

from __future__ import annotations

import re
import subprocess

import pytest

import json
import struct
import sys
from pathlib import Path

from kiln.codegen.cuda_wgmma import KERNEL, KERNEL_ADD, KERNEL_ATTR, KERNELS, WgmmaConfig, WgmmaLinear, build_cubin, \
    match_linear, source
from kiln.codegen.targets import CUDA_ARCHS, resolve_target
from kiln.ir.tvm import te, tirx, tvm
from test_cuda_compile import EM_CUDA, NVCC, find_cuobjdump

ROOT = Path(__file__).resolve().parents[2]

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc (the CUDA toolkit) is not on PATH")


def test_config_fits_hopper_shared_memory_and_rejects_bad_tiles():
    cfg = WgmmaConfig()
    assert cfg.smem_bytes <= CUDA_ARCHS["sm_90a"].max_shared_memory_per_block
    with pytest.raises(ValueError):
        source(WgmmaConfig(bn=260))
    src = source(WgmmaConfig(bn=128, stages=3))
    assert "m64n128k16" in src and "cp.async.wait_group 1" in src and "wgmma.wait_group.sync.aligned 0" in src
    src = source(WgmmaConfig(bn=128, stages=3, mma_in_flight=1))  # one slice ahead, one in flight
    assert "cp.async.wait_group 0" in src and "load(kt + 1)" in src and "wgmma.wait_group.sync.aligned 1" in src
    with pytest.raises(ValueError):
        source(WgmmaConfig(stages=3, mma_in_flight=2))  # no slot left for the next slice's copy


@needs_nvcc
@pytest.mark.cuda_compile
@pytest.mark.parametrize("fields", [{}, {"mma_in_flight": 1}, {"bn": 128, "stages": 6, "mma_in_flight": 1}])
def test_cubin_holds_hgmma_without_spills(tmp_path, fields):  # (the configurations gemm.py times)
    cfg = WgmmaConfig(**fields)
    assert cfg.smem_bytes <= CUDA_ARCHS["sm_90a"].max_shared_memory_per_block
    cubin = build_cubin(tmp_path / "wgmma.cubin", cfg)
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
    assert re.search(r"\.target\s+sm_90a", sass.stdout)
    functions = re.split(r"Function : ", sass.stdout)[1:]
    assert sorted(f.split()[0] for f in functions) == sorted(KERNELS.values())  # fp16, bf16; D = ..., D = ... + R
    for f in functions:  # four k16 steps per slice, bf16's on bf16 operands
        suffix = r"\.BF16" if "_bf16" in f.split()[0] else ""
        assert len(re.findall(rf"\bHGMMA\.64x{cfg.bn}x16\.F32{suffix} ", f)) == cfg.bk // 16, f.split()[0]
    assert re.search(r"\bLDGSTS\b", sass.stdout) and re.search(r"\bWARPGROUP\.ARRIVE\b", sass.stdout)
    for f in functions:  # in the k loop, wait until at most in_flight groups run; all of them before the epilogue
        waits = re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, (0x[0-9a-f]+)", f)
        assert f"0x{cfg.mma_in_flight:x}" in waits and waits[-1] == "0x0", waits


def i64(v):
    return tirx.IntImm("int64", v)


def fused_linear(n=512, k=256, residual=False, dtype="float16", rows=None, epilogue=None, swap=False):
    """A PrimFunc shaped as TVM's FuseTIR leaves a prefill linear: [rows, k] x [n, k]^T, fp32 sum, cast
    to fp16, optionally + R (the residual) or another epilogue."""
    rows = rows if rows is not None else tirx.Var("seq_len", "int64")
    A = te.placeholder((rows, i64(k)), dtype, name="A")
    W = te.placeholder((i64(n), i64(k)), dtype, name="W")
    r = te.reduce_axis((i64(0), i64(k)), name="k")
    C = te.compute((rows, i64(n)), lambda i, j: te.sum(A[i, r].astype("float32") * W[j, r].astype("float32"), axis=r),
                   name="NT_matmul")
    D = te.compute(C.shape, lambda i, j: C[i, j].astype(dtype), name="compute")
    if residual:
        R = te.placeholder((rows, i64(n)), dtype, name="R")
        E = te.compute(C.shape, lambda i, j: R[i, j] + D[i, j], name="T_add")
        return te.create_prim_func([A, W, R, E])
    if epilogue is not None:
        return te.create_prim_func([A, W, te.compute(C.shape, lambda i, j: epilogue(D[i, j]), name="epi")])
    return te.create_prim_func([W, A, D] if swap else [A, W, D])


def test_match_linear_takes_the_fused_prefill_linears():
    lin = match_linear(fused_linear())
    assert (lin.n, lin.k, lin.r, str(lin.rows)) == (512, 256, None, "seq_len")
    func = fused_linear(residual=True)
    lin = match_linear(func)
    assert [x.same_as(p) for x, p in zip((lin.a, lin.w, lin.r, lin.d), func.params)] == [True] * 4
    sys.path.insert(0, str(ROOT / "tools" / "gpu"))
    from gemm import linear  # [1, m, K] with a leading 1

    assert match_linear(linear(4096, 4096)).n == 4096
    assert match_linear(fused_linear()).kernel == KERNEL and match_linear(func).kernel == KERNEL_ADD
    lin = match_linear(fused_linear(dtype="bfloat16", residual=True))
    assert lin.dtype == "bfloat16" and lin.kernel == KERNELS[("bfloat16", True)] == "kiln_wgmma_gemm_bf16_add"


@pytest.mark.parametrize("case", ["fp32", "n128", "k32", "static_rows", "silu", "swapped"])
def test_match_linear_refuses_what_the_kernel_does_not_compute(case):
    func = {"fp32": lambda: fused_linear(dtype="float32"), "n128": lambda: fused_linear(n=128),
            "k32": lambda: fused_linear(k=32), "static_rows": lambda: fused_linear(rows=i64(256)),
            "silu": lambda: fused_linear(epilogue=lambda x: x * tirx.sigmoid(x)),
            "swapped": lambda: fused_linear(swap=True)}[case]()
    assert match_linear(func) is None


def test_rule_only_on_archs_with_wgmma():
    assert WgmmaLinear().apply(fused_linear(), resolve_target("cuda", "sm_90").tvm_target(), False) is None
    f = WgmmaLinear().apply(fused_linear(residual=True), resolve_target("cuda", "sm_90a").tvm_target(), False)
    assert str(f.attrs[KERNEL_ATTR]) == KERNEL_ADD and f"call_packed(\"{KERNEL_ADD}\"" in f.script()
    f = WgmmaLinear().apply(fused_linear(dtype="bfloat16"), resolve_target("cuda", "sm_90a").tvm_target(), False)
    assert str(f.attrs[KERNEL_ATTR]) == "kiln_wgmma_gemm_bf16" and 'call_packed("kiln_wgmma_gemm_bf16"' in f.script()


@needs_nvcc
@pytest.mark.cuda_compile
def test_host_code_launches_the_kernel_after_the_low_batch_branches():
    """Lowered host TIR of a dispatched linear: GEMV kernels for small counts, then one launch of the
    wgmma kernel with A, W, R, D, the sizes, the grid (N / 256, ceil(rows / 128)), 256 threads and its
    shared memory."""
    from kiln.codegen.cuda_gemv import LOW_BATCH, specialize
    from kiln.codegen.cuda_matmul import PASS_CONFIG, TIR_PIPELINE, MatmulMMA
    from tvm.tirx.compilation_pipeline import PIPELINE_MAP

    t = resolve_target("cuda", "sm_90a").tvm_target()
    with t, tvm.transform.PassContext(config=PASS_CONFIG):
        func = specialize(fused_linear(n=512, k=256, residual=True), t, [WgmmaLinear(), MatmulMMA()])
        assert str(func.attrs[KERNEL_ATTR]) == KERNEL_ADD  # kept through the dispatch
        mod = tvm.IRModule({"lin": func.with_attr("global_symbol", "lin")})
        lowered = PIPELINE_MAP[TIR_PIPELINE]()[0](tirx.transform.BindTarget(t)(mod))
    host = lowered["lin"].script()
    assert host.count("T.call_ffi_kernel(") == len(LOW_BATCH)
    smem = WgmmaConfig().smem_bytes
    want = (rf'T\.call_packed\("{KERNEL_ADD}", A_\d+\.data, W_\d+\.data, R_\d+\.data, T_add_\d+\.data, '
            rf'T\.Cast\("int32", seq_len\), 512, 256, 2, \(seq_len \+ T\.int64\(127\)\) // T\.int64\(128\), 256, {smem}\)')
    assert re.search(want, host), host


def cuda_elfs(data: bytes) -> list[bytes]:
    """Every CUDA ELF (cubin) stored raw in ``data``, cut where its header tables end (nvcc writes the
    program headers last)."""
    out, pos = [], 0
    while (pos := data.find(b"\x7fELF", pos)) >= 0:
        if data[pos + 4] == 2 and struct.unpack_from("<H", data, pos + 18)[0] == EM_CUDA:  # 64-bit, EM_CUDA
            phoff, shoff = struct.unpack_from("<QQ", data, pos + 32)
            phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, pos + 54)
            out.append(data[pos:pos + max(phoff + phentsize * phnum, shoff + shentsize * shnum)])
        pos += 4
    return out


@needs_nvcc
@pytest.mark.cuda_compile
def test_sm90a_model_carries_the_wgmma_cubin(tmp_path):
    """A Llama-shaped fp16 model (config only) for sm_90a: its prefill linears launch the wgmma kernels,
    whose cubin travels inside model.so next to TVM's own kernels."""
    from click.testing import CliRunner

    from kiln.cli import main

    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512, "hidden_size": 256,
           "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 64, "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "torch_dtype": "float16",
           "bos_token_id": 1, "eos_token_id": 2}
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    r = CliRunner().invoke(main, ["compile", str(tmp_path / "m"), "-o", str(tmp_path / "art"), "--config-only",
                                  "--target", "cuda", "--arch", "sm_90a", "-q"])
    assert r.exit_code == 0, r.output
    elfs = [e for e in cuda_elfs((tmp_path / "art" / "model.so").read_bytes()) if f".text.{KERNEL}".encode() in e]
    assert len(elfs) == 1, len(elfs)
    path = tmp_path / "wgmma.cubin"
    path.write_bytes(elfs[0])
    sass = subprocess.run([find_cuobjdump(), "-sass", str(path)], capture_output=True, text=True, timeout=120)
    assert sass.returncode == 0, sass.stderr
    assert {f"Function : {KERNEL}", f"Function : {KERNEL_ADD}"} <= set(re.findall(r"Function : \S+", sass.stdout))
    assert "HGMMA.64x256x16.F32" in sass.stdout
