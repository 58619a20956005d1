"""The one place kiln imports churn-prone TVM (compiler-side) names.

TVM 0.27 renamed much of its Python API (tir -> tirx, dlight -> s_tir.dlight, StructInfo -> types);
every compile-side module imports TVM through here so the next rename is one edit.

Importing this module also prepares CUDA cross-compilation on a host without a GPU: TVM only
emits real machine code (a fatbin) when ``libtvm_runtime_cuda.so`` loads, which needs a
``libcuda.so.1``. Where no driver is installed, a stub driver (every entry point returns
CUDA_ERROR_NO_DEVICE) is built with the system C compiler and preloaded, and nvcc is selected as
the CUDA compiler. Without it TVM silently keeps CUDA *source* in the library (see
shared/notes/tvm-0.27.md section 2.2). The runtime never imports this module.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

_STUB_SYMBOLS = (
    "cuDeviceGetName", "cuFuncSetAttribute", "cuGetErrorName", "cuGetErrorString", "cuLaunchKernelEx",
    "cuModuleGetFunction", "cuModuleLoadData", "cuModuleUnload", "cuTensorMapEncodeTiled",
)


def _cuda_root() -> Path | None:
    if os.environ.get("CUDA_PATH"):
        return Path(os.environ["CUDA_PATH"])
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    path = Path(nvcc).resolve()
    # nvcc may be a shell wrapper (exec /usr/local/cuda-X/bin/nvcc "$@"): follow it.
    try:
        head = path.read_bytes()[:512]
        if head.startswith(b"#!"):
            for tok in head.decode(errors="ignore").split():
                if tok.endswith("/bin/nvcc") and Path(tok).exists():
                    path = Path(tok).resolve()
                    break
    except OSError:
        return None
    return path.parent.parent


def _preload_cuda_driver() -> str:
    """Make ``libcuda.so.1`` resolvable before TVM loads its CUDA runtime; return which one."""
    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
        return "driver"
    except OSError:
        pass
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return "none"
    cache = Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln")) / "cuda-stub"
    lib = cache / "libcuda.so.1"
    if not lib.exists():
        cache.mkdir(parents=True, exist_ok=True)
        src = cache / "cuda_stub.c"
        src.write_text("".join(f"int {s}(void) {{ return 100; }}\n" for s in _STUB_SYMBOLS))
        tmp = cache / f"libcuda.so.1.{os.getpid()}"
        r = subprocess.run([cc, "-shared", "-fPIC", "-o", str(tmp), str(src), "-Wl,-soname,libcuda.so.1"],
                           capture_output=True)
        if r.returncode != 0:
            return "none"
        tmp.replace(lib)
    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    return "stub"


CUDA_DRIVER = _preload_cuda_driver()
os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")
if (_root := _cuda_root()) is not None:
    os.environ.setdefault("CUDA_PATH", str(_root))

import tvm  # noqa: E402
from tvm import relax, te, tirx, topi  # noqa: E402
from tvm.ir import IRModule  # noqa: E402
from tvm.ir.expr import TensorLoad  # noqa: E402  (was tvm.tir.BufferLoad)
from tvm.relax.expr_functor import PyExprMutator, mutator  # noqa: E402
from tvm.relax.frontend.nn.llm.kv_cache import RopeMode, TIRPagedKVCache  # noqa: E402
from tvm.s_tir import dlight  # noqa: E402
from tvm.target import Target  # noqa: E402
from tvm_ffi import structural_equal  # noqa: E402  (was tvm.ir.structural_equal)

TVM_VERSION = tvm.__version__


def _register_kiln_errors() -> None:
    """Let kiln's errors cross TVM's FFI with their type: a PassError raised inside a module pass
    (called through C++) would otherwise come back to the caller as a plain RuntimeError."""
    import tvm_ffi

    from .. import errors

    for cls in vars(errors).values():
        if isinstance(cls, type) and issubclass(cls, errors.KilnError):
            tvm_ffi.register_error(cls.__name__, cls)


_register_kiln_errors()


def frontend(name: str):
    """TVM's importer ``tvm.relax.frontend.<name>`` ("torch": ``from_exported_program``, "onnx":
    ``from_onnx``), imported on first use because the torch one imports torch."""
    import importlib

    return importlib.import_module(f"tvm.relax.frontend.{name}")


def cuda_runtime_loaded() -> bool:
    """True when TVM's CUDA runtime loaded, so CUDA builds embed machine code, not source."""
    from tvm import base

    return "tvm_runtime_cuda" in getattr(base, "_LOADED_LIBS", {})


__all__ = [
    "CUDA_DRIVER", "IRModule", "PyExprMutator", "RopeMode", "TIRPagedKVCache", "TVM_VERSION", "Target",
    "cuda_runtime_loaded", "dlight", "frontend", "mutator", "relax", "structural_equal", "te", "tirx", "topi", "tvm",
]
