"""Command line: ``python -m loadtest run`` runs the locustfile headless.

The run writes Locust's CSV files (``locust_stats.csv``, ``locust_failures.csv``,
``locust_stats_history.csv``, ``locust_exceptions.csv``), its HTML report
(``report.html``) and ``summary.json`` to the output folder, then prints the
summary. Exit status: 0 when no request failed (rejections with 429 or 503
allowed), 1 when some did, 2 for invalid options, and Locust's own status
when Locust itself failed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

from loadtest.forms import FORMS, parse_forms
from loadtest.images import MAX_TEST_IMAGES, ImageSourceError, load_images
from loadtest.summary import Summary, format_summary

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
DEFAULT_HOST = "http://127.0.0.1:8000"
# Locust's time spans: "90", "90s", "2m", "1h30m".
TIME_SPAN = re.compile(r"^(?:\d+|(?:\d+h)?(?:\d+m)?(?:\d+s)?)$")
TIME_UNITS = {"h": 3600, "m": 60, "s": 1}
STOP_TIMEOUT_S = 5  # time users get to finish the request in flight at the end
# Start-up, image loading and report writing on top of the run time.
EXTRA_TIME_S = 120
EXIT_FAILED_REQUESTS = 1
EXIT_INVALID_OPTIONS = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest",
        description="Load-test a running classification service with Locust.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="run the locustfile headless and print a summary",
        description="Post real images in every request form to POST /classify "
        "for a fixed time; write Locust's CSV and HTML reports and print "
        "throughput, latency percentiles, error rate and rejection rate.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_run_arguments(run)
    return parser


def add_run_arguments(run: argparse.ArgumentParser) -> None:
    env = os.environ.get
    run.add_argument(
        "--host",
        default=env("LOADTEST_HOST", DEFAULT_HOST),
        help="base URL of the service (env LOADTEST_HOST)",
    )
    run.add_argument(
        "-u",
        "--users",
        type=int,
        default=int(env("LOADTEST_USERS", "10")),
        help="concurrent users; each sends its next request once the last one "
        "is answered (env LOADTEST_USERS)",
    )
    run.add_argument(
        "-r",
        "--spawn-rate",
        type=float,
        default=float(env("LOADTEST_SPAWN_RATE", "10")),
        help="users started per second (env LOADTEST_SPAWN_RATE)",
    )
    run.add_argument(
        "-t",
        "--run-time",
        "--duration",
        dest="run_time",
        default=env("LOADTEST_RUN_TIME", "30s"),
        help="how long to send requests, e.g. 90s, 5m, 1h30m; a bare number is "
        "seconds (env LOADTEST_RUN_TIME)",
    )
    run.add_argument(
        "--out",
        type=Path,
        default=Path(env("LOADTEST_OUT", "loadtest-report")),
        help="folder for the CSV files, report.html and summary.json "
        "(env LOADTEST_OUT)",
    )
    run.add_argument(
        "--image-dir",
        default=env("LOADTEST_IMAGE_DIR", ""),
        help="folder of image files to send, labels read from 'label-N' in file "
        "names (env LOADTEST_IMAGE_DIR; default: the MNIST test set under "
        "--data-root, else the repository's examples/digits)",
    )
    run.add_argument(
        "--data-root",
        default=env("NOPROP_DATA_ROOT", ""),
        help="datasets folder with MNIST/raw/; its first "
        f"{MAX_TEST_IMAGES} test images are sent (env NOPROP_DATA_ROOT)",
    )
    run.add_argument(
        "--forms",
        default=env("LOADTEST_FORMS", ",".join(FORMS)),
        help="comma-separated request forms, picked at random per request "
        "(env LOADTEST_FORMS)",
    )
    run.add_argument(
        "--max-images-per-request",
        type=int,
        default=4,
        help="maximum images in one multipart or JSON request",
    )
    run.add_argument(
        "--request-rate",
        type=float,
        default=0.0,
        help="requests per second from all users together (0: no pause between "
        "a user's requests)",
    )
    run.add_argument(
        "--reset-stats",
        action="store_true",
        help="leave the time until all users have started out of the statistics",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = check_arguments(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_INVALID_OPTIONS

    args.out.mkdir(parents=True, exist_ok=True)
    summary_path = args.out / "summary.json"
    summary_path.unlink(missing_ok=True)
    command = locust_command(args, summary_path)
    timeout = parse_seconds(args.run_time) + STOP_TIMEOUT_S + EXTRA_TIME_S
    try:
        result = subprocess.run(command, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        print(f"error: Locust did not finish within {timeout} s", file=sys.stderr)
        return EXIT_FAILED_REQUESTS
    if not summary_path.is_file():
        print(
            f"error: Locust exited with status {result.returncode} without "
            "writing a summary; see its output above",
            file=sys.stderr,
        )
        return result.returncode or EXIT_FAILED_REQUESTS

    summary = Summary.from_file(summary_path)
    print(f"\nload test of {args.host}: {args.users} users, {args.run_time}")
    print(format_summary(summary))
    print(f"reports: {args.out}/report.html, {args.out}/locust_stats.csv")
    return EXIT_FAILED_REQUESTS if summary.errors else 0


def check_arguments(args: argparse.Namespace) -> str | None:
    """Return what is wrong with the options, or None."""
    if not re.match(r"^https?://[^/]+", args.host):
        return f"invalid --host {args.host!r}; expected http://HOST:PORT"
    if args.users < 1:
        return f"--users must be at least 1, got {args.users}"
    if args.spawn_rate <= 0:
        return f"--spawn-rate must be positive, got {args.spawn_rate}"
    if not TIME_SPAN.match(args.run_time) or parse_seconds(args.run_time) < 1:
        return f"invalid --run-time {args.run_time!r}; expected e.g. 90s, 5m, 1h30m"
    if args.max_images_per_request < 1:
        return (
            "--max-images-per-request must be at least 1, got "
            f"{args.max_images_per_request}"
        )
    if args.request_rate < 0:
        return f"--request-rate must not be negative, got {args.request_rate}"
    try:
        parse_forms(args.forms)
        image_dir = Path(args.image_dir) if args.image_dir else None
        data_root = Path(args.data_root) if args.data_root else None
        load_images(image_dir, data_root, max_images=1)
    except (ValueError, ImageSourceError) as error:
        return str(error)
    return None


def parse_seconds(span: str) -> int:
    """Convert a Locust time span ("90", "2m", "1h30m") to seconds."""
    if span.isdigit():
        return int(span)
    return sum(
        int(number) * TIME_UNITS[unit]
        for number, unit in re.findall(r"(\d+)([hms])", span)
    )


def locust_command(args: argparse.Namespace, summary_path: Path) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "locust",
        "--locustfile",
        str(LOCUSTFILE),
        "--headless",
        "--only-summary",
        "--host",
        args.host,
        "--users",
        str(args.users),
        "--spawn-rate",
        str(args.spawn_rate),
        "--run-time",
        args.run_time,
        "--stop-timeout",
        str(STOP_TIMEOUT_S),
        "--csv",
        str(args.out / "locust"),
        "--html",
        str(args.out / "report.html"),
        "--summary-file",
        str(summary_path),
        "--forms",
        args.forms,
        "--max-images-per-request",
        str(args.max_images_per_request),
        "--request-rate",
        str(args.request_rate),
        "--image-dir",
        args.image_dir,
        "--data-root",
        args.data_root,
    ]
    if args.reset_stats:
        command.append("--reset-stats")
    return command
