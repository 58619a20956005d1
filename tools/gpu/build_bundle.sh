#!/usr/bin/env bash
# Build gpu_bundle/: what a GPU machine without TVM needs to run tools/gpu/run_all.sh (shared/notes/gpu.md).
#
#   tools/gpu/build_bundle.sh                  here, on the CPU host (nvcc on PATH, network for one pip download)
#   tools/gpu/build_bundle.sh --smoke DIR      a CPU-only stand-in bundle of tiny models in DIR (tests)
#
# gpu_bundle/ (git-ignored; carry it with the working tree, 64 MiB in all):
#   py/tvm_ffi/                  the tvm_ffi package for CPython 3.12 (the GPU machine's Python), trimmed
#   py/apache_tvm*.dist-info/    package metadata, so kiln's artifact check sees the TVM versions it built with
#   tvmlib/                      libtvm_runtime.so + libtvm_runtime_cuda.so (runtime only, no compiler)
#   cudart/libcudart.so.13       used only where the GPU's Python has no CUDA runtime of its own
#   artifacts/demo/              models/kiln-demo for cuda sm_90, fp32, with its weights
#   artifacts/demo-nograph/      the same, --no-cuda-graph, without its params.safetensors (demo's; run_all.sh copies it)
#   artifacts/llama-3.2-1b/      config-only, fp16, sm_90, --context-len $CONTEXT_LEN (default 4096):
#   artifacts/llama-3-8b/          no weights (random at load time), placeholder tokenizer
#   artifacts/llama-3.2-1b-nograph/  the same as llama-3.2-1b, --no-cuda-graph (what CUDA graphs bring)
#   artifacts/llama-3-8b-sm90a/  the same as llama-3-8b for sm_90a: prefill linears on kiln's wgmma kernel
#   gemm/gemm_sm_90.so           kiln's tensor-core GEMM alone (tools/gpu/gemm.py build)
#   gemm/lowbatch_sm_90.so,.json the Llama-3-8B linears at small m: MMA, each low-batch GEMV bucket, kiln's dispatch
#   demo_cpu_greedy.json         the demo model's greedy tokens on this CPU (tools/gpu/demo_check.py record)
#   configs/llama-3-8b/          the config llama-3-8b was compiled from (tools/gpu/parity_hf.py builds transformers')
#   bundle.json                  what was built, from which commit and kiln sources (tools/gpu/source_hash.py:
#                                run_all.sh refuses the bundle in a checkout whose sources differ), versions, sizes
#
# and packs it into gpu_bundle.tar.xz beside it (about 40% of its size): carry that file to the GPU
# machine (run's carry: ["gpu_bundle.tar.xz"]); run_all.sh unpacks it there with Python's tarfile.
#
# The GPU machine already has torch, numpy, safetensors, tokenizers, click, jinja2, tqdm and matplotlib,
# which is all kiln's runtime and `kiln bench` import; EXTRA_WHEELS="name==version ..." adds pure-Python
# packages for cp312 to py/ should that change. Fails if the packed bundle plus the working tree exceed
# the 64 MiB a GPU call can take.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
PY=${PYTHON:-$ROOT/.venv/bin/python}
CONTEXT_LEN=${CONTEXT_LEN:-4096}
GPU_PYTHON=3.12
CALL_LIMIT_MIB=64
SMOKE=0
if [ "${1:-}" = --smoke ]; then
    SMOKE=1
    BUNDLE=${2:?--smoke needs a directory}
else
    BUNDLE=${KILN_GPU_BUNDLE:-$ROOT/gpu_bundle}
fi
kiln() { "$PY" -m kiln.cli "$@"; }
step() { echo "[$(date +%H:%M:%S)] $*"; }

rm -rf "$BUNDLE" "$BUNDLE.tar.xz"
mkdir -p "$BUNDLE/artifacts"
BUNDLE=$(cd "$BUNDLE" && pwd)
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/kiln-bundle.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT
declare -A SECONDS_OF

compile() {  # compile NAME SRC ARGS...: kiln compile into artifacts/NAME, timed
    local name=$1 src=$2 t0=$SECONDS; shift 2
    step "compiling $name: kiln compile $src $*"
    kiln compile "$src" -o "$BUNDLE/artifacts/$name" -q "$@"
    SECONDS_OF[$name]=$(( SECONDS - t0 ))
}

