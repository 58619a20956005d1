"""``kiln bench`` on the demo artifact with tiny settings: every documented JSON key present with sane
values, the two plots valid PNGs, the summary on stdout, and bad options one line without a traceback."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from kiln.cli import main

pytestmark = pytest.mark.cpu

BATCH_SIZES, INPUT_LEN, OUTPUT_LEN, NUM_PROMPTS, RATES = [1, 4], 32, 8, 8, ["4", "inf"]
TOP_KEYS = ("kiln_version", "date", "artifact", "artifact_path", "target", "device", "model", "engine_config",
            "warm_up", "modes", "options", "workload", "slo_ms", "latency", "throughput", "serving")
LATENCY_KEYS = ("batch_size", "input_len", "output_len", "prefill_steps", "prefill_ms", "prefill_tokens_per_s",
                "decode_steps", "mean_decode_step_ms", "p50_decode_step_ms", "p99_decode_step_ms",
                "decode_tokens_per_s")
THROUGHPUT_KEYS = ("completed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
                   "output_throughput", "total_token_throughput")
LATENCIES = ("ttft", "tpot", "itl", "e2el")
SERVING_KEYS = ("request_rate", *THROUGHPUT_KEYS, "request_goodput",
                *(f"{s}_{m}_ms" for m in LATENCIES for s in ("mean", "p50", "p90", "p99")))


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def demo(zoo):
    return zoo.artifact("demo")


@pytest.fixture(scope="module")
def run(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    args = ["bench", str(demo), "--batch-sizes", ",".join(map(str, BATCH_SIZES)), "--input-len", str(INPUT_LEN),
            "--output-len", str(OUTPUT_LEN), "--num-prompts", str(NUM_PROMPTS), "--request-rates", ",".join(RATES),
            "--slo", "ttft:60000,tpot:10000,e2el:60000", "--json", str(out / "bench.json"),
            "--plot", str(out / "plots")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res, json.loads((out / "bench.json").read_text()), out / "plots"


def test_json_has_every_key(run, demo):
    _, got, _ = run
    assert set(TOP_KEYS) <= set(got)
    assert got["artifact"] == demo.name and got["device"] == "cpu" and got["target"]["name"] == "cpu"
    assert got["kiln_version"] and got["date"] and got["model"]["context_len"] == 512
    assert got["warm_up"] == {"graph_batch_sizes": 0, "graph_seconds": 0.0}  # a CPU artifact: no CUDA graphs
    assert got["modes"] == ["latency", "throughput", "serving"]
    assert got["options"]["batch_sizes"] == BATCH_SIZES and got["options"]["request_rates"] == [4.0, "inf"]
    assert got["slo_ms"] == {"ttft": 60000.0, "tpot": 10000.0, "e2el": 60000.0}
    assert got["workload"]["num_prompts"] == NUM_PROMPTS and got["workload"]["max_total_len"] <= 512


def test_latency(run):
    rows = run[1]["latency"]
    assert [r["batch_size"] for r in rows] == BATCH_SIZES
    for r in rows:
        assert set(r) == set(LATENCY_KEYS)
        assert all(positive(r[k]) for k in LATENCY_KEYS), r
        assert r["decode_steps"] == OUTPUT_LEN and r["input_len"] == INPUT_LEN
        assert r["decode_tokens_per_s"] == pytest.approx(r["batch_size"] * 1e3 / r["mean_decode_step_ms"])
        assert r["prefill_tokens_per_s"] == pytest.approx(r["batch_size"] * INPUT_LEN * 1e3 / r["prefill_ms"])
        assert r["p50_decode_step_ms"] <= r["p99_decode_step_ms"]


def test_throughput(run):
    t = run[1]["throughput"]
    assert set(t) == set(THROUGHPUT_KEYS)
    assert all(positive(t[k]) for k in THROUGHPUT_KEYS), t
    assert t["completed"] == NUM_PROMPTS
    assert t["request_throughput"] == pytest.approx(NUM_PROMPTS / t["duration"])
    assert t["total_token_throughput"] > t["output_throughput"]


def test_serving(run):
    rows = run[1]["serving"]
    assert [r["request_rate"] for r in rows] == [4.0, "inf"]
    throughput = run[1]["throughput"]
    for r in rows:
        assert set(r) == set(SERVING_KEYS)
        assert all(positive(r[k]) for k in SERVING_KEYS if k != "request_rate"), r
        assert r["completed"] == NUM_PROMPTS
        assert r["total_output_tokens"] == throughput["total_output_tokens"]  # the same requests at every rate
        assert r["request_goodput"] == pytest.approx(r["request_throughput"])  # the SLOs are generous
        for m in LATENCIES:
            assert r[f"p50_{m}_ms"] <= r[f"p90_{m}_ms"] <= r[f"p99_{m}_ms"], (m, r)
        assert r["p99_ttft_ms"] <= r["p99_e2el_ms"]


def test_plots_are_pngs(run):
    from PIL import Image

    for name in ("serving_latency.png", "decode_throughput.png"):
        path = run[2] / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        with Image.open(path) as im:
            im.verify()
            assert im.size[0] > 100 and im.size[1] > 100


def test_summary_on_stdout(run):
    res = run[0]
    assert "offline latency" in res.stdout and "offline throughput" in res.stdout and "online serving" in res.stdout
    assert "%|" not in res.stdout  # progress bars go to stderr
    assert "Traceback" not in res.output


@pytest.mark.parametrize("option, value", [
    ("--slo", "ttft:fast"), ("--slo", "latency:5"), ("--slo", "ttft:5,ttft:6"), ("--batch-sizes", "1,0"),
    ("--batch-sizes", "eight"), ("--request-rates", "1,-4"),
])
def test_bad_option_is_a_usage_error(demo, option, value):
    res = CliRunner().invoke(main, ["bench", str(demo), option, value])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit)
    assert f"Invalid value for '{option}'" in res.output


@pytest.mark.parametrize("args, fragment", [
    (["--mode", "latency", "--input-len", "500", "--output-len", "16"], "context window of 512"),
    (["--batch-sizes", "8", "--max-num-seqs", "4"], "--max-num-seqs of at least 8"),
    (["--kv-cache-memory", "lots"], "--kv-cache-memory"),
    (["--json", "no/such/dir/out.json"], "does not exist"),
])
def test_user_errors_are_one_line(demo, args, fragment):
    res = CliRunner().invoke(main, ["bench", str(demo), "--no-progress", *args])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit)
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], res.output


def test_missing_artifact(tmp_path):
    res = CliRunner().invoke(main, ["bench", str(tmp_path / "nope"), "--no-progress"])
    assert res.exit_code == 1 and res.output.startswith("error: ") and "not a kiln artifact" in res.output


def test_random_weights_reach_the_engine(demo, tmp_path):
    out = tmp_path / "rw.json"
    res = CliRunner().invoke(main, ["bench", str(demo), "--mode", "latency", "--batch-sizes", "2", "--output-len", "2",
                                    "--random-weights", "5", "--no-progress", "--json", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    got = json.loads(out.read_text())
    assert got["engine_config"]["random_weights"] == 5 and got["options"]["random_weights"] == 5
    assert "latency" in got and "throughput" not in got and "serving" not in got
    assert got["latency"][0]["decode_steps"] == 2


def test_latency_leaves_the_first_decode_step_of_each_batch_untimed(demo):
    """On a GPU the first decode step at a new batch size captures its CUDA graph: one decode-only step
    runs untimed before the ``output_len`` timed ones."""
    from kiln.bench.runner import BenchConfig, _decoding, latency_at_batch
    from kiln.runtime.engine import Engine, EngineConfig

    engine = Engine(demo, EngineConfig(max_num_seqs=4, kv_cache_memory=32 << 20))
    decode_steps, step = [], engine.step

    def counted():
        decode_steps.append(_decoding(engine, 3))
        return step()

    engine.step = counted
    row = latency_at_batch(engine, BenchConfig(input_len=8, output_len=3, progress=False), 3, seed=1)
    assert row["decode_steps"] == 3 and sum(decode_steps) == 4
