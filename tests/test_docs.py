"""The README's commands run as written, and the docs point only at files inside the repo.

Every fenced ``bash`` / ``sh`` / ``console`` block of README.md is a command a reader will paste. Each runs
here, in order, in a scratch directory where ``models/`` and ``data/`` are the repo's (so
``kiln compile models/kiln-demo -o build/kiln-demo-cpu`` means what it says), with the venv's ``kiln`` first
on PATH, and must exit 0. A block that cannot run in CI (it needs a GPU, nvcc, the network, or is the test
suite itself) carries a marker on the line before it, with its reason::

    <!-- no-test: needs a GPU -->

A block whose command is ``kiln serve ...`` is a server: it is started in the background (on a free port,
replacing the README's 8000 in every block), the following blocks run against it once ``/health`` answers,
and at the end it is stopped with Ctrl-C (SIGINT) and must exit cleanly (0, or 130 for the interrupt).

Links: every relative link of README.md and docs/*.md names an existing file inside the repo, and no doc
names a path outside it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
SHELLS = ("bash", "sh", "console")
README_PORT = "8000"
BLOCK_TIMEOUT_S = 300
SERVER_START_S = 120

# an optional no-test marker, then a fenced block (its language, its body)
FENCE = re.compile(r"^(?:<!--\s*no-test:(?P<why>[^>]*)-->[ \t]*\n)?```(?P<lang>[\w-]*)[ \t]*\n(?P<body>.*?)^```[ \t]*$",
                   re.M | re.S)


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    body: str
    no_test: str | None  # the marker's reason; None for a block that must run

    @property
    def commands(self) -> str:
        """The shell text: a console block's ``$ `` lines (and their ``\\`` continuations), else the body."""
        if self.lang != "console":
            return self.body
        out, cont = [], False
        for line in self.body.splitlines():
            if line.startswith("$ ") or cont:
                out.append(line[2:] if line.startswith("$ ") and not cont else line)
                cont = line.rstrip().endswith("\\")
        return "\n".join(out) + "\n"

    @property
    def is_server(self) -> bool:
        return self.commands.lstrip().startswith("kiln serve ")

    @property
    def name(self) -> str:
        first = next((ln.strip() for ln in self.commands.splitlines() if ln.strip()), "")
        return f"L{self.line}:{first[:40]}"


def shell_blocks(path: Path = README) -> list[Block]:
    text = path.read_text()
    blocks = []
    for m in FENCE.finditer(text):
        if m.group("lang") in SHELLS:
            why = m.group("why")
            blocks.append(Block(text.count("\n", 0, m.start("lang")) + 1, m.group("lang"), m.group("body"),
                                None if why is None else why.strip()))
    return blocks


