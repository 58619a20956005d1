"""kiln's layering, checked on the source: every import in kiln/ (module level or inside a function,
relative ones resolved) goes to its own layer or a lower one of ``LAYERS``; the serving side imports
nothing of the compile side; the module graph has no cycles. Pure ``ast``: nothing of kiln is imported.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

KILN = Path(__file__).resolve().parent.parent / "kiln"

# Lowest layer first; a module may import its own layer and the layers before it. Paths are relative
# to kiln/ (a folder ends in "/"); a file takes the layer of its longest matching path. The order is the
# code's: a pass rewrites IR and reads nothing but ir/; frontend/graph.py runs the recognition passes on
# an imported graph; quant/calibrate.py reads a checkpoint through frontend/; passes/pipeline.py, where
# import, quantization and the rewrites meet, sits above them all; the artifact lies between the compile
# side, which writes it, and the serving side, which reads it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("__init__.py", "errors.py", "cpu_features.py", "byte_level.py", "progress.py")),  # no kiln imports
    ("ir", ("ir/",)),
    ("passes", ("passes/",)),
    ("frontend", ("frontend/",)),
    ("quant", ("quant/",)),
    ("codegen", ("codegen/",)),
    ("pipeline", ("passes/pipeline.py",)),
    ("artifact", ("artifact.py",)),
    ("compiler", ("compiler.py",)),
    ("scheduler", ("scheduler/",)),
    ("runtime", ("runtime/",)),
    ("server", ("server/",)),
    ("bench", ("bench/",)),
    ("cli", ("cli.py",)),
]
# The runtime runs an artifact without the TVM compiler: the serving side imports no compile-side layer
# (the linear order above alone would let it).
SERVING = {"scheduler", "runtime", "server", "bench"}
COMPILE = {"passes", "frontend", "quant", "codegen", "pipeline", "compiler"}

# (importing file, imported layer): allowed upward imports, each with its reason
UPWARD_EXCEPTIONS: dict[tuple[str, str], str] = {}
# import cycles allowed for now (sets of module names; one that is gone passes too)
KNOWN_CYCLES: list[set[str]] = []  # none: a cycle found here is fixed, not listed


@dataclass(frozen=True)
class Import:
    file: str  # relative to kiln/
    line: int
    module: str  # the kiln module imported (a package's __init__ is the package name)
    type_only: bool  # under ``if TYPE_CHECKING:``


def module_name(rel: str) -> str:
    parts = ["kiln", *Path(rel).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p.relative_to(KILN).as_posix()): p.relative_to(KILN).as_posix()
           for p in sorted(KILN.rglob("*.py"))}


def layer_of(rel: str) -> str:
    found = [(len(p), name) for name, paths in LAYERS for p in paths
             if rel == p or (p.endswith("/") and rel.startswith(p))]
    assert found, f"kiln/{rel} is in no layer of tests/test_layers.py's LAYERS: put it in one"
    return max(found)[1]


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            out |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return out


def _resolve(name: str) -> str:
    """The kiln module a dotted name is or lies in (``kiln.quant.schemes.Calibration`` -> ``kiln.quant.schemes``)."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def imports_of(rel: str, source: str | None = None) -> list[Import]:
    """Every import of a kiln module in kiln/``rel`` (or in ``source``, as if it were that file), at any depth."""
    tree = ast.parse((KILN / rel).read_text() if source is None else source, filename=rel)
    type_only = _type_checking_nodes(tree)
    me = module_name(rel)
    package = me if rel.endswith("__init__.py") else me.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                assert base, f"kiln/{rel}:{node.lineno}: a relative import above kiln"
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # ``from . import formats`` imports a module, ``from .schemes import X`` a name of one
            names = [f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source for a in node.names]
        else:
            continue
        for name in names:
            if name == "kiln" or name.startswith("kiln."):
                out.append(Import(rel, node.lineno, _resolve(name), id(node) in type_only))
    return out


ALL_IMPORTS = [imp for rel in MODULES.values() for imp in imports_of(rel)]
RANK = {name: i for i, (name, _) in enumerate(LAYERS)}


def test_every_module_is_in_a_layer():
    paths = [p for _, ps in LAYERS for p in ps]
    assert len(paths) == len(set(paths)), "a path is listed in two layers"
    for rel in MODULES.values():
        layer_of(rel)


def test_imports_go_down_the_layers():
    bad = []
    for imp in ALL_IMPORTS:
        mine, theirs = layer_of(imp.file), layer_of(MODULES[imp.module])
        if RANK[theirs] > RANK[mine] and (imp.file, theirs) not in UPWARD_EXCEPTIONS:
            bad.append(f"kiln/{imp.file}:{imp.line}: {mine} imports {imp.module} ({theirs}, a higher layer)")
    assert not bad, "imports against the layer order (tests/test_layers.py LAYERS):\n" + "\n".join(bad)


def test_the_serving_side_imports_no_compile_side():
    bad = [f"kiln/{imp.file}:{imp.line}: {layer_of(imp.file)} imports {imp.module}" for imp in ALL_IMPORTS
           if layer_of(imp.file) in SERVING and layer_of(MODULES[imp.module]) in COMPILE]
    assert not bad, "the serving side imports the compile side:\n" + "\n".join(bad)


def test_upward_exceptions_are_still_needed():
    used = {(imp.file, layer_of(MODULES[imp.module])) for imp in ALL_IMPORTS}
    stale = [f"{file} -> {layer}" for file, layer in UPWARD_EXCEPTIONS if (file, layer) not in used]
    assert not stale, f"UPWARD_EXCEPTIONS no longer needed, remove them: {stale}"


def module_graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: first line} (``if TYPE_CHECKING:`` imports left out: they never run)."""
    graph: dict[str, dict[str, int]] = {m: {} for m in MODULES}
    for imp in ALL_IMPORTS:
        me = module_name(imp.file)
        if not imp.type_only and imp.module != me:
            graph[me].setdefault(imp.module, imp.line)
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's strongly connected components."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = module_graph()
    bad = []
    for comp in strongly_connected(graph):
        if len(comp) > 1 and set(comp) not in KNOWN_CYCLES:
            edges = [f"  kiln/{MODULES[a]}:{line} imports {b}" for a in comp for b, line in graph[a].items() if b in comp]
            bad.append(" <-> ".join(comp) + "\n" + "\n".join(edges))
    assert not bad, "import cycles:\n" + "\n".join(bad)


def test_no_private_name_is_imported_from_another_module():
    """``from .x import _name`` across files means a helper that should be public (or should not be used)."""
    bad = []
    for rel in MODULES.values():
        for node in ast.walk(ast.parse((KILN / rel).read_text(), filename=rel)):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("kiln")):
                bad += [f"kiln/{rel}:{node.lineno}: imports {a.name} from {'.' * node.level}{node.module or ''}"
                        for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_the_parser_sees_relative_nested_and_type_only_imports():
    source = """
from typing import TYPE_CHECKING
from . import formats
from ..ir.spec import ModelSpec
if TYPE_CHECKING:
    from ..runtime.engine import Engine
def f():
    import kiln.server.app
    from .. import __version__
"""
    got = {(imp.line, imp.module, imp.type_only) for imp in imports_of("quant/example.py", source)}
    assert got == {(3, "kiln.quant.formats", False), (4, "kiln.ir.spec", False), (6, "kiln.runtime.engine", True),
                   (8, "kiln.server.app", False), (9, "kiln", False)}
