"""Overload: far more concurrent clients than the queue holds.

The excess must get 429 with Retry-After, every accepted request must get
a response, the server's memory must stay bounded, and its throughput must not
collapse compared with a moderate load.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.hardening.traffic import MemorySampler, resident_bytes, run_clients
from tests.service.conftest import ServerProcess, start_default_server

MAX_QUEUE_SIZE = 8
IMAGES_PER_REQUEST = 4
MODERATE_CLIENTS = 2
# 256 images wanted at once, 32 times what the queue holds. More clients would
# make this test's own HTTP client, not the server, the bottleneck.
OVERLOAD_CLIENTS = 64
PHASE_S = 6.0
# Growth of resident memory allowed under overload, over the idle server's.
MEMORY_GROWTH_BOUND = 200 * 1024 * 1024


@pytest.fixture(scope="module")
def small_queue_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServerProcess]:
    process = start_default_server(
        tmp_path_factory.mktemp("overload") / "server.log",
        max_queue_size=MAX_QUEUE_SIZE,
        max_batch_size=8,
        max_images_per_request=IMAGES_PER_REQUEST,
    )
    yield process
    process.stop()


def test_overload_sheds_excess(small_queue_server: ServerProcess) -> None:
    url = small_queue_server.url
    pid = small_queue_server.process.pid
    moderate = run_clients(url, MODERATE_CLIENTS, PHASE_S, IMAGES_PER_REQUEST)
    idle_memory = resident_bytes(pid)
    with MemorySampler(pid) as memory:
        overload = run_clients(url, OVERLOAD_CLIENTS, PHASE_S, IMAGES_PER_REQUEST)

    statuses = overload.statuses()
    rejected = [o for o in overload.outcomes if o.status == 429]
    failed = [o for o in overload.outcomes if o.status not in (200, 429)]
    moderate_rate = moderate.images_per_s(PHASE_S)
    overload_rate = overload.images_per_s(PHASE_S)
    summary = (
        f"statuses {statuses}; {moderate_rate:.0f} images/s moderate, "
        f"{overload_rate:.0f} under overload; peak memory "
        f"{memory.peak() / 2**20:.0f} MiB, idle {idle_memory / 2**20:.0f} MiB"
    )
    print(summary)

    assert moderate.statuses() == {200: len(moderate.outcomes)}, moderate.statuses()
    assert not failed, f"{failed[0].status} {failed[0].detail}; {summary}"
    assert rejected, f"no request was rejected; {summary}"
    assert all(o.detail == "1" for o in rejected), "429 without Retry-After: 1"
    assert statuses.get(200, 0) > 0, summary
    assert memory.peak() - idle_memory < MEMORY_GROWTH_BOUND, summary
    # The clients share the two cores with the server, so this bound is loose.
    assert overload_rate > 0.5 * moderate_rate, summary
    assert small_queue_server.process.poll() is None
