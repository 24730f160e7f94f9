"""Settings from NOPROP_* variables, their validation and the command line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.cli import EXIT_INVALID_SETTINGS, main
from service.settings import Settings, format_validation_error


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "mnist-test" / "model.onnx"
    path.parent.mkdir()
    path.write_bytes(b"not read by Settings")
    return path


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("NOPROP_") and name != "NOPROP_DATA_ROOT":
            monkeypatch.delenv(name)


def test_settings_read_environment(monkeypatch, model_file):
    monkeypatch.setenv("NOPROP_MODEL_PATH", str(model_file))
    monkeypatch.setenv("NOPROP_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("NOPROP_MAX_QUEUE_DELAY_MS", "2.5")
    monkeypatch.setenv("NOPROP_EXECUTION_PROVIDERS", " CPUExecutionProvider ,")
    monkeypatch.setenv("NOPROP_PORT", "9001")
    monkeypatch.setenv("NOPROP_INTRA_OP_ALLOW_SPINNING", "true")
    monkeypatch.setenv("NOPROP_ACCESS_LOG", "1")
    settings = Settings()
    assert settings.model_path == model_file
    assert settings.max_batch_size == 7
    assert settings.max_queue_delay_ms == 2.5
    assert settings.execution_providers == ["CPUExecutionProvider"]
    assert settings.port == 9001
    assert settings.intra_op_allow_spinning is True
    assert settings.access_log is True


def test_settings_defaults(model_file):
    settings = Settings(model_path=model_file)
    assert settings.execution_providers == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert settings.host == "127.0.0.1"
    assert settings.port == 8000
    assert settings.require_cuda is False
    assert settings.intra_op_allow_spinning is False
    assert settings.access_log is False


def test_settings_model_name_from_path(model_file, tmp_path):
    assert Settings(model_path=model_file).resolved_model_name == "mnist-test"
    other = tmp_path / "digits.int8.onnx"
    other.write_bytes(b"x")
    assert Settings(model_path=other).resolved_model_name == "digits.int8"
    named = Settings(model_path=model_file, model_name="prod")
    assert named.resolved_model_name == "prod"


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("NOPROP_MAX_BATCH_SIZE", "0", "greater than or equal to 1"),
        ("NOPROP_MAX_BATCH_SIZE", "many", "valid integer"),
        ("NOPROP_MAX_QUEUE_DELAY_MS", "-1", "greater than or equal to 0"),
        ("NOPROP_REQUEST_TIMEOUT_S", "0", "greater than 0"),
        ("NOPROP_PORT", "70000", "less than or equal to 65535"),
        ("NOPROP_EXECUTION_PROVIDERS", "GPUProvider", "unknown execution provider"),
        ("NOPROP_EXECUTION_PROVIDERS", ",", "at least one execution provider"),
        ("NOPROP_LOG_LEVEL", "loud", "'debug', 'info', 'warning' or 'error'"),
    ],
)
def test_settings_reject_invalid_value(
    monkeypatch, model_file, variable, value, message
):
    monkeypatch.setenv("NOPROP_MODEL_PATH", str(model_file))
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as caught:
        Settings()
    text = format_validation_error(caught.value)
    assert text.startswith(f"invalid {variable}=")
    assert message in text


def test_settings_reject_missing_model(tmp_path):
    with pytest.raises(ValidationError) as caught:
        Settings(model_path=tmp_path / "absent.onnx")
    text = format_validation_error(caught.value)
    assert "invalid NOPROP_MODEL_PATH=" in text
    assert "absent.onnx" in text
    assert "model file not found" in text


def test_settings_reject_cuda_required_without_cuda_provider(model_file):
    with pytest.raises(ValidationError, match="NOPROP_REQUIRE_CUDA is set"):
        Settings(
            model_path=model_file,
            require_cuda=True,
            execution_providers=["CPUExecutionProvider"],
        )


def test_settings_reject_request_larger_than_queue(model_file):
    with pytest.raises(ValidationError, match="must not exceed NOPROP_MAX_QUEUE_SIZE"):
        Settings(model_path=model_file, max_queue_size=8, max_images_per_request=9)


def test_cli_exits_on_invalid_settings(monkeypatch, model_file, capsys):
    monkeypatch.setenv("NOPROP_MODEL_PATH", str(model_file))
    monkeypatch.setenv("NOPROP_MAX_QUEUE_SIZE", "zero")
    assert main([]) == EXIT_INVALID_SETTINGS
    error = capsys.readouterr().err
    assert "invalid NOPROP_MAX_QUEUE_SIZE='zero'" in error


def test_cli_help_lists_variables(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["--help"])
    assert caught.value.code == 0
    output = capsys.readouterr().out
    for variable in ("NOPROP_MODEL_PATH", "NOPROP_MAX_BATCH_SIZE", "NOPROP_PORT"):
        assert variable in output
