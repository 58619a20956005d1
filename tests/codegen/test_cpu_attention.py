"""kiln's CPU decode attention (kiln/codegen/cpu_attention.py) against TVM's kernel it replaces and NumPy.

Both kernels are compiled for the host and run on the same paged KV pool: sequences of 0 keys (an empty page
table), one key, a full page, a page and one key, and several pages; GQA groups of 7 and 1; head dims that
take vectors (64, 32) and one that does not (40: scalar); float32 and float16 caches. The output must equal
TVM's up to float32 sum order (1e-5 of the values' scale) and ``lse`` must agree too; the output also matches a
float64 NumPy softmax(q k^T * sm_scale) v.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

pytestmark = pytest.mark.cpu

PAGE = 16
LENGTHS = (0, 1, 16, 17, 45)


def _compile(func):
    from kiln.codegen.targets import resolve_target
    from kiln.ir.tvm import tvm

    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                       target=resolve_target("cpu", None).tvm_target())


def _case(h_qo, h_kv, d, dtype, rng):
    """(kernel arguments as NumPy arrays, the NumPy reference output)."""
    b = len(LENGTHS)
    npages = [math.ceil(n / PAGE) for n in LENGTHS]
    pool = rng.standard_normal((sum(npages) + 3, 2, h_kv, PAGE, d)).astype(dtype)
    order = rng.permutation(len(pool))[:sum(npages)].astype("int32")  # pages scattered over the pool
    indptr = np.concatenate([[0], np.cumsum(npages)]).astype("int32")
    last = np.array([(n - 1) % PAGE + 1 if n else 0 for n in LENGTHS], "int32")
    q = rng.standard_normal((b, h_qo, d)).astype(dtype)
    sm_scale = 1 / math.sqrt(d)
    want = np.zeros((b, h_qo, d))
    for s, n in enumerate(LENGTHS):
        if not n:
            continue
        rows = order[indptr[s]:indptr[s + 1]]
        k = pool[rows, 0].transpose(1, 0, 2, 3).reshape(h_kv, -1, d)[:, :n].astype(np.float64)
        v = pool[rows, 1].transpose(1, 0, 2, 3).reshape(h_kv, -1, d)[:, :n].astype(np.float64)
        for h in range(h_qo):
            logits = k[h // (h_qo // h_kv)] @ q[s, h].astype(np.float64) * sm_scale
            p = np.exp(logits - logits.max())
            want[s, h] = p @ v[h // (h_qo // h_kv)] / p.sum()
    zeros = np.zeros(b, "int32")
    args = [q, pool, indptr, order, last, zeros, zeros, np.zeros((b, h_qo, d), dtype), np.zeros((b, h_qo), "float32")]
    return args, sm_scale, want


@pytest.mark.parametrize("h_qo,h_kv,d,dtype", [(14, 2, 64, "float32"), (4, 4, 32, "float32"), (6, 2, 40, "float32"),
                                               (14, 2, 64, "float16")])
def test_decode_attention_matches_tvm_and_numpy(h_qo, h_kv, d, dtype):
    from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode_cpu

    from kiln.codegen.cpu_attention import decode_shape, schedule_decode_attention
    from kiln.codegen.cpu_schedule import vector_lanes
    from kiln.codegen.targets import resolve_target
    from kiln.ir.tvm import tvm

    tvm_func = _attention_decode_cpu(h_kv, h_qo, d, dtype, False, {})
    assert decode_shape(tvm_func) == (h_qo, h_kv, d, PAGE, dtype)
    ours = schedule_decode_attention(tvm_func, vector_lanes(resolve_target("cpu", None).tvm_target()))
    assert ours is not None and "T.parallel" in ours.script()
    libs = {"tvm": _compile(tvm_func), "kiln": _compile(ours)}
    args, sm_scale, want = _case(h_qo, h_kv, d, dtype, np.random.default_rng(d))
    dev = tvm.cpu()
    got = {}
    for name, lib in libs.items():
        arrays = [tvm.runtime.tensor(a, dev) for a in args]
        lib["main"](*arrays, 0, 1.0, 1e4, sm_scale)
        got[name] = (arrays[7].numpy().astype(np.float64), arrays[8].numpy())
    tol = 1e-5 if dtype == "float32" else 2e-3
    np.testing.assert_allclose(got["kiln"][0], got["tvm"][0], rtol=tol, atol=tol)
    np.testing.assert_allclose(got["kiln"][1], got["tvm"][1], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got["kiln"][0], want, rtol=tol, atol=tol)
    assert (got["kiln"][1][0] == np.float32(-5e4)).all()  # the empty sequence: TVM's lse, zeros out
    assert not got["kiln"][0][0].any()


def test_inline_rope_is_refused():
    """kiln's caches apply RoPE at append; the kernel stops on rotary_mode 1 instead of skipping the rotation."""
    from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode_cpu

    from kiln.codegen.cpu_attention import schedule_decode_attention
    from kiln.ir.tvm import tvm

    lib = _compile(schedule_decode_attention(_attention_decode_cpu(2, 4, 32, "float32", False, {}), 16))
    args, sm_scale, _ = _case(4, 2, 32, "float32", np.random.default_rng(0))
    dev = tvm.cpu()
    with pytest.raises(Exception, match="RopeMode.NORMAL"):
        lib["main"](*[tvm.runtime.tensor(a, dev) for a in args], 1, 1.0, 1e4, sm_scale)


