"""The life of a compile: checkpoint -> reference form -> passes -> codegen -> artifact directory.

With ``config_only`` the checkpoint is its config.json alone: the parameter layout comes from the
ModelSpec, no weight is read, and the artifact holds no params.safetensors (the runtime fills the
layout with seeded random weights, for benchmarks). A directory without a tokenizer then gets a
placeholder one covering the vocabulary.

A pre-quantized checkpoint (an AutoAWQ GEMM one: frontend/hf.py ``prequantized``) implies its scheme
(``awq-w4g128``): its packed params are converted from the stored tensors (quant/autoawq.py), not made
by ``quantize_params``, and need no calibration; the IR is quantized as for ``--quant``.
"""

from __future__ import annotations

import re
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .artifact import CompileOptions, load_artifact, write_artifact
from .errors import CompilerError, KilnError


@dataclass(frozen=True)
class CompileConfig:
    target: str = "cpu"
    arch: str | None = None
    dtype: str | None = None  # None: the checkpoint's dtype
    context_len: int | None = None  # None: the model's max_position_embeddings
    config_only: bool = False  # compile from config.json alone: no weights in the artifact
    quant: str | None = None  # a scheme of kiln/quant/schemes.py (rtn-w4g128, awq-w4g128, w4a8, ...)
    calib: Path | None = None  # `kiln calibrate` output, for the schemes that need activation statistics
    dump_ir: Path | None = None
    keep_reference: bool = False  # keep the dense forward in the library (for self-checks)
    tokenizer: Path | None = None  # a .pt2/.onnx graph's tokenizer directory (a checkpoint directory has its own)
    fuse: bool = True  # the fusion passes (dequantize into matmul, QKV, gate/up + SiLU·mul, residual add + RMSNorm)
    kv_sharing: tuple[int, ...] | None = None  # per layer, its KV source (overrides the config's kv_sources)
    cuda_graph: bool = True  # cuda: decode steps as CUDA graphs (codegen/cuda_graph.py)
    max_batch_size: int = 256  # cuda with graphs: most sequences in one decode step (the runner enforces it)


@dataclass
class CompileReport:
    seconds: dict[str, float] = field(default_factory=dict)
    artifact_bytes: int = 0


def compile_model(model_dir: str | Path, out: str | Path, config: CompileConfig,
                  progress: Callable[[str], None] = lambda s: None) -> CompileReport:
    from .codegen.targets import resolve_target
    from .frontend.graph import GRAPH_SUFFIXES, is_graph_file
    from .frontend.hf import load_spec, prequantized, tokenizer_files
    from .frontend.placeholder_tokenizer import write_placeholder_tokenizer

    # Check what the user gave before importing the TVM compiler (seconds): bad input fails fast.
    target = resolve_target(config.target, config.arch)
    if config.max_batch_size < 1:
        raise KilnError(f"--max-batch-size must be at least 1, got {config.max_batch_size}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "manifest.json").exists())):
        raise KilnError(f"{out} exists and is not a kiln artifact; refusing to overwrite it")
    graph = is_graph_file(model_dir)
    if graph:
        _check_graph_options(Path(model_dir), config)
        pre = None
    else:
        if config.tokenizer is not None:
            raise KilnError(f"--tokenizer is for .pt2/.onnx graphs; {model_dir} brings its own tokenizer")
        load_spec(Path(model_dir), dtype=config.dtype, context_len=config.context_len, kv_sources=config.kv_sharing)
        pre = prequantized(Path(model_dir))
    quant = _scheme_name(model_dir, config, pre)
    scheme = calib = None
    if quant is not None:
        from .quant.calibrate import load_calibration
        from .quant.schemes import get_scheme

        scheme = get_scheme(quant)
        if scheme.needs_calib and pre is None and config.calib is None and not config.config_only:
            raise KilnError(f"--quant {scheme.name} needs activation statistics: run `kiln calibrate {model_dir} "
                            f"-o CALIB` and pass --calib CALIB")
        if config.calib is not None and not config.config_only:
            calib = load_calibration(config.calib)[0]
    placeholder = config.config_only and not (Path(model_dir) / "tokenizer.json").exists()
    if not placeholder:
        tokenizer_files(config.tokenizer if graph else Path(model_dir))

    from .codegen.build import build, export
    from .frontend import import_hf
    from .passes.lib.linears import apply_merges
    from .passes.pipeline import Fusion, build_pipeline, run_pipeline

    report = CompileReport()
    t = time.perf_counter()

    def lap(name):
        nonlocal t
        now = time.perf_counter()
        report.seconds[name] = round(now - t, 3)
        t = now

    if graph:
        from .frontend.graph import import_graph

        progress("importing and recognising the graph")
        imported = import_graph(model_dir, config.tokenizer, dtype=config.dtype, context_len=config.context_len,
                                dump_dir=config.dump_ir)
    else:
        progress("importing the config (no weights)" if config.config_only else "importing the checkpoint")
        imported = import_hf(model_dir, dtype=config.dtype, context_len=config.context_len,
                             with_tokenizer=not placeholder, with_weights=not config.config_only,
                             kv_sources=config.kv_sharing)
    spec = imported.spec
    layout, params, mod = imported.param_layout, imported.params, imported.mod
    if scheme is not None:
        progress(f"quantizing ({scheme.name})")
        layout, params, mod = _quantize(imported, scheme, calib)
    lap("import")
    progress("running passes")
    fusion = Fusion(layout, scheme.group_size if scheme else None)
    with _step("passes", model_dir):
        mod = run_pipeline(mod, build_pipeline(target, config.keep_reference, fusion, config.fuse, spec.kv_sources),
                           config.dump_ir)
    # the pass chose the cache from the IR (passes/paged_groups.needs_groups), the runtime will from the spec
    from .ir.abi import entry_points

    want = set(entry_points(spec.grouped_kv))
    assert want <= {gv.name_hint for gv in mod.get_global_vars()}, f"serving form lacks {want}: the IR and the " \
        "spec disagree on the KV cache"
    # the fusion passes merged weights and share_kv dropped some: make them, in the new layout
    layout = fusion.layout
    params = apply_merges(params, layout, fusion.merges) if params is not None else None
    lap("passes")
    progress(f"building for {target.name}{' ' + target.arch if target.arch else ''}")
    # the bound the decode graphs' static memory is planned for; none where there are no decode graphs (the
    # CPU, --no-cuda-graph, and the grouped cache's serving form, which has no decode entry point)
    max_batch = config.max_batch_size if target.name == "cuda" and config.cuda_graph and not spec.grouped_kv \
        else None
    with _step(f"build for {target.name}", model_dir):
        ex = build(mod, target, max_batch_size=max_batch)
    lap("build")

    progress("writing the artifact")
    options = CompileOptions(dtype=spec.dtype, context_len=spec.context_len, quant=scheme.name if scheme else None,
                             source=Path(model_dir).name,
                             source_format=pre.source_format if pre else
                             GRAPH_SUFFIXES[Path(model_dir).suffix] if graph else "hf",
                             config_only=config.config_only, max_batch_size=max_batch)
    write_artifact(out, write_library=lambda path: export(ex, path), params=params,
                   tokenizer_files=imported.tokenizer_files,
                   write_placeholder_tokenizer=(lambda d: write_placeholder_tokenizer(spec, d)) if placeholder else None,
                   spec=spec, target=target.describe(), param_layout=layout, options=options)
    lap("write")
    report.artifact_bytes = sum(load_artifact(out).file_sizes().values()) + (out / "manifest.json").stat().st_size
    return report


@contextmanager
def _step(name: str, model_dir) -> Iterator[None]:
    """Turn a failure inside a compile step (TVM's C++ checks, a pass tripping over IR it built itself) into
    one ``CompilerError`` line naming the step, the model and TVM's source file; the traceback goes to a log
    file. A KilnError (the user's to fix) passes through as it is."""
    try:
        yield
    except KilnError:
        raise
    except Exception as e:  # noqa: BLE001 (every other failure here is kiln's or TVM's, never the user's)
        from .passes.pipeline import PASS_NOTE

        text = traceback.format_exc()
        where = re.findall(r"/src/([\w/]+\.cc)", text)
        passes = [n[len(PASS_NOTE):] for n in getattr(e, "__notes__", ()) if n.startswith(PASS_NOTE)]
        if passes:
            name = f"pass {passes[-1]}"
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith("File ")]
        first = lines[0] if lines else ""
        with tempfile.NamedTemporaryFile("w", prefix="kiln-compile-", suffix=".log", delete=False) as log:
            log.write(text)
        raise CompilerError(f"compiling {model_dir} failed in {name}"
                            f"{f' (TVM {where[-1]})' if where else ''}: {type(e).__name__}: {first[:300]} "
                            f"[a kiln bug; traceback in {log.name}]") from None


