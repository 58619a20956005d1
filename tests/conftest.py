"""Shared fixtures: tiny random-weight Hugging Face models of every supported architecture, saved with
``save_pretrained`` and a small tokenizer, and their kiln artifacts — each built once per session.

Tiers (pytest markers): unit (no marker: pure Python/NumPy), ``cpu`` (compiles/runs on the CPU
target), ``cuda_compile`` (needs nvcc, no GPU), ``gpu`` (needs a GPU; skipped without one).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = Path(os.environ.get("KILN_DEMO_MODEL", ROOT / "models" / "kiln-demo"))
VOCAB = 320

# variant -> (transformers config class name, config overrides, save options)
MODELS: dict[str, tuple[str, dict, dict]] = {
    # GQA, untied lm_head, default RoPE
    "llama": ("LlamaConfig", {}, {}),
    # tied embeddings + llama3 RoPE scaling; checkpoint stored in bfloat16 and sharded
    "llama3-tied": ("LlamaConfig", {"tie_word_embeddings": True, "rope_theta": 500000.0,
                                    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 64}},
                    {"dtype": "bfloat16", "max_shard_size": "100KB"}),
    # linear RoPE scaling, multi-head (no GQA), checkpoint in float16
    "llama-linear": ("LlamaConfig", {"num_key_value_heads": 4, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
                     {"dtype": "float16"}),
    # Mistral with a sliding window longer than the compiled context (so it never applies)
    "mistral": ("MistralConfig", {"sliding_window": 4096, "head_dim": 16}, {}),
    # Mistral whose window (16) the tests generate far past: served by kiln's grouped KV cache
    "mistral-sliding": ("MistralConfig", {"sliding_window": 16, "head_dim": 16}, {}),
    # attention bias, tied embeddings
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}, {}),
    # q/k norm, head_dim different from hidden/heads
    "qwen3": ("Qwen3Config", {"head_dim": 32}, {}),
    # attention bias on q/k/v and o_proj
    "llama-bias": ("LlamaConfig", {"attention_bias": True}, {}),
}

BASE_CONFIG = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                   bos_token_id=1, eos_token_id=2, pad_token_id=0)


def pytest_configure(config):
    os.environ.setdefault("KILN_CACHE", str(ROOT / "build" / "cache"))


def _has_gpu() -> bool:
    return Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi") is not None


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU; this machine has none")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def save_tokenizer(path: Path, vocab: int = VOCAB) -> None:
    """A small word-level tokenizer ("w0".."wN" plus specials) in the fast-tokenizer layout."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(path)


