"""Calibration: run a Hugging Face checkpoint in PyTorch over calibration text and record what every
decoder linear's input looks like, for the quantization schemes (AWQ's activation scales and clip
search) to read later. The result is a saved file; nothing here changes the model.

Data (llm-awq's recipe, on one text file): the whole text is tokenized as one sequence (BOS first
when the model has one and the tokenizer does not add it), split into consecutive blocks of
``seq_len`` tokens (a remainder shorter than a block is dropped; a text shorter than one block is
one block), and ``num_samples`` of the blocks are chosen at random with ``seed`` (all of them
when there are fewer), kept in text order. llm-awq shuffles pile-val lines, concatenates 128 of them
and splits into 512-token blocks; the defaults here are the same numbers.

Statistics, per decoder linear (kiln names ``layers.{i}.q_proj`` ... ``layers.{i}.down_proj``), over
all calibration tokens, from forward hooks on the float32 model on the CPU. q/k/v read one input, as
do gate/up (``calibration.SHARED_INPUT``): the hook sits on the group's first linear and every key of the
group holds the same tensors, which ``Calibration.save`` stores once. Per linear:
- ``mean_abs[in]``: mean |x| per input channel (AWQ's s_X, ``get_act_scale``);
- ``max_abs[in]``: max |x| per input channel;
- ``samples[T, in]``: T = min(512, tokens) input rows at token indices drawn once with ``seed``
  (the same tokens for every linear, like llm-awq's ``n_sample_token=512`` for the clip search).

The file also records its provenance (``Calibration.meta``): model, data file and its sha256, token
counts and the options.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, KilnError
from ..frontend.hf import load_spec
from ..frontend.registry import ARCHITECTURES, Architecture
from ..progress import count
from .calibration import MAX_SAMPLES, Calibration, input_key

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "data" / "calibration.txt"
_LINEAR = re.compile(r"layers\.\{i\}\.(\w+_proj)$")  # a decoder linear's kiln name template


@dataclass(frozen=True)
class CalibrateConfig:
    num_samples: int = 128  # blocks of calibration text
    seq_len: int = 512  # tokens per block
    seed: int = 0  # which blocks, which sample rows
    max_sample_rows: int = MAX_SAMPLES

    def __post_init__(self):
        assert self.num_samples >= 1 and self.seq_len >= 1 and 1 <= self.max_sample_rows <= MAX_SAMPLES, self


def linear_module_names(arch: Architecture, num_layers: int) -> dict[str, str]:
    """HF module name -> kiln linear name for every decoder linear, from the registry's weight table."""
    linears = {k: hf.removesuffix(".weight") for k, hf in arch.weights.items()
               if _LINEAR.match(k) and hf.endswith(".weight")}
    return {hf.replace("{i}", str(i)): k.replace("{i}", str(i)) for i in range(num_layers) for k, hf in linears.items()}


def choose_blocks(num_tokens: int, config: CalibrateConfig, rng: np.random.Generator) -> list[tuple[int, int]]:
    """(start, end) token ranges of the calibration blocks, in text order (module docstring)."""
    assert num_tokens > 0
    num_blocks = num_tokens // config.seq_len
    if num_blocks == 0:
        return [(0, num_tokens)]
    picked = range(num_blocks) if num_blocks <= config.num_samples else \
        sorted(rng.choice(num_blocks, size=config.num_samples, replace=False).tolist())
    return [(b * config.seq_len, (b + 1) * config.seq_len) for b in picked]


class _InputStats:
    """Running statistics of one linear's input rows, fed block by block."""

    def __init__(self, sample_rows: np.ndarray):
        self.sample_rows = sample_rows  # sorted global token indices to keep
        self.sum_abs = self.max_abs = None
        self.num_rows = 0
        self.samples: list = []

    def add(self, x, offset: int) -> None:
        """x: [rows, in], the rows of global token indices offset .. offset + rows."""
        import torch

        x = x.detach().float()
        a = x.abs()
        s, m = a.sum(0, dtype=torch.float64), a.amax(0)
        self.sum_abs = s if self.sum_abs is None else self.sum_abs + s
        self.max_abs = m if self.max_abs is None else torch.maximum(self.max_abs, m)
        lo, hi = np.searchsorted(self.sample_rows, [offset, offset + len(x)])
        if hi > lo:
            self.samples.append(x[torch.from_numpy(self.sample_rows[lo:hi] - offset)].clone())
        self.num_rows += len(x)


