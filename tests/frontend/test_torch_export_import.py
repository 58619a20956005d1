"""kiln.frontend.torch_export: a transformers model's torch.export program -> a Relax module that runs.

Random-weight Llama (GQA) and Qwen2 (q/k/v bias, tied embeddings) are exported with a dynamic sequence
length, saved as .pt2, imported, compiled for llvm and run at two lengths against transformers; kiln's
fixes of TVM's import are checked on small modules (what they change, what they leave alone) and on the
input_ids-only export that needs both; user errors must be kiln errors naming the file or op.
"""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch

from kiln.errors import CheckpointError, UnsupportedModelError
from kiln.frontend.torch_export import (ENTRY, fix_bool_equal_cumsum, fix_inbound_strided_slice,
                                        load_exported_program, op_histogram)
from kiln.ir.tvm import IRModule, Target, relax, tirx, tvm

pytestmark = pytest.mark.cpu

ATOL = 1e-4
LENGTHS = (7, 19)  # neither is the length the program was traced with (12)
VARIANTS = ("llama", "qwen2")


def export(model, with_mask: bool = True) -> torch.export.ExportedProgram:
    """``model.forward(input_ids[, attention_mask]) -> logits`` with a dynamic sequence length."""
    model.config.use_cache = False
    seq = torch.export.Dim("seq", min=2, max=128)
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    kwargs, dims = {"input_ids": ids}, {"input_ids": {1: seq}}
    if with_mask:
        kwargs["attention_mask"], dims["attention_mask"] = torch.ones_like(ids), {1: seq}
    return torch.export.export(model, (), kwargs, dynamic_shapes=dims)


def compile_llvm(mod: IRModule) -> relax.VirtualMachine:
    target = Target({"kind": "llvm"})
    ex = tvm.compile(mod, target=target, relax_pipeline=relax.backend.cpu_generic.get_default_pipeline(target))
    return relax.VirtualMachine(ex, tvm.cpu())


def run(vm, params: dict, inputs: list[np.ndarray]) -> np.ndarray:
    args = [tvm.runtime.tensor(np.asarray(a), tvm.cpu()) for a in [*inputs, *params.values()]]
    return vm[ENTRY](*args).numpy()


def check_logits(model, vm, params, with_mask: bool = True) -> None:
    gen = torch.Generator().manual_seed(1)
    for n in LENGTHS:
        ids = torch.randint(0, model.config.vocab_size, (1, n), generator=gen)
        mask = torch.ones_like(ids)
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask if with_mask else None).logits.numpy()
        got = run(vm, params, [ids.numpy(), mask.numpy()] if with_mask else [ids.numpy()])
        assert got.shape == want.shape == (1, n, model.config.vocab_size)
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


@pytest.fixture(scope="module", params=VARIANTS)
def imported(request, zoo, tmp_path_factory):
    """(variant, transformers model, .pt2 path, mod, params, info), imported from the saved file."""
    _, model = zoo.hf(request.param)
    path = tmp_path_factory.mktemp("pt2") / f"{request.param}.pt2"
    torch.export.save(export(model), path)
    return (request.param, model, path, *load_exported_program(path))


# ------------------------------------------------------------------------------------------ import


def test_saved_program_runs_and_matches_transformers(imported):
    variant, model, _, mod, params, info = imported
    assert relax.analysis.check_well_formed(mod)
    assert info.source == "torch.export" and info.input_names == ("input_ids", "attention_mask")
    assert len(info.dynamic_dims) == 1  # the sequence length
    # weights are parameters named by their state-dict keys, in the entry's order
    state = model.state_dict()
    assert list(params) == list(info.param_names) == [p.name for p in mod[ENTRY].params[2:]]
    assert "model.embed_tokens.weight" in params and "model.layers.1.mlp.down_proj.weight" in params
    for name, value in params.items():
        torch.testing.assert_close(value, state[name], rtol=0, atol=0)
    assert "params" not in mod[ENTRY].attrs  # the weights are not carried in the module
    print(f"\n{variant} torch.export op histogram (fixes {info.fixes}): {op_histogram(mod)}")
    check_logits(model, compile_llvm(mod), params)


def test_program_object_imports_like_its_file(imported):
    variant, model, path, mod, params, info = imported
    mod2, params2, info2 = load_exported_program(torch.export.load(path))
    assert info2 == info and list(params2) == list(params)
    tvm.ir.assert_structural_equal(mod2, mod)


def test_input_ids_only_export_needs_both_fixes(zoo):
    """Without attention_mask transformers runs its packed-sequence detection (bool equal, bool cumsum,
    slices of the positions): the TVM breakages fix_bool_equal_cumsum and fix_inbound_strided_slice repair."""
    _, model = zoo.hf("llama")
    mod, params, info = load_exported_program(export(model, with_mask=False))
    assert info.input_names == ("input_ids",)
    assert set(info.fixes) == {"fix_bool_equal_cumsum", "fix_inbound_strided_slice"}
    assert "cumsum" in op_histogram(mod)
    check_logits(model, compile_llvm(mod), params, with_mask=False)


