"""Frontends: a model on disk -> (reference-form IRModule, parameters, ModelSpec, tokenizer files)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .registry import ARCHITECTURES


@dataclass
class ImportedModel:
    spec: Any  # ModelSpec
    mod: Any  # tvm IRModule in reference form
    params: dict[str, Any]  # kiln parameter name -> torch tensor, in packed-tuple order
    tokenizer_files: list[Path] = field(default_factory=list)


def import_hf(model_dir: str | Path, dtype: str | None = None, context_len: int | None = None,
              with_tokenizer: bool = True) -> ImportedModel:
    """Load a Hugging Face checkpoint directory into kiln's reference form."""
    from .hf import load_spec, load_weights, tokenizer_files
    from .reference import build_reference, param_shapes

    model_dir = Path(model_dir)
    spec = load_spec(model_dir, dtype=dtype, context_len=context_len)
    toks = tokenizer_files(model_dir) if with_tokenizer else []
    shapes = param_shapes(spec)
    params = load_weights(model_dir, spec, shapes)
    return ImportedModel(spec, build_reference(spec), {k: params[k] for k in shapes}, toks)


__all__ = ["ARCHITECTURES", "ImportedModel", "import_hf"]
