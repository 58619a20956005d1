#!/usr/bin/env bash
# Every GPU measurement of kiln in one command, on a machine with torch but no TVM (see shared/notes/gpu.md).
#
#   tools/gpu/run_all.sh [PART|GROUP ...]        from the repo root, with gpu_bundle.tar.xz carried along
#   tools/gpu/run_all.sh --plan [PART|GROUP ...] the parts and their time limits, without running anything
#
# Built beforehand on the CPU host by tools/gpu/build_bundle.sh. Puts the bundle's runtime-only TVM on
# PYTHONPATH and runs, each part guarded by its own time limit so one failure loses nothing else:
#
#   preflight                           Python, the bundle's tvm_ffi, the runtime on the device, one demo forward
#                                       (tools/gpu/preflight.py); if it fails, every later part is skipped
#   nvidia-smi                          the card as found
#   peaks                               copy bandwidth and bf16/fp16 matmul peak (tools/gpu/peaks.py)
#   gemm                                kiln's tensor-core GEMM alone vs torch.matmul (tools/gpu/gemm.py)
#   demo                                the demo model's greedy tokens on the GPU vs the CPU's (tools/gpu/demo_check.py)
#   demo-nograph                        the same without CUDA graphs (tells a graph fault from a kernel fault)
#   wgmma-logits                        Llama-3-8B sm_90 vs sm_90a (wgmma prefill): same logits? (same_logits.py)
#   kiln-SHAPE-latency                  kiln bench: decode at batch 1..256 (random weights, seed 0)
#   kiln-SHAPE-prefill-512, -2048       kiln bench: one prompt of 512 / 2048 tokens (and llama-3-8b-sm90a's)
#   hf-SHAPE                            transformers peers on the same shape (tools/gpu/hf_peers.py)
#   kiln-SHAPE-serving                  kiln bench: ShareGPT-like requests at several rates
#   kiln-llama-3.2-1b-nograph-latency   decode again without CUDA graphs, for what they bring
#
#   parity-llama-3-8b                   fp16 Llama-3-8B logits, kiln against transformers on the same seeded weights
#                                       (128-token prefill, 8 teacher-forced decode steps; tools/gpu/parity_hf.py)
#   kiln-llama-3-8b-quick               kiln bench: Llama-3-8B decode at batch 1, 8, 32, 64 (128-token prompts)
#   hf-llama-3-8b-quick                 transformers eager and static cache + torch.compile, batch 1, 32 new tokens
#
# SHAPE is llama-3-8b or llama-3.2-1b; groups: quick (the default: preflight nvidia-smi peaks demo parity-llama-3-8b
# gemm kiln-llama-3-8b-quick hf-llama-3-8b-quick, limits adding up to 480 s, the deadline 480 s), all, base, kiln, hf,
# serving, graphs. After each part
# tools/gpu/collect.py rewrites $OUT/results.json, $OUT/logs.txt and $OUT/tables.md (BENCHMARKS.md's tables,
# tools/gpu/tables.py), so a run cut short keeps what it finished. Parts run in the order above until
# KILN_GPU_DEADLINE seconds (default 480 for quick, else 560) have passed; the rest are recorded as skipped (run
# them with a second command naming them).
#
# Environment: OUT (results folder; default out/gpu), KILN_GPU_BUNDLE (the bundle: a folder, or its .tar.xz,
# unpacked into a scratch folder; default gpu_bundle.tar.xz if present, else gpu_bundle/),
# KILN_GPU_DEVICE (cuda; cpu for a smoke test with a bundle from `build_bundle.sh --smoke`), KILN_GPU_ALLOW_STALE=1
# (run a bundle built from other kiln sources than this checkout's; refused otherwise),
# KILN_GPU_SMALL=1 (tiny sizes everywhere, for that smoke test), PYTHON (default python3).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
PLAN=0
[ "${1:-}" = --plan ] && { PLAN=1; shift; }
GROUPS_ASKED=("${@:-quick}")
QUICK_ONLY=1
for g in "${GROUPS_ASKED[@]}"; do [ "$g" = quick ] || QUICK_ONLY=0; done
DEFAULT_DEADLINE=560 L_PEAKS=60 L_DEMO=90 L_GEMM=120 L_PARITY=120  # the time limits that differ in the quick group
[ "$QUICK_ONLY" = 1 ] && { DEFAULT_DEADLINE=480; L_PEAKS=35; L_DEMO=40; L_GEMM=70; L_PARITY=60; }
OUT=${OUT:-$ROOT/out/gpu}
DEVICE=${KILN_GPU_DEVICE:-cuda}
SMALL=${KILN_GPU_SMALL:-0}
PY=${PYTHON:-python3}
DEADLINE=$(( SECONDS + ${KILN_GPU_DEADLINE:-$DEFAULT_DEADLINE} ))
SHAPES="llama-3-8b llama-3.2-1b"
STOPPED=""  # set when preflight fails: every later part is recorded as skipped