# ------------------------------------------------------------------------------------------ fixes


def _func(params, build):
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(build(bb, *params))
        bb.emit_func_output(out)
    return bb.get()["main"]


def _bindings(func) -> dict:
    return {b.var.name: b for block in func.body.blocks for b in block.bindings}


def test_fix_bool_equal_cumsum_retypes_and_runs():
    x = relax.Var("x", relax.TensorType([1, 6], "bool"))
    y = relax.Var("y", relax.TensorType([1, 6], "bool"))

    def build(bb, x, y):
        eq = bb.emit(relax.op.equal(x, y))
        return relax.op.cumsum(eq, axis=1)  # what the torch frontend makes of torch.cumsum(bool): bool-typed

    before = _func([x, y], build)
    assert before.ret_ty.dtype == "bool"
    after = fix_bool_equal_cumsum(before)
    assert after.ret_ty.dtype == "int64"
    equal = [b.value for b in _bindings(after).values() if getattr(b.value, "op", None) == tvm.ir.Op.get("relax.equal")]
    assert [str(a.ty.dtype) for a in equal[0].args] == ["int8", "int8"]
    a = np.array([[1, 0, 1, 1, 0, 0]], bool)
    b = np.array([[1, 1, 1, 0, 0, 1]], bool)
    got = run(compile_llvm(IRModule({"main": after})), {}, [a, b])
    np.testing.assert_array_equal(got, torch.cumsum(torch.tensor(a == b), dim=1).numpy())
    # a module without bool equal/cumsum is left as it is
    f = _func([x], lambda bb, x: relax.op.astype(x, "int32"))
    tvm.ir.assert_structural_equal(fix_bool_equal_cumsum(f), f)


def test_fix_inbound_strided_slice_keeps_shapes_known():
    seq = tirx.Var("seq", "int64")
    x = relax.Var("x", relax.TensorType([1, seq], "int64"))

    def build(bb, x):  # transformers' packed-sequence detection: diff of [first - 1, positions...]
        first = bb.emit(relax.op.strided_slice(x, [1], [0], [1]))
        cat = bb.emit(relax.op.concat([relax.op.subtract(first, relax.const(1, "int64")), x], axis=-1))
        lo = bb.emit(relax.op.strided_slice(cat, [-1], [0], [seq]))
        hi = bb.emit(relax.op.strided_slice(cat, [-1], [1], [seq + 1]))
        tail = bb.emit(relax.op.strided_slice(x, [1], [1], [2**63 - 1]))  # end past the extent: not inbound
        return relax.Tuple([relax.op.subtract(hi, lo), tail])

    before = _func([x], build).with_attr("tir_var_lower_bound", {"seq": 2})
    assert before.ret_ty.fields[0].shape is None  # min(1, seq) + ... cannot be proven equal
    after = fix_inbound_strided_slice(before)
    assert [d if isinstance(d, tirx.Var) else int(d) for d in after.ret_ty.fields[0].shape] == [1, seq]
    slices = [b.value for b in _bindings(after).values()
              if getattr(b.value, "op", None) is not None and b.value.op.name == "relax.strided_slice"]
    assert [bool(s.attrs.assume_inbound) for s in slices] == [True, True, True, False]
    # without the lower bound, seq may be 0 and x[:, 0:1] is not provably in bounds
    unbounded = fix_inbound_strided_slice(_func([x], build))
    assert unbounded.ret_ty.fields[0].shape is None


# ------------------------------------------------------------------------------------------ errors


def test_missing_and_non_archive_files_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_exported_program(tmp_path / "nope.pt2")
    text = tmp_path / "model.pt2"
    text.write_text("not a zip")
    with pytest.raises(CheckpointError, match="not a torch.export archive"):
        load_exported_program(text)
    state = tmp_path / "weights.pt2"  # a zip, but torch.save'd, not torch.export.save'd
    torch.save({"w": torch.zeros(2)}, state)
    assert zipfile.is_zipfile(state)
    with pytest.raises(CheckpointError, match="torch.export.load"):
        load_exported_program(state)


class _Unsupported(torch.nn.Module):
    def forward(self, x):
        return torch.kthvalue(x, 2, dim=-1)[0][None]


class _TwoOutputs(torch.nn.Module):
    def forward(self, x):
        return x * 2, x + 1


class _NotLogits(torch.nn.Module):
    def forward(self, x):
        return x.sum(-1)


def test_unimportable_programs_are_unsupported_model_errors():
    x = (torch.rand(1, 4, 8),)
    with pytest.raises(UnsupportedModelError, match="kthvalue"):
        load_exported_program(torch.export.export(_Unsupported(), x))
    with pytest.raises(UnsupportedModelError, match="returns 2 outputs"):
        load_exported_program(torch.export.export(_TwoOutputs(), x))
    with pytest.raises(UnsupportedModelError, match="not logits"):
        load_exported_program(torch.export.export(_NotLogits(), x))
