"""kiln/codegen/cpu_schedule.py: the CPU linear schedule computes what the unscheduled PrimFunc computes
(static and symbolic row counts, with and without a fused epilogue, for every vector width the rule may
pick), it only touches ``C[m, n] = sum_k A[m, k] * W[n, k]`` PrimFuncs, and in a real model's module it
leaves everything but the linears (attention kernels, norms, RoPE, KV-cache copies) as they were.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.cpu

ROWS = (1, 3, 8, 33, 64, 133)  # each schedule of the row-count branch, and padded row blocks


def _legalize(mod):
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from kiln.ir.tvm import Target, relax, tvm

    target = Target({"kind": "llvm"})
    with target:
        return tvm.transform.Sequential([relax.transform.FuseTransposeMatmul()] + cpu.legalize_passes(target))(mod)


def _linear(n: int, k: int, epilogue: str | None, m=None):
    """The fused PrimFunc of ``epilogue(x @ W^T)`` as kiln's CPU pipeline produces it (W is [n, k])."""
    from kiln.ir.tvm import relax, tirx

    m = tirx.Var("m", "int64") if m is None else m
    x = relax.Var("x", relax.TensorType((m, k), "float32"))
    w = relax.Var("w", relax.TensorType((n, k), "float32"))
    r = relax.Var("r", relax.TensorType((m, n), "float32"))
    params = [x, w] + ([r] if epilogue else [])
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, relax.op.permute_dims(w)))
            if epilogue == "add":  # bias / residual
                y = bb.emit(relax.op.add(y, r))
            elif epilogue == "silu_mul":  # SwiGLU: silu(gate) * up
                y = bb.emit(relax.op.multiply(relax.op.nn.silu(y), r))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return _only_prim_func(_legalize(bb.get()))


def _only_prim_func(mod):
    from kiln.ir.tvm import tirx

    funcs = [f for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
    assert len(funcs) == 1, [gv.name_hint for gv, _ in mod.functions_items()]
    return funcs[0]


def _run(func, arrays, out_shape):
    from kiln.ir.tvm import Target, tvm

    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                      target=Target({"kind": "llvm"}))
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in arrays]
    out = tvm.runtime.tensor(np.zeros(out_shape, "float32"), dev)
    lib.mod["main"](*args, out)
    return out.numpy()


def _inputs(m, n, k, epilogue, seed=0):
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal((m, k)).astype("float32"), rng.standard_normal((n, k)).astype("float32")]
    if epilogue:
        arrays.append(rng.standard_normal((m, n)).astype("float32"))
    return arrays


def _reference(arrays, epilogue):
    x, w = (a.astype("float64") for a in arrays[:2])
    y = x @ w.T
    if epilogue == "add":
        y = y + arrays[2]
    elif epilogue == "silu_mul":
        y = y / (1 + np.exp(-y)) * arrays[2]
    return y


def _check(got, want, ref):
    scale = np.abs(ref).max()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * scale)


SHAPES = [  # (n, k, epilogue): the demo model's linears, plus sizes that need smaller tiles
    (256, 256, None), (688, 256, "silu_mul"), (256, 688, "add"), (4096, 256, None), (20, 12, "add"), (6, 36, None),
]


@pytest.mark.parametrize("lanes", [4, 16])
@pytest.mark.parametrize("n,k,epilogue", SHAPES)
def test_symbolic_rows_match_unscheduled(n, k, epilogue, lanes):
    from kiln.codegen.cpu_schedule import schedule_func

    func = _linear(n, k, epilogue)
    sched = schedule_func(func, lanes)
    assert sched is not None, "the rule did not recognise a linear"
    for m in ROWS:
        arrays = _inputs(m, n, k, epilogue, seed=m)
        _check(_run(sched, arrays, (m, n)), _run(func, arrays, (m, n)), _reference(arrays, epilogue))


@pytest.mark.parametrize("n,k,epilogue", [(256, 256, None), (688, 256, "silu_mul"), (256, 688, "add")])
@pytest.mark.parametrize("m", ROWS)
def test_static_rows_match_unscheduled(m, n, k, epilogue):
    from kiln.codegen.cpu_schedule import schedule_func

    func = _linear(n, k, epilogue, m=m)
    sched = schedule_func(func, 4)
    assert sched is not None
    arrays = _inputs(m, n, k, epilogue, seed=m)
    _check(_run(sched, arrays, (m, n)), _run(func, arrays, (m, n)), _reference(arrays, epilogue))


def test_schedule_is_parallel_and_vectorized():
    from kiln.codegen.cpu_schedule import schedule_func

    text = schedule_func(_linear(256, 256, "add"), 4).script()
    assert "T.parallel" in text and "T.vectorized" in text


