"""kiln.bench.metrics against hand-computed values: percentiles, TTFT/TPOT/ITL/E2EL, goodput per SLO
kind, requests with a single output token, and the --slo parser."""

from __future__ import annotations

import pytest

from kiln.bench.metrics import RequestTiming, goodput, meets_slo, parse_slo, percentile, serving_metrics

# A: arrives at 1.0 s, 4 tokens at 1.5, 1.7, 2.0, 2.5 -> ttft 0.5, e2el 1.5, tpot (1.5 - 0.5) / 3, gaps .2 .3 .5
A = RequestTiming(arrival=1.0, token_times=(1.5, 1.7, 2.0, 2.5), prompt_len=10)
# B: one token only -> ttft = e2el = 0.25, no TPOT, no gaps
B = RequestTiming(arrival=0.0, token_times=(0.25,), prompt_len=3)


def test_percentile_interpolates_between_closest_ranks():
    assert percentile([4, 1, 3, 2], 50) == pytest.approx(2.5)
    assert percentile([1, 2, 3, 4], 90) == pytest.approx(3.7)  # rank 0.9 * 3 = 2.7
    assert percentile([1, 2, 3, 4], 99) == pytest.approx(3.97)
    assert percentile([1, 2, 3, 4], 0) == 1 and percentile([1, 2, 3, 4], 100) == 4
    assert percentile([7.0], 99) == 7.0


def test_request_timing():
    assert A.ttft == pytest.approx(0.5) and A.e2el == pytest.approx(1.5) and A.output_len == 4
    assert A.tpot == pytest.approx(1.0 / 3)  # (e2el - ttft) / (output_len - 1)
    assert A.itls == pytest.approx([0.2, 0.3, 0.5])
    assert B.ttft == B.e2el == 0.25 and B.tpot is None and B.itls == []


def test_request_timing_rejects_impossible_times():
    with pytest.raises(AssertionError):
        RequestTiming(arrival=1.0, token_times=(0.5,), prompt_len=1)  # a token before its request arrived
    with pytest.raises(AssertionError):
        RequestTiming(arrival=0.0, token_times=(2.0, 1.0), prompt_len=1)


def test_serving_metrics_by_hand():
    m = serving_metrics([A, B], duration=2.0)
    assert m["completed"] == 2 and m["duration"] == 2.0
    assert m["total_input_tokens"] == 13 and m["total_output_tokens"] == 5
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["output_throughput"] == pytest.approx(2.5)
    assert m["total_token_throughput"] == pytest.approx(9.0)
    assert m["request_goodput"] is None  # no SLO given
    # TTFT 500 and 250 ms
    assert m["mean_ttft_ms"] == pytest.approx(375) and m["p50_ttft_ms"] == pytest.approx(375)
    assert m["p90_ttft_ms"] == pytest.approx(475) and m["p99_ttft_ms"] == pytest.approx(497.5)
    # TPOT: only A has one (B's single token is left out)
    for k in ("mean", "p50", "p90", "p99"):
        assert m[f"{k}_tpot_ms"] == pytest.approx(1000 / 3)
    # ITL: A's gaps 200, 300, 500 ms pooled
    assert m["mean_itl_ms"] == pytest.approx(1000 / 3) and m["p50_itl_ms"] == pytest.approx(300)
    assert m["p90_itl_ms"] == pytest.approx(460) and m["p99_itl_ms"] == pytest.approx(496)
    # E2EL 1500 and 250 ms
    assert m["mean_e2el_ms"] == pytest.approx(875) and m["p99_e2el_ms"] == pytest.approx(250 + 0.99 * 1250)


def test_single_token_requests_have_no_tpot_or_itl():
    m = serving_metrics([B, B], duration=1.0)
    assert m["mean_tpot_ms"] is None and m["p99_tpot_ms"] is None and m["p50_itl_ms"] is None
    assert m["p50_ttft_ms"] == pytest.approx(250) and m["p50_e2el_ms"] == pytest.approx(250)


@pytest.mark.parametrize("slo, good", [
    ({"ttft": 400}, 1),  # B (250 ms) only
    ({"ttft": 500}, 2),  # a limit is met when equal
    ({"tpot": 300}, 1),  # A's 333 ms fails; B has no TPOT, which meets any TPOT limit
    ({"tpot": 400}, 2),
    ({"e2el": 1000}, 1),  # B only
    ({"e2el": 1500}, 2),
    ({"ttft": 600, "tpot": 300}, 1),  # every SLO must hold
    ({"ttft": 600, "tpot": 400, "e2el": 2000}, 2),
    ({"ttft": 100}, 0),
])
def test_goodput_per_slo_kind(slo, good):
    assert sum(meets_slo(r, slo) for r in (A, B)) == good
    assert goodput([A, B], slo, duration=2.0) == pytest.approx(good / 2.0)
    assert serving_metrics([A, B], 2.0, slo)["request_goodput"] == pytest.approx(good / 2.0)


def test_parse_slo():
    assert parse_slo("ttft:500,tpot:50") == {"ttft": 500.0, "tpot": 50.0}
    assert parse_slo(" E2EL : 1.5e3 ") == {"e2el": 1500.0}


@pytest.mark.parametrize("text, fragment", [
    ("", "KIND:MS"), ("ttft", "KIND:MS"), ("ttfb:5", "KIND:MS"), ("ttft:", "not a number"),
    ("ttft:fast", "not a number"), ("ttft:0", "positive"), ("tpot:-1", "positive"), ("e2el:inf", "positive"),
    ("ttft:nan", "positive"), ("ttft:5,ttft:6", "twice"), ("ttft:5,", "KIND:MS"),
])
def test_parse_slo_rejects(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_slo(text)