if [ "$SMOKE" = 0 ]; then
    command -v nvcc >/dev/null || { echo "nvcc is not on PATH: CUDA artifacts need it (see README, --target cuda)" >&2; exit 1; }

    # -- 1. runtime-only TVM for the GPU machine's Python ------------------------------------------------
    TVM_VERSION=$("$PY" -c 'from importlib.metadata import version; print(version("apache-tvm"))')
    FFI_VERSION=$("$PY" -c 'from importlib.metadata import version; print(version("apache-tvm-ffi"))')
    TVM_LIB=$("$PY" -c 'import importlib.util, os; print(os.path.join(list(importlib.util.find_spec("tvm").submodule_search_locations)[0], "lib"))')
    step "downloading apache-tvm-ffi==$FFI_VERSION for CPython $GPU_PYTHON"
    "$PY" -m pip download -q "apache-tvm-ffi==$FFI_VERSION" --python-version "$GPU_PYTHON" --implementation cp \
        --only-binary=:all: --no-deps --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$SCRATCH/wheels"
    "$PY" - "$SCRATCH"/wheels/apache_tvm_ffi-*.whl "$BUNDLE/py" <<'EOF'
import sys, zipfile
wheel, dest = sys.argv[1:]
# Not needed to run (shared/notes/tvm-0.27.md 3.4): sources, headers, build files, stubs, tests.
# Kept: cpp/ (tvm_ffi/__init__ imports it) and lib/libtvm_ffi_testing.so (core.so links against it).
drop = ("tvm_ffi/3rdparty/", "tvm_ffi/include/", "tvm_ffi/src/", "tvm_ffi/stub/", "tvm_ffi/share/",
        "tvm_ffi/cython/", "tvm_ffi/testing/", "tvm_ffi/CMakeLists.txt", "tvm_ffi/core.pyi")
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if not n.startswith(drop)]
    z.extractall(dest, names)
    assert any(n.startswith("tvm_ffi/core.cpython-312") for n in names), "not a cp312 wheel"
EOF
    mkdir -p "$BUNDLE/tvmlib" "$BUNDLE/cudart"
    cp "$TVM_LIB/libtvm_runtime.so" "$TVM_LIB/libtvm_runtime_cuda.so" "$BUNDLE/tvmlib/"
    # apache-tvm's wheel is py3-none: the same libraries serve every Python. Its METADATA marks the version.
    TVM_DIST=$("$PY" -c 'from importlib.metadata import distribution; print(distribution("apache-tvm")._path)')
    mkdir -p "$BUNDLE/py/$(basename "$TVM_DIST")"
    cp "$TVM_DIST/METADATA" "$BUNDLE/py/$(basename "$TVM_DIST")/"
    CUDA_ROOT=$("$PY" - <<'EOF'
import re, shutil
from pathlib import Path
nvcc = Path(shutil.which("nvcc")).resolve()
m = re.search(rb"(/\S+/bin/nvcc)", nvcc.read_bytes()[:512]) if nvcc.read_bytes()[:2] == b"#!" else None
print((Path(m.group(1).decode()).resolve() if m else nvcc).parent.parent)  # nvcc may be a wrapper script
EOF
)
    for d in "$CUDA_ROOT/lib" "$CUDA_ROOT/lib64" "$CUDA_ROOT/targets/x86_64-linux/lib"; do
        [ -e "$d/libcudart.so.13" ] && { cp -L "$d/libcudart.so.13" "$BUNDLE/cudart/"; break; }
    done
    [ -e "$BUNDLE/cudart/libcudart.so.13" ] || echo "warning: no libcudart.so.13 next to nvcc; the GPU's own must do" >&2
    for w in ${EXTRA_WHEELS:-}; do
        step "adding $w (cp312, pure Python)"
        "$PY" -m pip install -q --no-deps --only-binary=:all: --python-version "$GPU_PYTHON" --implementation cp \
            --target "$BUNDLE/py" "$w"
    done

    # -- 2. artifacts ----------------------------------------------------------------------------------------
    compile demo models/kiln-demo --target cuda --arch sm_90
    compile demo-nograph models/kiln-demo --target cuda --arch sm_90 --no-cuda-graph
    for shape in llama-3.2-1b llama-3-8b; do
        compile "$shape" "tools/gpu/configs/$shape" --config-only --target cuda --arch sm_90 --dtype float16 \
            --context-len "$CONTEXT_LEN"
    done
    compile llama-3.2-1b-nograph tools/gpu/configs/llama-3.2-1b --config-only --target cuda --arch sm_90 \
        --dtype float16 --context-len "$CONTEXT_LEN" --no-cuda-graph
    compile llama-3-8b-sm90a tools/gpu/configs/llama-3-8b --config-only --target cuda --arch sm_90a \
        --dtype float16 --context-len "$CONTEXT_LEN"
    mkdir -p "$BUNDLE/configs/llama-3-8b"  # what parity_hf.py builds transformers' side from
    cp tools/gpu/configs/llama-3-8b/config.json "$BUNDLE/configs/llama-3-8b/"
    DEMO_SRC=models/kiln-demo
    step "building kiln's tensor-core GEMM alone (tools/gpu/gemm.py)"
    "$PY" tools/gpu/gemm.py build "$BUNDLE/gemm" --arch sm_90 >/dev/null \
        || { echo "warning: tools/gpu/gemm.py build failed; the run will skip the gemm part" >&2; rm -rf "$BUNDLE/gemm"; }
