"""A model graph on disk (``.pt2`` from torch.export, ``.onnx``) -> kiln's reference form, by recognition.

    open_graph(path, tokenizer_dir, ...) -> GraphSource: .load(), then .recognized(...)

No registry entry and no config is needed for the model's structure: the importer (torch_export.py,
onnx_import.py) gives a dense Relax graph, and the recognition steps of the compile pipeline
(kiln/passes/pipeline.py: kiln/passes/recognize_*.py) find RMSNorm, SwiGLU, attention with RoPE, GQA and
its causal mask, name every weight by its role and rebuild the graph as the reference form; the
ModelSpec is read off the graph (``GraphSource.recognized``). The tokenizer directory supplies the tokenizer and, when it holds the model's config.json, the
context length, the end-of-sequence ids and RoPE scaling parameters to check the graph's tables
against.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..errors import CheckpointError, KilnError, UnsupportedModelError
from . import ImportedModel

GRAPH_SUFFIXES = {".pt2": "torch.export", ".onnx": "onnx"}
MASK_LEN_MAX = 4097  # the longest sequence the causal mask is evaluated at (finds windows up to 4096)


def is_graph_file(path: str | Path) -> bool:
    return Path(path).suffix in GRAPH_SUFFIXES and not Path(path).is_dir()


def _read_config(tokenizer_dir: Path) -> dict:
    path = tokenizer_dir / "config.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def _eos_ids(tokenizer_dir: Path, config: dict) -> tuple[int, ...]:
    from .hf import eos_ids

    ids = eos_ids(tokenizer_dir, config)
    if ids:
        return ids
    tc = tokenizer_dir / "tokenizer_config.json"  # else the tokenizer's own end-of-sequence token
    eos = json.loads(tc.read_text()).get("eos_token") if tc.exists() else None
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if eos is None:
        return ()
    from tokenizers import Tokenizer

    tid = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).token_to_id(eos)
    return () if tid is None else (int(tid),)


def load_graph(path: Path):
    """(module, weights name -> numpy array, ImportInfo) from the file's importer."""
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist or is not a file")
    if path.suffix == ".pt2":
        from .torch_export import load_exported_program

        mod, params, info = load_exported_program(path)
        half = sorted({str(v.dtype).removeprefix("torch.") for v in params.values() if v.is_floating_point()}
                      & {"float16", "bfloat16"})
        if half:
            raise UnsupportedModelError(
                f"{path}: a {half[0]} torch.export graph: TVM 0.27's importer computes its linears in float32 "
                "(matmul out_dtype float32, never cast back), so the graph mixes precisions kiln does not "
                "recognise; export the model in float32 (a float16 ONNX export works)")
        weights = {k: v.numpy() for k, v in params.items()}
    elif path.suffix == ".onnx":
        from .onnx_import import load_onnx

        mod, weights, info = load_onnx(path)
    else:
        raise UnsupportedModelError(f"{path}: kiln imports .pt2 (torch.export) and .onnx graphs")
    return mod, {k: np.asarray(v) for k, v in weights.items()}, info


def specialize_empty_cache(mod, info):
    """A graph with ``past_key_values`` inputs (ONNX Runtime GenAI-style: ``input_ids [1, seq]``,
    ``attention_mask [1, total]``, ``position_ids``, ``past_key_values.{i}.key/value [1, kv, past, d]``,
    returning logits and the presents) is specialised to a sequence starting from an empty cache: every
    symbolic size that only past inputs carry becomes 0, and the mask's total length becomes ``seq``.
    Attention then concatenates an empty past, which recognize_attention reads through; kiln's paged KV
    cache replaces the past and present tensors. A graph without such inputs is returned as it is."""
    from ..ir.tvm import relax, tirx

    func = mod["main"]
    inputs = func.params[:len(info.input_names)]

    def dyn(p):
        return [d for d in (p.ty.shape or []) if isinstance(d, tirx.Var)]

    seq = dyn(inputs[0])
    if len(seq) != 1:
        return mod
    seq = seq[0]
    binds = {}
    for p in inputs[1:]:
        for d in dyn(p):
            if d.same_as(seq) or d in binds:
                continue
            if "past" in p.name or "cache" in p.name:
                binds[d] = tirx.IntImm("int64", 0)
            elif "mask" in p.name:
                binds[d] = seq
    if not binds:
        return mod
    from ..ir.tvm import tvm

    out = tvm.IRModule({gv: f for gv, f in mod.functions_items()}, attrs=mod.attrs)
    out["main"] = relax.transform.Normalize()(tvm.IRModule({"main": func.bind_symbolic_vars(binds)}))["main"]
    return out