def make_hf_model(variant: str, path: Path, seed: int = 0):
    """Create, save and return (eval mode, float32) a random-weight transformers model."""
    import torch
    import transformers

    cls_name, overrides, save = MODELS[variant]
    cfg = getattr(transformers, cls_name)(**{**BASE_CONFIG, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # larger weights than HF's init so attention patterns and logits are not flat
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    dtype = save.get("dtype")
    if dtype:
        model = model.to(getattr(torch, dtype))
    model.save_pretrained(path, max_shard_size=save.get("max_shard_size", "10GB"))
    save_tokenizer(path)
    if dtype:  # the float32 reference: stored weights upcast, RoPE buffers recomputed in float32
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


def fused_param_shapes(spec) -> dict[str, tuple[int, ...]]:
    """The artifact's parameter layout for ``spec`` after the fusion passes: the reference form's, with each
    layer's q/k/v projections (and biases) and gate/up projections merged row-wise, in place of the first."""
    from kiln.frontend.reference import param_shapes

    merged = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "q_bias": "qkv_bias",
              "k_bias": "qkv_bias", "v_bias": "qkv_bias", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in param_shapes(spec).items():
        layer, _, role = name.rpartition(".")
        if role not in merged:
            out[name] = tuple(shape)
            continue
        key = f"{layer}.{merged[role]}"
        rows = out.get(key, (0,))[0]
        out[key] = (rows + shape[0], *shape[1:])
    return out


def unfuse_params(params: dict, spec) -> dict:
    """An artifact's stored tensors with the fusion passes' merges split back, row-wise, into each linear's
    own (``layers.0.qkv_proj.qweight`` -> ``layers.0.q_proj.qweight``, ...), for tests that compare them
    with a per-linear reference."""
    qd, kvd = spec.num_q_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    splits = {"qkv_proj": (("q_proj", qd), ("k_proj", kvd), ("v_proj", kvd)),
              "qkv_bias": (("q_bias", qd), ("k_bias", kvd), ("v_bias", kvd)),
              "gate_up_proj": (("gate_proj", spec.intermediate_size), ("up_proj", spec.intermediate_size))}
    out = {}
    for name, t in params.items():
        parts = name.split(".")
        if len(parts) >= 3 and parts[0] == "layers" and parts[2] in splits:
            row = 0
            for role, rows in splits[parts[2]]:
                out[".".join([*parts[:2], role, *parts[3:]])] = t[row:row + rows]
                row += rows
            assert row == t.shape[0], name
        else:
            out[name] = t
    return out


def export_graph(model, path: Path) -> Path:
    """Export ``model.forward(input_ids, attention_mask) -> logits`` (sequence length dynamic, 2..128) to
    ``path``: a .pt2 with torch.export.save, an .onnx with the dynamo ONNX exporter."""
    import warnings

    import torch

    model.config.use_cache = False
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    seq = torch.export.Dim("seq", min=2, max=128)
    dims = {"input_ids": {1: seq}, "attention_mask": {1: seq}}
    if path.suffix == ".pt2":
        torch.export.save(torch.export.export(model, (), kwargs, dynamic_shapes=dims), path)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (), str(path), kwargs=kwargs, dynamic_shapes=dims, dynamo=True, verbose=False,
                              input_names=["input_ids", "attention_mask"], output_names=["logits"])
    return path


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kiln")


class _Zoo:
    """Session cache of HF models and their compiled CPU artifacts."""

    def __init__(self, root: Path):
        self.root = root
        self._hf: dict = {}
        self._art: dict = {}
        self._graphs: dict = {}

    def hf(self, variant: str):
        """(model_dir, transformers model in float32)"""
        if variant not in self._hf:
            d = self.root / f"hf-{variant}"
            self._hf[variant] = (d, make_hf_model(variant, d))
        return self._hf[variant]

    def graph(self, variant: str, fmt: str) -> Path:
        """``variant``'s forward(input_ids, attention_mask) -> logits exported with a dynamic sequence length:
        fmt "pt2" (torch.export.save) or "onnx" (torch.onnx.export, dynamo=True)."""
        key = (variant, fmt)
        if key not in self._graphs:
            _, model = self.hf(variant)
            self._graphs[key] = export_graph(model, self.root / f"graph-{variant}.{fmt}")
        return self._graphs[key]

    def artifact(self, variant: str, **options) -> Path:
        """Compile ``variant`` (an HF variant name, or "demo" for the bundled model) for the CPU."""
        from kiln.compiler import CompileConfig, compile_model

        key = (variant, tuple(sorted(options.items())))
        if key not in self._art:
            src = DEMO_MODEL if variant == "demo" else self.hf(variant)[0]
            out = self.root / f"art-{variant}-{len(self._art)}"
            compile_model(src, out, CompileConfig(**options))
            self._art[key] = out
        return self._art[key]


@pytest.fixture(scope="session")
def zoo(workdir) -> _Zoo:
    return _Zoo(workdir)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models and tensors: torch's intra-op threads only fight (each other and a busy 2-core machine)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def fresh_copy(tmp_path):
    """Copy a directory into this test's tmp dir (for tests that modify an artifact)."""

    def copy(src: Path) -> Path:
        dst = tmp_path / src.name
        shutil.copytree(src, dst)
        return dst

    return copy