def _check_graph_options(path: Path, config: CompileConfig) -> None:
    """What a .pt2/.onnx graph cannot be compiled with, before any work."""
    if not path.is_file():
        raise KilnError(f"{path} does not exist or is not a file")
    if config.tokenizer is None:
        raise KilnError(f"{path} is a model graph: pass --tokenizer DIR (a directory with tokenizer.json, and "
                        "ideally the model's config.json)")
    if config.config_only:
        raise KilnError("--config-only compiles a Hugging Face config.json; a graph file carries its weights")
    if config.kv_sharing is not None:
        raise KilnError("--kv-sharing applies to a Hugging Face checkpoint directory; a graph's attention is read "
                        "from the graph")


def _scheme_name(model_dir, config: CompileConfig, pre) -> str | None:
    """--quant, or the scheme a pre-quantized checkpoint (``pre``) implies, which no other --quant or
    --calib may contradict."""
    if pre is None:
        return config.quant
    if config.quant not in (None, pre.scheme):
        raise KilnError(f"{model_dir} is already quantized as {pre.scheme} (source format {pre.source_format}): "
                        f"compile it without --quant (--quant {config.quant} needs the float checkpoint)")
    if config.calib is not None:
        raise KilnError(f"{model_dir} is already quantized as {pre.scheme} (source format {pre.source_format}): "
                        f"it needs no --calib")
    return pre.scheme


def _quantize(imported, scheme, calib):
    """The scheme's weights (kiln/quant/schemes.py, or converted from a pre-quantized checkpoint) and IR
    (kiln/passes/quantize_linears.py), meeting in one layout."""
    from .passes.quantize_linears import packed_layout, quantize_linears
    from .quant.autoawq import from_autoawq
    from .quant.schemes import quantize_params, quantized_linears

    names = set(quantized_linears(imported.spec))
    group = scheme.group_size or 1
    params, dtypes = None, None
    if imported.params is not None and imported.prequantized is not None:
        assert imported.prequantized.source_format == "autoawq" and scheme.name == imported.prequantized.scheme
        params = from_autoawq(imported.params, imported.spec)
    elif imported.params is not None:
        params = quantize_params(imported.params, imported.spec, scheme.name, calib)
    if params is not None:
        dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in params.items()}
    layout = packed_layout(imported.param_layout, names, scheme.kind, group, dtypes)
    mod = quantize_linears(imported.mod, imported.param_layout, names, scheme.kind, group, dtypes)
    if params is not None:
        params = {k: params[k].contiguous() for k in layout}  # the packed tuple's order
    return layout, params, mod
