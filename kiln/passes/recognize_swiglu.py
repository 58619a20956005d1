"""Recognise SiLU in the imported form, so the SwiGLU MLP reads ``multiply(silu(gate), up)``.

Matches ``x * sigmoid(x)`` (either operand order; what torch.export and ONNX make of ``F.silu``) and
emits ``R.nn.silu(x)``. The SwiGLU MLP of every Llama-family model is then ``down(silu(gate(h)) *
up(h))`` exactly as in kiln's reference form, which is what fuse_gate_up matches.
Invariant: the function computes the same values; nothing else changes.
"""

from __future__ import annotations

from ..ir.tvm import IRModule, relax
from .lib.graph_view import GraphView, op_name, rewrite_matches


def match_silu(g: GraphView, var):
    """x if ``var`` = x * sigmoid(x), else None."""
    c = g.call(var)
    if c is None or op_name(c) != "multiply":
        return None
    for x, s in (c.args, c.args[::-1]):
        if isinstance(s, relax.Var) and g.op(s) == "sigmoid" and g.value[s].args[0].same_as(x):
            return x
    return None


def recognize_swiglu(mod: IRModule) -> IRModule:
    return rewrite_matches(mod, match_silu, lambda x, m: relax.op.nn.silu(m(x)))