def _unary_module(kind):
    from kiln.ir.tvm import relax, tirx

    m = tirx.Var("m", "int64")
    x = relax.Var("x", relax.TensorType((m, 64), "float32"))
    bb = relax.BlockBuilder()
    if kind == "nn_matmul":  # x @ W with W [k, n]: k is not contiguous in W, not the rule's pattern
        w = relax.Var("w", relax.TensorType((64, 32), "float32"))
        params, call = [x, w], lambda: relax.op.matmul(x, w)
    elif kind == "rms_norm":
        g = relax.Var("g", relax.TensorType((64,), "float32"))
        params, call = [x, g], lambda: relax.op.nn.rms_norm(x, g, axes=[-1])
    elif kind == "softmax":
        params, call = [x], lambda: relax.op.nn.softmax(x)
    elif kind == "sum":
        params, call = [x], lambda: relax.op.sum(x, axis=[1])
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(call())
        bb.emit_func_output(out)
    return _legalize(bb.get())


@pytest.mark.parametrize("kind", ["nn_matmul", "rms_norm", "softmax", "sum"])
def test_other_funcs_pass_through(kind):
    from kiln.codegen.cpu_schedule import ScheduleCPUMatmul, schedule_func
    from kiln.ir.tvm import Target, tirx

    mod = _unary_module(kind)
    for _, f in mod.functions_items():
        if isinstance(f, tirx.PrimFunc):
            assert schedule_func(f, 4) is None
    with Target({"kind": "llvm"}):
        out = ScheduleCPUMatmul(mod)
    for gv, f in mod.functions_items():
        assert out[gv].same_as(f)


def test_model_module_only_linears_change(zoo):
    """On a real (tiny Llama) serving module: every linear is scheduled, and TVM's decode and ragged prefill
    attention kernels are replaced by kiln/codegen/cpu_attention.py's; nothing else is touched."""
    from kiln.codegen.cpu_schedule import ScheduleCPUMatmul
    from kiln.codegen.targets import resolve_target
    from kiln.frontend import import_hf
    from kiln.ir.tvm import tirx
    from kiln.passes.pipeline import build_pipeline, run_pipeline

    target = resolve_target("cpu")
    imported = import_hf(zoo.hf("llama")[0])
    mod = run_pipeline(build_pipeline(target, imported.spec, fuse=False), imported.mod).mod
    mod = _legalize(mod)
    with target.tvm_target():
        out = ScheduleCPUMatmul(mod)
    changed, kept = set(), set()
    for gv, f in mod.functions_items():
        if isinstance(f, tirx.PrimFunc):
            (kept if out[gv].same_as(f) else changed).add(gv.name_hint)
    attention = {"tir_attention_decode_cpu", "tir_attention_prefill_ragged_cpu"}
    assert attention <= changed and all("NT_matmul" in name for name in changed - attention), changed
    assert not [name for name in kept if "NT_matmul" in name], kept
    assert any("attention" in name or "paged_kv" in name for name in kept), kept  # paged prefill, sliding window


def test_kernels_keep_noalias_and_alignment_beside_a_kernel_without_it():
    """TVM 0.27's LLVM codegen gives a kernel's buffers ``noalias`` and 64-byte alignment only while no PrimFunc
    of the module lacks ``tirx.noalias`` (TVM's KV-cache kernels do): without kiln.MarkNoAlias the model's
    linears lost both and ran at half speed. Checked in the LLVM IR kiln's CPU build writes."""
    from kiln.codegen.build import build
    from kiln.codegen.targets import resolve_target
    from kiln.ir.tvm import relax, te, tirx

    m = tirx.Var("m", "int64")
    x = relax.Var("x", relax.TensorType((m, 64), "float32"))
    w = relax.Var("w", relax.TensorType((128, 64), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, relax.op.permute_dims(w)))
            z = bb.emit_te(lambda a: te.compute(a.shape, lambda i, j: a[i, j] * 2.0, name="double"), y,
                           primfunc_name_hint="double")
            out = bb.emit_output(z)
        bb.emit_func_output(out)
    mod = bb.get()
    double = mod["double"].with_attr("op_pattern", 8)  # its own kernel, as TVM's KV-cache kernels are
    mod["double"] = double.without_attr("tirx.noalias") if "tirx.noalias" in double.attrs else double

    def sources(module, acc):
        try:
            acc.append(module.inspect_source("ll"))
        except Exception:  # a module without LLVM IR (the VM's bytecode)
            pass
        for sub in module.imports:
            sources(sub, acc)
        return acc

    ll = "\n".join(sources(build(mod, resolve_target("cpu")).mod, []))
    linear = [line for line in ll.splitlines() if line.startswith("define") and "NT_matmul_compute_" in line]
    assert linear and "ptr noalias align 64 %w" in linear[0], linear
