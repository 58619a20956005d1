"""The compile pipeline: one list of named steps, from the model on disk to the serving form.

Every step takes the model being compiled (``Model``: the IRModule, its parameters and their layout, the
ModelSpec) and returns it; a step that merges or drops weights changes the params and the layout together
with the module, in that step. Read top to bottom, in phases. Optional steps are chosen here, when the
pipeline is built (from the source, the spec, the scheme and the target), never inside a step.
``run_pipeline`` checks the IR after each step and, with ``dump_dir``, writes it as ``NN-<step>.py``
(TVMScript), every step numbered the same way, the import and recognition included.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import KilnError, UnsupportedModelError
from ..ir.tvm import IRModule, relax
from ..ir.verify import verify_reference, verify_serving
from .fuse_add_rms_norm import fuse_add_rms_norm
from .fuse_dequant_matmul import fuse_dequant_matmul
from .fuse_gate_up import fuse_gate_up
from .fuse_qkv import fuse_qkv
from .lib.linears import Layout, apply_merges
from .lower_paged_attention import lower_paged_attention
from .lower_paged_groups import lower_paged_groups
from .quantize_linears import packed_layout, quantize_linears
from .recognize_attention import recognize_attention
from .recognize_model import recognize_model
from .recognize_rms_norm import recognize_rms_norm
from .recognize_swiglu import recognize_swiglu
from .share_kv import share_kv


@dataclass(frozen=True)
class Model:
    """What the steps pass along. Before recognition a graph's ``params`` are its NumPy weights by the graph's
    names, with no ``layout`` and no ``spec`` yet."""

    mod: IRModule
    params: dict | None = None  # name -> torch tensor, in ``layout`` order; None when compiled from config.json alone
    layout: Layout | None = None  # name -> (shape, dtype): the packed params tuple, in order
    spec: Any = None  # ModelSpec


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[Model | None], Model]
    check: Callable[[IRModule], None] | None = None
    # the input a failure here is blamed on (a graph kiln cannot take: recognition), rather than on kiln
    blame: str | None = None


@dataclass(frozen=True)
class Quantization:
    """``--quant``: the scheme (kiln/quant/schemes.py), its calibration, and a pre-quantized checkpoint's format."""

    scheme: Any  # quant.schemes.Scheme
    calib: Any = None  # quant.calibration.Calibration
    prequantized: Any = None  # frontend.hf.PreQuantized


def build_pipeline(target, spec=None, *, source=None, quant: Quantization | None = None, fuse: bool = True,
                   keep_reference: bool = False) -> list[Step]:
    """The steps for ``source`` (frontend ``CheckpointSource`` or ``GraphSource``; None: start from a given
    reference-form module) compiled for ``target``. ``spec``: the model's, when known before the import (a
    checkpoint's); a graph's is read off it by recognize_model, so its KV-cache choice waits for that."""
    steps: list[Step] = []
    # Phase 0: import. A checkpoint gives the reference form directly; a graph gives the importer's dense
    # graph, which recognition turns into the reference form, its weights under kiln's names and the spec.
    if source is not None and source.kind == "graph":
        graph = str(source.path)
        steps += [Step("import_graph", lambda _: _import_graph(source)),
                  Step("recognize_rms_norm", _on_module(lambda mod: recognize_rms_norm(mod)), blame=graph),
                  Step("recognize_swiglu", _on_module(lambda mod: recognize_swiglu(mod)), blame=graph),
                  Step("recognize_attention", lambda m: replace(m, mod=recognize_attention(
                      m.mod, m.params, source.mask_len, source.rope_hint)), blame=graph),
                  Step("recognize_model", lambda m: _recognized(source, m), blame=graph)]
    elif source is not None:
        steps.append(Step("import_checkpoint", lambda _: _from_imported(source.load())))
    # Phase 1: the reference form, checked (the frontends promise it); quantized; KV shared between layers.
    steps.append(Step("verify_reference", lambda m: m, verify_reference))
    if quant is not None:
        steps.append(Step("quantize_linears", lambda m: _quantize(m, quant), verify_reference))
    if spec is not None and any(src != i for i, src in enumerate(spec.kv_sources)):
        steps.append(Step("share_kv", lambda m: _with_layout(m, *share_kv(m.mod, m.layout, spec.kv_sources), []),
                          verify_reference))
    # Phase 2: fusion in the reference form (fewer, larger kernels; same logits). Quantized weights are
    # dequantized inside their products first; the merges then stack packed tensors.
    if fuse:
        group = quant.scheme.group_size if quant is not None else None
        steps += [Step("fuse_dequant_matmul", _merging(fuse_dequant_matmul, group), verify_reference),
                  Step("fuse_qkv", _merging(fuse_qkv, group), verify_reference),
                  Step("fuse_gate_up", _merging(fuse_gate_up, group), verify_reference)]
        if target.name == "cpu":
            # On CUDA no dlight rule schedules the two-output kernel (GeneralReduction and Reduction both
            # decline it; Fallback would reduce each row in one thread), while TVM already fuses the
            # residual add into the o/down projection's epilogue: the kernel count is the same without it.
            steps.append(Step("fuse_add_rms_norm", _on_module(fuse_add_rms_norm), verify_reference))
    # Phase 3: the serving form. Attention goes onto TVM's paged KV cache, or, for a model with sliding-window
    # or KV-sharing layers, kiln's grouped one; the entry points appear. Then dead code goes.
    tt = target.tvm_target()
    if spec is not None and spec.grouped_kv:
        steps.append(Step("lower_paged_groups", _on_module(lambda mod: lower_paged_groups(mod, tt, keep_reference)),
                          verify_serving))
    elif spec is not None:
        steps.append(Step("lower_paged_attention", _on_module(
            lambda mod: lower_paged_attention(mod, tt, keep_reference)), verify_serving))
    else:
        steps.append(Step("lower_paged_kv", lambda m: replace(m, mod=(
            lower_paged_groups if m.spec.grouped_kv else lower_paged_attention)(m.mod, tt, keep_reference)),
            verify_serving))
    steps.append(Step("dead_code_elimination", _on_module(lambda mod: relax.transform.DeadCodeElimination(
        _entries(mod))(mod)), verify_serving))
    return steps


