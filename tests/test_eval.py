"""``kiln eval``: the sliding-window definition, kiln's perplexity of the demo artifact against the same
definition computed with transformers, chunked prefill of a window, and the command."""

from __future__ import annotations

import json
import math

import pytest

from conftest import DEMO_MODEL, ROOT
from kiln.errors import KilnError
from kiln.runtime.perplexity import sliding_windows

HELDOUT = ROOT / "data" / "heldout.txt"


@pytest.mark.parametrize("num_tokens,window,stride", [(10, 4, 2), (11, 4, 3), (10, 4, 1), (3, 8, 4), (100, 16, 8)])
def test_every_token_but_the_first_is_scored_once(num_tokens, window, stride):
    windows = sliding_windows(num_tokens, window, stride)
    scored = [t for w in windows for t in range(w.first_scored, w.end)]
    assert scored == list(range(1, num_tokens))
    for w in windows:
        assert w.end - w.begin <= window and w.begin % stride == 0
        if w.begin > 0:  # past the first window, at least window - stride tokens of context
            assert w.first_scored - w.begin >= window - stride


def test_windows_without_overlap_skip_their_first_token():
    windows = sliding_windows(10, 4, 4)
    assert [(w.begin, w.end, w.first_scored) for w in windows] == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    assert sliding_windows(9, 4, 4)[-1].end == 8  # a last window of one token scores nothing


@pytest.mark.parametrize("args", [(1, 4, 2), (10, 1, 1), (10, 4, 0), (10, 4, 5)])
def test_bad_windows_are_refused(args):
    with pytest.raises(KilnError):
        sliding_windows(*args)


def hf_perplexity(text: str, window: int, stride: int) -> tuple[float, int]:
    """The definition computed with transformers: Hugging Face's loop over windows, labels of the
    tokens already scored masked with -100, and the loss summed over the scored tokens exactly."""
    import torch
    from transformers import AutoModelForCausalLM

    from kiln.runtime.perplexity import encode_text
    from kiln.runtime.tokenizer import Tokenizer

    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    ids = torch.from_numpy(encode_text(Tokenizer(DEMO_MODEL), text, model.config.bos_token_id))[None]
    n = ids.shape[1]
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        x = ids[:, begin:end]
        labels = x.clone()
        labels[:, :max(prev_end - begin, 0)] = -100
        with torch.no_grad():
            logits = model(x).logits[0, :-1].double()
        loss = torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=-100, reduction="sum")
        nll += loss.item()
        count += int((labels[0, 1:] != -100).sum())
        prev_end = end
        if end == n:
            break
    return math.exp(nll / count), count


@pytest.mark.cpu
def test_perplexity_matches_transformers(zoo):
    from kiln.runtime.perplexity import evaluate_perplexity

    text = HELDOUT.read_text()[:4000]
    res = evaluate_perplexity(zoo.artifact("demo"), text, window=128, stride=48)
    want, count = hf_perplexity(text, 128, 48)
    assert res.num_tokens_scored == count == res.num_tokens - 1
    assert res.window == 128 and res.stride == 48 and res.num_windows > 10
    assert res.perplexity == pytest.approx(want, rel=1e-3)
    assert 2.0 < res.perplexity < 200.0  # a model of Python source, on Python source


@pytest.mark.cpu
def test_a_window_prefilled_in_chunks_scores_the_same(zoo):
    """A window longer than the prefill chunk runs in several batch_prefill calls on one KV sequence."""
    from kiln.artifact import load_artifact
    from kiln.runtime.kv_cache import KVCacheConfig
    from kiln.runtime.model_runner import ModelRunner
    from kiln.runtime.perplexity import Window, encode_text, window_nll
    from kiln.runtime.tokenizer import Tokenizer

    art = load_artifact(zoo.artifact("demo"))
    ids = encode_text(Tokenizer(art.path), HELDOUT.read_text()[:2000], art.spec.bos_token_id)[:200]
    whole = ModelRunner(art, kv_config=KVCacheConfig(max_num_seqs=1, max_total_tokens=256, prefill_chunk_size=256))
    chunked = ModelRunner(art, kv_config=KVCacheConfig(max_num_seqs=1, max_total_tokens=256, prefill_chunk_size=48))
    for w in (Window(0, 200, 1), Window(10, 200, 130)):  # the second: two context-only chunks
        assert window_nll(chunked, ids, w) == pytest.approx(window_nll(whole, ids, w), rel=1e-5)


def invoke(*args):
    from click.testing import CliRunner

    from kiln.cli import main

    return CliRunner().invoke(main, ["eval", *map(str, args)])


@pytest.mark.cpu
def test_command_json(zoo, tmp_path):
    data = tmp_path / "head.txt"
    data.write_text(HELDOUT.read_text()[:1500])
    art = zoo.artifact("demo")
    r = invoke(art, "--data", data, "--json", "--window", "64")
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["perplexity"] > 1.0 and out["window"] == 64 and out["stride"] == 32
    assert out["artifact"] == str(art) and out["num_tokens_scored"] == out["num_tokens"] - 1
    progress = [ln for ln in r.stderr.splitlines() if "eval: window" in ln]  # a few lines, however many windows
    assert 2 <= len(progress) <= 11 and progress[-1].endswith(f"eval: window {out['num_windows']}/{out['num_windows']}")
    r = invoke(art, "--data", data)  # the default window: the context (512), one window here
    assert r.exit_code == 0 and r.stdout.startswith("perplexity ") and "window 512, stride 256" in r.stdout


@pytest.mark.cpu
def test_command_user_errors(zoo, tmp_path):
    art = zoo.artifact("demo")
    data = tmp_path / "t.txt"
    data.write_text("def f(x):\n    return x\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    for args, fragment in [((art, "--data", data, "--window", "1024"), "context window"),
                           ((art, "--data", data, "--window", "64", "--stride", "65"), "--stride 65"),
                           ((art, "--data", empty), "empty"),
                           ((art, "--data", tmp_path / "missing.txt"), "missing.txt"),
                           ((tmp_path / "no-artifact", "--data", data), "not a kiln artifact")]:
        r = invoke(*args)
        assert r.exit_code == 1 and isinstance(r.exception, SystemExit), (args, r.output)
        errors = [ln for ln in r.output.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1 and fragment in errors[0], (args, r.output)
