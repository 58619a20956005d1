"""Spike (issue MixAttention): does TVM 0.27's whole-cache sliding mode free KV pages, and is its attention
a sliding window's (Mistral semantics: absolute RoPE positions, each query sees the last W keys)?

    CHUNKS=8 python tools/spikes/tvm_sliding_cache.py       # prefill 8 tokens, then decode to 120
    CHUNKS=32,32 python tools/spikes/tvm_sliding_cache.py   # chunked prefill with chunks longer than W

A 2-layer all-sliding model (W = 16, page 16) runs on TVM's paged cache created with
support_sliding_window=1 and EnableSlidingWindowForSeq(seq, W, sink 0); every step's logits are compared
with tests/mixattention_reference.py and the cache's free pages printed. (kiln lowers windows to its own
grouped cache, passes/lower_paged_groups.py; here the composites go to TVM's lowering with window -1, so that
TVM's cache itself is asked to slide.)"""
import os
import sys

import numpy as np
import torch
import tvm_ffi
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "tests"))
import mixattention_reference as ref
from kiln.ir.spec import ModelSpec
from kiln.frontend.reference import build_reference, param_shapes
from kiln.passes.pipeline import build_pipeline, run_pipeline
from kiln.codegen.targets import resolve_target
from kiln.codegen.build import build
from kiln.ir.tvm import relax, tvm
from kiln.ir.attention import is_attention

W, PAGE = 16, 16
spec = ModelSpec("spike", vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_q_heads=4,
                 num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, context_len=512, sliding_window=W)
mod = build_reference(spec)
# TVM's lowering takes only window -1 composites (windows go to kiln's grouped cache): the cache itself slides
mod = tvm.IRModule({gv: (f.with_attr("kiln.sliding_window", -1) if is_attention(f) else f) for gv, f in mod.functions_items()})
t = resolve_target("cpu", None)
ex = build(run_pipeline(build_pipeline(t, spec.replace(sliding_window=None), fuse=False), mod).mod, t)
vm = relax.VirtualMachine(ex, tvm.cpu())
S = tvm_ffi.Shape
kv = vm["create_paged_kv_cache"](S([4]), S([1024]), S([32]), S([PAGE]), S([1]))
g = tvm.get_global_func
add, begin, end = g("vm.builtin.kv_state_add_sequence"), g("vm.builtin.kv_state_begin_forward"), g("vm.builtin.kv_state_end_forward")
enable = g("vm.builtin.attention_kv_cache_enable_sliding_window_for_seq")
free = g("vm.builtin.attention_kv_cache_get_num_available_pages")
w = ref.random_weights(spec, seed=1, std=0.2)
params = [tvm.runtime.tensor(w[n].numpy(), tvm.cpu()) for n in param_shapes(spec)]
add(kv, 0)
enable(kv, 0, W, 0)
print("pages free at start", free(kv))
ids = torch.randint(3, 97, (120,), generator=torch.Generator().manual_seed(0)).tolist()
want = ref.forward(spec, w, ids).numpy()

def step(tokens, entry):
    x = tvm.runtime.tensor(np.asarray(tokens, dtype="int32"), tvm.cpu())
    begin(kv, S([0]), S([len(tokens)]))
    emb = vm["embed"](x, params)
    if entry == "prefill":
        out = vm["prefill"](tvm.runtime.tensor(emb.numpy()[None], tvm.cpu()), kv, params)
    else:
        out = vm["decode"](tvm.runtime.tensor(emb.numpy()[None], tvm.cpu()), kv, params)
    end(kv)
    return out[0].numpy().reshape(-1)

pos = 0
CHUNKS = [int(c) for c in os.environ.get("CHUNKS", "32,32").split(",")]
for chunk in CHUNKS:  # chunked prefill
    logits = step(ids[pos:pos + chunk], "prefill"); pos += chunk
    print(f"prefill to {pos}: max|d| {np.abs(logits - want[pos - 1]).max():.2e}  free pages {free(kv)}")
errs = []
while pos < len(ids):
    logits = step(ids[pos:pos + 1], "decode"); pos += 1
    errs.append(np.abs(logits - want[pos - 1]).max())
    if pos % 16 == 0:
        print(f"decode at {pos}: max|d| so far {max(errs):.2e}  free pages {free(kv)}")