@dataclass
class GraphSource:
    """A .pt2/.onnx graph and its tokenizer directory, checked (``open_graph``); nothing imported yet.

    The compile pipeline imports it (``load``), recognizes it (kiln/passes/recognize_*.py), and turns the
    recognized model into kiln's parameters and ModelSpec (``recognized``)."""

    kind: ClassVar[str] = "graph"
    path: Path
    tokenizer_dir: Path
    tokenizer_files: list[Path]
    config: dict  # the tokenizer directory's config.json ({} without one)
    context_len: int
    dtype: str | None  # the dtype asked for; a graph computes in the dtype it was exported in
    rope_hint: object  # RopeSpec from config.json, to check the graph's tables against (None: the graph decides)
    info: object = None  # the importer's ImportInfo, once loaded

    @property
    def source_format(self) -> str:
        return GRAPH_SUFFIXES[self.path.suffix]

    @property
    def mask_len(self) -> int:
        """The sequence length the causal mask is evaluated at (sliding windows up to 4096 are found)."""
        return min(self.context_len, MASK_LEN_MAX)

    def load(self):
        """(the importer's dense module, its weights by the graph's names as NumPy arrays), a cache-carrying
        graph specialised to an empty cache."""
        mod, weights, info = load_graph(self.path)
        self.info = info
        return specialize_empty_cache(mod, info), weights

    def recognized(self, rec, weights: dict) -> ImportedModel:
        """The reference form recognize_model made (``rec``) with its weights under kiln's names (a pre-transposed
        ONNX weight transposed back) and the ModelSpec: the graph's fields, the context length and the
        end-of-sequence ids from the tokenizer directory."""
        import torch

        from ..ir.spec import ModelSpec

        fields = dict(rec.spec)
        if self.dtype is not None and self.dtype != fields["dtype"]:
            raise UnsupportedModelError(f"{self.path}: the graph computes in {fields['dtype']}; --dtype {self.dtype} "
                                        "needs a graph exported in that dtype")
        window = fields.pop("sliding_window")
        ctx = self.context_len
        spec = ModelSpec(architecture=f"{self.info.source} graph", context_len=ctx,
                         sliding_window=None if window is None or window >= ctx else window,
                         bos_token_id=self.config.get("bos_token_id"),
                         eos_token_ids=_eos_ids(self.tokenizer_dir, self.config), **fields)
        params, layout = {}, {}
        for name, (src, transposed) in rec.params.items():
            a = weights[src].T if transposed else weights[src]
            t = torch.from_numpy(np.array(a, order="C"))  # a copy: the importers' arrays may be read-only views
            params[name] = t.to(torch.bfloat16) if spec.dtype == "bfloat16" else t
            layout[name] = (tuple(a.shape), spec.dtype)
        return ImportedModel(spec, rec.mod, layout, params, self.tokenizer_files)


def open_graph(path: str | Path, tokenizer_dir: str | Path, dtype: str | None = None,
               context_len: int | None = None) -> GraphSource:
    """Check a graph file and its tokenizer directory before any import: the tokenizer files, the context
    length (--context-len, else config.json's max_position_embeddings) and RoPE parameters to expect."""
    from .hf import check_context_len, rope_spec, tokenizer_files

    path, tokenizer_dir = Path(path), Path(tokenizer_dir)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist or is not a file")
    if not tokenizer_dir.is_dir():
        raise CheckpointError(f"--tokenizer {tokenizer_dir} is not a directory")
    toks = tokenizer_files(tokenizer_dir)
    config = _read_config(tokenizer_dir)
    check_context_len(context_len, config, tokenizer_dir / "config.json")
    ctx = context_len or config.get("max_position_embeddings")
    if not ctx:
        raise KilnError(f"{path}: the graph does not say how long a sequence the model serves; pass --context-len "
                        f"(or put the model's config.json in {tokenizer_dir})")
    rope_hint = None
    if config:
        try:
            rope_hint = rope_spec(config)
        except UnsupportedModelError:
            rope_hint = None  # the graph's own tables decide; an unknown scaling fails there, naming the node
    return GraphSource(path, tokenizer_dir, toks, config, int(ctx), dtype, rope_hint)


__all__ = ["GRAPH_SUFFIXES", "GraphSource", "is_graph_file", "load_graph", "open_graph"]