def encode_text(tokenizer_file: Path, text: str, bos_token_id: int | None) -> list[int]:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_file)).encode(text).ids
    if bos_token_id is not None and (not ids or ids[0] != bos_token_id):
        ids = [bos_token_id] + ids
    return ids


def read_text(path: Path) -> str:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KilnError(f"calibration data {path} does not exist") from None
    except IsADirectoryError:
        raise KilnError(f"calibration data {path} is a directory; give a text file") from None
    except UnicodeDecodeError as e:
        raise KilnError(f"calibration data {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise KilnError(f"calibration data {path} is empty")
    return text


def _load_model(model_dir: Path):
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    except Exception as e:  # transformers raises OSError/ValueError/... for a missing or corrupt checkpoint
        last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"transformers cannot load {model_dir}: {last}") from None
    return model.eval()


def calibrate(model_dir: str | Path, data: str | Path, config: CalibrateConfig = CalibrateConfig()):
    """Run the model over the calibration blocks; return (Calibration, metadata dict)."""
    import torch

    model_dir, data = Path(model_dir), Path(data)
    spec = load_spec(model_dir)  # checks the directory, config.json and the architecture first
    arch = ARCHITECTURES[spec.architecture]
    if not (model_dir / "tokenizer.json").exists():
        raise CheckpointError(f"{model_dir} has no tokenizer.json (calibration tokenizes text with it)")
    text = read_text(data)
    ids = encode_text(model_dir / "tokenizer.json", text, spec.bos_token_id)
    rng = np.random.default_rng(config.seed)
    blocks = choose_blocks(len(ids), config, rng)
    num_tokens = sum(e - s for s, e in blocks)
    sample_rows = np.sort(rng.choice(num_tokens, size=min(config.max_sample_rows, num_tokens), replace=False))

    model = _load_model(model_dir)
    names = linear_module_names(arch, spec.num_layers)
    modules = dict(model.named_modules())
    missing = [hf for hf in names if not isinstance(modules.get(hf), torch.nn.Linear)]
    if missing:
        raise CheckpointError(f"the transformers model of {model_dir} has no linear {missing[0]}")
    hooked = {hf: kname for hf, kname in names.items() if input_key(kname) == kname}  # one per shared input
    stats = {kname: _InputStats(sample_rows) for kname in hooked.values()}
    offset = 0

    def hook(kname):
        def fn(module, inputs, output):
            x = inputs[0]  # [1, L, in]
            stats[kname].add(x.reshape(-1, x.shape[-1]), offset)
        return fn

    handles = [modules[hf].register_forward_hook(hook(kname)) for hf, kname in hooked.items()]
    try:
        with torch.inference_mode():
            for i, (start, end) in enumerate(blocks, start=1):
                model(torch.tensor([ids[start:end]], dtype=torch.long), use_cache=False)
                offset += end - start
                count("calibrate: block", i, len(blocks))
    finally:
        for h in handles:
            h.remove()

    for kname, st in stats.items():
        assert st.num_rows == num_tokens, (kname, st.num_rows, num_tokens)
    mean_abs = {k: (st.sum_abs / st.num_rows).float() for k, st in stats.items()}
    max_abs = {k: st.max_abs for k, st in stats.items()}
    samples = {k: torch.cat(st.samples) for k, st in stats.items()}
    keys = list(names.values())  # every linear, in layer order; a group's members share its tensors
    calib = Calibration(mean_abs={k: mean_abs[input_key(k)] for k in keys},
                        max_abs={k: max_abs[input_key(k)] for k in keys},
                        samples={k: samples[input_key(k)] for k in keys})
    meta = {
        "model": str(model_dir), "architecture": spec.architecture, "data": str(data),
        "data_sha256": hashlib.sha256(data.read_bytes()).hexdigest(), "text_tokens": len(ids),
        "num_blocks": len(blocks), "num_tokens": num_tokens, "num_sample_rows": len(sample_rows),
        "options": asdict(config),
    }
    return calib, meta


def save_calibration(calib: Calibration, meta: dict, path: str | Path) -> None:
    """Write ``calib`` with ``meta`` as its provenance (in the safetensors header, Calibration.save)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise KilnError(f"-o {path}: the directory {path.parent} does not exist")
    calib.meta = dict(meta)
    calib.save(path)


def load_calibration(path: str | Path) -> tuple[Calibration, dict]:
    """(Calibration, its provenance metadata)."""
    calib = Calibration.load(path)
    return calib, calib.meta
