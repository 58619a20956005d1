"""kiln's own layer on top of TVM Relax: ModelSpec, the artifact ABI, canonical ops, IR checks.

``spec`` and ``abi`` are pure Python (the runtime reads them); ``tvm``, ``attention`` and
``verify`` import the TVM compiler and are used by compile-side code only.
"""

from .abi import ABI_VERSION, ENTRY_POINTS
from .spec import ModelSpec, RopeSpec

__all__ = ["ABI_VERSION", "ENTRY_POINTS", "ModelSpec", "RopeSpec"]
