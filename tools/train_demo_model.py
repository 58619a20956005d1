"""Train kiln's bundled demo model: a small Llama on the Python standard library's own source.

The corpus is every ``.py`` file of the running interpreter's standard library (no network, present
on any machine with Python). Files are split deterministically by a hash of their relative path:
about 5% are held out and never seen by the tokenizer or the model; the held-out perplexity is
measured on them at the end.

Output (Hugging Face layout, loadable by transformers and by ``kiln compile``):
    config.json, generation_config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json (with a chat template), special_tokens_map.json, training.json

    python tools/train_demo_model.py -o models/kiln-demo --minutes 70

Training is time-boxed: the learning-rate schedule runs over ``--minutes`` of wall clock, so the
result depends on the machine's speed; ``training.json`` records steps, tokens seen and the
held-out perplexity.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL = ["<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def corpus_files(root: Path) -> tuple[list[Path], list[Path]]:
    files = sorted(
        p for p in root.rglob("*.py")
        if "site-packages" not in p.parts and "idlelib" not in p.parts and p.stat().st_size < 400_000
    )
    train, held = [], []
    for p in files:
        h = int(hashlib.sha256(str(p.relative_to(root)).encode()).hexdigest()[:8], 16)
        (held if h % 20 == 0 else train).append(p)
    return train, held


def read(paths: list[Path]) -> list[str]:
    out = []
    for p in paths:
        try:
            out.append(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            pass
    return out


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode(tok: Tokenizer, texts: list[str]) -> np.ndarray:
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.append(bos)
        ids.extend(enc.ids)
        ids.append(eos)
    return np.asarray(ids, dtype=np.int32)


@torch.no_grad()
def perplexity(model, data: np.ndarray, seq_len: int, max_windows: int = 200) -> float:
    model.eval()
    n = min(max_windows, (len(data) - 1) // seq_len)
    nll, count = 0.0, 0
    for i in range(n):
        x = torch.from_numpy(data[i * seq_len:(i + 1) * seq_len + 1].astype(np.int64))[None]
        logits = model(x[:, :-1]).logits
        nll += torch.nn.functional.cross_entropy(logits[0], x[0, 1:], reduction="sum").item()
        count += seq_len
    model.train()
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", default="models/kiln-demo")
    ap.add_argument("--minutes", type=float, default=70.0)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(sysconfig.get_paths()["stdlib"])
    train_paths, held_paths = corpus_files(root)
    train_texts, held_texts = read(train_paths), read(held_paths)
    print(f"corpus: {len(train_texts)} train files, {len(held_texts)} held-out files from {root}", flush=True)

    t0 = time.time()
    tok = train_tokenizer(train_texts, args.vocab)
    train_ids, held_ids = encode(tok, train_texts), encode(tok, held_texts)
    print(f"tokenizer: {tok.get_vocab_size()} tokens in {time.time() - t0:.0f}s; "
          f"{len(train_ids) / 1e6:.1f}M train tokens, {len(held_ids) / 1e6:.2f}M held-out", flush=True)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token=None, pad_token="</s>",
        additional_special_tokens=SPECIAL[2:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = args.seq_len * 2
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")

    cfg = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq_len * 2, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(cfg)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"model: {num_params / 1e6:.2f}M parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    rng = np.random.default_rng(args.seed)
    budget = args.minutes * 60.0
    warmup_s = min(120.0, budget * 0.05)
    t_start, step, tokens_seen, ema = time.time(), 0, 0, None
    model.train()
    while (elapsed := time.time() - t_start) < budget:
        frac = elapsed / budget
        lr = args.lr * min(1.0, (elapsed + 1) / warmup_s) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = rng.integers(0, len(train_ids) - args.seq_len, size=args.batch)
        x = torch.from_numpy(np.stack([train_ids[s:s + args.seq_len] for s in starts]).astype(np.int64))
        loss = model(input_ids=x, labels=x).loss  # transformers shifts the labels by one itself
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_seen += args.batch * args.seq_len
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 50 == 0:
            print(f"step {step} t={elapsed / 60:.1f}min lr={lr:.2e} loss={ema:.3f}", flush=True)

    ppl = perplexity(model, held_ids, args.seq_len)
    print(f"held-out perplexity: {ppl:.2f} over {step} steps ({tokens_seen / 1e6:.1f}M tokens)", flush=True)

    model.generation_config.bos_token_id = bos
    model.generation_config.eos_token_id = [eos, tok.token_to_id("<|end|>")]  # </s>, and the chat turn's end
    model.generation_config.pad_token_id = eos
    model.save_pretrained(out, safe_serialization=True)
    fast.save_pretrained(out)
    # transformers 5 writes the template to chat_template.jinja only; kiln and older readers look in
    # tokenizer_config.json, so keep it there too, under the class name every version knows.
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["chat_template"] = CHAT_TEMPLATE
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc_path.write_text(json.dumps(tc, indent=2) + "\n")
    info = {
        "command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        "python": sys.version.split()[0], "torch": torch.__version__,
        "corpus": f"Python {sys.version_info.major}.{sys.version_info.minor} standard library .py files",
        "train_files": len(train_texts), "held_out_files": len(held_texts),
        "train_tokens": int(len(train_ids)), "held_out_tokens": int(len(held_ids)),
        "parameters": num_params, "steps": step, "tokens_seen": tokens_seen,
        "minutes": args.minutes, "seq_len": args.seq_len, "batch": args.batch, "lr": args.lr, "seed": args.seed,
        "held_out_perplexity": round(ppl, 3), "held_out_windows": min(200, (len(held_ids) - 1) // args.seq_len),
    }
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
