"""Drive the docker-compose stack with podman-compose for the deployment test.

The stack is the repository's docker-compose.yml merged with
docker-compose.cpu.yml, because the test machines have no GPU. Images are built
on a local Debian base image, since no registry can be reached, and get tags of
their own, so that the test removes exactly what it built.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
SETUP_SCRIPT = REPOSITORY_ROOT / "docker" / "setup-podman.sh"
COMPOSE_FILES = ("docker-compose.yml", "docker-compose.cpu.yml")
LOCAL_BASE_IMAGE = "localhost/debian-base:bookworm"
# Where a host CA bundle is mounted inside builds; see PIP_CERT in the Dockerfiles.
BUILD_CA_PATH = "/run/host-ca.crt"
SERVICES = ("service", "load", "train")
# Peak disk use of building the trainer image, measured at 15.1 GB: its
# 6.4 GB of layers plus the copies podman makes while committing a layer
# (docs/deploy.md). Buildah keeps those copies under /var/tmp.
TRAIN_BUILD_DISK_GB = 16
BUILD_TEMP_DIR = Path(os.environ.get("TMPDIR", "/var/tmp"))


@dataclass
class PhaseTimes:
    """Wall-clock seconds of each phase of the deployment test, in order."""

    phases: list[tuple[str, float, str]] = field(default_factory=list)

    @contextlib.contextmanager
    def measure(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        outcome = "failed"
        try:
            yield
            outcome = "ok"
        finally:
            seconds = time.monotonic() - start
            self.phases.append((name, seconds, outcome))
            print(f"deploy phase {name!r}: {seconds:.1f} s ({outcome})", flush=True)

    def table(self) -> list[str]:
        width = max(len(name) for name, _, _ in self.phases)
        lines = [
            f"{name:<{width}}  {seconds:7.1f} s  {outcome}"
            for name, seconds, outcome in self.phases
        ]
        total = sum(seconds for _, seconds, _ in self.phases)
        lines.append(f"{'total':<{width}}  {total:7.1f} s")
        return lines


PHASES = PhaseTimes()


def podman_unavailable_reason() -> str | None:
    """Return why podman cannot be installed or used here, or None if it can."""
    if shutil.which("podman") and shutil.which("debootstrap"):
        return None
    if os.geteuid() != 0:
        return "podman is not installed, and installing it needs root"
    if not shutil.which("apt-get"):
        return "podman is not installed, and this host has no apt-get to install it"
    return None


def set_up_podman() -> None:
    """Install and configure podman and build the local base image where missing."""
    subprocess.run(
        ["bash", str(SETUP_SCRIPT)],
        check=True,
        env={**os.environ, "BASE_IMAGE": LOCAL_BASE_IMAGE},
    )


def free_build_disk_gb() -> tuple[float, str]:
    """Return the free GB where image builds write, and where that is.

    Builds write to podman's graph root and to the temporary folder. Where
    the two are on different file systems, the smaller free space counts.
    """
    root = subprocess.run(
        ["podman", "info", "--format", "{{.Store.GraphRoot}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    places = [Path(root), BUILD_TEMP_DIR]
    free = min(shutil.disk_usage(place).free for place in places if place.exists())
    return free / 1e9, " and ".join(str(place) for place in places)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def host_pip_build_options() -> tuple[dict[str, str], list[str]]:
    """Build arguments and volume options that give builds the host's pip setup.

    Local wheel folders named by the host's pip configuration (find-links and
    file:// extra indexes) are mounted read-only at the same paths, so that a
    build installs torch from them rather than downloading it. The host's CA
    bundle, when pip names one, is mounted for PIP_CERT.
    """
    result = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        check=True,
    )
    settings: dict[str, str] = {}
    for line in result.stdout.splitlines():
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        settings.setdefault(name, value.strip().strip("'\""))

    build_args: dict[str, str] = {}
    mounts: set[str] = set()

    index_urls = []
    for url in settings.get("extra-index-url", "").split():
        path = urllib.parse.urlparse(url).path if url.startswith("file://") else ""
        if path and Path(path).exists():
            index_urls.append(url)
            # A simple index links to files beside it, so mount its parent.
            mounts.add(str(Path(path).parent))
    if index_urls:
        build_args["PIP_EXTRA_INDEX_URL"] = " ".join(index_urls)

    find_links = [p for p in settings.get("find-links", "").split() if Path(p).is_dir()]
    if find_links:
        build_args["PIP_FIND_LINKS"] = " ".join(find_links)
        mounts.update(find_links)

    volume_options = [f"-v {path}:{path}:ro" for path in sorted(mounts)]
    cert = settings.get("cert", "")
    if cert and Path(cert).is_file():
        build_args["PIP_CERT"] = BUILD_CA_PATH
        volume_options.append(f"-v {cert}:{BUILD_CA_PATH}:ro")
    return build_args, volume_options


class ComposeStack:
    """One podman-compose project built from the repository's compose files."""

    def __init__(self, work_dir: Path, data_root: Path | None) -> None:
        suffix = f"{os.getpid()}-{int(time.time())}"
        self.project = f"noprop-deploy-test-{suffix}"
        self.tag = f"deploy-test-{suffix}"
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.report_dir = work_dir / "loadtest-report"
        self.images = {
            service: f"localhost/noprop-{service}:{self.tag}" for service in SERVICES
        }

        build_args, volume_options = host_pip_build_options()
        self.env = {
            **os.environ,
            **build_args,
            "NOPROP_SERVICE_IMAGE": self.images["service"],
            "NOPROP_LOAD_IMAGE": self.images["load"],
            "NOPROP_TRAIN_IMAGE": self.images["train"],
            "NOPROP_SERVICE_BASE_IMAGE": LOCAL_BASE_IMAGE,
            "NOPROP_LOAD_BASE_IMAGE": LOCAL_BASE_IMAGE,
            "NOPROP_TRAIN_BASE_IMAGE": LOCAL_BASE_IMAGE,
            "NOPROP_PUBLISH": f"127.0.0.1:{self.port}",
            # Half of the machine, so that the test's own client keeps a core.
            "NOPROP_CPUS": str(max(1.0, (os.cpu_count() or 2) / 2)),
            "NOPROP_MEMORY": "2g",
            "NOPROP_DRAIN_DELAY_S": "1",
            "LOAD_REPORT_DIR": str(self.report_dir),
        }
        if data_root is not None:
            self.env["NOPROP_DATA_ROOT"] = str(data_root)
        # HEALTHCHECK needs the docker image format; podman's default is OCI.
        self.build_options = " ".join(["--format docker", *volume_options])

    def compose(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        """Run podman-compose on this project; raise with its output on failure."""
        command = [
            sys.executable, "-m", "podman_compose",
            "--project-name", self.project,
            *(option for name in COMPOSE_FILES for option in ("-f", name)),
            f"--podman-build-args={self.build_options}",
            *args,
        ]  # fmt: skip
        result = subprocess.run(
            command,
            cwd=REPOSITORY_ROOT,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise AssertionError(
                f"{shlex.join(command)} exited with {result.returncode}\n"
                f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
            )
        return result

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"

    def podman(
        self, *args: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["podman", *args], capture_output=True, text=True, check=check
        )

    def wait_ready(self, timeout: float = 180) -> float:
        """Poll /readyz until it returns 200; return the seconds it took."""
        start = time.monotonic()
        last = "no response"
        while time.monotonic() - start < timeout:
            try:
                response = httpx.get(f"{self.base_url}/readyz", timeout=2)
                if response.status_code == 200:
                    return time.monotonic() - start
                last = f"{response.status_code} {response.text}"
            except httpx.HTTPError as error:
                last = repr(error)
            time.sleep(0.5)
        logs = self.podman("logs", self.container("service"), check=False)
        raise AssertionError(
            f"{self.base_url}/readyz not ready after {timeout} s (last: {last})\n"
            f"service logs:\n{(logs.stdout + logs.stderr)[-4000:]}"
        )

    def remove_image(self, service: str) -> None:
        """Remove one of the images this stack built, and the build's leftovers."""
        self.podman("rmi", "--force", self.images[service], check=False)
        self.podman("image", "prune", "--force", check=False)

    def tear_down(self) -> None:
        """Remove the project's containers, volumes and images, in any state."""
        subprocess.run(
            [
                sys.executable, "-m", "podman_compose",
                "--project-name", self.project,
                *(option for name in COMPOSE_FILES for option in ("-f", name)),
                "--profile", "load", "--profile", "train",
                "down", "--volumes", "--timeout", "5",
            ],
            cwd=REPOSITORY_ROOT,
            env=self.env,
            capture_output=True,
            timeout=300,
        )  # fmt: skip
        leftovers = self.podman(
            "ps", "--all", "--quiet", "--filter", f"name={self.project}", check=False
        ).stdout.split()
        if leftovers:
            self.podman("rm", "--force", *leftovers, check=False)
        volumes = self.podman(
            "volume", "ls", "--quiet", "--filter", f"name={self.project}", check=False
        ).stdout.split()
        if volumes:
            self.podman("volume", "rm", "--force", *volumes, check=False)
        self.podman("rmi", "--force", *self.images.values(), check=False)
        # The intermediate layers of the builds are left untagged.
        self.podman("image", "prune", "--force", check=False)