if [ "$PLAN" = 0 ]; then
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kiln-gpu.XXXXXX")
mkdir -p "$OUT"

SRC=${KILN_GPU_BUNDLE:-}
[ -n "$SRC" ] || { [ -f gpu_bundle.tar.xz ] && SRC=gpu_bundle.tar.xz || SRC=gpu_bundle; }
if [ -f "$SRC" ]; then  # (Python's tarfile: the GPU machine may have no xz)
    echo "unpacking $SRC"
    "$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' "$SRC" "$WORK/bundle" \
        || { echo "could not unpack $SRC" >&2; exit 2; }
    SRC=$WORK/bundle
fi
BUNDLE=$(cd "$SRC" 2>/dev/null && pwd) && [ -e "$BUNDLE/bundle.json" ] \
    || { echo "no bundle at $SRC: run tools/gpu/build_bundle.sh first" >&2; exit 2; }
# A bundle from other kiln sources holds artifacts another kiln compiled: refuse it (KILN_GPU_ALLOW_STALE=1 runs it).
BUILT_FROM=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1])).get("kiln_sources", "unrecorded"))' "$BUNDLE/bundle.json")
SOURCES=$("$PY" tools/gpu/source_hash.py "$ROOT")
if [ "$BUILT_FROM" != "$SOURCES" ] && [ "${KILN_GPU_ALLOW_STALE:-0}" != 1 ]; then
    echo "stale bundle: built from kiln sources $BUILT_FROM, this checkout's are $SOURCES; rebuild it with tools/gpu/build_bundle.sh (or set KILN_GPU_ALLOW_STALE=1)" >&2
    exit 2
fi

# The bundle's tvm_ffi and TVM runtime libraries; kiln itself from this checkout.
export PYTHONPATH="$BUNDLE/py:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
[ -d "$BUNDLE/tvmlib" ] && export KILN_TVM_LIB_DIR="$BUNDLE/tvmlib"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg TVM_FFI_CACHE_DIR="$WORK/tvm-ffi-cache" KILN_CACHE="$WORK/kiln-cache"
# TVM's CUDA runtime links libcudart.so.13: python's own (the nvidia-cuda-runtime wheel torch uses), else the bundle's.
if [ "$DEVICE" = cuda ]; then
    CUDART=$("$PY" -c 'import glob, os, site; print(next((os.path.dirname(p) for d in site.getsitepackages() for p in glob.glob(d + "/nvidia/**/libcudart.so.13", recursive=True)), ""))' 2>/dev/null)
    [ -n "$CUDART" ] || CUDART="$BUNDLE/cudart"
    export LD_LIBRARY_PATH="$CUDART${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
else
    BUNDLE="<bundle>" WORK="<work>"
fi

if [ "$SMALL" = 1 ]; then
    SMALLFLAG=--small
    LATENCY="--batch-sizes 1,2 --input-len 16 --output-len 4"
    PREFILL_OUT=2; SERVING="--num-prompts 4 --request-rates 8,inf"
    HF="--small --compile-backend eager --batches 2 --prompt-len 8 --new-tokens 4 --repeats 1 --skip continuous_batching"
    QUICK_LATENCY="--batch-sizes 1,2 --input-len 16 --output-len 4"
    HF_QUICK="--small --compile-backend eager --prompt-len 8 --new-tokens 4 --repeats 1 --skip batched continuous_batching"
