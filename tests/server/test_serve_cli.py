"""``kiln serve`` and ``kiln chat``: option parsing, user errors as one ``error:`` line with exit 1, a real
server process answering and stopping on Ctrl-C, and a terminal chat driven through click's CliRunner."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest
from click.testing import CliRunner

import kiln.runtime.chat_template as chat_template
from kiln.cli import main, parse_memory
from kiln.errors import KilnError

KILN = Path(sys.executable).with_name("kiln")  # the installed console script


@pytest.fixture(scope="module")
def demo_artifact(zoo) -> Path:
    return zoo.artifact("demo")


@pytest.mark.parametrize("text, value", [
    ("0.5", 0.5), ("1.0", 1.0), (".25", 0.25), ("1000000", 1_000_000), ("512MiB", 512 << 20), ("2GiB", 2 << 30),
    ("2gib", 2 << 30), ("1.5GB", 1_500_000_000), ("64k", 64_000), ("64Ki", 65_536),
])
def test_parse_memory(text, value):
    got = parse_memory(text)
    assert got == value and type(got) is type(value)  # a fraction stays a float, a size is an int


@pytest.mark.parametrize("text", ["0", "0.0", "1.5", "-1", "2XB", "lots", "", "1e9", "0MiB"])
def test_parse_memory_refuses(text):
    with pytest.raises(KilnError, match="--kv-cache-memory"):
        parse_memory(text)


def assert_one_error_line(res: subprocess.CompletedProcess, *fragments: str) -> None:
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and res.stderr.strip().splitlines()[-1] == errors[0], res.stderr
    for f in fragments:
        assert f in errors[0], (f, errors[0])


def kiln(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(KILN), *map(str, args)], capture_output=True, text=True, timeout=300)


def test_serve_bad_kv_cache_memory(tmp_path):
    assert_one_error_line(kiln("serve", tmp_path, "--kv-cache-memory", "2XB"), "--kv-cache-memory", "2XB")
    assert_one_error_line(kiln("serve", tmp_path, "--kv-cache-memory", "1.5"), "(0, 1]")


@pytest.mark.cpu
def test_serve_missing_artifact(tmp_path):
    assert_one_error_line(kiln("serve", tmp_path / "nope", "--port", "0"), "nope")


@pytest.mark.cpu
def test_serve_kv_cache_too_small(demo_artifact):
    assert_one_error_line(kiln("serve", demo_artifact, "--port", "0", "--kv-cache-memory", "1000"), "kv_cache_memory")


@pytest.mark.cpu
def test_serve_runs_until_interrupted(demo_artifact):
    proc = subprocess.Popen([str(KILN), "serve", demo_artifact, "--port", "0", "--kv-cache-memory", "64MiB",
                             "--max-num-seqs", "8", "--api-key", "sk-cli"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # printed once the server accepts connections
        assert line.startswith("kiln: serving "), (line, proc.stderr.read() if proc.poll() is not None else "")
        url = line.split(" at ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")  # loopback by default
        assert httpx2.get(url.removesuffix("/v1") + "/health", timeout=10).status_code == 200
        models = httpx2.get(f"{url}/models", headers={"Authorization": "Bearer sk-cli"}, timeout=10)
        assert models.json()["data"][0]["id"] == Path(demo_artifact).name
        r = httpx2.post(f"{url}/completions", headers={"Authorization": "Bearer sk-cli"}, timeout=60,
                        json={"model": Path(demo_artifact).name, "prompt": "import", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        finally:
            proc.kill()
    assert proc.returncode in (0, 130), proc.stderr.read()
    assert "Traceback" not in proc.stderr.read()


@pytest.mark.cpu
def test_chat_keeps_history_and_exits(demo_artifact, monkeypatch):
    seen = []

    def spy(tokenizer, messages, add_generation_prompt=True):
        seen.append([m["role"] for m in messages])
        return render(tokenizer, messages, add_generation_prompt)

    render = chat_template.render_chat
    monkeypatch.setattr(chat_template, "render_chat", spy)
    res = CliRunner().invoke(main, ["chat", str(demo_artifact), "--system", "Be brief.", "--max-tokens", "8",
                                    "--temperature", "0"],
                             input="Open a file.\nAnd close it.\n/reset\nhello\n/exit\nnever read\n")
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output
    assert seen == [["system", "user"], ["system", "user", "assistant", "user"], ["system", "user"]]
    # what follows each prompt: a reply, a reply, nothing (/reset), a reply, nothing (/exit)
    replies = [part.strip() for part in res.stdout.split("> ")[1:]]
    assert [bool(r) for r in replies] == [True, True, False, True, False], res.stdout


@pytest.mark.cpu
def test_chat_ends_at_eof(demo_artifact):
    res = CliRunner().invoke(main, ["chat", str(demo_artifact), "--max-tokens", "4", "--temperature", "0"],
                             input="hi\n")
    assert res.exit_code == 0, res.output
    # one turn, then the prompt that met the end of input (a prompt ends its line: stdin is not echoed; the
    # reply itself may hold "> ", e.g. the demo's ">>> def __")
    assert [line.rstrip() for line in res.output.splitlines()].count(">") == 2, res.output