PASS_NOTE = "kiln pass: "


def run_pipeline(steps: list[Step], model: Model | IRModule | None = None, dump_dir: Path | None = None,
                 progress: Callable[[str], None] = lambda s: None) -> Model:
    """Run ``steps`` in order from ``model`` (None when the first step imports it). A failure carries the
    step's name as a note (``PASS_NOTE``) for the compiler's one-line report; a recognition step's failure
    that is not kiln's own error becomes an UnsupportedModelError naming the step."""
    if isinstance(model, IRModule):
        model = Model(model)
    if dump_dir is not None:
        dump_dir = Path(dump_dir)
        dump_dir.mkdir(parents=True, exist_ok=True)
        if model is not None:
            (dump_dir / "00-input.py").write_text(model.mod.script())
    for i, step in enumerate(steps, start=1):
        progress(step.name)
        try:
            model = step.run(model)
            if step.check is not None:
                step.check(model.mod)
        except KilnError as e:
            e.add_note(f"{PASS_NOTE}{step.name}")
            raise
        except Exception as e:
            if step.blame is not None:  # TVM rejecting what a recognition pass built from this graph
                lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
                raise UnsupportedModelError(f"{step.blame}: {step.name} failed on this graph ({type(e).__name__}: "
                                            f"{lines[-1] if lines else ''})"[:400]) from None
            e.add_note(f"{PASS_NOTE}{step.name}")
            raise
        if dump_dir is not None:
            (dump_dir / f"{i:02d}-{step.name}.py").write_text(model.mod.script())
    return model


# -- how the passes' own signatures become steps -----------------------------------------------------------


def _on_module(fn: Callable[[IRModule], IRModule]) -> Callable[[Model], Model]:
    """A pass that changes the module alone."""
    return lambda m: replace(m, mod=fn(m.mod))


def _with_layout(m: Model, mod: IRModule, layout: Layout, merges: list) -> Model:
    """The module and the params layout a pass returned; the params made for that layout: merged tensors
    concatenated (``merges``), dropped ones gone."""
    params = apply_merges(m.params, layout, merges) if m.params is not None else None
    return replace(m, mod=mod, layout=layout, params=params)


def _merging(fuse, group: int | None) -> Callable[[Model], Model]:
    """A fusion pass ``fuse(mod, layout, group) -> (mod, layout, merges)``."""
    return lambda m: _with_layout(m, *fuse(m.mod, m.layout, group))


def _from_imported(imported) -> Model:
    return Model(imported.mod, imported.params, imported.param_layout, imported.spec)


def _import_graph(source) -> Model:
    mod, weights = source.load()
    return Model(mod, weights)


def _recognized(source, m: Model) -> Model:
    return _from_imported(source.recognized(recognize_model(m.mod), m.params))


def _quantize(m: Model, quant: Quantization) -> Model:
    """The scheme's packed weights (kiln/quant/schemes.py, or converted from a pre-quantized checkpoint) and the
    reference form's linears rewritten onto them (quantize_linears), meeting in one layout."""
    from ..quant.autoawq import from_autoawq
    from ..quant.schemes import quantize_params, quantized_linears

    scheme, pre = quant.scheme, quant.prequantized
    names = set(quantized_linears(m.spec))
    group = scheme.group_size or 1
    params = dtypes = None
    if m.params is not None and pre is not None:
        assert pre.source_format == "autoawq" and scheme.name == pre.scheme
        params = from_autoawq(m.params, m.spec)
    elif m.params is not None:
        params = quantize_params(m.params, m.spec, scheme.name, quant.calib)
    if params is not None:
        dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in params.items()}
    layout = packed_layout(m.layout, names, scheme.kind, group, dtypes)
    mod = quantize_linears(m.mod, m.layout, names, scheme.kind, group, dtypes)
    if params is not None:
        params = {k: params[k].contiguous() for k in layout}  # the packed tuple's order
    return replace(m, mod=mod, params=params, layout=layout)


def _entries(mod: IRModule) -> list[str]:
    return [gv.name_hint for gv, f in mod.functions_items()
            if isinstance(f, relax.Function) and f.attrs is not None and "global_symbol" in f.attrs]