else
    # A CPU stand-in: the same layout, the demo model and tiny shapes for the CPU, for the tests. Its runtime is
    # this venv's, laid out as on the device: tvm_ffi trimmed the same way into py/, TVM's runtime libraries in
    # tvmlib/ (the test runs it with the TVM compiler and the other modules the device lacks unimportable).
    step "smoke bundle: this Python's tvm_ffi and TVM's runtime libraries, trimmed"
    TVM_LIB=$("$PY" -c 'import importlib.util, os; print(os.path.join(list(importlib.util.find_spec("tvm").submodule_search_locations)[0], "lib"))')
    mkdir -p "$BUNDLE/tvmlib"
    cp "$TVM_LIB/libtvm_runtime.so" "$BUNDLE/tvmlib/"
    [ -e "$TVM_LIB/libtvm_runtime_cuda.so" ] && cp "$TVM_LIB/libtvm_runtime_cuda.so" "$BUNDLE/tvmlib/"
    "$PY" - "$BUNDLE/py" <<'EOF'
import importlib.util, shutil, sys
from importlib.metadata import distribution
from pathlib import Path
dest = Path(sys.argv[1])
src = Path(list(importlib.util.find_spec("tvm_ffi").submodule_search_locations)[0])
drop = {"3rdparty", "include", "src", "stub", "share", "cython", "testing", "CMakeLists.txt", "core.pyi"}  # (as above)
shutil.copytree(src, dest / "tvm_ffi", ignore=lambda d, names: [n for n in names if Path(d) == src and n in drop])
for name in ("apache-tvm-ffi", "apache-tvm"):
    dist = Path(distribution(name)._path)
    (dest / dist.name).mkdir(parents=True)
    shutil.copy(dist / "METADATA", dest / dist.name / "METADATA")
EOF
    step "smoke bundle: CPU artifacts"
    DEMO_SRC=models/kiln-demo
    "$PY" - "$SCRATCH/shapes" <<'EOF'
import json, sys
from pathlib import Path
shapes = Path(sys.argv[1])
for name in ("llama-3.2-1b", "llama-3-8b"):  # the real configs, shrunk: same features, toy sizes
    cfg = json.loads(Path(f"tools/gpu/configs/{name}/config.json").read_text())
    cfg.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, vocab_size=512, bos_token_id=1, eos_token_id=2)
    (shapes / name).mkdir(parents=True)
    (shapes / name / "config.json").write_text(json.dumps(cfg))
EOF
    compile demo "$DEMO_SRC"
    compile demo-nograph "$DEMO_SRC"  # no CUDA graphs on a CPU: the same artifact, for the same steps
    for shape in llama-3.2-1b llama-3-8b; do
        compile "$shape" "$SCRATCH/shapes/$shape" --config-only --context-len 256
    done
    compile llama-3.2-1b-nograph "$SCRATCH/shapes/llama-3.2-1b" --config-only --context-len 256
    compile llama-3-8b-sm90a "$SCRATCH/shapes/llama-3-8b" --config-only --context-len 256  # (a CPU twin)
    mkdir -p "$BUNDLE/configs/llama-3-8b"
    cp "$SCRATCH/shapes/llama-3-8b/config.json" "$BUNDLE/configs/llama-3-8b/"
