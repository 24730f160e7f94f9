"""Serving throughput and latency against the onnxruntime limit and a peer.

One run against the default model measures, on this machine:

1. the limit: onnxruntime alone (no HTTP) with the service's session
   options, at the service's max_batch_size and at batch 1, before and
   after the servers;
2. the service with batching, and the same service with max_batch_size = 1;
3. the peer: the same model behind BentoML's adaptive batching
   (benchmarks/peer_bentoml.py), in its own venv, .venv-peer;

at each concurrency level, all under the same Locust load generator
(benchmarks/serving_locustfile.py: one real MNIST test image per multipart
request, identical bodies for every server). It then runs the batched
service at half its saturating throughput, at a fixed request rate, for the
latency target. Servers bind 127.0.0.1 on free ports. Every load run stops
after ``--seconds`` or ``--max-requests``, whichever comes first.

    python benchmarks/serving.py --out build/serving-benchmark

writes results.json, report.md (tables with ratios), Locust's CSV files and
the servers' logs to the output folder, and the plot to ``--plot``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

from loadtest.images import MAX_TEST_IMAGES, load_images
from loadtest.summary import Summary
from service.images import decode_image
from service.model import ModelSession
from service.settings import DEFAULT_MODEL_PATH, Settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_report import write_plot, write_report  # noqa: E402

logger = logging.getLogger("benchmarks.serving")

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = REPOSITORY_ROOT / "benchmarks" / "serving_locustfile.py"
PEER_SERVICE = "benchmarks.peer_bentoml:NoPropClassifier"
READY_TIMEOUT_S = 300  # the peer venv's first import of BentoML is slow
STOP_TIMEOUT_S = 30
LOCUST_EXTRA_TIME_S = 120  # start-up and report writing on top of the run time
HALF_LOAD_USERS = 128


@dataclass(frozen=True)
class Server:
    """One HTTP server under test: how to start it and which API it has."""

    name: str
    api: str  # "noprop" or "bentoml", the response check of the locustfile
    command: list[str]
    env: dict[str, str]


@dataclass
class LevelResult:
    concurrency: int
    summary: Summary
    load_average: float  # 1-minute load average at the end of the run
    # CPU used during the run, in cores (CPU seconds per second of run time).
    server_cores: float = 0.0  # every process of the server
    event_loop_cores: float = 0.0  # the service's main thread; 0 for the peer
    generator_cores: float = 0.0  # the Locust process


@dataclass
class Results:
    """Everything one benchmark run measured, as written to results.json."""

    machine: dict[str, str]
    command: str
    max_batch_size: int
    limit: dict[str, float] = field(default_factory=dict)  # images/s by batch
    limit_by_spinning: dict[str, float] = field(default_factory=dict)
    batch_seconds: float = 0.0  # one batch of max_batch_size, onnxruntime alone
    levels: dict[str, list[LevelResult]] = field(default_factory=dict)
    half_load: LevelResult | None = None
    half_load_rate: float = 0.0
    profile: str | None = None  # the batched service's profile at saturation


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Benchmark the service against onnxruntime alone and BentoML.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=[1, 4, 16, 32, 64, 128],
        help="concurrent Locust users, one level after another",
    )
    parser.add_argument(
        "--seconds", type=int, default=20, help="measured seconds per level"
    )
    parser.add_argument(
        "--warmup-seconds",
        type=int,
        default=5,
        help="unmeasured load before each server's first level",
    )
    parser.add_argument(
        "--max-requests",
        type=int,
        default=50_000,
        help="requests after which a load run stops, whatever its time",
    )
    parser.add_argument(
        "--limit-seconds",
        type=float,
        default=12.0,
        help="seconds of onnxruntime alone per batch size, in 3 rounds",
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=Settings.model_fields["max_batch_size"].default,
        help="the batched service's and the peer's max_batch_size",
    )
    parser.add_argument(
        "--peer-venv",
        type=Path,
        default=REPOSITORY_ROOT / ".venv-peer",
        help="venv with the peer extra; created with pip when missing",
    )
    parser.add_argument("--no-peer", action="store_true", help="skip BentoML")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="record the batched service with py-spy at the highest concurrency "
        "(py-spy must be installed)",
    )
    parser.add_argument(
        "--data-root",
        type=Path,
        default=os.environ.get("NOPROP_DATA_ROOT") or None,
        help="datasets folder with MNIST/raw/ (default: NOPROP_DATA_ROOT, "
        "else the example digits)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPOSITORY_ROOT / "build" / "serving-benchmark",
        help="folder for results.json, report.md, CSV files and server logs",
    )
    parser.add_argument(
        "--from-results",
        type=Path,
        default=None,
        help="measure nothing: rewrite the report and plot from a results.json",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        default=REPOSITORY_ROOT / "docs" / "serving-benchmark.png",
        help="PNG file for the throughput and p99 plot",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll
    args = build_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_results is not None:
        results = load_results(args.from_results)
        write_plot(results, args.plot)
        print(write_report(results, args.out / "report.md"))
        return 0

    results = Results(
        machine=describe_machine(),
        command=" ".join(["python", "benchmarks/serving.py", *sys.argv[1:]]),
        max_batch_size=args.max_batch_size,
    )

    measure_limit(results, args, "before")
    servers = [
        service_server("service", args.max_batch_size),
        service_server("service, max_batch_size=1", 1),
    ]
    if not args.no_peer:
        servers.append(peer_server(ensure_peer_venv(args.peer_venv), args))
    for server in servers:
        with RunningServer(server, args.out) as running:
            measure_levels(running, results, args)
            if server.name == "service":
                measure_half_load(running, results, args)
                if args.profile:
                    results.profile = record_profile(running, args)

    measure_limit(results, args, "after")
    (args.out / "results.json").write_text(
        json.dumps(asdict(results), indent=2, default=str)
    )
    write_plot(results, args.plot)
    report = write_report(results, args.out / "report.md")
    print(report)
    return 0


def load_results(path: Path) -> Results:
    """Read a results.json written by an earlier run."""
    data = json.loads(path.read_text())

    def level(item: dict) -> LevelResult:
        return LevelResult(**{**item, "summary": Summary(**item["summary"])})

    data["levels"] = {
        name: [level(item) for item in items] for name, items in data["levels"].items()
    }
    if data["half_load"] is not None:
        data["half_load"] = level(data["half_load"])
    return Results(**data)


def describe_machine() -> dict[str, str]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in ("onnxruntime", "locust", "fastapi", "uvicorn", "starlette"):
        versions[package] = _version(package)
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        **versions,
        "load_average_at_start": f"{os.getloadavg()[0]:.2f}",
    }


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def measure_limit(results: Results, args: argparse.Namespace, when: str) -> None:
    """Time onnxruntime alone at max_batch_size and at batch 1.

    The session has the service's thread count, and is measured with and
    without spinning threads, in turns. The limit is the fastest median of
    all calls, ``when`` ("before" or "after" the servers) included, so a
    change in the machine's speed during the run lowers no ratio's bound.
    """
    settings = Settings(max_batch_size=args.max_batch_size)
    images, _ = load_images(None, args.data_root, MAX_TEST_IMAGES)
    models = {
        spinning: ModelSession(
            DEFAULT_MODEL_PATH,
            "limit",
            ["CPUExecutionProvider"],
            settings.intra_op_num_threads,
            spinning,
        )
        for spinning in (False, True)
    }
    shape = models[False].info.input_shape
    decoded = np.stack([decode_image(image.data, shape, 1 << 20) for image in images])
    rounds: dict[tuple[int, bool], list[float]] = {}
    for _ in range(3):
        for batch_size in (args.max_batch_size, 1):
            batch = decoded[np.arange(batch_size) % len(decoded)]  # (B, H, W, C)
            for spinning, model in models.items():
                rate = images_per_second(
                    lambda m=model, b=batch: m.run(b),
                    batch_size,
                    args.limit_seconds / 6,
                )
                rounds.setdefault((batch_size, spinning), []).append(rate)

    for (batch_size, spinning), rates in rounds.items():
        rate = statistics.median(rates)
        variant = f"{batch_size}, spinning={spinning}, {when}"
        results.limit_by_spinning[variant] = rate
        best = max(results.limit.get(str(batch_size), 0.0), rate)
        results.limit[str(batch_size)] = best
        logger.info("onnxruntime alone, batch %s: %.1f images/s", variant, rate)
    results.batch_seconds = (
        args.max_batch_size / results.limit[str(args.max_batch_size)]
    )


def images_per_second(
    run: Callable[[], object], batch_size: int, seconds: float
) -> float:
    """Return the images per second of ``run``, timed for at least ``seconds``."""
    run()
    calls = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        run()
        calls += 1
    return calls * batch_size / (time.perf_counter() - start)


def service_server(name: str, max_batch_size: int) -> Server:
    env = {
        "NOPROP_MODEL_PATH": str(DEFAULT_MODEL_PATH),
        "NOPROP_HOST": "127.0.0.1",
        "NOPROP_MAX_BATCH_SIZE": str(max_batch_size),
    }
    return Server(name, "noprop", [sys.executable, "-m", "service"], env)


def peer_server(venv: Path, args: argparse.Namespace) -> Server:
    env = {
        "BENTOML_DO_NOT_TRACK": "true",  # else BentoML sends usage statistics
        "BENTOML_HOME": str(args.out / "bentoml-home"),
        "PEER_MODEL_PATH": str(DEFAULT_MODEL_PATH),
        "PEER_MAX_BATCH_SIZE": str(args.max_batch_size),
    }
    command = [str(venv / "bin" / "bentoml"), "serve", PEER_SERVICE]
    command += ["--host", "127.0.0.1"]
    return Server("BentoML", "bentoml", command, env)


def ensure_peer_venv(venv: Path) -> Path:
    """Create the peer venv with the project's peer extra unless it exists."""
    if (venv / "bin" / "bentoml").is_file():
        return venv
    logger.info("creating %s with the peer extra (BentoML)", venv)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "-e", f"{REPOSITORY_ROOT}[peer]"], check=True)
    return venv