BLOCKS = shell_blocks()
RUNNABLE = [b for b in BLOCKS if b.no_test is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(proc: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return  # exited: the block's result says so
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"the server did not answer /health within {SERVER_START_S} s")


def _stop(proc: subprocess.Popen) -> int:
    """Ctrl-C the server block (its own process group), as a reader would; kill it if it does not stop."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory) -> dict[Block, tuple[int, str]]:
    """Run every unmarked README block in order; block -> (exit status, output tail)."""
    work = tmp_path_factory.mktemp("readme")
    for name in ("models", "data"):
        (work / name).symlink_to(ROOT / name)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    port = str(_free_port())
    results: dict[Block, tuple[int, str]] = {}
    servers: list[tuple[Block, subprocess.Popen, Path]] = []
    try:
        for block in RUNNABLE:
            script = re.sub(rf"\b{README_PORT}\b", port, block.commands)
            argv = ["bash", "-e", "-o", "pipefail", "-c", script]
            if block.is_server:
                log = work / f"server-{block.line}.log"
                with log.open("w") as f:
                    proc = subprocess.Popen(argv, cwd=work, env=env, stdout=f, stderr=subprocess.STDOUT,
                                            start_new_session=True)
                servers.append((block, proc, log))
                _wait_healthy(proc, int(port))
                continue
            res = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
            results[block] = (res.returncode, (res.stdout + res.stderr)[-3000:])
    finally:
        for block, proc, log in servers:
            results[block] = (_stop(proc), log.read_text()[-3000:])
    return results


@pytest.mark.cpu
@pytest.mark.parametrize("block", RUNNABLE, ids=[b.name for b in RUNNABLE])
def test_readme_block_runs(readme_run, block):
    status, output = readme_run[block]
    ok = (0, 130) if block.is_server else (0,)  # kiln serve stopped by Ctrl-C exits 130, as a shell command does
    assert status in ok, f"README.md line {block.line} exited with {status}:\n{block.commands}\n{output}"
    assert "Traceback" not in output, f"README.md line {block.line}:\n{output}"


@pytest.mark.cpu
def test_every_unmarked_block_ran(readme_run):
    assert set(readme_run) == set(RUNNABLE)


def test_readme_quickstart_is_tested():
    """Marking a block no-test must not quietly drop the quickstart: these commands stay in tested blocks."""
    tested = "\n".join(b.commands for b in RUNNABLE)
    for command in ("kiln compile models/kiln-demo", "kiln generate", "kiln inspect", "kiln serve", "curl ",
                    "kiln bench"):
        assert command in tested, f"no unmarked README block runs `{command}`"


def test_no_test_markers_give_a_reason():
    for b in BLOCKS:
        assert b.no_test is None or b.no_test, f"README.md line {b.line}: `<!-- no-test: REASON -->` needs a reason"


def test_readme_keeps_the_test_command():
    """.ci/run runs `make test`, the README's test command: both must stay."""
    assert any(b.commands.lstrip().startswith("make test") for b in BLOCKS)
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^test:", (ROOT / "Makefile").read_text(), re.M)


def test_readme_is_a_front_page():
    assert len(README.read_text().splitlines()) <= 150, "README.md is over 150 lines: move detail into docs/"


# ------------------------------------------------------------------------------------------------ links

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|^\s*\[[^\]]+\]:\s*(\S+)|href=\"([^\"]+)\"",
                  re.M)


def _links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text())  # code blocks hold commands, not links
    return [next(g for g in m.groups() if g) for m in LINK.finditer(text)]


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_relative_links_name_files_in_the_repo(doc):
    for target in _links(doc):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):  # https:, mailto:, an anchor
            continue
        path = target.split("#", 1)[0]
        assert not path.startswith("/"), f"{doc.name}: absolute path {target!r}; link relative to the file"
        resolved = (doc.parent / path).resolve()
        assert resolved.is_relative_to(ROOT), f"{doc.name}: {target!r} points outside the repo"
        assert resolved.exists(), f"{doc.name}: {target!r} does not exist"


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_docs_name_no_path_outside_the_repo(doc):
    text = doc.read_text()
    for pattern in (r"(?<![\w.])/work/", r"\.\./shared\b", r"(?<![\w./-])shared/(?:notes|DESIGN|STYLE)"):
        m = re.search(pattern, text)
        assert m is None, f"{doc.name} line {text.count(chr(10), 0, m.start()) + 1}: a path outside the repo"


def _synopsis_options(doc: Path) -> list[tuple[str, str]]:
    """(subcommand, --option) for every option of a ``kiln SUB ...`` synopsis in the doc's shell blocks, their
    ``\\`` and indented continuation lines included."""
    out = []
    for block in shell_blocks(doc):
        sub = None
        for line in block.commands.splitlines():
            m = re.match(r"\s*(?:\$\s*)?kiln\s+([a-z]+)\b", line)
            if m:
                sub = m.group(1)
            elif not line.startswith((" ", "\t")):
                sub = None  # another command
            if sub is not None:
                out += [(sub, opt) for opt in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", line)]
    return out


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_kiln_synopses_name_real_commands_and_options(doc):
    """docs/ show commands as synopses (MODEL_DIR, ARTIFACT): each names a real subcommand and real options."""
    from kiln.cli import main

    bad = []
    for sub, opt in _synopsis_options(doc):
        cmd = main.commands.get(sub)
        if cmd is None:
            bad.append(f"kiln {sub}: no such command")
        elif opt not in {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}:
            bad.append(f"kiln {sub} {opt}: no such option")
    assert not bad, f"{doc.name}: " + "; ".join(bad)


def test_the_synopsis_check_sees_options():
    assert ("compile", "--quant") in _synopsis_options(ROOT / "docs" / "compiling.md")
    assert ("serve", "--max-num-seqs") in _synopsis_options(ROOT / "docs" / "serving.md")
