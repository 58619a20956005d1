"""Load TVM's runtime alone: ``libtvm_runtime.so`` through ctypes and the ``tvm_ffi`` package.

A served artifact runs where only the runtime is installed: this module never imports ``tvm``
(whose import loads the 250 MB compiler library). It finds the runtime libraries in, in order,
``$KILN_TVM_LIB_DIR``, ``$TVM_LIBRARY_PATH`` or the installed ``tvm`` package's ``lib/`` folder
(located from package metadata, without importing it).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from functools import cache
from pathlib import Path

from ..errors import ArtifactError

DEVICE_TYPES = {"cpu": 1, "cuda": 2}


def _lib_dirs() -> list[Path]:
    dirs = [Path(p) for p in (os.environ.get("KILN_TVM_LIB_DIR"), os.environ.get("TVM_LIBRARY_PATH")) if p]
    spec = importlib.util.find_spec("tvm")
    if spec is not None and spec.submodule_search_locations:
        dirs.append(Path(list(spec.submodule_search_locations)[0]) / "lib")
    return dirs


def _find(name: str) -> Path:
    for d in _lib_dirs():
        if (d / name).exists():
            return d / name
    raise ArtifactError(f"cannot find {name}: install apache-tvm or set KILN_TVM_LIB_DIR to a folder holding it")


@cache
def require_cuda() -> None:
    """A CUDA artifact runs where torch sees a CUDA GPU (the runner hands its tensors to the VM through torch);
    elsewhere one line says so, instead of a driver error from deep inside torch or TVM."""
    import torch

    if not torch.cuda.is_available():
        raise ArtifactError("this artifact was compiled for a CUDA GPU and torch sees none on this machine "
                            "(torch.cuda.is_available() is False); compile the model with --target cpu to run it here")


def load_runtime(device: str = "cpu"):
    """Load the TVM runtime for ``device`` once per process; return the ``tvm_ffi`` module."""
    import tvm_ffi

    if device == "cuda":
        require_cuda()
    ctypes.CDLL(str(_find("libtvm_runtime.so")), mode=ctypes.RTLD_GLOBAL)
    if device == "cuda":
        try:
            ctypes.CDLL(str(_find("libtvm_runtime_cuda.so")), mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            raise ArtifactError(f"this artifact runs on a CUDA GPU, but TVM's CUDA runtime cannot load here ({e})") \
                from None
    return tvm_ffi


def global_func(name: str):
    import tvm_ffi

    f = tvm_ffi.get_global_func(name, allow_missing=True)
    if f is None:
        raise ArtifactError(f"the TVM runtime lacks {name}; is libtvm_runtime.so from apache-tvm 0.27?")
    return f
