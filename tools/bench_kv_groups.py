"""The grouped KV cache's own bookkeeping per decode step (runtime/kv_groups.py, no pool, no model):
begin_forward + end_forward for B sequences of 300 tokens, Character.AI's 13-layer map, window 64.

    python tools/bench_kv_groups.py [--batch 1 32 128] [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main() -> None:
    import mixattention_reference as ref

    from kiln.runtime.kv_cache import KVCacheConfig
    from kiln.runtime.kv_groups import GroupedKVCache

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--steps", type=int, default=200)
    a = ap.parse_args()
    spec = ref.character_ai_spec(64, 4096)
    out = {}
    for b in a.batch:
        kv = GroupedKVCache(spec, KVCacheConfig(max_num_seqs=b, max_total_tokens=b * 600, prefill_chunk_size=512))
        ids = list(range(b))
        for s in ids:
            kv.add_sequence(s)
            kv.begin_forward([s], [300])
            kv.end_forward()
        t = time.perf_counter()
        for _ in range(a.steps):
            kv.begin_forward(ids, [1] * b)
            kv.end_forward()
        out[b] = round((time.perf_counter() - t) / a.steps * 1e3, 4)
    print(json.dumps({"ms_per_decode_step": out}))


if __name__ == "__main__":
    main()
