"""Locust user of the serving benchmark: one image per request, multipart.

Every server in benchmarks/serving.py gets the same bodies: one real test
image in the multipart field ``images``, which both the service and the
BentoML peer accept. ``--api`` picks the response check: ``noprop`` for the
service's /classify schema, ``bentoml`` for the peer's list of probability
maps. ``--request-rate`` turns the closed loop into a fixed request rate.
Rejections (429, 503) are recorded apart from errors, as in loadtest/.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

from locust import FastHttpUser, events, task
from locust.env import Environment
from locust.exception import StopUser

from loadtest.forms import ClassifyRequest, build_request, check_response
from loadtest.images import MAX_TEST_IMAGES, load_images
from loadtest.summary import REJECTED_NAME, REJECTED_STATUSES, summarize

TOP_K = 3
NAME = "/classify multipart"
PATHS = {"noprop": f"/classify?top_k={TOP_K}", "bentoml": "/classify"}
# Pre-built request bodies, one per test image.
REQUESTS: list[ClassifyRequest] = []


@events.init_command_line_parser.add_listener
def add_arguments(parser) -> None:
    group = parser.add_argument_group("serving benchmark")
    group.add_argument(
        "--api",
        choices=sorted(PATHS),
        default="noprop",
        help="response check: the service's /classify schema or BentoML's list",
    )
    group.add_argument(
        "--data-root",
        default="",
        help="datasets folder with MNIST/raw/ (default: the example digits)",
    )
    group.add_argument(
        "--request-rate",
        type=float,
        default=0.0,
        help="requests per second from all users together (0: closed loop)",
    )
    group.add_argument("--summary-file", default="", help="JSON summary to write")
    group.add_argument(
        "--max-requests",
        type=int,
        default=100_000,
        help="requests after which every user stops, whatever the run time",
    )


@events.init.add_listener
def build_requests(environment: Environment, **_kwargs) -> None:
    options = environment.parsed_options
    data_root = Path(options.data_root) if options and options.data_root else None
    images, _ = load_images(None, data_root, MAX_TEST_IMAGES)
    REQUESTS.extend(build_request("multipart", [image]) for image in images)


@events.quitting.add_listener
def write_summary(environment: Environment, **_kwargs) -> None:
    options = environment.parsed_options
    if options is not None and options.summary_file:
        summary = summarize(environment.stats, images=BenchmarkUser.images)
        Path(options.summary_file).write_text(summary.to_json())


class BenchmarkUser(FastHttpUser):
    """A client that posts one image per request."""

    images = 0  # images in succeeded requests, across the users of this process

    def wait_time(self) -> float:
        options = self.environment.parsed_options
        if options.request_rate <= 0:
            return 0.0
        interval = options.num_users / options.request_rate
        return max(0.0, interval - (time.monotonic() - self._task_started))

    def on_start(self) -> None:
        self._task_started = time.monotonic()
        # Users start at different points of their first interval, so that a
        # fixed rate does not arrive in bursts of all users at once.
        if self.environment.parsed_options.request_rate > 0:
            time.sleep(random.uniform(0, self.wait_time()))

    @task
    def classify(self) -> None:
        options = self.environment.parsed_options
        if self.environment.stats.total.num_requests >= options.max_requests:
            raise StopUser()
        self._task_started = time.monotonic()
        request = random.choice(REQUESTS)
        api = options.api
        with self.client.post(
            PATHS[api],
            data=request.body,
            headers=request.headers,
            name=NAME,
            catch_response=True,
        ) as response:
            if response.status_code in REJECTED_STATUSES:
                response.request_meta["name"] = REJECTED_NAME
                response.failure(f"rejected: HTTP {response.status_code}")
            elif response.status_code != 200:
                response.failure(f"HTTP {response.status_code}")
            else:
                problem = check_body(api, response, request)
                if problem:
                    response.failure(problem)
                else:
                    BenchmarkUser.images += 1


def check_body(api: str, response, request: ClassifyRequest) -> str | None:
    """Return what is wrong with a 200 response body, or None."""
    try:
        payload = response.json()
    except ValueError as error:
        return f"the body is not JSON: {error}"
    if api == "noprop":
        try:
            check_response(payload, request, TOP_K)
        except Exception as error:  # ResponseShapeError, or a malformed body
            return f"invalid response: {error}"
        return None
    if not isinstance(payload, list) or len(payload) != 1:
        return "expected a list of one probability map"
    values = payload[0].values() if isinstance(payload[0], dict) else []
    if not values or not math.isclose(sum(values), 1.0, abs_tol=1e-3):
        return "the probabilities do not sum to 1"
    return None