def test_other_kernels_are_left_alone():
    from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode_cpu

    from kiln.codegen.cpu_attention import decode_shape

    assert decode_shape(_attention_decode_cpu(2, 4, 32, "float32", True, {})) is None  # the sliding-window one


def _prefill_case(h_qo, h_kv, d, dtype, causal, rng):
    """Ragged prefill: sequences of (queries, keys) (5, 5), (40, 40), (1, 1), (7, 20) and (0, 0)."""
    sizes = [(5, 5), (40, 40), (1, 1), (7, 20), (0, 0)]
    q_indptr = np.concatenate([[0], np.cumsum([s[0] for s in sizes])]).astype("int32")
    kv_indptr = np.concatenate([[0], np.cumsum([s[1] for s in sizes])]).astype("int32")
    q = rng.standard_normal((q_indptr[-1], h_qo, d)).astype(dtype)
    k = rng.standard_normal((kv_indptr[-1], h_kv, d)).astype(dtype)
    v = rng.standard_normal((kv_indptr[-1], h_kv, d)).astype(dtype)
    sm_scale = 1 / math.sqrt(d)
    want = np.zeros((q_indptr[-1], h_qo, d))
    for s, (nq, nk) in enumerate(sizes):
        for i in range(nq):
            seen = nk - nq + i + 1 if causal else nk
            for h in range(h_qo):
                kk = k[kv_indptr[s]:kv_indptr[s] + seen, h // (h_qo // h_kv)].astype(np.float64)
                vv = v[kv_indptr[s]:kv_indptr[s] + seen, h // (h_qo // h_kv)].astype(np.float64)
                logits = kk @ q[q_indptr[s] + i, h].astype(np.float64) * sm_scale
                p = np.exp(logits - logits.max())
                want[q_indptr[s] + i, h] = p @ vv / p.sum()
    rows = q_indptr[-1]
    args = [q, q_indptr, k, v, kv_indptr, np.zeros(rows, "int32"), np.zeros(len(sizes), "int32"),
            np.zeros((rows, h_qo, d), dtype), np.zeros((rows, h_qo), "float32")]
    return args, sm_scale, want


@pytest.mark.parametrize("causal", [1, 0])
@pytest.mark.parametrize("h_qo,h_kv,d,dtype", [(14, 2, 64, "float32"), (4, 4, 32, "float32"), (6, 2, 40, "float32"),
                                               (14, 2, 64, "float16")])
def test_prefill_attention_matches_tvm_and_numpy(h_qo, h_kv, d, dtype, causal):
    from tvm.relax.frontend.nn.llm._prefill_kernels import _attention_prefill_ragged_cpu

    from kiln.codegen.cpu_attention import prefill_shape, schedule_prefill_attention
    from kiln.codegen.cpu_schedule import vector_lanes
    from kiln.codegen.targets import resolve_target
    from kiln.ir.tvm import tvm

    tvm_func = _attention_prefill_ragged_cpu(h_kv, h_qo, d, d, dtype, {})
    assert prefill_shape(tvm_func) == (h_qo, h_kv, d, dtype)
    ours = schedule_prefill_attention(tvm_func, vector_lanes(resolve_target("cpu", None).tvm_target()))
    assert ours is not None and "T.parallel" in ours.script()
    args, sm_scale, want = _prefill_case(h_qo, h_kv, d, dtype, causal, np.random.default_rng(d + causal))
    dev = tvm.cpu()
    got = {}
    for name, lib in {"tvm": _compile(tvm_func), "kiln": _compile(ours)}.items():
        arrays = [tvm.runtime.tensor(a, dev) for a in args]
        lib["main"](*arrays, causal, 0, 1.0, 1e4, sm_scale)
        got[name] = (arrays[7].numpy().astype(np.float64), arrays[8].numpy())
    tol = 1e-5 if dtype == "float32" else 2e-3
    np.testing.assert_allclose(got["kiln"][0], got["tvm"][0], rtol=tol, atol=tol)
    np.testing.assert_allclose(got["kiln"][1], got["tvm"][1], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got["kiln"][0], want, rtol=tol, atol=tol)
