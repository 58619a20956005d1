"""The artifact: one directory a user can copy, written by ``kiln compile`` and read by the runtime.

    manifest.json       kiln / TVM / tvm-ffi / ABI versions, target, ModelSpec, parameter order and
                        layout (shape, dtype of each), compile options, whether the weights and a
                        real tokenizer are included, and the sha256 of every other file
    model.so            the compiled library (VM executable + kernels for the target)
    params.safetensors  the (transformed) weights, named by kiln parameter name; absent when the
                        model was compiled from its config.json alone ("weights": "none"), in which
                        case the runtime fills the layout with seeded random weights on request
    tokenizer.json, tokenizer_config.json, generation_config.json, ...   copied from the checkpoint,
                        or a placeholder covering the vocabulary ("tokenizer": "placeholder")

Pure Python (no TVM import): the runtime reads it on machines without the TVM compiler. Nothing in
an artifact is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .errors import ArtifactError
from .ir.abi import ABI_VERSION
from .ir.spec import ModelSpec

MANIFEST = "manifest.json"
LIBRARY = "model.so"
PARAMS = "params.safetensors"
FORMAT = "kiln-artifact"
WEIGHTS = ("included", "none")  # manifest "weights"
TOKENIZERS = ("included", "placeholder")  # manifest "tokenizer"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def installed_tvm_versions() -> dict[str, str]:
    """Versions of the installed TVM packages, read from package metadata (no import of tvm)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist, key in (("apache-tvm", "tvm"), ("apache-tvm-ffi", "tvm_ffi")):
        try:
            out[key] = version(dist)
        except PackageNotFoundError:
            out[key] = "unknown"
    return out


@dataclass(frozen=True)
class CompileOptions:
    """How ``kiln compile`` made the artifact (the manifest's "options"); read by inspect and the runtime."""

    dtype: str | None = None
    context_len: int | None = None
    quant: str | None = None  # the scheme's name; None: float weights
    source: str | None = None  # the checkpoint's directory or file name
    source_format: str = "hf"  # "hf", "autoawq", "torch.export", "onnx"
    config_only: bool = False
    max_batch_size: int | None = None  # the decode CUDA graphs' bound; None: no decode CUDA graphs

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "context_len": self.context_len, "quant": self.quant, "source": self.source,
                "source_format": self.source_format, "config_only": self.config_only,
                "max_batch_size": self.max_batch_size}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CompileOptions:
        """An older manifest may lack keys (or "options" altogether): they take the defaults."""
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass(frozen=True)
class Manifest:
    """manifest.json, parsed once by ``load_artifact``; ``to_json`` is the file's layout (unchanged since
    the first artifact: keys added later have defaults here, so older artifacts still load)."""

    abi_version: int
    kiln_version: str
    tvm_version: str
    tvm_ffi_version: str
    target: dict[str, Any]  # TargetSpec.describe(): {"name", "arch", ...}
    spec: ModelSpec
    param_names: tuple[str, ...]  # the packed order the library's entry points take
    # name -> (shape, dtype), in param_names order; None: an older artifact, which records no shapes
    param_shapes: dict[str, tuple[tuple[int, ...], str]] | None
    weights: str  # one of WEIGHTS
    tokenizer: str  # one of TOKENIZERS
    options: CompileOptions
    files: dict[str, str]  # file name -> sha256, every file but the manifest

    def __post_init__(self):
        assert self.weights in WEIGHTS and self.tokenizer in TOKENIZERS, (self.weights, self.tokenizer)
        assert self.param_shapes is None or tuple(self.param_shapes) == self.param_names, "param_shapes' order"

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Manifest:
        names = tuple(str(n) for n in d["param_names"])
        shapes = d.get("param_shapes")
        return cls(abi_version=d["abi_version"], kiln_version=d["kiln_version"], tvm_version=d["tvm_version"],
                   tvm_ffi_version=d["tvm_ffi_version"], target=d["target"], spec=ModelSpec.from_json(d["spec"]),
                   param_names=names,
                   param_shapes=None if shapes is None else
                   {n: (tuple(int(x) for x in shapes[n][0]), str(shapes[n][1])) for n in names},
                   weights=d.get("weights", "included"), tokenizer=d.get("tokenizer", "included"),
                   options=CompileOptions.from_json(d.get("options", {})), files=dict(d["files"]))

    def to_json(self) -> dict[str, Any]:
        assert self.param_shapes is not None, "kiln writes the parameter shapes"
        return {
            "format": FORMAT,
            "abi_version": self.abi_version,
            "kiln_version": self.kiln_version,
            "tvm_version": self.tvm_version,
            "tvm_ffi_version": self.tvm_ffi_version,
            "target": self.target,
            "spec": self.spec.to_json(),
            "param_names": list(self.param_names),
            "param_shapes": {name: [list(shape), dtype] for name, (shape, dtype) in self.param_shapes.items()},
            "weights": self.weights,
            "tokenizer": self.tokenizer,
            "options": self.options.to_json(),
            "files": self.files,
        }


