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

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t, 3)


def compile_model(model_dir: str | Path, out: str | Path, config: CompileConfig,
                  progress: Callable[[str], None] = lambda s: None) -> CompileReport:
    """Compile the model at ``model_dir`` (a Hugging Face checkpoint directory, or a .pt2/.onnx graph) into the
    artifact directory ``out``. What the user gave is checked before the TVM compiler is imported."""
    source, target, quant = _check(Path(model_dir), Path(out), config)
    from .codegen.build import build, export
    from .passes.pipeline import build_pipeline, run_pipeline

    report, spec = CompileReport(), getattr(source, "spec", None)
    steps = build_pipeline(target, spec, source=source, quant=quant, fuse=config.fuse,
                           keep_reference=config.keep_reference)
    with report.timed("passes"), _step("passes", model_dir):
        model = run_pipeline(steps, None, config.dump_ir, lambda name: progress(_step_line(name, config)))
    spec = model.spec
    # the decode CUDA graphs' static memory is planned for this bound; none where there are no decode graphs (the
    # CPU, --no-cuda-graph, and the grouped cache's serving form, which has no decode entry point)
    max_batch = config.max_batch_size if target.name == "cuda" and config.cuda_graph and not spec.grouped_kv else None
    progress(f"building for {target.name}{' ' + target.arch if target.arch else ''}")
    with report.timed("build"), _step(f"build for {target.name}", model_dir):
        ex = build(model.mod, target, max_batch_size=max_batch)
    progress("writing the artifact")
    options = CompileOptions(dtype=spec.dtype, context_len=spec.context_len, quant=quant.scheme.name if quant else None,
                             source=Path(model_dir).name, source_format=source.source_format,
                             config_only=config.config_only, max_batch_size=max_batch)
    with report.timed("write"):
        write_artifact(Path(out), write_library=lambda path: export(ex, path), params=model.params,
                       tokenizer_files=source.tokenizer_files, write_placeholder_tokenizer=_placeholder(source, spec),
                       spec=spec, target=target.describe(), param_layout=model.layout, options=options)
    report.artifact_bytes = sum(load_artifact(out).file_sizes().values()) + (Path(out) / "manifest.json").stat().st_size
    return report


def _step_line(name: str, config: CompileConfig) -> str:
    """The progress line of a pipeline step."""
    if name == "import_checkpoint":
        return "importing the config (no weights)" if config.config_only else "importing the checkpoint"
    return "importing the graph" if name == "import_graph" else f"pass {name}"


def _check(model_dir: Path, out: Path, config: CompileConfig):
    """(the source, opened; the target; the quantization) — every check of the user's input that needs no TVM."""
    from .codegen.targets import resolve_target
    from .frontend import open_checkpoint
    from .frontend.graph import is_graph_file, open_graph

    target = resolve_target(config.target, config.arch)
    if config.max_batch_size < 1:
        raise KilnError(f"--max-batch-size must be at least 1, got {config.max_batch_size}")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "manifest.json").exists())):
        raise KilnError(f"{out} exists and is not a kiln artifact; refusing to overwrite it")
    if is_graph_file(model_dir):
        _check_graph_options(model_dir, config)
        source = open_graph(model_dir, config.tokenizer, dtype=config.dtype, context_len=config.context_len)
    else:
        if config.tokenizer is not None:
            raise KilnError(f"--tokenizer is for .pt2/.onnx graphs; {model_dir} brings its own tokenizer")
        source = open_checkpoint(model_dir, dtype=config.dtype, context_len=config.context_len, with_tokenizer=False,
                                 with_weights=not config.config_only, kv_sources=config.kv_sharing)
    quant = _quantization(model_dir, config, getattr(source, "prequantized", None))
    if source.kind == "checkpoint" and not (config.config_only and not (model_dir / "tokenizer.json").exists()):
        source = source.with_tokenizer()  # checked after the scheme: a checkpoint's quantization is the first question
    return source, target, quant


def _quantization(model_dir: Path, config: CompileConfig, pre):
    """The scheme to compile with (--quant, or the one a pre-quantized checkpoint implies) and its calibration."""
    quant = _scheme_name(model_dir, config, pre)
    if quant is None:
        return None
    from .passes.pipeline import Quantization
    from .quant.calibrate import load_calibration
    from .quant.schemes import get_scheme

    scheme = get_scheme(quant)
    if scheme.needs_calib and pre is None and config.calib is None and not config.config_only:
        raise KilnError(f"--quant {scheme.name} needs activation statistics: run `kiln calibrate {model_dir} "
                        f"-o CALIB` and pass --calib CALIB")
    calib = load_calibration(config.calib)[0] if config.calib is not None and not config.config_only else None
    return Quantization(scheme, calib, pre)


def _placeholder(source, spec):
    """A config-only checkpoint without a tokenizer gets a placeholder one covering the vocabulary."""
    if source.tokenizer_files:
        return None
    from .frontend.placeholder_tokenizer import write_placeholder_tokenizer

    return lambda d: write_placeholder_tokenizer(spec, d)


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
