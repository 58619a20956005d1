"""tools/bench_cpu_linear.py's quantized mode runs every scheme it is given, in turns, on tiny shapes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cpu

ROOT = Path(__file__).resolve().parents[2]


def test_quant_schemes_take_turns_and_each_reports():
    proc = subprocess.run([sys.executable, "tools/bench_cpu_linear.py", "--quant", "w4a8", "rtn-w4g128", "--shape",
                           "64x256", "--rows", "1", "3", "--repeats", "2"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(r["rows"], r["quant"]) for r in rows] == [(1, "w4a8"), (1, "rtn-w4g128"), (3, "w4a8"), (3, "rtn-w4g128")]
    assert all(r["ms"] > 0 and r["packed_gbs"] > 0 for r in rows)
