"""CUDA cross-compilation without a GPU: ``model.so`` must hold machine code (a cubin inside a fatbin)
for the requested arch, not CUDA source; plus kiln/codegen/targets.py as data.

The compiles run in a subprocess each (one per arch/dtype, shared by the tests of that artifact), so
that a crash inside TVM (e.g. the fp16 Tensorize segfault of shared/notes/tvm-0.27.md 2.4) fails
the test with its exit status and stderr instead of killing the test session.

Why the fatbin is parsed here: TVM keeps the CUDA module's fatbin inside its own serialized module
blob in ``model.so``, not in an ``.nv_fatbin`` section, so ``cuobjdump model.so`` reports "does not
contain device code". The test finds the fatbin (magic 0xBA55ED50), reads its entries (kind 2 = ELF
cubin, kind 1 = PTX; the arch of each) and cross-checks the extracted fatbin with cuobjdump.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.codegen.targets import CUDA_ARCHS, TargetSpec, resolve_target
from kiln.errors import TargetError

ROOT = Path(__file__).resolve().parents[2]
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc (the CUDA toolkit) is not on PATH; "
                                                     "CUDA cross-compilation needs it")

FATBIN_MAGIC = 0xBA55ED50
FATBIN_KIND_PTX, FATBIN_KIND_ELF = 1, 2
EM_CUDA = 190
# The paged-attention kernels of TVM's KV cache must be in the cubin as machine code.
KV_KERNELS = ("batch_prefill_paged_kv_kernel", "batch_decode_paged_kv_kernel", "batch_prefill_ragged_kv_kernel")

BUILDS = [("sm_80", "float32"), ("sm_90", "float32"), ("sm_90", "float16")]

_COMPILE = """
import json, sys
from kiln.compiler import CompileConfig, compile_model
r = compile_model(sys.argv[1], sys.argv[2], CompileConfig(target="cuda", arch=sys.argv[3], dtype=sys.argv[4]))
print("KILN_REPORT " + json.dumps({"seconds": r.seconds, "artifact_bytes": r.artifact_bytes}))
"""


# ---------------------------------------------------------------------------------- fatbin reading


def fatbins(data: bytes) -> list[bytes]:
    """Every fatbin (header + entries) embedded in ``data``."""
    out, pos = [], 0
    magic = struct.pack("<I", FATBIN_MAGIC)
    while (pos := data.find(magic, pos)) >= 0:
        _, version, header_size, size = struct.unpack_from("<IHHQ", data, pos)
        if version == 1 and header_size == 16 and pos + header_size + size <= len(data):
            out.append(data[pos:pos + header_size + size])
            pos += header_size + size
        else:
            pos += 4
    return out


def fatbin_entries(fatbin: bytes) -> list[tuple[int, int, bytes]]:
    """(kind, sm arch number, payload) for each entry of one fatbin."""
    _, _, header_size, size = struct.unpack_from("<IHHQ", fatbin, 0)
    entries, pos = [], header_size
    while pos < header_size + size:
        kind, _, entry_header, payload = struct.unpack_from("<HHIQ", fatbin, pos)
        arch = struct.unpack_from("<I", fatbin, pos + 28)[0]
        entries.append((kind, arch, fatbin[pos + entry_header:pos + entry_header + payload]))
        pos += entry_header + payload
    return entries


def find_cuobjdump() -> str | None:
    """Next to nvcc (following its wrapper), on PATH, or the copy bundled with triton."""
    from kiln.ir.tvm import _cuda_root

    candidates = []
    if (root := _cuda_root()) is not None:
        candidates.append(root / "bin" / "cuobjdump")
    if (on_path := shutil.which("cuobjdump")) is not None:
        candidates.append(Path(on_path))
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    return next((str(c) for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)


# ---------------------------------------------------------------------------------- the builds


@pytest.fixture(scope="module", params=BUILDS, ids=[f"{a}-{d}" for a, d in BUILDS])
def cuda_artifact(request, zoo, workdir):
    """(arch, dtype, artifact dir, compile report) for the conftest "llama" variant."""
    if NVCC is None:
        pytest.skip("nvcc (the CUDA toolkit) is not on PATH; CUDA cross-compilation needs it")
    arch, dtype = request.param
    model_dir, _ = zoo.hf("llama")
    out = workdir / f"cuda-llama-{arch}-{dtype}"
    proc = subprocess.run([sys.executable, "-c", _COMPILE, str(model_dir), str(out), arch, dtype], cwd=ROOT,
                          env={**os.environ}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (
        f"compile for {arch} {dtype} exited with {proc.returncode}"
        f"{' (killed by signal ' + str(-proc.returncode) + ')' if proc.returncode < 0 else ''}:\n"
        f"{proc.stderr[-4000:]}")
    report = json.loads(proc.stdout.split("KILN_REPORT ", 1)[1])
    so = out / "model.so"
    print(f"\n[cuda {arch} {dtype}] {report['seconds']} model.so {so.stat().st_size / 1e6:.2f} MB")
    return arch, dtype, out, report


@needs_nvcc
@pytest.mark.cuda_compile
def test_library_holds_a_cubin_for_the_arch(cuda_artifact):
    arch, _, out, _ = cuda_artifact
    data = (out / "model.so").read_bytes()
    fbs = fatbins(data)
    assert len(fbs) == 1, f"expected one fatbin in model.so, found {len(fbs)}"
    entries = fatbin_entries(fbs[0])
    sm = int(arch[3:5])
    assert {(kind, a) for kind, a, _ in entries} == {(FATBIN_KIND_ELF, sm)}, \
        f"fatbin entries (kind, arch) {[(k, a) for k, a, _ in entries]}; want only an ELF cubin for sm_{sm}"
    (_, _, elf), = entries
    assert elf[:4] == b"\x7fELF" and struct.unpack_from("<H", elf, 18)[0] == EM_CUDA
    kernels = set(re.findall(rb"\.text\.([A-Za-z0-9_]+)", elf))
    assert len(kernels) > 20
    for k in KV_KERNELS:
        assert k.encode() in kernels, f"{k} is not in the cubin"


@needs_nvcc
@pytest.mark.cuda_compile
def test_symbolic_linears_dispatch_small_batches_to_a_gemv(cuda_artifact):
    """Every linear over the token count (fused QKV, o, gate/up, down, lm_head of batch_prefill and
    batch_decode) is one kernel per cuda_gemv.LOW_BATCH branch plus the GEMM."""
    from kiln.codegen.cuda_gemv import LOW_BATCH

    (fb,) = fatbins((cuda_artifact[2] / "model.so").read_bytes())
    (_, _, elf), = fatbin_entries(fb)
    kernels = {k.decode() for k in re.findall(rb"\.text\.([A-Za-z0-9_]+)", elf)}
    last = len(LOW_BATCH)  # kernels of one PrimFunc are NAME_kernel, NAME_kernel_1, ...
    dispatched = {k.removesuffix(f"_kernel_{last}") for k in kernels if "matmul" in k and k.endswith(f"_kernel_{last}")}
    assert len(dispatched) >= 5, sorted(kernels)
    for name in dispatched:
        assert {f"{name}_kernel"} | {f"{name}_kernel_{i}" for i in range(1, last + 1)} <= kernels


@needs_nvcc
@pytest.mark.cuda_compile
def test_decode_steps_replay_cuda_graphs(cuda_artifact):
    """decode and batch_decode run their kernels through captured CUDA graphs (codegen/cuda_graph.py);
    the prefills launch theirs; the manifest records the batch bound the runner enforces."""
    data = (cuda_artifact[2] / "model.so").read_bytes()
    assert b"vm.builtin.cuda_graph.run_or_capture" in data
    captured = set(re.findall(rb"([a-z_]+)_cuda_graph_capture", data))
    # prefill's tail after its last-row gather (final norm and lm_head on [1, H]) is static: one graph that every
    # prefill replays; batch_prefill's tail runs over its symbolic row count and stays launched by the VM
    assert captured == {b"decode", b"batch_decode", b"prefill"}, captured
    options = json.loads((cuda_artifact[2] / "manifest.json").read_text())["options"]
    assert options["max_batch_size"] == 256


@needs_nvcc
@pytest.mark.cuda_compile
def test_kiln_compile_reports_the_cuda_build_phases(zoo, tmp_path):
    """The CUDA build is a compile's long step: `kiln compile` prints a line as each phase begins, and no warning
    of TVM's (it used to print "Fast mode segfaults ..." on every build)."""
    model_dir, _ = zoo.hf("llama")
    proc = subprocess.run([sys.executable, "-m", "kiln.cli", "compile", str(model_dir), "-o", str(tmp_path / "a"),
                           "--target", "cuda", "--arch", "sm_90", "--context-len", "64"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    phases = [ln.split("build: ", 1)[1] for ln in proc.stderr.splitlines() if "build: " in ln]
    assert phases == ["legalizing and fusing the operators", "scheduling the kernels (dlight, tensor-core matmuls)",
                      "lowering the kernels and compiling them with nvcc"], proc.stderr
    assert "warning" not in proc.stderr.lower(), proc.stderr


@needs_nvcc
@pytest.mark.cuda_compile
def test_no_cuda_graph_leaves_every_launch_to_the_vm(zoo, tmp_path):
    model_dir, _ = zoo.hf("llama")
    out = tmp_path / "nograph"
    proc = subprocess.run([sys.executable, "-m", "kiln.cli", "compile", str(model_dir), "-o", str(out), "-q",
                           "--target", "cuda", "--arch", "sm_90", "--no-cuda-graph"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert b"_cuda_graph_capture" not in (out / "model.so").read_bytes()
    options = json.loads((out / "manifest.json").read_text())["options"]
    assert options["max_batch_size"] is None


@needs_nvcc
@pytest.mark.cuda_compile
def test_library_holds_no_cuda_source(cuda_artifact):
    data = (cuda_artifact[2] / "model.so").read_bytes()
    # (launch-parameter tags such as "threadIdx.x" are legitimately in TVM's kernel table; not source)
    for marker in (b"__global__", b'extern "C"', b"#include <cuda", b"__launch_bounds__", b"__syncthreads"):
        assert marker not in data, f"model.so contains CUDA source ({marker!r})"


@needs_nvcc
@pytest.mark.cuda_compile
def test_cuobjdump_sees_sass_for_the_arch(cuda_artifact, tmp_path):
    arch = cuda_artifact[0]
    tool = find_cuobjdump()
    assert tool is not None, "no cuobjdump next to nvcc, on PATH or in triton; it comes with the CUDA toolkit"
    (fb,) = fatbins((cuda_artifact[2] / "model.so").read_bytes())
    path = tmp_path / "model.fatbin"
    path.write_bytes(fb)
    elf = subprocess.run([tool, "--list-elf", str(path)], capture_output=True, text=True, timeout=120)
    assert elf.returncode == 0, elf.stderr
    assert re.findall(r"ELF file\s+\d+: \S+\.(sm_\d+a?)\.cubin", elf.stdout) == [arch], elf.stdout
    ptx = subprocess.run([tool, "--list-ptx", str(path)], capture_output=True, text=True, timeout=120)
    assert "PTX file" not in ptx.stdout, ptx.stdout  # machine code only, nothing left to JIT
    sass = subprocess.run([tool, "-sass", str(path)], capture_output=True, text=True, timeout=300)
    assert sass.returncode == 0, sass.stderr
    assert f"arch = {arch}" in sass.stdout
    functions = set(re.findall(r"Function : (\S+)", sass.stdout))
    assert set(KV_KERNELS) <= functions
    assert re.search(r"/\*0000\*/\s+[A-Z]", sass.stdout)  # real instructions
    if cuda_artifact[1] == "float16":
        # the prefill gate/up matmul (N = 2 x 128, K = 64) goes through kiln's mma.sync rule with cp.async
        assert re.search(r"\bHMMA\.16816\.F32\b", sass.stdout) and re.search(r"\bLDGSTS\b", sass.stdout)


@needs_nvcc
@pytest.mark.cuda_compile
def test_manifest_and_inspect_record_the_arch(cuda_artifact):
    from click.testing import CliRunner

    from kiln.cli import main

    arch, dtype, out, _ = cuda_artifact
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == {"name": "cuda", "arch": arch, "device": "cuda"}
    assert manifest["spec"]["dtype"] == dtype
    res = CliRunner().invoke(main, ["inspect", str(out)])
    assert res.exit_code == 0, res.output
    assert re.search(rf"^target\s+cuda {arch}$", res.output, re.M), res.output
    assert f"LlamaForCausalLM, {dtype}" in res.output
    res = CliRunner().invoke(main, ["inspect", str(out), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["target"] == {"name": "cuda", "arch": arch, "device": "cuda"}


# ---------------------------------------------------------------------------------- targets.py


def test_resolve_cpu():
    t = resolve_target("cpu", "x86-64")
    assert t == TargetSpec("cpu") and t.arch is None and t.device == "cpu"
    assert t.describe() == {"name": "cpu", "arch": None, "device": "cpu"}


@pytest.mark.parametrize("arch", list(CUDA_ARCHS))
def test_resolve_every_cuda_arch(arch):
    t = resolve_target("cuda", arch)
    assert (t.name, t.arch, t.device) == ("cuda", arch, "cuda")
    assert t.describe() == {"name": "cuda", "arch": arch, "device": "cuda"}


def test_cuda_defaults_to_sm_90():
    assert resolve_target("cuda") == TargetSpec("cuda", "sm_90")
    assert resolve_target("cuda", None).arch == "sm_90"


def test_known_archs():
    assert set(CUDA_ARCHS) == {"sm_80", "sm_86", "sm_89", "sm_90", "sm_90a"}
    assert all(a.max_shared_memory_per_block > 0 and a.gpus for a in CUDA_ARCHS.values())


@pytest.mark.parametrize("name", ["gpu", "rocm", "llvm", "CUDA", "metal", ""])
def test_rejects_unknown_target(name):
    with pytest.raises(TargetError, match="unknown target"):
        resolve_target(name)


@pytest.mark.parametrize("arch", ["sm_70", "sm_100", "90", "sm90", "compute_90", "SM_90"])
def test_rejects_unknown_cuda_arch(arch):
    with pytest.raises(TargetError, match=rf"unknown CUDA arch '{arch}'; kiln knows sm_80"):
        resolve_target("cuda", arch)


def test_rejects_cuda_arch_for_cpu():
    with pytest.raises(TargetError, match=r"unknown CPU arch 'sm_90'.*--arch sm_XX is for --target cuda"):
        resolve_target("cpu", "sm_90")


def test_cpu_archs():
    assert resolve_target("cpu") == resolve_target("cpu", "native") == TargetSpec("cpu", "native")
    assert resolve_target("cpu", "x86-64") == TargetSpec("cpu")
    v3 = resolve_target("cpu", "x86-64-v3")
    assert v3.describe()["cpu_flags"] and "avx2" in v3.describe()["cpu_flags"]
    assert "cpu_flags" not in resolve_target("cpu", "x86-64").describe()
    from kiln.cpu_features import host_cpu_flags

    native = resolve_target("cpu").describe()  # the host's own CPU, as -march=native
    assert native["mcpu"] and set(native["cpu_flags"]) <= (host_cpu_flags() or set())
    assert resolve_target("cpu").tvm_target().attrs["mcpu"] == native["mcpu"]


@pytest.mark.cpu
@pytest.mark.parametrize("arch", list(CUDA_ARCHS))
def test_tvm_target_carries_the_arch(arch):
    t = resolve_target("cuda", arch).tvm_target()
    assert t.kind.name == "cuda" and str(t.attrs["arch"]) == arch
    assert int(t.attrs["max_shared_memory_per_block"]) == CUDA_ARCHS[arch].max_shared_memory_per_block
    assert t.host is not None and t.host.kind.name == "llvm"
    assert resolve_target("cpu").tvm_target().kind.name == "llvm"


@needs_nvcc
@pytest.mark.cuda_compile
@pytest.mark.parametrize("command", [["bench", "--mode", "latency", "--batch-sizes", "1", "--input-len", "4",
                                      "--output-len", "2"],
                                     ["serve", "--port", "0"], ["chat"], ["generate", "--prompt", "hi"]],
                         ids=lambda c: c[0])
def test_a_cuda_artifact_on_a_machine_without_a_gpu_is_one_line(cuda_artifact, command):
    """``kiln serve``, ``chat``, ``bench`` and ``generate`` on a CUDA artifact where torch sees no GPU: one
    ``error:`` line and exit 1, not a driver traceback from inside torch (kiln/runtime/tvm_runtime.py
    ``require_cuda``). The subprocess sees no GPU (``CUDA_VISIBLE_DEVICES=""``) on any host, GPU or not."""
    from test_cli import assert_user_error

    proc = subprocess.run([sys.executable, "-m", "kiln.cli", command[0], str(cuda_artifact[2]), *command[1:]],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 1
    assert_user_error(proc, "compiled for a CUDA GPU", "--target cpu")
