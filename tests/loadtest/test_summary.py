"""The load test summary: rates, JSON round trip and the printed lines."""

from __future__ import annotations

from loadtest.summary import Summary, format_summary


def make_summary() -> Summary:
    return Summary(
        duration_s=10.0,
        requests=200,
        succeeded=150,
        errors=10,
        rejected={"429": 30, "503": 10},
        images=300,
        labelled=300,
        correct=297,
        latency_ms={"p50": 20.0, "p95": 45.0, "p99": 80.0},
    )


def test_summary_rates():
    summary = make_summary()
    assert summary.requests_per_s == 15.0
    assert summary.images_per_s == 30.0
    assert summary.error_rate == 0.05
    assert summary.rejection_rate == 0.2


def test_summary_json_round_trip(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text(make_summary().to_json())
    assert Summary.from_file(path) == make_summary()


def test_summary_empty_run_rates_zero():
    summary = Summary(duration_s=0.0, requests=0, succeeded=0, errors=0)
    assert summary.requests_per_s == 0.0
    assert summary.error_rate == 0.0
    assert summary.rejection_rate == 0.0
    assert "latency:        no requests" in format_summary(summary)


def test_format_summary_lines():
    text = format_summary(make_summary())
    assert "throughput:     15.0 requests/s, 30.0 images/s" in text
    assert "latency:        p50 20 ms, p95 45 ms, p99 80 ms" in text
    assert "error rate:     5.00% (10 errors)" in text
    assert "rejection rate: 20.00% (30 x HTTP 429, 10 x HTTP 503)" in text
    assert "top-1 accuracy: 99.00% of 300 labelled images" in text
