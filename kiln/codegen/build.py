"""Lower a serving-form module to a target and export it as one shared library.

The CPU pipeline is TVM's generic one (legalize, fuse, lower). The CUDA pipeline adds dlight
schedules for every kernel: linears over a symbolic row count dispatch small counts to a low-batch
GEMV (cuda_gemv.py), and kiln's tensor-core matmul rule (cuda_matmul.py) comes first for the rest.
It must run where TVM's CUDA runtime loaded (kiln/ir/tvm.py preloads a stub driver on GPU-less
hosts) so that nvcc turns the kernels into a fatbin of machine code for the arch; a build that
would embed CUDA source instead is refused.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import TargetError
from ..progress import note
from ..ir.tvm import cuda_runtime_loaded, dlight, relax, tvm
from ..ir.quant_kernels import WEIGHT_STAGES
from .cpu_schedule import ScheduleCPUMatmul
from .cuda_gemv import low_batch_specialize
from .cuda_graph import PASS_CONFIG as GRAPH_PASS_CONFIG
from .cuda_graph import annotate_decode_graphs
from .cuda_matmul import PASS_CONFIG as MMA_PASS_CONFIG
from .cuda_matmul import TIR_PIPELINE as MMA_TIR_PIPELINE
from .cuda_matmul import MatmulMMA
from .cuda_wgmma import WgmmaLinear, attach_kernels
from .targets import TargetSpec


@tvm.transform.module_pass(opt_level=0, name="kiln.InlineWeightStages")
def inline_weight_stages(mod, _ctx):
    """On CUDA the fused quantized kernels rebuild each weight element inside the reduction, where dlight's
    GEMV and GEMM rules expect a single reduction block: their weight stage (kiln/ir/quant_kernels.py
    ``WEIGHT_STAGES``) is inlined first."""
    updated = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        body = func.body
        if not (isinstance(body, tvm.s_tir.SBlockRealize) and body.block.name_hint == "root"):
            continue
        sch = tvm.s_tir.Schedule(func)
        stages = [b for b in sch.get_child_blocks(sch.get_sblock("root")) if sch.get(b).name_hint in WEIGHT_STAGES]
        for b in stages:
            sch.compute_inline(b)
        if stages:
            updated[gv] = sch.mod["main"]
    for gv, func in updated.items():
        mod[gv] = func
    return mod


def _phase(message: str):
    """A no-op pass that reports, as one progress line, the phase of the build the passes after it make."""

    @tvm.transform.module_pass(opt_level=0, name="kiln.BuildPhase")
    def phase(mod, _ctx):
        note(message)
        return mod

    return phase


def _cuda_pipeline(target, max_batch_size):
    @tvm.transform.module_pass(opt_level=0, name="kiln.CUDAPipeline")
    def pipeline(mod, _ctx):
        graphs = [annotate_decode_graphs(max_batch_size)] if max_batch_size else []
        seq = tvm.transform.Sequential([_phase("build: legalizing and fusing the operators")] + graphs + [
            relax.transform.FuseTransposeMatmul(),  # matmul(x, permute_dims(W)) without materialising W^T
            relax.backend.DispatchSampling(), relax.backend.DispatchSortScan(),
            relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR(),
            relax.transform.DeadCodeElimination(), inline_weight_stages,
            # symbolic-M linears: a low-batch GEMV for small n, else a GEMM: kiln's wgmma kernel where the arch
            # has it (cuda_wgmma.py, its cubin attached to the module), else the rules below (cuda_gemv.py)
            _phase("build: scheduling the kernels (dlight, tensor-core matmuls)"),
            low_batch_specialize([WgmmaLinear(), MatmulMMA(), dlight.gpu.Matmul()]), attach_kernels(),
            # prefill matmuls: kiln's ldmatrix + mma.sync + cp.async rule, else dlight's (WMMA or SIMT)
            dlight.ApplyDefaultSchedule(MatmulMMA(), dlight.gpu.Matmul(), dlight.gpu.GEMV(), dlight.gpu.Reduction(),
                                        dlight.gpu.GeneralReduction(), dlight.gpu.Fallback()),
            relax.transform.RewriteDataflowReshape(), relax.transform.ToNonDataflow(),
            relax.transform.RemovePurityChecking(), relax.transform.CallTIRRewrite(),
            relax.transform.StaticPlanBlockMemory(), relax.transform.RewriteCUDAGraph(),
            relax.transform.LowerAllocTensor(), relax.transform.KillAfterLastUse(),
            relax.transform.LowerRuntimeBuiltin(), relax.transform.ComputePrimValue(),
            relax.transform.VMShapeLower(), relax.transform.AttachGlobalSymbol(),
            _phase("build: lowering the kernels and compiling them with nvcc"),
        ])
        with target:
            return seq(mod)

    return pipeline


@tvm.transform.module_pass(opt_level=0, name="kiln.MarkNoAlias")
def mark_noalias(mod, _ctx):
    """Every CPU kernel's buffer arguments are distinct memory (the VM and the KV-cache builtins pass each call
    distinct tensors, and an in-place kernel takes its buffer once; every parity test runs through this), so
    every PrimFunc may say so. It matters beyond
    the kernel itself: TVM 0.27's LLVM codegen drops ``noalias`` and the 64-byte alignment of every kernel of a
    module that holds one PrimFunc without ``tirx.noalias`` (TVM's KV-cache and attention kernels lack it),
    which halved kiln's scheduled linears (measured: a gate/up projection over 512 rows 143 ms in the model's
    library, 75 ms alone; 77 ms with the attribute on both)."""
    updated = {gv: f.with_attr("tirx.noalias", True) for gv, f in mod.functions_items()
               if isinstance(f, tvm.tirx.PrimFunc) and not (f.attrs or {}).get("tirx.noalias", False)}
    for gv, f in updated.items():
        mod[gv] = f
    return mod


def _cpu_pipeline(target):
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    @tvm.transform.module_pass(opt_level=0, name="kiln.CPUPipeline")
    def pipeline(mod, _ctx):
        # HF weights are [out, in]; without this fusion every step would copy each weight transposed
        # (measured: 3x slower batch-1 decode on the demo model). After FuseTIR (the end of the legalize
        # passes) the linears get a parallel, vectorized schedule; every other kernel stays as it is.
        seq = tvm.transform.Sequential(
            [_phase("build: legalizing and fusing the operators"), relax.transform.FuseTransposeMatmul()]
            + cpu.library_dispatch_passes(target) + cpu.legalize_passes(target) + [ScheduleCPUMatmul]
            + cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target) + [mark_noalias]
            + [_phase("build: lowering the kernels and compiling them with LLVM")])
        with target:
            return seq(mod)

    return pipeline


def build(mod, target: TargetSpec, max_batch_size: int | None = None):
    """Compile a serving-form IRModule; returns TVM's executable. On CUDA, ``max_batch_size`` turns on
    CUDA graphs for the decode steps, ``batch_decode``'s planned for at most that many sequences
    (cuda_graph.py); None leaves every kernel launched by the VM."""
    tt = target.tvm_target()
    if target.name == "cuda":
        if shutil.which("nvcc") is None:
            raise TargetError("--target cuda needs nvcc (the CUDA toolkit) on PATH to produce machine code")
        if not cuda_runtime_loaded():
            raise TargetError("TVM's CUDA runtime did not load, so the build would hold CUDA source instead of "
                              "machine code; install a C compiler (for the stub driver) or a CUDA driver")
        config = {**MMA_PASS_CONFIG, **(GRAPH_PASS_CONFIG if max_batch_size else {})}
        with tt, tvm.transform.PassContext(opt_level=3, config=config):
            return tvm.compile(mod, target=tt, relax_pipeline=_cuda_pipeline(tt, max_batch_size),
                               tir_pipeline=MMA_TIR_PIPELINE)
    return tvm.compile(mod, target=tt, relax_pipeline=_cpu_pipeline(tt))


def export(executable, path: Path) -> None:
    executable.export_library(str(path))


def kernel_calls(executable, entry: str) -> dict[str, int]:
    """Kernel launches of one call of ``entry``: compiled kernel (PrimFunc) name -> calls, from the VM's
    bytecode, plus the KV-cache attention builtin (one per layer). VM bookkeeping (shapes, allocation,
    reshape views, tuple access) and host-side shape functions are not kernels and are not counted."""
    import collections
    import re

    text = executable.as_text()
    start = text.find(f"@{entry}:")
    if start < 0:
        raise KeyError(f"the executable has no function {entry!r}")
    end = text.find("\n@", start + 1)
    body = text[start:end if end > 0 else len(text)]
    counts: collections.Counter = collections.Counter()
    for callee in re.findall(r"^\s*call\s+(\S+)", body, flags=re.M):
        if callee.startswith("vm.builtin.attention_kv_cache") or not callee.startswith(
                ("vm.builtin.", "compute_symbolic_expr", "shape_func")):
            counts[callee] += 1
    return dict(counts.most_common())
