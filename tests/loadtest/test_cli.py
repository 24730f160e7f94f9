"""Smoke runs of ``python -m loadtest run`` against the real service over HTTP."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

from loadtest.cli import DEFAULT_HOST, main
from loadtest.forms import FORMS
from loadtest.summary import REJECTED_NAME
from tests.service.conftest import EXAMPLE_DIGITS, REPOSITORY_ROOT, ServerProcess

RUN_TIME = "4s"
# Locust's start-up and report writing on top of the run time.
COMMAND_TIMEOUT_S = 120


def run_loadtest(server: ServerProcess, out: Path, *options: str):
    command = [
        sys.executable, "-m", "loadtest", "run", "--host", server.url,
        "--run-time", RUN_TIME, "--out", str(out),
        "--image-dir", str(EXAMPLE_DIGITS), *options,
    ]  # fmt: skip
    return subprocess.run(
        command,
        cwd=REPOSITORY_ROOT,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )


def request_names(out: Path) -> dict[str, int]:
    """Return the request count of every row of Locust's stats CSV, by name."""
    with open(out / "locust_stats.csv") as file:
        return {row["Name"]: int(row["Request Count"]) for row in csv.DictReader(file)}


def test_loadtest_run_every_form(server, tmp_path):
    out = tmp_path / "report"
    result = run_loadtest(server, out, "--users", "6", "--spawn-rate", "6")
    assert result.returncode == 0, result.stdout + result.stderr

    summary = json.loads((out / "summary.json").read_text())
    assert summary["succeeded"] > 0
    assert summary["errors"] == 0
    assert summary["rejected"] == {}
    assert summary["succeeded"] == summary["requests"]
    assert summary["images"] >= summary["succeeded"]
    assert summary["labelled"] == summary["images"]
    assert set(summary["latency_ms"]) == {"p50", "p95", "p99"}
    assert (out / "report.html").is_file()

    names = request_names(out)
    for form in FORMS:
        assert names.get(f"/classify {form}", 0) > 0, form
    assert "throughput:" in result.stdout
    assert "rejection rate: 0.00%" in result.stdout


def test_loadtest_counts_rejections_apart(busy_server, tmp_path):
    out = tmp_path / "report"
    result = run_loadtest(
        busy_server, out, "--users", "8", "--spawn-rate", "8", "--forms", "raw"
    )
    assert result.returncode == 0, result.stdout + result.stderr

    summary = json.loads((out / "summary.json").read_text())
    assert summary["errors"] == 0
    assert summary["rejected"].get("429", 0) > 0
    assert summary["succeeded"] > 0
    assert request_names(out).get(REJECTED_NAME, 0) > 0


def test_loadtest_default_host_is_loopback():
    assert DEFAULT_HOST == "http://127.0.0.1:8000"


def test_loadtest_rejects_invalid_options(capsys, tmp_path):
    cases = [
        (["--host", "127.0.0.1:8000"], "invalid --host"),
        (["--users", "0"], "--users must be at least 1"),
        (["--run-time", "soon"], "invalid --run-time"),
        (["--forms", "raw,xml"], "invalid request forms"),
        (["--image-dir", str(tmp_path / "missing")], "does not exist"),
    ]
    for options, message in cases:
        status = main(["run", "--out", str(tmp_path / "out"), *options])
        assert status == 2, options
        assert message in capsys.readouterr().err, options
