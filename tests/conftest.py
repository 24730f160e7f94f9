"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DATA_ROOT_ENV = "NOPROP_DATA_ROOT"


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The folder of real datasets from NOPROP_DATA_ROOT; skips the test when unset."""
    value = os.environ.get(DATA_ROOT_ENV)
    if not value:
        pytest.skip(f"{DATA_ROOT_ENV} is not set; it names the folder of real datasets")
    return Path(value)
