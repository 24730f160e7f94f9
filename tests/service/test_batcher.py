"""Batcher tests with a stand-in model function, so every timing is controlled."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.batcher import (
    Batcher,
    BatcherClosedError,
    BatchError,
    DeadlineExceededError,
    QueueFullError,
)
from service.metrics import Metrics
from tests.service.conftest import run_async

TIMEOUT_S = 10


class FakeModel:
    """Returns one row per image whose entries are the image's first pixel.

    ``gate`` blocks each run until set, and ``calls`` records the batch
    sizes and the threads that ran them.
    """

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.batch_sizes: list[int] = []
        self.threads: list[str] = []

    def __call__(self, images: np.ndarray) -> np.ndarray:
        assert self.gate.wait(TIMEOUT_S)
        self.batch_sizes.append(len(images))
        self.threads.append(threading.current_thread().name)
        first_pixels = images[:, 0, 0, 0].astype(np.float32)
        return np.repeat(first_pixels[:, None], 3, axis=1)  # (N, 3)


def image(value: int) -> np.ndarray:
    return np.full((2, 2, 1), value, dtype=np.uint8)


def make_batcher(run, metrics=None, **options) -> tuple[Batcher, ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-worker")
    values = {"max_batch_size": 4, "max_queue_delay_ms": 50, "max_queue_size": 16}
    values.update(options)
    batcher = Batcher(executor, run, metrics=metrics or Metrics(), **values)
    batcher.start()
    return batcher, executor


def deadline(seconds: float = TIMEOUT_S) -> float:
    return time.monotonic() + seconds


def histogram_count(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(f"{name}_count")


def test_batcher_maps_rows_to_images():
    async def scenario():
        model = FakeModel()
        batcher, executor = make_batcher(model)
        futures = batcher.submit(
            [image(value) for value in (5, 6, 7)], "r1", deadline()
        )
        rows = await asyncio.gather(*futures)
        await batcher.stop(TIMEOUT_S)
        executor.shutdown()
        return model, rows

    model, rows = run_async(scenario())
    assert [row[0] for row in rows] == [5, 6, 7]
    assert model.batch_sizes == [3]
    assert model.threads[0].startswith("test-worker")


def test_batcher_runs_full_batch_without_delay():
    async def scenario():
        model = FakeModel()
        metrics = Metrics()
        batcher, executor = make_batcher(model, metrics, max_queue_delay_ms=2000)
        start = time.monotonic()
        futures = []
        for index in range(8):
            futures += batcher.submit([image(index)], f"r{index}", deadline())
        rows = await asyncio.gather(*futures)
        elapsed = time.monotonic() - start
        await batcher.stop(TIMEOUT_S)
        executor.shutdown()
        return model, metrics, rows, elapsed

    model, metrics, rows, elapsed = run_async(scenario())
    assert model.batch_sizes == [4, 4]
    assert [row[0] for row in rows] == list(range(8))
    assert elapsed < 1.5
    assert histogram_count(metrics, "noprop_batch_size") == 2
    assert metrics.registry.get_sample_value("noprop_batch_size_sum") == 8


def test_batcher_runs_partial_batch_after_delay():
    async def scenario():
        model = FakeModel()
        batcher, executor = make_batcher(model, max_queue_delay_ms=100)
        start = time.monotonic()
        row = await batcher.submit([image(9)], "r1", deadline())[0]
        elapsed = time.monotonic() - start
        await batcher.stop(TIMEOUT_S)
        executor.shutdown()
        return model, row, elapsed

    model, row, elapsed = run_async(scenario())
    assert row[0] == 9
    assert model.batch_sizes == [1]
    assert elapsed >= 0.09


def test_batcher_rejects_request_when_queue_full():
    async def scenario():
        model = FakeModel()
        model.gate.clear()
        batcher, executor = make_batcher(
            model, max_batch_size=1, max_queue_delay_ms=0, max_queue_size=2
        )
        running = batcher.submit([image(1)], "r1", deadline())
        while batcher.queue_depth:  # the collector takes r1 to the worker
            await asyncio.sleep(0.01)
        queued = batcher.submit([image(2), image(3)], "r2", deadline())
        with pytest.raises(QueueFullError):
            batcher.submit([image(4)], "r3", deadline())
        depth = batcher.queue_depth
        model.gate.set()
        rows = await asyncio.gather(*running, *queued)
        await batcher.stop(TIMEOUT_S)
        executor.shutdown()
        return depth, rows

    depth, rows = run_async(scenario())
    assert depth == 2
    assert [row[0] for row in rows] == [1, 2, 3]


def test_batcher_fails_every_item_of_failed_batch():
    def broken(images: np.ndarray) -> np.ndarray:
        raise RuntimeError("device lost")

    async def scenario():
        metrics = Metrics()
        batcher, executor = make_batcher(broken, metrics)
        futures = batcher.submit([image(1), image(2)], "r1", deadline())
        futures += batcher.submit([image(3)], "r2", deadline())
        results = await asyncio.gather(*futures, return_exceptions=True)
        await batcher.stop(TIMEOUT_S)
        executor.shutdown()
        return metrics, results

    metrics, results = run_async(scenario())
    assert len(results) == 3
    for result in results:
        assert isinstance(result, BatchError)
        assert "device lost" in str(result)
    assert metrics.registry.get_sample_value("noprop_failed_batches_total") == 1


def test_batcher_fails_batch_with_wrong_row_count():
    def one_row_short(images: np.ndarray) -> np.ndarray:
        return np.zeros((len(images) - 1, 3), np.float32)

    async def scenario():
        batcher, executor = make_batcher(one_row_short)
        futures = batcher.submit([image(1), image(2)], "r1", deadline())
        results = await asyncio.gather(*futures, return_exceptions=True)
        await batcher.stop(TIMEOUT_S)
        executor.shutdown()
        return results

    results = run_async(scenario())
    for result in results:
        assert isinstance(result, BatchError)
        assert "1 rows for 2 images" in str(result)


def test_batcher_drops_cancelled_and_expired_items():
    async def scenario():
        model = FakeModel()
        metrics = Metrics()
        batcher, executor = make_batcher(model, metrics, max_queue_delay_ms=200)
        cancelled = batcher.submit([image(1)], "gone", deadline())
        expired = batcher.submit([image(2)], "late", deadline(0.05))
        kept = batcher.submit([image(3)], "kept", deadline())
        cancelled[0].cancel()
        row = await kept[0]
        expired_error = await asyncio.gather(*expired, return_exceptions=True)
        await batcher.stop(TIMEOUT_S)
        executor.shutdown()
        return model, metrics, row, expired_error[0]

    model, metrics, row, expired_error = run_async(scenario())
    assert row[0] == 3
    assert model.batch_sizes == [1]
    assert isinstance(expired_error, DeadlineExceededError)
    dropped = "noprop_dropped_images_total"
    assert metrics.registry.get_sample_value(dropped, {"reason": "cancelled"}) == 1
    assert metrics.registry.get_sample_value(dropped, {"reason": "deadline"}) == 1


def test_batcher_stop_answers_queued_then_rejects():
    async def scenario():
        model = FakeModel()
        batcher, executor = make_batcher(model, max_queue_delay_ms=300)
        futures = batcher.submit([image(1), image(2)], "r1", deadline())
        await batcher.stop(TIMEOUT_S)
        rows = await asyncio.gather(*futures)
        with pytest.raises(BatcherClosedError):
            batcher.submit([image(3)], "r2", deadline())
        executor.shutdown()
        return rows

    rows = run_async(scenario())
    assert [row[0] for row in rows] == [1, 2]


def test_batcher_stop_timeout_fails_waiting_items():
    async def scenario():
        model = FakeModel()
        model.gate.clear()
        batcher, executor = make_batcher(model, max_batch_size=1, max_queue_delay_ms=0)
        futures = batcher.submit([image(1), image(2)], "r1", deadline())
        await batcher.stop(0.2)
        results = await asyncio.gather(*futures, return_exceptions=True)
        model.gate.set()
        executor.shutdown()
        return results

    results = run_async(scenario())
    assert len(results) == 2
    for result in results:
        assert isinstance(result, BatcherClosedError)


def test_batcher_rejects_invalid_settings():
    with pytest.raises(ValueError, match="max_batch_size=0"):
        Batcher(
            ThreadPoolExecutor(max_workers=1),
            FakeModel(),
            max_batch_size=0,
            max_queue_delay_ms=1,
            max_queue_size=1,
            metrics=Metrics(),
        )