fi
# demo-nograph has demo's weights: run_all.sh copies them back before using it, so they travel once
cmp "$BUNDLE/artifacts/demo/params.safetensors" "$BUNDLE/artifacts/demo-nograph/params.safetensors"
rm "$BUNDLE/artifacts/demo-nograph/params.safetensors"

# -- 3. the CPU's greedy tokens of the demo model, for the GPU to match -----------------------------------
if [ "$SMOKE" = 0 ]; then
    compile demo-cpu "$DEMO_SRC"
    CPU_DEMO="$BUNDLE/artifacts/demo-cpu"
    TOKENS=64
else
    CPU_DEMO="$BUNDLE/artifacts/demo"
    TOKENS=16
fi
step "recording the demo model's greedy tokens on the CPU"
"$PY" tools/gpu/demo_check.py record "$CPU_DEMO" --max-tokens "$TOKENS" --out "$BUNDLE/demo_cpu_greedy.json" >/dev/null
if [ "$SMOKE" = 0 ]; then
    rm -rf "$CPU_DEMO"
fi

# -- 4. the record, the packed bundle and its size ---------------------------------------------------------
COMPILE_SECONDS=$(for k in "${!SECONDS_OF[@]}"; do echo "$k=${SECONDS_OF[$k]}"; done)
"$PY" - "$BUNDLE" "$SMOKE" "$COMPILE_SECONDS" "$("$PY" tools/gpu/source_hash.py "$ROOT")" <<'EOF'
import json, subprocess, sys, time
from pathlib import Path
bundle, smoke, seconds = Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3]
def size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
parts = {p.name: size(p) for p in sorted(bundle.iterdir())}
parts.update({f"artifacts/{p.name}": size(p) for p in sorted((bundle / "artifacts").iterdir())})
head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip())
from importlib.metadata import version
record = {"built": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "smoke": smoke, "git_head": head, "git_dirty": dirty,
          "kiln_sources": sys.argv[4],
          "python_for": "cp312", "tvm": version("apache-tvm"), "tvm_ffi": version("apache-tvm-ffi"),
          "compile_seconds": dict(kv.split("=") for kv in seconds.split()), "bytes": parts, "total_bytes": size(bundle)}
for name in ("llama-3.2-1b", "llama-3-8b", "demo"):
    m = json.loads((bundle / "artifacts" / name / "manifest.json").read_text())
    record.setdefault("artifacts", {})[name] = {"target": m["target"], "dtype": m["spec"]["dtype"],
        "context_len": m["spec"]["context_len"], "weights": m["weights"], "tokenizer": m["tokenizer"]}
(bundle / "bundle.json").write_text(json.dumps(record, indent=2) + "\n")
EOF
step "packing $BUNDLE.tar.xz"
if command -v xz >/dev/null; then
    tar -C "$BUNDLE" -cf - . | xz -6 -T0 >"$BUNDLE.tar.xz"
else
    "$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1], "w:xz").add(sys.argv[2], arcname=".")' "$BUNDLE.tar.xz" "$BUNDLE"
fi
"$PY" - "$BUNDLE" "$CALL_LIMIT_MIB" <<'EOF'
import json, subprocess, sys
from pathlib import Path
bundle, call_limit = Path(sys.argv[1]), int(sys.argv[2])
MiB = 1 << 20
tree = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], capture_output=True, check=True).stdout
tree_bytes = sum(Path(f).stat().st_size for f in tree.decode().split("\0") if f and Path(f).is_file())
record = json.loads((bundle / "bundle.json").read_text())
packed = Path(f"{bundle}.tar.xz").stat().st_size
for k, v in record["bytes"].items():
    print(f"  {k:<28} {v / MiB:8.2f} MiB")
print(f"  {'bundle total':<28} {record['total_bytes'] / MiB:8.2f} MiB")
print(f"  {'packed (.tar.xz)':<28} {packed / MiB:8.2f} MiB")
print(f"  {'+ working tree':<28} {(packed + tree_bytes) / MiB:8.2f} MiB (a GPU call takes {call_limit})")
if packed + tree_bytes > call_limit * MiB:
    sys.exit(f"packed bundle + working tree = {(packed + tree_bytes) / MiB:.1f} MiB, over the {call_limit} MiB a GPU call takes")
EOF
step "done: $BUNDLE and $BUNDLE.tar.xz"
