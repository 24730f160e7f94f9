"""Dynamic batching: one bounded asyncio queue, one collector, one worker thread.

Requests put one item per image into the queue. The collector takes the
oldest item and adds more until ``max_batch_size`` items are in hand or
``max_queue_delay_ms`` has passed since that oldest item was queued. Items
whose request was cancelled (the client went away or the handler timed out)
or whose deadline passed are dropped before the batch is stacked. The batch
runs on a single worker thread, so the event loop never blocks on inference
and the session never runs two batches at once.

Every item's future gets exactly one outcome: a probability row, or an
exception. A batch that raises, or returns a different number of rows than
it got images, fails all of its items with BatchError.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from service.metrics import Metrics

logger = logging.getLogger(__name__)

RunBatch = Callable[[np.ndarray], np.ndarray]


class QueueFullError(Exception):
    """The queue has no room for all images of a request."""


class BatcherClosedError(Exception):
    """The batcher is stopping or stopped and accepts no new images."""


class DeadlineExceededError(Exception):
    """The request's deadline passed before its batch was formed."""


class BatchError(Exception):
    """The batch that contained this item failed."""


@dataclass(eq=False)
class _Item:
    image: np.ndarray  # (H, W, C) uint8
    request_id: str
    deadline: float  # time.monotonic() value
    enqueued_at: float = field(default_factory=time.monotonic)
    future: asyncio.Future = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Batcher:
    """Collects single images into batches and runs them on a worker thread."""

    def __init__(
        self,
        executor: ThreadPoolExecutor,
        run_batch: RunBatch,
        *,
        max_batch_size: int,
        max_queue_delay_ms: float,
        max_queue_size: int,
        metrics: Metrics,
    ) -> None:
        if max_batch_size < 1 or max_queue_size < 1 or max_queue_delay_ms < 0:
            raise ValueError(
                f"invalid batcher settings: max_batch_size={max_batch_size}, "
                f"max_queue_size={max_queue_size}, "
                f"max_queue_delay_ms={max_queue_delay_ms}"
            )
        self._executor = executor
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_ms / 1000
        self.max_queue_size = max_queue_size
        self._metrics = metrics
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=max_queue_size)
        self._collector: asyncio.Task | None = None
        self._in_hand: list[_Item] = []  # taken from the queue, not yet resolved
        self._running = False  # whether the batch in hand is on the worker thread
        self._closed = False
        metrics.queue_depth.set_function(lambda: self.queue_depth)

    @property
    def queue_depth(self) -> int:
        """Images waiting for their batch to run, in the queue or in hand."""
        waiting_in_hand = 0 if self._running else len(self._in_hand)
        return self._queue.qsize() + waiting_in_hand

    def start(self) -> None:
        """Start the collector task on the running event loop."""
        if self._collector is None:
            self._collector = asyncio.create_task(self._collect(), name="batcher")
            self._collector.add_done_callback(_log_collector_exit)

    def submit(
        self, images: list[np.ndarray], request_id: str, deadline: float
    ) -> list[asyncio.Future]:
        """Queue every image of one request; return one future per image.

        Raises QueueFullError at once, queueing nothing, unless all images fit,
        and BatcherClosedError while stopping. Each future resolves to a
        float32 row of probabilities or raises DeadlineExceededError or
        BatchError. Cancel the futures to withdraw the request.
        """
        if self._closed:
            raise BatcherClosedError("the service is shutting down")
        free = self.max_queue_size - self._queue.qsize()
        if len(images) > free:
            raise QueueFullError(
                f"the queue has room for {free} images; the request has {len(images)}"
            )
        items = [_Item(image, request_id, deadline) for image in images]
        for item in items:
            self._queue.put_nowait(item)
        return [item.future for item in items]

    async def stop(self, timeout: float) -> None:
        """Reject new images, run the queued ones, then stop the collector.

        Items still unresolved after ``timeout`` seconds fail with
        BatcherClosedError.
        """
        self._closed = True
        if self._collector is None:
            return
        deadline = time.monotonic() + timeout
        while self._has_work() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self._collector.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._collector

        closed = BatcherClosedError("the service shut down before the batch ran")
        for item in self._in_hand:
            _fail(item, closed)
        self._in_hand = []
        while not self._queue.empty():
            _fail(self._queue.get_nowait(), closed)

    def _has_work(self) -> bool:
        return bool(self._in_hand) or not self._queue.empty()

    async def _collect(self) -> None:
        while True:
            await self._fill_batch()
            batch = self._drop_stale(self._in_hand)
            if batch:
                self._running = True
                try:
                    await self._run(batch)
                finally:
                    self._running = False
            self._in_hand = []

    async def _fill_batch(self) -> None:
        """Wait for the oldest item, then take more until full or its delay ends.

        The items go to ``self._in_hand`` at once, so that ``stop`` can fail
        them if it cancels the collector here.
        """
        batch = self._in_hand
        batch.append(await self._queue.get())
        deadline = batch[0].enqueued_at + self.max_queue_delay_s
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining):
                    batch.append(await self._queue.get())
            except TimeoutError:
                break

    def _drop_stale(self, batch: list[_Item]) -> list[_Item]:
        """Remove items whose request is gone or whose deadline has passed."""
        now = time.monotonic()
        live_items = []
        for item in batch:
            if item.future.done():
                self._metrics.dropped_images.labels(reason="cancelled").inc()
            elif now >= item.deadline:
                self._metrics.dropped_images.labels(reason="deadline").inc()
                _fail(item, DeadlineExceededError("the request timed out in the queue"))
            else:
                live_items.append(item)
        return live_items

    async def _run(self, batch: list[_Item]) -> None:
        now = time.monotonic()
        for item in batch:
            self._metrics.queue_wait_seconds.observe(now - item.enqueued_at)
        self._metrics.batch_size.observe(len(batch))

        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        try:
            images = np.stack([item.image for item in batch])  # (N, H, W, C)
            probabilities = await loop.run_in_executor(
                self._executor, self._run_batch, images
            )
            if len(probabilities) != len(batch):
                raise BatchError(
                    f"the model returned {len(probabilities)} rows for "
                    f"{len(batch)} images"
                )
        except Exception as error:
            self._fail_batch(batch, error)
            return
        finally:
            self._metrics.inference_seconds.observe(time.perf_counter() - start)

        for item, row in zip(batch, probabilities, strict=True):
            if not item.future.done():
                item.future.set_result(row)

    def _fail_batch(self, batch: list[_Item], error: Exception) -> None:
        request_ids = sorted({item.request_id for item in batch})
        logger.error(
            "batch of %d images failed for requests %s: %s",
            len(batch),
            ", ".join(request_ids),
            error,
            exc_info=error,
        )
        self._metrics.failed_batches.inc()
        for item in batch:
            _fail(item, BatchError(f"inference failed: {error}"))


def _fail(item: _Item, error: Exception) -> None:
    if not item.future.done():
        item.future.set_exception(error)


def _log_collector_exit(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.critical(
            "batch collector stopped; requests will time out",
            exc_info=task.exception(),
        )
