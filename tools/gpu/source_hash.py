"""The hash of kiln's Python sources in a checkout (stdlib only: it runs on the GPU machine too).

    python tools/gpu/source_hash.py [REPO_ROOT]

build_bundle.sh records it in bundle.json (``kiln_sources``); run_all.sh recomputes it from the checkout it runs
in and refuses a bundle built from other sources: its artifacts were compiled by another kiln than the one
that would load and measure them.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path


def source_hash(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted((root / "kiln").rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


if __name__ == "__main__":
    print(source_hash(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2]))