else
    SMALLFLAG=
    LATENCY="--batch-sizes 1,8,32,64,128,256 --input-len 128 --output-len 32"
    PREFILL_OUT=4; SERVING="--num-prompts 100 --request-rates 4,16,inf"
    HF="--new-tokens 64 --batches 8 32 64 --repeats 2"
    QUICK_LATENCY="--batch-sizes 1,8,32,64 --input-len 128 --output-len 32"
    HF_QUICK="--new-tokens 32 --repeats 1 --skip batched continuous_batching"
fi

part() {  # part NAME LIMIT_S CMD...: run CMD under its limit (or what is left of the deadline), record how it went
    local name=$1 limit=$2; shift 2
    local left=$(( DEADLINE - SECONDS )) t0=$SECONDS rc
    if [ "$PLAN" = 1 ]; then
        echo "$name $limit"
        return
    fi
    if [ -n "$STOPPED" ]; then
        echo "{\"part\": \"$name\", \"skipped\": \"$STOPPED\"}" >"$WORK/$name.status.json"
        echo "== $name: skipped, $STOPPED"
    elif [ "$left" -lt 15 ]; then
        echo "{\"part\": \"$name\", \"skipped\": \"out of time (KILN_GPU_DEADLINE)\"}" >"$WORK/$name.status.json"
        echo "== $name: skipped, out of time"
    else
        [ "$limit" -gt "$left" ] && limit=$left
        echo "== $name (limit ${limit}s): $*"
        timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1
        rc=$?
        local timed_out=false; { [ $rc = 124 ] || [ $rc = 137 ]; } && timed_out=true
        echo "{\"part\": \"$name\", \"rc\": $rc, \"seconds\": $(( SECONDS - t0 )), \"limit\": $limit, \"timed_out\": $timed_out}" \
            >"$WORK/$name.status.json"
        tail -n 15 "$WORK/$name.log"
        echo "== $name: exit $rc after $(( SECONDS - t0 ))s"
        if [ "$name" = preflight ] && [ $rc != 0 ]; then
            STOPPED="preflight failed"
            cat "$WORK/$name.log"  # its one-screen diagnosis
        fi
    fi
    "$PY" tools/gpu/collect.py "$WORK" "$OUT" --bundle "$BUNDLE" || echo "collect.py failed" >&2
}

bench() {  # bench NAME SHAPE LIMIT_S BENCH_ARGS...: kiln bench with random weights (seed 0)
    local name=$1 shape=$2 limit=$3; shift 3
    part "$name" "$limit" "$PY" -m kiln.cli bench "$BUNDLE/artifacts/$shape" --random-weights 0 --no-progress \
        --json "$WORK/$name.json" "$@"
}

