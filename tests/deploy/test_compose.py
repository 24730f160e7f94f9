"""Deployment test: build the images and run the docker-compose stack for real.

The stack runs under podman-compose from docker-compose.yml merged with
docker-compose.cpu.yml. Each test is one phase, and they run in file order on
one stack: readiness, classification through the published port, /metrics, the
`load` profile, the `train` profile with a switch to the exported model, and
last a SIGTERM drain under traffic. The phase times are printed at the end of
the run. Run it alone with

    .venv/bin/python -m pytest tests/deploy -v

The module fixture always removes the containers, volumes and images it made.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.deploy.stack import (
    PHASES,
    REPOSITORY_ROOT,
    TRAIN_BUILD_DISK_GB,
    ComposeStack,
    free_build_disk_gb,
    podman_unavailable_reason,
    set_up_podman,
)

pytestmark = pytest.mark.slow

DIGITS = sorted((REPOSITORY_ROOT / "examples" / "digits").glob("*.png"))
DIGIT_LABEL = re.compile(r"label-(\d+)")
DEFAULT_MODEL = "mnist-dt-onehot"
EXPORTED_MODEL = "deploy-test"
# Small enough to train and export in about a minute on two CPU cores.
TINY_TRAIN_ARGS = (
    "--dataset mnist --steps 2 --epochs 1 --lr 0.005 --train-subset 512 "
    "--test-subset 256 --train-eval-size 256 --batch-size 64 --device cpu"
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeStack]:
    reason = podman_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    data_root = os.environ.get("NOPROP_DATA_ROOT")
    with PHASES.measure("install podman and base image"):
        set_up_podman()
    stack = ComposeStack(
        tmp_path_factory.mktemp("deploy"), Path(data_root) if data_root else None
    )
    try:
        with PHASES.measure("build service image"):
            stack.compose("build", "service")
        with PHASES.measure("start stack"):
            stack.compose("up", "-d", "service")
        with PHASES.measure("wait for readiness"):
            stack.wait_ready()
        yield stack
    finally:
        with PHASES.measure("clean up"):
            stack.tear_down()


def _label(path: Path) -> str:
    match = DIGIT_LABEL.search(path.name)
    assert match, f"{path.name} has no label-N in its name"
    return match.group(1)


def test_container_healthy(stack: ComposeStack) -> None:
    with PHASES.measure("health check"):
        check = stack.podman(
            "healthcheck", "run", stack.container("service"), check=False
        )
        user = stack.podman("exec", stack.container("service"), "id", "-u").stdout
        write_models = stack.podman(
            "exec", stack.container("service"), "touch", "/models/probe", check=False
        )
        pid1 = stack.podman(
            "exec", stack.container("service"), "cat", "/proc/1/cmdline"
        ).stdout
    assert check.returncode == 0, f"HEALTHCHECK failed: {check.stdout}{check.stderr}"
    assert write_models.returncode != 0, "the models volume is writable"
    assert "Read-only file system" in write_models.stderr, write_models.stderr
    assert user.strip() != "0", "the service runs as root"
    assert "service" in pid1.replace("\0", " "), f"PID 1 is {pid1!r}, not the service"


def test_classify_real_digits(stack: ComposeStack) -> None:
    with PHASES.measure("classify real digits"):
        responses = []
        for path in DIGITS:
            response = httpx.post(
                f"{stack.base_url}/classify",
                content=path.read_bytes(),
                headers={"Content-Type": "image/png"},
                timeout=30,
            )
            responses.append((path, response))
    assert len(responses) == 10
    for path, response in responses:
        assert response.status_code == 200, f"{path.name}: {response.text}"
        body = response.json()
        assert body["model"] == DEFAULT_MODEL
        (prediction,) = body["predictions"]
        assert prediction["top_k"][0]["label"] == _label(path), path.name
        assert sum(prediction["probabilities"].values()) == pytest.approx(1, abs=1e-4)


def test_classify_mnist_batches(stack: ComposeStack) -> None:
    """200 real MNIST test images, 20 per request, in multipart and JSON forms."""
    from training.data import load_dataset

    if stack.env.get("NOPROP_DATA_ROOT") is None:
        pytest.skip("NOPROP_DATA_ROOT is not set; it names the folder of real datasets")
    split, _ = load_dataset("mnist", stack.env["NOPROP_DATA_ROOT"], train=False)
    images, labels = split.images[:200], split.labels[:200].tolist()
    pngs = [_png(image[0].numpy()) for image in images]

    with PHASES.measure("classify 200 MNIST test images"):
        predicted: list[int] = []
        for start in range(0, len(pngs), 20):
            chunk = pngs[start : start + 20]
            if start % 40 == 0:
                files = [
                    ("images", (f"{i}.png", png, "image/png"))
                    for i, png in enumerate(chunk)
                ]
                response = httpx.post(
                    f"{stack.base_url}/classify", files=files, timeout=30
                )
            else:
                encoded = [base64.b64encode(png).decode() for png in chunk]
                response = httpx.post(
                    f"{stack.base_url}/classify", json={"images": encoded}, timeout=30
                )
            assert response.status_code == 200, response.text
            predictions = response.json()["predictions"]
            assert len(predictions) == len(chunk)
            predicted += [int(p["top_k"][0]["label"]) for p in predictions]
    correct = sum(p == label for p, label in zip(predicted, labels, strict=True))
    # The default model scores 99.4% on the whole test set.
    assert correct >= 194, f"{correct}/200 correct"


def _png(pixels) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_metrics_count_requests(stack: ComposeStack) -> None:
    with PHASES.measure("check /metrics"):
        response = httpx.get(f"{stack.base_url}/metrics", timeout=10)
    assert response.status_code == 200
    text = response.text
    ok_counter = (
        r'^noprop_http_requests_total\{method="POST",route="/classify",status="200"\}'
        r" (\S+)$"
    )
    ok_line = re.search(ok_counter, text, re.MULTILINE)
    assert ok_line, "no counter of successful /classify requests"
    assert float(ok_line.group(1)) >= len(DIGITS)
    batches = re.search(r"^noprop_batch_size_count (\S+)$", text, re.MULTILINE)
    assert batches and float(batches.group(1)) >= 1


def test_load_profile(stack: ComposeStack) -> None:
    with PHASES.measure("build load image"):
        stack.compose("--profile", "load", "build", "load")
    with PHASES.measure("run load profile (Locust, 8 s)"):
        stack.compose(
            "--profile", "load", "run", "--rm", "load",
            env={"LOAD_USERS": "4", "LOAD_SPAWN_RATE": "4", "LOAD_RUN_TIME": "8s"},
            timeout=180,
        )  # fmt: skip
    summary = json.loads((stack.report_dir / "summary.json").read_text())
    assert (stack.report_dir / "report.html").is_file()
    assert summary["requests"] > 0, summary
    assert summary["errors"] == 0, summary


def test_train_profile_model_switch(stack: ComposeStack) -> None:
    """Train and export into the models volume, then serve the model it wrote."""
    if stack.env.get("NOPROP_DATA_ROOT") is None:
        pytest.skip("NOPROP_DATA_ROOT is not set; it names the folder of real datasets")
    free_gb, places = free_build_disk_gb()
    if free_gb < TRAIN_BUILD_DISK_GB:
        pytest.skip(
            f"building the trainer image needs about {TRAIN_BUILD_DISK_GB} GB free "
            f"in {places}; {free_gb:.1f} GB are free"
        )
    try:
        with PHASES.measure("build train image"):
            stack.compose("--profile", "train", "build", "train", timeout=1800)
        with PHASES.measure("run train profile (train and export)"):
            stack.compose(
                "--profile", "train", "run", "--rm", "train",
                env={
                    "NOPROP_RUN_NAME": EXPORTED_MODEL,
                    "NOPROP_TRAIN_ARGS": TINY_TRAIN_ARGS,
                    "NOPROP_EXPORT_ARGS": "--verify-images 256",
                },
                timeout=900,
            )  # fmt: skip
    finally:
        # 6.4 GB that no later phase needs.
        stack.remove_image("train")
    switched = {"NOPROP_MODEL_PATH": f"/models/{EXPORTED_MODEL}/model.onnx"}
    with PHASES.measure("restart service on the exported model"):
        stack.compose("up", "-d", "--force-recreate", "service", env=switched)
        stack.wait_ready()
    response = httpx.post(
        f"{stack.base_url}/classify",
        content=DIGITS[0].read_bytes(),
        headers={"Content-Type": "image/png"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert response.json()["model"] == EXPORTED_MODEL

    with PHASES.measure("restart service on the default model"):
        stack.compose("up", "-d", "--force-recreate", "service")
        stack.wait_ready()
    model = httpx.get(f"{stack.base_url}/model", timeout=10).json()
    assert model["name"] == DEFAULT_MODEL


class DrainClient:
    """Threads that post real digits in a loop and record how each request ended.

    Each thread stops at its first 503 or refused connection, as a load
    balancer stops routing to an instance whose readiness turned 503.
    """

    def __init__(self, base_url: str, threads: int) -> None:
        self.base_url = base_url
        self.stop = threading.Event()
        self.records: list[tuple[float, float, str]] = []  # start, end, outcome
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run) for _ in range(threads)]
        self.files = [("images", (p.name, p.read_bytes(), "image/png")) for p in DIGITS]

    def _run(self) -> None:
        with httpx.Client(timeout=20) as client:
            while not self.stop.is_set():
                start = time.monotonic()
                outcome = self._post(client)
                with self.lock:
                    self.records.append((start, time.monotonic(), outcome))
                if outcome in ("rejected", "refused"):
                    # A load balancer stops sending to a draining instance.
                    # Connections opened while the server closes its listening
                    # socket can be reset unanswered, so they are not sent.
                    return

    def _post(self, client: httpx.Client) -> str:
        try:
            response = client.post(f"{self.base_url}/classify", files=self.files)
        except httpx.ConnectError:
            return "refused"  # never sent: the listening socket is closed
        except httpx.HTTPError as error:
            return f"lost: {error!r}"
        if response.status_code == 200 and len(response.json()["predictions"]) == 10:
            return "ok"
        if response.status_code == 503:
            return "rejected"
        return f"lost: {response.status_code} {response.text[:200]}"

    def __enter__(self) -> DrainClient:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)


def test_sigterm_drain_loses_nothing(stack: ComposeStack) -> None:
    container = stack.container("service")
    with (
        PHASES.measure("SIGTERM drain under traffic"),
        DrainClient(stack.base_url, 6) as client,
    ):
        time.sleep(3)
        signal_time = time.monotonic()
        # podman-compose stop sends SIGTERM and waits up to stop_grace_period.
        stack.compose("stop", "service", timeout=120)
        stopped_time = time.monotonic()
        time.sleep(1)

    outcomes = Counter(
        outcome if not outcome.startswith("lost") else "lost"
        for _, _, outcome in client.records
    )
    lost = [outcome for _, _, outcome in client.records if outcome.startswith("lost")]
    in_flight = [
        outcome for start, end, outcome in client.records if start < signal_time < end
    ]
    state = stack.podman(
        "inspect", container, "--format", "{{.State.ExitCode}} {{.State.Status}}"
    ).stdout.split()
    logs = stack.podman("logs", container, check=False)
    log_text = logs.stdout + logs.stderr

    assert not lost, f"{len(lost)} requests lost, first: {lost[0]}; all: {outcomes}"
    assert outcomes["ok"] > 0, outcomes
    assert in_flight, "no request was in flight when SIGTERM arrived"
    assert all(outcome == "ok" for outcome in in_flight), in_flight
    # uvicorn re-raises SIGTERM after its shutdown, which PID 1 ignores, so the
    # exit status is 0, or 143 under an init process; 137 would mean SIGKILL.
    assert state[1] == "exited", state
    assert state[0] in ("0", "143"), (
        f"exit status {state[0]} after {stopped_time - signal_time:.1f} s"
    )
    assert "draining" in log_text, log_text[-2000:]
