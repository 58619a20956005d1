"""Quantized models cross-compiled for CUDA (sm_90) without a GPU: each scheme kind's kernels
(kiln/ir/quant_kernels.py, scheduled by dlight) end up as sm_90 machine code in ``model.so``.

Compiled from config.json alone (``--config-only``: the layout is what matters here; the numerics are
tested on the CPU in tests/quant and tests/passes/test_quantize.py), in a subprocess each so a TVM crash
fails the test instead of the session.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from test_cuda_compile import NVCC, ROOT, fatbins, find_cuobjdump

pytestmark = [pytest.mark.cuda_compile,
              pytest.mark.skipif(NVCC is None, reason="nvcc (the CUDA toolkit) is not on PATH")]

_COMPILE = """
import sys
from kiln.compiler import CompileConfig, compile_model
compile_model(sys.argv[1], sys.argv[2], CompileConfig(target="cuda", arch="sm_90", dtype="float16", config_only=True,
                                                      quant=sys.argv[3]))
"""
KERNELS = {"rtn-w4g128": ("dequant_matmul",), "w4a8": ("quantize_per_token", "w4a8_matmul"),
           "w8a8": ("quantize_per_token", "w8a8_matmul")}


@pytest.mark.parametrize("scheme", list(KERNELS))
def test_quantized_kernels_compile_to_sm90(scheme, zoo, tmp_path):
    model_dir, _ = zoo.hf("llama")
    out = tmp_path / "art"
    proc = subprocess.run([sys.executable, "-c", _COMPILE, str(model_dir), str(out), scheme], cwd=ROOT,
                          env={**os.environ}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["quant"] == scheme and manifest["weights"] == "none"
    assert any(n.endswith(".qweight") for n in manifest["param_shapes"])
    (fb,) = fatbins((out / "model.so").read_bytes())
    path = tmp_path / "model.fatbin"
    path.write_bytes(fb)
    tool = find_cuobjdump()
    assert tool is not None
    sass = subprocess.run([tool, "-sass", str(path)], capture_output=True, text=True, timeout=300)
    assert sass.returncode == 0 and "code for sm_90" in sass.stdout
    functions = " ".join(re.findall(r"Function : (\S+)", sass.stdout))
    for kernel in KERNELS[scheme]:
        assert kernel in functions, (kernel, functions[:2000])