run() {
    case $1 in
        preflight) part preflight 15 "$PY" tools/gpu/preflight.py "$BUNDLE" --device "$DEVICE" --out "$WORK/preflight.json" ;;
        nvidia-smi) part nvidia-smi 10 nvidia-smi ;;
        peaks) part peaks $L_PEAKS "$PY" tools/gpu/peaks.py --device "$DEVICE" $SMALLFLAG --out "$WORK/peaks.json" ;;
        gemm) if [ -d "$BUNDLE/gemm" ] || [ "$PLAN" = 1 ]; then
                  part gemm $L_GEMM "$PY" tools/gpu/gemm.py run "$BUNDLE/gemm" --json "$WORK/gemm.json"
              else
                  echo '{"part": "gemm", "skipped": "the bundle has no gemm/"}' >"$WORK/gemm.status.json"
              fi ;;
        wgmma-logits) local n=512 steps=8; [ "$SMALL" = 1 ] && { n=16; steps=2; }
                      part "$1" 120 "$PY" tools/gpu/same_logits.py "$BUNDLE/artifacts/llama-3-8b" \
                          "$BUNDLE/artifacts/llama-3-8b-sm90a" --prompt-len $n --steps $steps --out "$WORK/$1.json" ;;
        demo|demo-nograph)
              [ -e "$BUNDLE/artifacts/$1/params.safetensors" ] || [ "$PLAN" = 1 ] \
                  || cp "$BUNDLE/artifacts/demo/params.safetensors" "$BUNDLE/artifacts/$1/"  # (build_bundle.sh)
              part "$1" $L_DEMO "$PY" tools/gpu/demo_check.py check "$BUNDLE/artifacts/$1" \
                  --expect "$BUNDLE/demo_cpu_greedy.json" --out "$WORK/$1.json" ;;
        parity-llama-3-8b) local pl=128 st=8; [ "$SMALL" = 1 ] && { pl=16; st=4; }
                           part "$1" $L_PARITY "$PY" tools/gpu/parity_hf.py "$BUNDLE/artifacts/llama-3-8b" \
                               --config "$BUNDLE/configs/llama-3-8b" --device "$DEVICE" --prompt-len $pl --steps $st \
                               --out "$WORK/$1.json" ;;
        kiln-llama-3-8b-quick) bench "$1" llama-3-8b 100 --mode latency $QUICK_LATENCY ;;
        hf-llama-3-8b-quick) part "$1" 150 "$PY" tools/gpu/hf_peers.py --config tools/gpu/configs/llama-3-8b \
                                 --device "$DEVICE" $HF_QUICK --out "$WORK/$1.json" ;;
        kiln-*-nograph-latency) local s=${1#kiln-}; s=${s%-latency}  # (no plot: $OUT returns 8 files at most)
                                bench "$1" "$s" 120 --mode latency $LATENCY ;;
        kiln-*-latency) local s=${1#kiln-}; s=${s%-latency}
                        bench "$1" "$s" 120 --mode latency $LATENCY --plot "$OUT/plots-$1" ;;
        kiln-*-prefill-*) local s=${1#kiln-}; s=${s%-prefill-*}; local n=${1##*-}
                          [ "$SMALL" = 1 ] && n=$(( n / 64 ))
                          # the whole prompt in one step: --max-batched-tokens of its length
                          bench "$1" "$s" 60 --mode latency --batch-sizes 1 --input-len "$n" \
                              --output-len $PREFILL_OUT --max-batched-tokens "$n" ;;
        kiln-*-serving) local s=${1#kiln-}; s=${s%-serving}
                        bench "$1" "$s" 120 --mode serving $SERVING --plot "$OUT/plots-$1" ;;
        hf-*) local s=${1#hf-}; part "$1" 240 "$PY" tools/gpu/hf_peers.py --config "tools/gpu/configs/$s" \
                  --device "$DEVICE" $HF --out "$WORK/$1.json" ;;
        *) echo "unknown part $1" >&2; return 2 ;;
    esac
}

expand() {  # the parts of a group, in run order
    local s
    case $1 in
        quick) echo preflight nvidia-smi peaks demo parity-llama-3-8b gemm kiln-llama-3-8b-quick hf-llama-3-8b-quick ;;
        base) echo nvidia-smi peaks gemm demo demo-nograph parity-llama-3-8b wgmma-logits ;;
        kiln) for s in $SHAPES; do echo "kiln-$s-latency"; done
              for s in $SHAPES llama-3-8b-sm90a; do echo "kiln-$s-prefill-512 kiln-$s-prefill-2048"; done ;;
        hf) for s in $SHAPES; do echo "hf-$s"; done ;;
        serving) for s in $SHAPES; do echo "kiln-$s-serving"; done ;;
        graphs) echo kiln-llama-3.2-1b-nograph-latency ;;
        all) echo preflight; expand base; expand kiln; expand hf; expand serving; expand graphs ;;
        *) echo "$1" ;;
    esac
}

[ "$PLAN" = 1 ] || echo "kiln GPU run: bundle $BUNDLE, device $DEVICE, results in $OUT (work dir $WORK)"
for arg in "${GROUPS_ASKED[@]}"; do
    for p in $(expand "$arg"); do
        run "$p"
    done
done
[ "$PLAN" = 1 ] && exit 0
"$PY" - "$OUT/results.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(json.dumps(r["summary"], indent=1))
for name, p in r["parts"].items():
    s = p["status"]
    print(f"{name:32} {'skipped' if 'skipped' in s else 'exit %s in %ss%s' % (s.get('rc'), s.get('seconds'), ' (timed out)' if s.get('timed_out') else '')}")
EOF
