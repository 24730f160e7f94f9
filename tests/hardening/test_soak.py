"""Soak: a bounded run at moderate load with memory and latency sampled.

The run fails when the server's resident memory grows by more than
MEMORY_GROWTH_BOUND after the first third, or when the p99 latency of the last
third exceeds LATENCY_GROWTH times that of the first third. CI runs the short
soak; the long one runs with

    .venv/bin/python -m pytest -m long tests/hardening/test_soak.py
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest

from tests.hardening.traffic import MemorySampler, Traffic, run_clients
from tests.service.conftest import ServerProcess, start_default_server

CLIENTS = 4
IMAGES_PER_REQUEST = 4
MEMORY_GROWTH_BOUND = 20 * 1024 * 1024
LATENCY_GROWTH = 2.0
# Scheduling noise on a shared 2-core machine, added to the latency bound.
LATENCY_SLACK_S = 0.02


@pytest.fixture(scope="module")
def soak_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = start_default_server(
        tmp_path_factory.mktemp("soak") / "server.log", max_batch_size=16
    )
    yield process
    process.stop()


def _p99(latencies: list[float]) -> float:
    return latencies[min(len(latencies) - 1, math.ceil(0.99 * len(latencies)) - 1)]


def _window(traffic: Traffic, start: float, end: float) -> list[float]:
    return sorted(
        o.end - o.start
        for o in traffic.outcomes
        if o.status == 200 and start <= o.start < end
    )


def soak(server: ServerProcess, duration_s: float) -> None:
    with MemorySampler(server.process.pid, interval_s=0.5) as memory:
        traffic = run_clients(server.url, CLIENTS, duration_s, IMAGES_PER_REQUEST)

    begin = min(o.start for o in traffic.outcomes)
    third = duration_s / 3
    first = _window(traffic, begin, begin + third)
    last = _window(traffic, begin + 2 * third, begin + duration_s)
    settled = [value for t, value in memory.samples if t >= begin + third]
    growth = max(settled) - settled[0]
    summary = (
        f"{len(traffic.outcomes)} requests, statuses {traffic.statuses()}; p99 "
        f"{_p99(first) * 1000:.0f} ms first third, {_p99(last) * 1000:.0f} ms last; "
        f"memory {settled[0] / 2**20:.1f} MiB after the first third, peak "
        f"{max(settled) / 2**20:.1f} MiB"
    )
    print(summary)

    assert traffic.statuses() == {200: len(traffic.outcomes)}, summary
    assert growth < MEMORY_GROWTH_BOUND, summary
    assert _p99(last) < LATENCY_GROWTH * _p99(first) + LATENCY_SLACK_S, summary
    assert server.process.poll() is None


def test_soak_short(soak_server: ServerProcess) -> None:
    soak(soak_server, duration_s=45)


@pytest.mark.long
def test_soak_long(soak_server: ServerProcess) -> None:
    soak(soak_server, duration_s=600)
