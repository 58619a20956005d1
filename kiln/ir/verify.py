"""IR invariants checked at pass boundaries (pipeline.py runs them after every pass).

- reference form: well-formed; ``forward`` exists and calls at least one attention composite.
- serving form: well-formed; every ABI entry point (of TVM's paged cache, or of kiln's grouped one) exists with its ``num_input``; no serving
  entry point calls a reference attention composite any more.
"""

from __future__ import annotations

from ..errors import PassError
from .abi import ENTRY_POINTS, GROUPED_ENTRY_POINTS, REFERENCE_ENTRY
from .attention import is_attention
from .tvm import IRModule, relax


def _well_formed(mod: IRModule, stage: str) -> None:
    if not relax.analysis.check_well_formed(mod):
        raise PassError(f"the module is not well-formed {stage}")


def _called_composites(mod: IRModule, func) -> list[str]:
    found = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, relax.GlobalVar) and is_attention(mod[e.op]):
            found.append(e.op.name_hint)

    relax.analysis.post_order_visit(func.body, visit)
    return found


def verify_reference(mod: IRModule) -> None:
    _well_formed(mod, "in reference form")
    names = {gv.name_hint: gv for gv in mod.get_global_vars()}
    if REFERENCE_ENTRY.name not in names:
        raise PassError("reference form needs a 'forward' function")
    if not _called_composites(mod, mod[names[REFERENCE_ENTRY.name]]):
        raise PassError("reference form: forward calls no attention composite")


def verify_serving(mod: IRModule) -> None:
    _well_formed(mod, "in serving form")
    names = {gv.name_hint: gv for gv in mod.get_global_vars()}
    # TVM's paged cache comes with its constructor; kiln's grouped cache is made by the runtime
    abi = ENTRY_POINTS if "create_paged_kv_cache" in names else GROUPED_ENTRY_POINTS
    for name, entry in abi.items():
        if name not in names:
            raise PassError(f"serving form lacks the entry point {name!r}")
        f = mod[names[name]]
        if int(f.attrs["num_input"]) != entry.num_input or len(f.params) != len(entry.inputs):
            raise PassError(f"entry point {name!r} does not match the ABI in kiln/ir/abi.py")
        if name != REFERENCE_ENTRY.name and _called_composites(mod, f):
            raise PassError(f"entry point {name!r} still calls reference attention")
