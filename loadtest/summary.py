"""The short summary of a load test: throughput, latency, errors and rejections."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CLASSIFY_NAME_PREFIX = "/classify "
# 429 (queue full) and 503 (not ready, shutting down) responses are recorded
# under this name, so that their short latencies stay out of the percentiles.
REJECTED_NAME = "/classify rejected"
REJECTED_STATUSES = (429, 503)
PERCENTILES = (0.50, 0.95, 0.99)
# Locust stores a failure as the repr of its exception, e.g.
# "CatchResponseError('rejected: HTTP 429')".
REJECTED_STATUS = re.compile(r"rejected: HTTP (\d{3})")


@dataclass(frozen=True)
class Summary:
    """Counts, rates and latency percentiles of one load test run.

    Latencies are Locust's: milliseconds from sending a request to reading its
    whole response, rounded to 2 significant digits above 100 ms. They cover
    every /classify request that was not rejected, errors included.
    """

    duration_s: float
    requests: int  # every /classify request sent, rejections included
    succeeded: int  # 200 responses of the expected shape
    errors: int  # any other outcome except a rejection
    rejected: dict[str, int] = field(default_factory=dict)  # by HTTP status
    images: int = 0  # images in the succeeded requests
    labelled: int = 0  # of those images, the ones with a known label
    correct: int = 0  # of those, the ones whose top class is the label
    latency_ms: dict[str, float] = field(default_factory=dict)  # "p50" -> ms

    @property
    def requests_per_s(self) -> float:
        return self.succeeded / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def images_per_s(self) -> float:
        return self.images / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def rejection_rate(self) -> float:
        return sum(self.rejected.values()) / self.requests if self.requests else 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_file(cls, path: Path) -> Summary:
        return cls(**json.loads(path.read_text()))


def summarize(
    stats: Any, images: int = 0, labelled: int = 0, correct: int = 0
) -> Summary:
    """Build a Summary from Locust's RequestStats of a finished run.

    ``images``, ``labelled`` and ``correct`` come from the users, because
    Locust counts requests, not the images in them.
    """
    from locust.stats import StatsEntry  # imported here: locust patches on import

    classify = StatsEntry(stats, "/classify", "POST")
    rejected_total = 0
    for entry in stats.entries.values():
        if entry.name == REJECTED_NAME:
            rejected_total += entry.num_requests
        elif entry.name.startswith(CLASSIFY_NAME_PREFIX):
            classify.extend(entry)

    latency_ms = {}
    if classify.num_requests:
        for percentile in PERCENTILES:
            value = classify.get_response_time_percentile(percentile)
            latency_ms[f"p{round(percentile * 100)}"] = float(value)

    rejected = count_rejections(stats)
    total = stats.total
    duration = max(0.0, (total.last_request_timestamp or 0) - total.start_time)
    return Summary(
        duration_s=duration,
        requests=classify.num_requests + rejected_total,
        succeeded=classify.num_requests - classify.num_failures,
        errors=classify.num_failures,
        rejected=rejected,
        images=images,
        labelled=labelled,
        correct=correct,
        latency_ms=latency_ms,
    )


def count_rejections(stats: Any) -> dict[str, int]:
    """Count rejected requests by status, from the failure messages "HTTP 429"."""
    counts: dict[str, int] = {}
    for error in stats.errors.values():
        if error.name == REJECTED_NAME:
            match = REJECTED_STATUS.search(str(error.error))
            status = match.group(1) if match else "other"
            counts[status] = counts.get(status, 0) + error.occurrences
    return counts


def format_summary(summary: Summary) -> str:
    """Format the summary as a few aligned lines for a terminal."""
    latency = ", ".join(
        f"{name} {value:.0f} ms" for name, value in summary.latency_ms.items()
    )
    rejected = ", ".join(
        f"{count} x HTTP {status}" for status, count in sorted(summary.rejected.items())
    )
    lines = [
        f"duration:       {summary.duration_s:.1f} s",
        f"requests:       {summary.requests} ({summary.succeeded} succeeded)",
        f"throughput:     {summary.requests_per_s:.1f} requests/s, "
        f"{summary.images_per_s:.1f} images/s",
        f"latency:        {latency or 'no requests'}",
        f"error rate:     {summary.error_rate:.2%} ({summary.errors} errors)",
        f"rejection rate: {summary.rejection_rate:.2%} ({rejected or 'none'})",
    ]
    if summary.labelled:
        lines.append(
            f"top-1 accuracy: {summary.correct / summary.labelled:.2%} of "
            f"{summary.labelled} labelled images"
        )
    return "\n".join(lines)
