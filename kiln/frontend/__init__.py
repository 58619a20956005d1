"""Frontends: a model on disk -> (reference-form IRModule, parameters, ModelSpec, tokenizer files)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .registry import ARCHITECTURES


@dataclass
class ImportedModel:
    spec: Any  # ModelSpec
    mod: Any  # tvm IRModule in reference form
    # kiln parameter name -> (shape, dtype), in packed-tuple order: the artifact's parameter layout
    param_layout: dict[str, tuple[tuple[int, ...], str]]
    params: dict[str, Any] | None  # name -> torch tensor in layout order; None when compiled from config.json alone
    tokenizer_files: list[Path] = field(default_factory=list)
    # PreQuantized (hf.py) for a pre-quantized checkpoint: params then hold each quantized linear NAME as
    # its stored tensors NAME.<suffix>, at NAME's position, while param_layout stays the reference form's
    prequantized: Any = None


@dataclass
class CheckpointSource:
    """A Hugging Face checkpoint directory, checked (``open_checkpoint``): its spec read and its tokenizer files
    found once; the weights are read by ``load``."""

    kind: ClassVar[str] = "checkpoint"
    model_dir: Path
    spec: Any  # ModelSpec
    prequantized: Any  # hf.PreQuantized, or None
    tokenizer_files: list[Path]
    with_weights: bool

    @property
    def source_format(self) -> str:
        return self.prequantized.source_format if self.prequantized else "hf"

    def with_tokenizer(self) -> "CheckpointSource":
        """This source with its tokenizer files found (CheckpointError if the directory has no usable tokenizer)."""
        from .hf import tokenizer_files

        return dataclasses.replace(self, tokenizer_files=tokenizer_files(self.model_dir))

    def load(self) -> ImportedModel:
        """The reference form and, unless config-only, the weights (the parameter layout comes from the spec)."""
        from ..ir.spec import shared_kv_params
        from .hf import load_weights
        from .reference import build_reference, param_shapes

        spec, pre = self.spec, self.prequantized
        shapes = param_shapes(spec)
        layout = {name: (shape, spec.dtype) for name, shape in shapes.items()}
        params = None
        if self.with_weights:
            import torch

            # layers that share another layer's KV have no K/V weights to read (share_kv drops the placeholders)
            unused = shared_kv_params(spec.kv_sources)
            loaded = load_weights(self.model_dir, spec, {k: s for k, s in shapes.items() if k not in unused}, pre)
            params = {}
            for k in shapes:
                if k in unused:
                    params[k] = torch.zeros(shapes[k], dtype=getattr(torch, spec.dtype))
                    continue
                stored = [k] if k in loaded else [f"{k}.{suffix}" for suffix in pre.suffixes]
                params.update({name: loaded[name] for name in stored})
        return ImportedModel(spec, build_reference(spec), layout, params, self.tokenizer_files, pre)


def open_checkpoint(model_dir: str | Path, dtype: str | None = None, context_len: int | None = None,
                    with_tokenizer: bool = True, with_weights: bool = True,
                    kv_sources: tuple[int, ...] | None = None) -> CheckpointSource:
    """Check a Hugging Face checkpoint directory before any weight is read: its config (the ModelSpec), whether
    it is pre-quantized, its tokenizer files. ``with_weights=False``: config.json alone is compiled."""
    from .hf import load_spec, prequantized, tokenizer_files

    model_dir = Path(model_dir)
    spec = load_spec(model_dir, dtype=dtype, context_len=context_len, kv_sources=kv_sources)
    toks = tokenizer_files(model_dir) if with_tokenizer else []
    return CheckpointSource(model_dir, spec, prequantized(model_dir), toks, with_weights)


def import_hf(model_dir: str | Path, dtype: str | None = None, context_len: int | None = None,
              with_tokenizer: bool = True, with_weights: bool = True,
              kv_sources: tuple[int, ...] | None = None) -> ImportedModel:
    """Load a Hugging Face checkpoint directory into kiln's reference form (``open_checkpoint(...).load()``)."""
    return open_checkpoint(model_dir, dtype, context_len, with_tokenizer, with_weights, kv_sources).load()


__all__ = ["ARCHITECTURES", "CheckpointSource", "ImportedModel", "import_hf", "open_checkpoint"]
