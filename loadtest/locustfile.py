"""Locust users that post real images to POST /classify in every accepted form.

Run it through ``python -m loadtest run`` or with Locust's own command line:

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000

Each task picks a request form (see ``loadtest.forms``) and random test
images, and checks the response: a 200 must have the /classify shape, one
prediction per image. 429 and 503 responses are recorded under the name
"/classify rejected", apart from errors, because they are the service
shedding load as designed. Options added to Locust's, with the environment
variable that also sets them where there is one: --image-dir
(LOADTEST_IMAGE_DIR), --data-root (NOPROP_DATA_ROOT), --forms
(LOADTEST_FORMS), --max-images-per-request, --request-rate and
--summary-file.
"""

from __future__ import annotations

import logging
import random
import sys
import time
from pathlib import Path

from locust import FastHttpUser, events, task
from locust.env import Environment
from locust.runners import WorkerRunner

from loadtest.forms import (
    FORMS,
    SINGLE_IMAGE_FORMS,
    ClassifyRequest,
    ResponseShapeError,
    build_request,
    check_response,
    parse_forms,
)
from loadtest.images import (
    MAX_TEST_IMAGES,
    ImageSourceError,
    TestImage,
    load_images,
)
from loadtest.summary import REJECTED_NAME, REJECTED_STATUSES, summarize

logger = logging.getLogger(__name__)

TOP_K = 3
CLASSIFY_PATH = f"/classify?top_k={TOP_K}"


class _Run:
    """Images and counters shared by the users of this process."""

    images: list[TestImage] = []
    forms: tuple[str, ...] = FORMS
    max_images_per_request = 1
    # NOTE: counted per process, so with Locust's --processes the summary's
    # image counts and accuracy cover the master only. python -m loadtest run
    # always runs one process.
    classified_images = 0
    labelled_images = 0
    correct_labels = 0


@events.init_command_line_parser.add_listener
def add_arguments(parser) -> None:
    group = parser.add_argument_group("noprop load test")
    group.add_argument(
        "--image-dir",
        env_var="LOADTEST_IMAGE_DIR",
        default="",
        help="folder of image files to send; labels are read from 'label-N' in "
        "file names (default: the MNIST test set under --data-root, else the "
        "repository's examples/digits)",
    )
    group.add_argument(
        "--data-root",
        env_var="NOPROP_DATA_ROOT",
        default="",
        help="datasets folder with MNIST/raw/ in torchvision's layout",
    )
    group.add_argument(
        "--forms",
        env_var="LOADTEST_FORMS",
        default=",".join(FORMS),
        help=f"comma-separated request forms to send, picked at random: "
        f"{', '.join(FORMS)}",
    )
    group.add_argument(
        "--max-images-per-request",
        type=int,
        default=4,
        help="maximum images in one multipart or JSON request; each request "
        "carries 1 to this many",
    )
    group.add_argument(
        "--request-rate",
        type=float,
        default=0.0,
        help="requests per second from all users together; 0: each user sends "
        "its next request as soon as the last one is answered",
    )
    group.add_argument(
        "--summary-file",
        default="",
        help="JSON file to write the run's summary to at exit",
    )


@events.init.add_listener
def load_test_images(environment: Environment, **_kwargs) -> None:
    options = environment.parsed_options
    if options is None:
        return  # library use without a command line: no options to read
    try:
        _Run.forms = parse_forms(options.forms)
        if options.max_images_per_request < 1:
            raise ValueError(
                "--max-images-per-request must be at least 1, got "
                f"{options.max_images_per_request}"
            )
        image_dir = Path(options.image_dir) if options.image_dir else None
        data_root = Path(options.data_root) if options.data_root else None
        images, source = load_images(image_dir, data_root, MAX_TEST_IMAGES)
    except (ValueError, ImageSourceError) as error:
        logger.error("invalid load test options: %s", error)
        sys.exit(2)
    _Run.images = images
    _Run.max_images_per_request = options.max_images_per_request
    logger.info("sending %d test images from the %s", len(images), source)


@events.quitting.add_listener
def write_summary(environment: Environment, **_kwargs) -> None:
    options = environment.parsed_options
    if options is None or not options.summary_file:
        return
    if isinstance(environment.runner, WorkerRunner):
        return
    summary = summarize(
        environment.stats,
        images=_Run.classified_images,
        labelled=_Run.labelled_images,
        correct=_Run.correct_labels,
    )
    Path(options.summary_file).write_text(summary.to_json())


class ClassifyUser(FastHttpUser):
    """A client that posts images and waits for each answer before the next."""

    def wait_time(self) -> float:
        options = self.environment.parsed_options
        rate = options.request_rate if options is not None else 0.0
        if rate <= 0:
            return 0.0
        # Each user starts a request every users / rate seconds, so that all
        # users together send rate requests per second while answers keep up.
        interval = options.num_users / rate
        return max(0.0, interval - (time.monotonic() - self._task_started))

    def on_start(self) -> None:
        self._task_started = time.monotonic()

    @task
    def classify(self) -> None:
        self._task_started = time.monotonic()
        form = random.choice(_Run.forms)
        count = 1
        if form not in SINGLE_IMAGE_FORMS:
            count = random.randint(1, _Run.max_images_per_request)
        request = build_request(form, random.choices(_Run.images, k=count))
        self._post(request)

    def _post(self, request: ClassifyRequest) -> None:
        with self.client.post(
            CLASSIFY_PATH,
            data=request.body,
            headers=request.headers,
            name=f"/classify {request.form}",
            catch_response=True,
        ) as response:
            if response.status_code in REJECTED_STATUSES:
                response.request_meta["name"] = REJECTED_NAME
                response.failure(f"rejected: HTTP {response.status_code}")
            elif response.status_code != 200:
                response.failure(
                    f"HTTP {response.status_code}: {_error_code(response)}"
                )
            else:
                self._check(response, request)

    def _check(self, response, request: ClassifyRequest) -> None:
        if "x-request-id" not in response.headers:
            response.failure("the response has no X-Request-ID header")
            return
        try:
            correct = check_response(response.json(), request, TOP_K)
        except (ResponseShapeError, ValueError) as error:
            response.failure(f"invalid response: {error}")
            return
        _Run.classified_images += len(request.images)
        _Run.labelled_images += sum(image.label is not None for image in request.images)
        _Run.correct_labels += correct


def _error_code(response) -> str:
    """Return the error code of a JSON error body, or the body's first bytes."""
    try:
        return response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return repr((response.content or b"")[:80])
