"""Small batches of a symbolic-M matmul run as a low-batch GEMV, not as a padded GEMM.

kiln's states are token-major ``[n, H]``: every linear of ``batch_decode`` and ``batch_prefill`` is
one PrimFunc over a symbolic row count ``n``. Scheduled as a tensor-core GEMM (cuda_matmul.py), a
decode step of 8 sequences pads them to a 128-row tile and spreads the weight over N / 128 blocks
(32 for N = 4096): a fraction of the 132 SMs of an H100 or H200, which should leave the weight read well below
memory bandwidth (gemm.py measures it). This pass gives each such PrimFunc a dispatch on ``n`` at the top of the kernel's host
code: ``n <= limit`` runs dlight's ``LowBatchGEMV(bucket)`` schedule (``n`` padded to the bucket,
each block computing ``bucket`` rows of a slice of N, the weight streamed once per bucket of rows),
larger ``n`` runs the schedule the rest of the rule list gives (kiln's MMA GEMM first). One PrimFunc,
several kernels; the branch is taken on the host before the launch.

``LOW_BATCH`` holds the (limit, bucket) pairs, tightest first. They are not tuned: the GPU run
(``tools/gpu/gemm.py``) times every bucket against the GEMM at each small ``n``, and that table is
what should set them.

Invariant: the specialised PrimFunc has the original's parameters and computes the same result on
every branch (each branch is a schedule of the original, and schedules preserve semantics); a
PrimFunc that is not GEMV-shaped, has more than one symbolic variable or that a rule refuses is
left untouched for the ordinary rules.
"""

from __future__ import annotations

from ..ir.tvm import dlight, tirx, tvm

LOW_BATCH: tuple[tuple[int, int], ...] = ((1, 1), (4, 4), (16, 8))  # (n <= limit, bucket), tightest first


def row_var(func):
    """The one symbolic variable of the parameters' shapes, or None."""
    found = set()
    for param in func.params:  # TVM 0.27: buffer parameters are Vars with a shape
        for dim in getattr(param, "shape", None) or ():
            if isinstance(dim, tirx.Var):
                found.add(dim)
            elif not isinstance(dim, tirx.IntImm):
                return None  # an expression of a variable: not a plain row count
    return found.pop() if len(found) == 1 else None


def _schedule(rule, func, target):
    sch = rule.apply(func, target, False)
    if isinstance(sch, list):
        sch = sch[0] if sch else None
    if sch is None or isinstance(sch, tirx.PrimFunc):  # (a rule may return the finished function itself)
        return sch
    return sch.mod["main"]


def specialize(func, target, large_rules, low_batch=LOW_BATCH):
    """``func`` with the low-batch dispatch, or None where it does not apply."""
    from tvm.s_tir.stmt import SBlock, SBlockRealize

    if not isinstance(func, tirx.PrimFunc) or func.attrs is not None and "tirx.is_scheduled" in func.attrs:
        return None
    n = row_var(func)
    if n is None:
        return None
    lows = []
    for limit, bucket in low_batch:
        low = _schedule(dlight.gpu.LowBatchGEMV(bucket), func, target)
        if low is None:
            return None
        lows.append((limit, low))
    large = next((s for rule in large_rules if (s := _schedule(rule, func, target)) is not None), None)
    if large is None:
        return None
    body = large.body
    for limit, low in reversed(lows):
        cond = tirx.op.tvm_thread_invariant(n <= limit)
        body = tirx.IfThenElse(cond, low.body, body)
    body = SBlockRealize([], True, SBlock([], [], [], "root", body))
    kept = {k: v for k, v in (large.attrs or {}).items() if k.startswith("kiln.")}  # e.g. an external kernel's name
    return func.with_body(body).with_attrs({"tirx.is_scheduled": True, **kept})


def low_batch_specialize(large_rules, low_batch=LOW_BATCH):
    """Module pass: every PrimFunc ``specialize`` accepts is replaced and marked scheduled, so the
    dlight rules that run after it leave it alone."""

    @tvm.transform.module_pass(opt_level=0, name="kiln.LowBatchGEMV")
    def transform(mod, _ctx):
        target = tvm.target.Target.current(allow_none=False)
        new = {gv: f for gv, func in mod.functions_items()
               if (f := specialize(func, target, large_rules, low_batch)) is not None}
        if not new:
            return mod
        mod = mod.clone()  # a pass must not change the module it was given
        for gv, func in new.items():
            mod.update_func(gv, func)
        return mod

    return transform
