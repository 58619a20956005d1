"""Recognise RMSNorm in the imported form and rewrite it to ``R.nn.rms_norm``.

Matches ``w * (x * r)`` (either operand order) where ``w`` is a weight vector over the last axis and

    r = rsqrt(mean(x^2, axis=-1, keepdims) + eps)          torch.export
    r = 1 / sqrt(mean(x^2, axis=-1, keepdims) + eps)       ONNX (dynamo)

``x^2`` may be ``power(x, 2)`` or ``x * x``, and ``x`` may be an upcast ``astype(x0, float32)`` with the
product cast back (transformers' half-precision RMSNorm): then the norm is taken of ``x0``.

Emits ``rms_norm(x0, w, axes=[-1], epsilon=eps)``, the op kiln's reference form uses.
Invariant: the function computes the same values (up to float rounding), the unmatched graph is
untouched, and the dead pieces of each matched norm are removed.
"""

from __future__ import annotations

from ..ir.tvm import IRModule, relax
from .lib.graph_view import GraphView, int_dims, op_name, rewrite_matches, scalar_const, shape_of


def _strip_astype(g: GraphView, e):
    """(source, was_cast) through one astype."""
    if isinstance(e, relax.Var) and g.op(e) == "astype":
        return g.value[e].args[0], True
    return e, False


def _square_of(g: GraphView, e):
    """x if e = x^2 (power(x, 2) or x * x), else None."""
    c = g.call(e) if isinstance(e, relax.Var) else None
    if c is None:
        return None
    if op_name(c) == "power" and scalar_const(c.args[1]) == 2.0:
        return c.args[0]
    if op_name(c) == "multiply" and c.args[0].same_as(c.args[1]):
        return c.args[0]
    return None


def _inv_rms(g: GraphView, r) -> tuple | None:
    """(x, eps) if r = 1 / sqrt(mean(x^2, -1) + eps), else None."""
    c = g.call(r) if isinstance(r, relax.Var) else None
    if c is None:
        return None
    if op_name(c) == "rsqrt":
        a = c.args[0]
    elif op_name(c) == "divide" and scalar_const(c.args[0]) == 1.0 and g.op(c.args[1]) == "sqrt":
        a = g.value[c.args[1]].args[0]
    else:
        return None
    add = g.call(a) if isinstance(a, relax.Var) else None
    if add is None or op_name(add) != "add":
        return None
    m, eps = add.args
    if scalar_const(eps) is None:
        m, eps = eps, m
    eps = scalar_const(eps)
    mean = g.call(m) if isinstance(m, relax.Var) else None
    if eps is None or mean is None or op_name(mean) != "mean" or not mean.attrs.keepdims:
        return None
    x = _square_of(g, mean.args[0])
    ndim = len(shape_of(mean.args[0]) or [])
    axes = [int(a) % ndim for a in mean.attrs.axis] if ndim else []
    if x is None or axes != [ndim - 1]:
        return None
    return x, eps


def match_rms_norm(g: GraphView, var) -> tuple | None:
    """(x, weight, eps) if ``var`` is the output of an RMSNorm, else None."""
    c = g.call(var)
    if c is None or op_name(c) != "multiply":
        return None
    for w, y in (c.args, c.args[::-1]):
        wshape, yshape = shape_of(w), shape_of(y)
        if not g.is_weight(w) or wshape is None or yshape is None or len(wshape) != 1 or \
                int_dims(wshape)[0] != int_dims(yshape[-1:])[0]:
            continue
        y, cast_back = _strip_astype(g, y)
        inner = g.call(y) if isinstance(y, relax.Var) else None
        if inner is None or op_name(inner) != "multiply":
            continue
        for x, r in (inner.args, inner.args[::-1]):
            found = _inv_rms(g, r)
            if found is None or not found[0].same_as(x):
                continue
            x0, upcast = _strip_astype(g, x)
            src = x0 if upcast and cast_back else x
            return src, w, found[1]
    return None


def recognize_rms_norm(mod: IRModule) -> IRModule:
    return rewrite_matches(mod, match_rms_norm, lambda found, m: relax.op.nn.rms_norm(
        m(found[0]), m(found[1]), axes=[-1], epsilon=found[2]))