@dataclass(frozen=True)
class Artifact:
    path: Path
    manifest: Manifest

    @property
    def spec(self) -> ModelSpec:
        return self.manifest.spec

    @property
    def target(self) -> dict[str, Any]:
        return self.manifest.target

    @property
    def param_names(self) -> list[str]:
        return list(self.manifest.param_names)

    @property
    def param_layout(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Parameter name -> (shape, dtype), in the packed order the library's entry points take."""
        if self.manifest.param_shapes is None:
            raise ArtifactError(f"{self.path}'s manifest records no parameter shapes (an older artifact): "
                                "recompile it with `kiln compile`")
        return dict(self.manifest.param_shapes)

    @property
    def has_weights(self) -> bool:
        return self.manifest.weights == "included"

    @property
    def placeholder_tokenizer(self) -> bool:
        return self.manifest.tokenizer == "placeholder"

    @property
    def library(self) -> Path:
        return self.path / LIBRARY

    @property
    def params_file(self) -> Path:
        return self.path / PARAMS

    def file_sizes(self) -> dict[str, int]:
        return {name: (self.path / name).stat().st_size for name in self.manifest.files}


def write_manifest(path: Path, *, spec: ModelSpec, target: dict,
                   param_layout: dict[str, tuple[tuple[int, ...], str]], weights: str, tokenizer: str,
                   options: CompileOptions, tvm_versions: dict[str, str]) -> Manifest:
    """Write ``path``/manifest.json over the files already in ``path``."""
    files = sorted(p.name for p in path.iterdir() if p.is_file() and p.name != MANIFEST)
    assert (PARAMS in files) == (weights == "included"), f"{PARAMS} present: {PARAMS in files}, weights {weights}"
    manifest = Manifest(abi_version=ABI_VERSION, kiln_version=__version__, tvm_version=tvm_versions["tvm"],
                        tvm_ffi_version=tvm_versions["tvm_ffi"], target=target, spec=spec,
                        param_names=tuple(param_layout), param_shapes=dict(param_layout), weights=weights,
                        tokenizer=tokenizer, options=options, files={name: sha256(path / name) for name in files})
    (path / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    return manifest


def write_artifact(out: Path, *, write_library: Callable[[Path], None], params: dict[str, Any] | None,
                   tokenizer_files: Iterable[Path], write_placeholder_tokenizer: Callable[[Path], None] | None,
                   spec: ModelSpec, target: dict, param_layout: dict[str, tuple[tuple[int, ...], str]],
                   options: CompileOptions) -> None:
    """Write the artifact directory ``out`` atomically (built beside it, renamed over it at the end).

    ``write_library(path)`` exports the compiled library (the caller holds TVM, this module does not);
    ``params`` None: a config-only artifact, no weights. ``write_placeholder_tokenizer(dir)`` is given
    when ``tokenizer_files`` is no real tokenizer; it writes one covering the vocabulary.
    """
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        write_library(tmp / LIBRARY)
        if params is not None:
            save_file(params, str(tmp / PARAMS))
        for f in tokenizer_files:
            shutil.copyfile(f, tmp / f.name)
        if write_placeholder_tokenizer is not None:
            write_placeholder_tokenizer(tmp)
        write_manifest(tmp, spec=spec, target=target, param_layout=param_layout,
                       weights="none" if params is None else "included",
                       tokenizer="placeholder" if write_placeholder_tokenizer is not None else "included",
                       options=options, tvm_versions=installed_tvm_versions())
        for f in tmp.iterdir():
            f.chmod(0o644 if f.suffix != ".so" else 0o755)
        tmp.chmod(0o755)  # mkdtemp makes it private; an artifact is meant to be copied and shared
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_artifact(path: str | Path, verify: bool = True) -> Artifact:
    """Read and check an artifact directory; raise ArtifactError on any mismatch."""
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir() or not mpath.exists():
        raise ArtifactError(f"{path} is not a kiln artifact (no {MANIFEST}); create one with `kiln compile`")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath} is corrupt ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mpath} is not a kiln artifact manifest")
    if verify:
        if manifest.get("abi_version") != ABI_VERSION or manifest.get("kiln_version") != __version__:
            raise ArtifactError(
                f"{path} was built by kiln {manifest.get('kiln_version')} (ABI {manifest.get('abi_version')}); "
                f"this is kiln {__version__} (ABI {ABI_VERSION}): recompile it with `kiln compile`")
        have = installed_tvm_versions()
        want = {"tvm": manifest.get("tvm_version"), "tvm_ffi": manifest.get("tvm_ffi_version")}
        if have != want:
            raise ArtifactError(f"{path} was built with TVM {want['tvm']} / tvm-ffi {want['tvm_ffi']}, "
                                f"installed are {have['tvm']} / {have['tvm_ffi']}: recompile it with `kiln compile`")
        files = manifest.get("files", {})
        weights = manifest.get("weights", "included")
        if weights not in WEIGHTS:
            raise ArtifactError(f"{mpath}: unknown \"weights\": {weights!r} (expected one of {', '.join(WEIGHTS)})")
        for name in (LIBRARY, PARAMS) if weights == "included" else (LIBRARY,):
            if name not in files:
                raise ArtifactError(f"{path}: the manifest lists no {name}")
        for name, digest in files.items():
            f = path / name
            if not f.is_file():
                raise ArtifactError(f"{path}: {name} is missing")
            if sha256(f) != digest:
                raise ArtifactError(f"{path}: {name} does not match its sha256 in the manifest (modified or corrupt)")
    try:
        return Artifact(path, Manifest.from_json(manifest))
    except (KeyError, TypeError, ValueError, IndexError, AssertionError) as e:
        raise ArtifactError(f"{mpath} is malformed ({e})") from None