class RunningServer:
    """A server process on a free loopback port, stopped on exit with its children."""

    def __init__(self, server: Server, out: Path) -> None:
        self.server = server
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = out / f"server-{slug(server.name)}.log"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> RunningServer:
        command = list(self.server.command)
        env = {**os.environ, **self.server.env, "NOPROP_PORT": str(self.port)}
        if self.server.api == "bentoml":
            command += ["--port", str(self.port)]
        logger.info("starting %s on %s", self.server.name, self.url)
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                command,
                cwd=REPOSITORY_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a process group of its own, for killpg
            )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.server.name} exited; see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.server.name} not ready within {READY_TIMEOUT_S} s")

    def __exit__(self, *_exc: object) -> None:
        group = self.process.pid
        os.killpg(group, signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(group, signal.SIGKILL)
            self.process.wait(STOP_TIMEOUT_S)
        logger.info("stopped %s", self.server.name)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def measure_levels(
    running: RunningServer, results: Results, args: argparse.Namespace
) -> None:
    top = max(args.concurrency)
    run_locust(running, args, users=top, seconds=args.warmup_seconds, tag="warmup")
    levels = results.levels.setdefault(running.server.name, [])
    for users in args.concurrency:
        level = run_locust(running, args, users=users, seconds=args.seconds)
        levels.append(level)
        summary = level.summary
        logger.info(
            "%s, %d users: %.1f images/s, p99 %.0f ms",
            running.server.name,
            users,
            summary.images_per_s,
            summary.latency_ms.get("p99", float("nan")),
        )


def measure_half_load(
    running: RunningServer, results: Results, args: argparse.Namespace
) -> None:
    """Send half the saturating request rate at a fixed rate; keep its latency."""
    saturation = max(
        level.summary.requests_per_s for level in results.levels["service"]
    )
    rate = saturation / 2
    results.half_load = run_locust(
        running, args, users=HALF_LOAD_USERS, seconds=args.seconds, rate=rate
    )
    results.half_load_rate = rate
    logger.info(
        "service at %.1f requests/s: p99 %.0f ms",
        rate,
        results.half_load.summary.latency_ms.get("p99", float("nan")),
    )


def run_locust(
    running: RunningServer,
    args: argparse.Namespace,
    users: int,
    seconds: int,
    rate: float = 0.0,
    tag: str = "",
) -> LevelResult:
    """Run the benchmark locustfile headless against ``running``; return its result."""
    name = f"{slug(running.server.name)}-{users}{'-' + tag if tag else ''}"
    if rate:
        name += "-fixed-rate"
    summary_path = args.out / "csv" / f"{name}.json"
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "locust", "--locustfile", str(LOCUSTFILE),
        "--headless", "--only-summary", "--loglevel", "WARNING",
        "--host", running.url, "--users", str(users), "--spawn-rate", str(users),
        "--run-time", f"{seconds}s", "--reset-stats", "--stop-timeout", "5",
        "--csv", str(args.out / "csv" / name),
        "--api", running.server.api, "--summary-file", str(summary_path),
        "--request-rate", str(rate), "--max-requests", str(args.max_requests),
    ]  # fmt: skip
    if args.data_root:
        command += ["--data-root", str(args.data_root)]
    server_before = process_cpu_seconds(running.process.pid)
    generator_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(args.out / "csv" / f"{name}.log", "w") as log:
        subprocess.run(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=seconds + LOCUST_EXTRA_TIME_S,
            check=False,
        )
    generator_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if running.process.poll() is not None:
        raise RuntimeError(
            f"{running.server.name} exited during the run; see {running.log_path}"
        )
    server_after = process_cpu_seconds(running.process.pid)

    summary = Summary.from_file(summary_path)
    level = LevelResult(users, summary, os.getloadavg()[0])
    # Both counters also cover Locust's start-up and the time after the last
    # request, so dividing by the requests' span overstates the cores a little.
    span = max(summary.duration_s, 1e-9)
    level.server_cores = (server_after[0] - server_before[0]) / span
    if running.server.api == "noprop":  # BentoML's main process only supervises
        level.event_loop_cores = (server_after[1] - server_before[1]) / span
    generator = (generator_after.ru_utime + generator_after.ru_stime) - (
        generator_before.ru_utime + generator_before.ru_stime
    )
    level.generator_cores = generator / span
    return level


