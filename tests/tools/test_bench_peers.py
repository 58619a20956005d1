"""tools/bench_peers.py: the CPU side-by-side benchmark, smoke-run on the demo model with kiln and transformers
only (the other peers live in a venv of their own), one round, short prompt and decode.

Checks that every row is there with positive speeds, that kiln fp32 decodes the same greedy tokens as
transformers, that the report files are written, and that a missing peer is skipped with its reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "bench_peers.py"


def run_tool(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.cpu
def test_demo_kiln_against_transformers(tmp_path):
    out = tmp_path / "run" / "results.json"
    res = run_tool("--shape", "demo", "--engines", "kiln,transformers", "--variants", "fp32", "--rounds", 1,
                   "--prompt-len", 32, "--decode-steps", 32, "--work", tmp_path / "work", "--out", out)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {(r["engine"], r["variant"]): r for r in result["rows"]}
    assert set(rows) == {("kiln", "fp32"), ("transformers", "fp32")} and result["skipped"] == []
    for row in rows.values():
        assert all(row[m] > 0 for m in ("prefill_tok_s", "decode1_tok_s", "decode8_tok_s", "load_s", "peak_rss_mb"))
        assert len(row["runs"][0]["greedy"]) == 32
        assert 0 < row["decode1_bandwidth_fraction"]
    assert rows["kiln", "fp32"]["greedy_agreement"] == 1.0
    assert "kiln / best peer" in out.with_suffix(".md").read_text() and out.with_suffix(".png").stat().st_size > 0


def test_a_missing_peer_is_skipped_with_its_reason(tmp_path):
    tool = load_tool()
    args = tool.parse_args(["--shape", "demo", "--engines", "ort", "--peers-python", sys.executable, "--work",
                            str(tmp_path)])
    args.peers_python = str(tmp_path / "no-such-python")
    cases, skipped = tool.prepare_cases(tool.DEMO_MODEL, args)
    assert cases == [] and [s["variant"] for s in skipped] == ["fp32", "int4"]
    assert "cannot run" in skipped[0]["reason"]


def test_bad_shape_is_a_one_line_error():
    res = run_tool("--shape", "gpt-5")
    assert res.returncode != 0 and "unknown shape 'gpt-5'" in res.stderr.strip().splitlines()[-1]


def load_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_peers", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
