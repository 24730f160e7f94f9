"""Prometheus metrics of one service instance, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latency buckets in seconds, from sub-millisecond queue waits to the timeout.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """The service's metrics. Each instance has its own registry, so that several
    apps in one process (as in tests) do not share counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "noprop_http_requests",
            "HTTP requests answered, by method, route and status code",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "noprop_http_request_duration_seconds",
            "Time from receiving a request to the end of its response",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait_seconds = Histogram(
            "noprop_queue_wait_seconds",
            "Time an image waited in the queue before its batch ran",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "noprop_batch_size",
            "Number of images in each batch run by the model",
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.inference_seconds = Histogram(
            "noprop_inference_duration_seconds",
            "Time the model took to run one batch",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "noprop_queue_depth",
            "Images waiting for their batch to run, queued or collected",
            registry=self.registry,
        )
        self.dropped_images = Counter(
            "noprop_dropped_images",
            "Images removed from the queue unprocessed, by reason: cancelled "
            "(client went away or request timed out) or deadline",
            ["reason"],
            registry=self.registry,
        )
        self.failed_batches = Counter(
            "noprop_failed_batches",
            "Batches whose inference raised an error",
            registry=self.registry,
        )
