"""The service must run where only the serve extra is installed: no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.service.conftest import REPOSITORY_ROOT

BUILD_APP = """
import sys
from service.app import create_app
from service.cli import main
from service.settings import Settings

create_app(Settings(model_path=sys.argv[1]))
loaded = [name for name in ("torch", "torchvision", "training", "export")
          if name in sys.modules]
assert "torch" not in sys.modules, loaded
assert not loaded, loaded
"""


def test_service_app_leaves_torch_unloaded(tmp_path: Path):
    model_file = tmp_path / "model.onnx"
    model_file.write_bytes(b"the app reads the model only at start-up")
    result = subprocess.run(
        [sys.executable, "-c", BUILD_APP, str(model_file)],
        cwd=REPOSITORY_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