def process_cpu_seconds(pid: int) -> tuple[float, float]:
    """Return the CPU seconds of a process tree and of its root's main thread.

    The first figure adds up ``pid`` and its descendants that are still
    running, because BentoML runs its workers in child processes. The second
    is ``pid``'s main thread alone.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended meanwhile
        parents[int(entry.name)] = int(fields[1])
        cpu[int(entry.name)] = (int(fields[11]) + int(fields[12])) / ticks

    tree = {pid}
    for candidate in parents:
        ancestor = candidate
        while ancestor > 1 and ancestor not in tree:
            ancestor = parents.get(ancestor, 0)
        if ancestor in tree:
            tree.add(candidate)
    main = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    main_seconds = (int(main[11]) + int(main[12])) / ticks
    return sum(cpu.get(member, 0.0) for member in tree), main_seconds


def record_profile(running: RunningServer, args: argparse.Namespace) -> str | None:
    """Record the batched service with py-spy under the highest concurrency."""
    py_spy = Path(sys.executable).parent / "py-spy"
    if not py_spy.is_file():
        logger.warning("py-spy not found next to %s; no profile", sys.executable)
        return None
    path = args.out / "profile-service.txt"
    seconds = max(5, args.seconds - 5)
    recorder = subprocess.Popen(
        [
            str(py_spy),
            "record",
            "--pid",
            str(running.process.pid),
            "--duration",
            str(seconds),
            "--rate",
            "100",
            "--format",
            "raw",
            "--output",
            str(path),
            "--nonblocking",
        ],  # fmt: skip
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    run_locust(
        running, args, users=max(args.concurrency), seconds=args.seconds, tag="profile"
    )
    recorder.wait(STOP_TIMEOUT_S)
    return str(path)


if __name__ == "__main__":
    sys.exit(main())
