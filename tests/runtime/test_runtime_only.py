"""The runtime runs an artifact with the TVM runtime alone: no ``import tvm``, no libtvm_compiler.so,
no compile-side kiln module."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cpu

ROOT = Path(__file__).resolve().parents[2]
KILN = ROOT / "kiln"
COMPILE_SIDE = ("kiln.frontend", "kiln.passes", "kiln.codegen", "kiln.ir.tvm", "kiln.ir.attention",
                "kiln.ir.verify", "kiln.compiler")


def _forbidden(module: str) -> bool:
    return module == "tvm" or module.startswith("tvm.") or any(
        module == m or module.startswith(m + ".") for m in COMPILE_SIDE)


def run_python(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON object as its last line."""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


PROCESS_REPORT = """
import json, sys
maps = open("/proc/self/maps").read().splitlines()
report = {
    "modules": sorted(sys.modules),
    "compiler_maps": [l for l in maps if "libtvm_compiler" in l],
    "runtime_mapped": any("libtvm_runtime" in l for l in maps),
}
"""


@pytest.fixture(scope="module")
def art(zoo) -> Path:
    return zoo.artifact("llama", dtype="float32")


def test_generate_with_runtime_only(art):
    code = f"""
from kiln.runtime import LLM, SamplingParams
llm = LLM({str(art)!r})
(res,) = llm.generate(["w5 w6 w7 w8"], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
{PROCESS_REPORT}
report["tokens"] = res.token_ids
print(json.dumps(report))
"""
    report = run_python(code)
    assert "tvm" not in report["modules"]
    assert [m for m in report["modules"] if _forbidden(m)] == []
    assert report["compiler_maps"] == []
    assert report["runtime_mapped"]  # the check above is meaningful: the runtime library was loaded
    assert "kiln.runtime.model_runner" in report["modules"] and "tvm_ffi" in report["modules"]

    from kiln.runtime import LLM, SamplingParams

    (ref,) = LLM(art).generate(["w5 w6 w7 w8"], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    assert len(ref.token_ids) == 10
    assert report["tokens"] == ref.token_ids


def test_runtime_package_imports_no_compile_side_module():
    code = f"""
import importlib, pkgutil
import kiln.runtime
for m in pkgutil.walk_packages(kiln.runtime.__path__, "kiln.runtime."):
    importlib.import_module(m.name)
{PROCESS_REPORT}
print(json.dumps(report))
"""
    report = run_python(code)
    mods = report["modules"]
    assert {"kiln.runtime.llm", "kiln.runtime.kv_cache", "kiln.runtime.model_runner", "kiln.artifact"} <= set(mods)
    assert [m for m in mods if _forbidden(m)] == []
    assert report["compiler_maps"] == []


# -- statically, including imports inside functions (which the import checks above cannot see) --------


def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] != "kiln":
        return None
    base = ROOT.joinpath(*parts)
    if (base / "__init__.py").exists():
        return base / "__init__.py"
    if base.with_suffix(".py").exists():
        return base.with_suffix(".py")
    return None


def _imports(name: str, path: Path) -> set[str]:
    """Every module ``path`` imports anywhere (top level or inside functions), as absolute names."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import submodule`
    # importing a.b.c runs a/__init__ and a/b/__init__ too
    return {".".join(m.split(".")[:i]) for m in out for i in range(1, len(m.split(".")) + 1)}


def test_runtime_sources_never_reach_the_compiler():
    roots = sorted("kiln.runtime" + ("" if p.stem == "__init__" else "." + p.stem)
                   for p in (KILN / "runtime").glob("*.py"))
    assert "kiln.runtime.model_runner" in roots
    seen, todo, via = set(), list(roots), {}
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _module_file(name)
        if path is None:
            continue
        for dep in _imports(name, path):
            if dep not in seen:
                via.setdefault(dep, name)
                todo.append(dep)
    bad = sorted(m for m in seen if _forbidden(m))
    assert bad == [], [f"{m} (imported by {via[m]})" for m in bad]
    assert "kiln.artifact" in seen and "tvm_ffi" in seen  # the walk did follow the runtime's imports
