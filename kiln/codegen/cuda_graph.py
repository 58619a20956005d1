"""Decode steps replay CUDA graphs instead of launching each kernel from the VM.

A decode step is hundreds of kernel launches (about ten per layer around each attention call); with
a small model or batch a kernel's GPU time can be as short as the VM's host work to launch it (what
graphs bring is measured by the GPU run's nograph parts). TVM's ``RewriteCUDAGraph`` (on with ``relax.backend.use_cuda_graph``) lifts the static
allocations of a function and captures the kernel launches between two non-capturable calls (the KV
cache's attention builtin, reads of the step's own inputs) as one graph, replayed by
``vm.builtin.cuda_graph.run_or_capture`` — captured on a step's first run, keyed by the values of the
function's ``relax.rewrite_cuda_graph.capture_symbolic_vars``.

``decode`` (batch 1) has static shapes and is captured as it is. ``batch_decode`` runs over a symbolic
``batch_size``: this pass gives it that variable as the capture key (one graph set per batch size the
scheduler runs, captured lazily) and an upper bound (``tir_var_upper_bound``) so that its memory is
planned statically, at the bound. Past the bound the planned buffers would overflow, so the bound is
recorded in the manifest (``options.max_batch_size``) and the model runner refuses a KV cache with
more sequences than that. Prefill functions get no capture key: a graph per chunk length would not be
reused (so a model on the grouped KV cache, whose serving form has only ``batch_prefill``, gets no
graphs and no bound). Only ``prefill``'s static tail — the final norm and lm_head on the one row it
gathers, ``[1, H] -> [1, V]`` — is captured by TVM as one graph that every prefill replays.

Invariant: only function attributes change; the computation is the same, and a function that is not
``batch_decode`` is untouched.
"""

from __future__ import annotations

from ..ir.tvm import relax, tvm

ENTRY = "batch_decode"
BATCH_VAR = "batch_size"
PASS_CONFIG = {"relax.backend.use_cuda_graph": True}


def annotate_decode_graphs(max_batch_size: int):
    """Module pass: ``batch_decode`` captured per batch size, planned for at most ``max_batch_size``."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")

    @tvm.transform.module_pass(opt_level=0, name="kiln.AnnotateDecodeGraphs")
    def transform(mod, _ctx):
        gv = next((g for g in mod.get_global_vars() if g.name_hint == ENTRY), None)
        if gv is None or not isinstance(mod[gv], relax.Function):
            return mod
        func = mod[gv]
        bounds = dict(func.attrs["tir_var_upper_bound"]) if func.attrs and "tir_var_upper_bound" in func.attrs else {}
        func = func.with_attrs({"relax.rewrite_cuda_graph.capture_symbolic_vars": [BATCH_VAR],
                                "tir_var_upper_bound": {**bounds, BATCH_VAR: max_batch_size}})
        mod = mod.clone()
        mod.update_func(gv, func)
        return mod

    return transform
