"""Exporting NoProp-CT and NoProp-FM checkpoints, and serving the exported files."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export import ExportError, export_checkpoint, read_metadata
from export.cli import main as export_main
from export.graph import find_forbidden_ops
from tests.export.conftest import VERIFY_IMAGES
from tests.service.conftest import ServerProcess, png_bytes
from training.continuous import DEFAULT_INTEGRATION
from training.data import load_dataset

VARIANTS = ("ct", "fm")


@pytest.fixture(scope="module", params=VARIANTS)
def continuous_checkpoint(
    request: pytest.FixtureRequest,
    data_root: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """A CT or FM checkpoint trained for one epoch on 1,000 real MNIST images."""
    from training.trainer import TrainConfig, Trainer

    config = TrainConfig(
        dataset="mnist",
        variant=request.param,
        num_steps=2,
        epochs=1,
        batch_size=64,
        lr=2e-3,
        train_subset=1000,
        test_subset=100,
        train_eval_size=100,
    )
    trainer = Trainer(config, tmp_path_factory.mktemp(request.param), data_root)
    trainer.run()
    return trainer.checkpoint_path


def variant_of(checkpoint: Path) -> str:
    return checkpoint.parent.name.rstrip("0123456789")


def test_default_export_unrolls_the_measured_steps(
    continuous_checkpoint: Path, data_root: Path, tmp_path: Path
) -> None:
    variant = variant_of(continuous_checkpoint)
    solver, steps = DEFAULT_INTEGRATION[variant]

    report = export_checkpoint(
        continuous_checkpoint,
        tmp_path / "model.onnx",
        data_root=data_root,
        verify_images=VERIFY_IMAGES,
    )

    (file,) = report.files
    model = onnx.load(file.path)
    metadata = read_metadata(model)
    assert (metadata.variant, metadata.num_steps) == (variant, steps)
    assert file.verification.argmax_mismatches == 0
    assert file.verification.max_abs_diff < 1e-4
    assert find_forbidden_ops(model) == []
    assert solver in ("euler", "heun")


@pytest.mark.parametrize(("solver", "steps"), [("euler", 3), ("heun", 2)])
def test_cli_steps_and_solver_change_the_graph(
    continuous_checkpoint: Path,
    data_root: Path,
    tmp_path: Path,
    solver: str,
    steps: int,
    capsys: pytest.CaptureFixture[str],
) -> None:
    output = tmp_path / f"{solver}.onnx"
    argv = [str(continuous_checkpoint), "-o", str(output), "--data-root"]
    argv += [str(data_root), "--verify-images", str(VERIFY_IMAGES)]
    argv += ["--steps", str(steps), "--solver", solver]

    assert export_main(argv) == 0, capsys.readouterr().err

    model = onnx.load(output)
    assert read_metadata(model).num_steps == steps
    # One time embedding per distinct time: Euler evaluates at t_0 .. t_{N-1},
    # Heun also at t_N. The optimizer merges Heun's two evaluations at one t.
    sines = sum(node.op_type == "Sin" for node in model.graph.node)
    assert sines == steps + (1 if solver == "heun" else 0)


def test_steps_are_rejected_for_dt_and_below_one(
    tiny_mnist_checkpoint: Path,
    continuous_checkpoint: Path,
    data_root: Path,
    tmp_path: Path,
) -> None:
    with pytest.raises(ExportError, match="variant is 'dt'"):
        export_checkpoint(
            tiny_mnist_checkpoint, tmp_path / "dt.onnx", data_root=data_root, steps=4
        )
    with pytest.raises(ExportError, match="steps must be at least 1, got 0"):
        export_checkpoint(
            continuous_checkpoint, tmp_path / "x.onnx", data_root=data_root, steps=0
        )
    assert not list(tmp_path.iterdir())


def test_service_serves_the_export_unchanged(
    continuous_checkpoint: Path, data_root: Path, tmp_path: Path
) -> None:
    """The service's probabilities are onnxruntime's, for real MNIST test digits."""
    path = tmp_path / "model.onnx"
    export_checkpoint(
        continuous_checkpoint, path, data_root=data_root, verify_images=VERIFY_IMAGES
    )
    split, _ = load_dataset("mnist", data_root, train=False)
    images = split.images[:8].permute(0, 2, 3, 1).numpy()  # (8, 28, 28, 1) uint8
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {"image": images})

    server = ServerProcess(path, tmp_path / "server.log")
    try:
        server.wait_listening()
        server.wait_ready()
        files = [
            ("images", (f"{i}.png", png_bytes(image[:, :, 0]), "image/png"))
            for i, image in enumerate(images)
        ]
        response = httpx.post(f"{server.url}/classify", files=files, timeout=30)
        model = httpx.get(f"{server.url}/model", timeout=10).json()
    finally:
        server.stop()

    assert response.status_code == 200, response.text
    served = np.array(
        [
            [p["probabilities"][str(label)] for label in range(10)]
            for p in response.json()["predictions"]
        ]
    )
    np.testing.assert_allclose(served, expected, atol=1e-6)
    assert model["metadata"]["noprop.variant"] == variant_of(continuous_checkpoint)
