"""Closed-loop HTTP clients and memory sampling for the overload and soak tests."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from dataclasses import dataclass, field

import httpx

from tests.service.conftest import example_digits


@dataclass
class Outcome:
    start: float
    end: float
    status: int  # 0 when no response arrived
    images: int
    detail: str = ""


@dataclass
class Traffic:
    outcomes: list[Outcome] = field(default_factory=list)

    def statuses(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for outcome in self.outcomes:
            counts[outcome.status] = counts.get(outcome.status, 0) + 1
        return counts

    def images_per_s(self, duration_s: float) -> float:
        done = sum(o.images for o in self.outcomes if o.status == 200)
        return done / duration_s

    def latencies(self, status: int = 200) -> list[float]:
        return sorted(o.end - o.start for o in self.outcomes if o.status == status)


def json_payload(images: int) -> dict:
    """A JSON body with ``images`` real MNIST digits, their labels in order."""
    digits = example_digits()
    encoded = [base64.b64encode(path.read_bytes()).decode() for path, _ in digits]
    return {"images": [encoded[i % len(encoded)] for i in range(images)]}


async def _client_loop(
    client: httpx.AsyncClient,
    url: str,
    payload: dict,
    deadline: float,
    traffic: Traffic,
) -> None:
    images = len(payload["images"])
    body = json.dumps(payload).encode()  # encoded once; the client shares the CPU
    headers = {"Content-Type": "application/json"}
    while time.monotonic() < deadline:
        start = time.monotonic()
        try:
            response = await client.post(url, content=body, headers=headers)
        except httpx.HTTPError as error:
            traffic.outcomes.append(
                Outcome(start, time.monotonic(), 0, images, repr(error))
            )
            continue
        outcome = Outcome(start, time.monotonic(), response.status_code, images)
        if response.status_code == 200:
            predictions = response.json()["predictions"]
            if len(predictions) != images:
                outcome.status, outcome.detail = -1, f"{len(predictions)} predictions"
        elif response.status_code == 429:
            outcome.detail = response.headers.get("retry-after", "")
            await asyncio.sleep(0.05)  # as a client honouring backpressure would
        else:
            outcome.detail = response.text[:300]
        traffic.outcomes.append(outcome)


def run_clients(
    base_url: str, clients: int, duration_s: float, images_per_request: int
) -> Traffic:
    """Run ``clients`` concurrent closed-loop clients for ``duration_s`` seconds."""
    traffic = Traffic()
    payload = json_payload(images_per_request)

    async def main() -> None:
        limits = httpx.Limits(
            max_connections=clients, max_keepalive_connections=clients
        )
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            deadline = time.monotonic() + duration_s
            url = f"{base_url}/classify"
            await asyncio.gather(
                *(
                    _client_loop(client, url, payload, deadline, traffic)
                    for _ in range(clients)
                )
            )

    asyncio.run(main())
    return traffic


def resident_bytes(pid: int) -> int:
    """The process's resident set size, from /proc."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"/proc/{pid}/status has no VmRSS")


class MemorySampler:
    """Sample a process's resident memory every ``interval_s`` on a thread."""

    def __init__(self, pid: int, interval_s: float = 0.25) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), resident_bytes(self.pid)))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self) -> int:
        return max(value for _, value in self.samples)
