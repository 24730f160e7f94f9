"""The images' pinned requirements agree with the extras in pyproject.toml."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS = REPOSITORY_ROOT / "docker" / "requirements"
PROJECT = "noprop-serve"
# The service image runs the CUDA build of onnxruntime; both install the same
# `onnxruntime` module, so the image has only the GPU one.
IMAGE_SUBSTITUTES = {"onnxruntime": "onnxruntime-gpu"}


def _extra_requirements(extra: str) -> list[Requirement]:
    """Return the requirements of an extra, with nested project extras expanded."""
    pyproject = tomllib.loads((REPOSITORY_ROOT / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    result = [Requirement(line) for line in pyproject["project"]["dependencies"]]
    pending = [extra]
    while pending:
        for line in extras[pending.pop()]:
            requirement = Requirement(line)
            if canonicalize_name(requirement.name) == PROJECT:
                pending.extend(requirement.extras)
            else:
                result.append(requirement)
    return result


def _pins(file_name: str) -> dict[str, Version]:
    pins = {}
    for number, line in enumerate(
        (REQUIREMENTS / file_name).read_text().splitlines(), 1
    ):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, separator, version = line.partition("==")
        assert separator, f"{file_name}:{number}: {line!r} is not pinned with =="
        pins[canonicalize_name(name)] = Version(version)
    return pins


@pytest.mark.parametrize(
    ("file_name", "extra"),
    [("serve.txt", "serve"), ("train.txt", "export"), ("load.txt", "load")],
)
def test_pins_satisfy_extra(file_name: str, extra: str) -> None:
    pins = _pins(file_name)
    substitutes = IMAGE_SUBSTITUTES if extra == "serve" else {}
    for requirement in _extra_requirements(extra):
        name = canonicalize_name(requirement.name)
        name = substitutes.get(name, name)
        assert name in pins, f"{file_name} does not pin {name}, needed by [{extra}]"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{file_name} pins {name}=={pins[name]}, outside {requirement}"
        )


def test_service_image_has_no_torch() -> None:
    pins = _pins("serve.txt")
    assert "torch" not in pins
    assert "onnxruntime" not in pins, "the CPU onnxruntime would shadow the GPU one"
