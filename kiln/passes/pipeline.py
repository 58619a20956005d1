"""The compile pipeline: IRModule -> IRModule passes, in order, each checked and optionally dumped.

Read top to bottom. Optional passes are chosen here when the pipeline is built, never inside a pass.
With ``dump_dir`` the module is written after every pass as ``NN-<pass>.py`` (TVMScript).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..ir.tvm import IRModule, relax
from ..ir.verify import verify_reference, verify_serving
from .fuse_add_rms_norm import fuse_add_rms_norm
from .fuse_dequant_matmul import fuse_dequant_matmul
from .fuse_gate_up import fuse_gate_up
from .fuse_qkv import fuse_qkv
from .lib.linears import Layout, Merge
from .lower_paged_attention import lower_paged_attention
from .lower_paged_groups import lower_paged_groups, needs_groups
from .share_kv import share_kv


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[IRModule], IRModule]
    check: Callable[[IRModule], None] | None = None


@dataclass
class Fusion:
    """The params side of the fusion phase: fuse_qkv and fuse_gate_up merge weights, so they take the
    params layout and return a new one; the merges accumulate here and the compiler applies them to the
    weights (linears.apply_merges). ``group``: the quantization scheme's group size, if quantized."""

    layout: Layout
    group: int | None = None
    merges: list[Merge] = field(default_factory=list)

    def merging(self, fuse) -> Callable[[IRModule], IRModule]:
        def run(mod: IRModule) -> IRModule:
            mod, self.layout, merges = fuse(mod, self.layout, self.group)
            self.merges += merges
            return mod

        return run


def build_pipeline(target, keep_reference: bool = False, fusion: Fusion | None = None, fuse: bool = True,
                   kv_sources: tuple[int, ...] = ()) -> list[Step]:
    """``fusion``: the params side (layout and merges) of the passes that change weights; the fusion passes
    run when it is given and ``fuse``. ``kv_sources``: ModelSpec.kv_sources, applied by share_kv (which
    drops the sharing layers' K/V weights, so it needs ``fusion`` too)."""
    tt = target.tvm_target()
    steps = [
        # Phase 1: the reference form as imported (frontends promise it; check it).
        Step("verify_reference", lambda m: m, verify_reference),
    ]
    if any(src != i for i, src in enumerate(kv_sources)):
        assert fusion is not None, "share_kv changes the params layout: pass a Fusion to carry it"
        steps.append(Step("share_kv", fusion.merging(lambda m, layout, _group: (*share_kv(m, layout, kv_sources), [])),
                          verify_reference))
    if fusion is not None and fuse:
        steps += [
            # Phase 1b: fusion in the reference form (fewer, larger kernels; same logits). Quantized weights
            # are dequantized inside their products first; the merges below then stack packed tensors.
            Step("fuse_dequant_matmul", fusion.merging(fuse_dequant_matmul), verify_reference),
            Step("fuse_qkv", fusion.merging(fuse_qkv), verify_reference),
            Step("fuse_gate_up", fusion.merging(fuse_gate_up), verify_reference),
        ]
        if target.name == "cpu":
            # On CUDA no dlight rule schedules the two-output kernel (GeneralReduction and Reduction both
            # decline it; Fallback would reduce each row in one thread), while TVM already fuses the
            # residual add into the o/down projection's epilogue: the kernel count is the same without it.
            steps.append(Step("fuse_add_rms_norm", fuse_add_rms_norm, verify_reference))
    return steps + [
        # Phase 2: serving form. Attention becomes paged-KV-cache calls; entry points appear.
        # Layers whose KV lives differently (sliding windows, shared KV) go to kiln's grouped cache.
        Step("lower_paged_attention", lambda m: (lower_paged_groups if needs_groups(m) else lower_paged_attention)(
            m, tt, keep_reference), verify_serving),
        # Phase 3: clean-up before codegen takes over (legalization and fusion are the target's).
        Step("dead_code_elimination", lambda m: relax.transform.DeadCodeElimination(_entries(m))(m), verify_serving),
    ]


def _entries(mod: IRModule) -> list[str]:
    return [gv.name_hint for gv, f in mod.functions_items()
            if isinstance(f, relax.Function) and f.attrs is not None and "global_symbol" in f.attrs]


PASS_NOTE = "kiln pass: "


def run_pipeline(mod: IRModule, steps: list[Step], dump_dir: Path | None = None) -> IRModule:
    if dump_dir is not None:
        dump_dir = Path(dump_dir)
        dump_dir.mkdir(parents=True, exist_ok=True)
        (dump_dir / "00-input.py").write_text(mod.script())
    for i, step in enumerate(steps, start=1):
        try:
            mod = step.run(mod)
            if step.check is not None:
                step.check(mod)
        except Exception as e:
            e.add_note(f"{PASS_NOTE}{step.name}")  # for the compiler's one-line report of a failure
            raise
        if dump_dir is not None:
            (dump_dir / f"{i:02d}-{step.name}.py").write_text(mod.script())
    return mod
