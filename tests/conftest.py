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


@pytest.fixture(scope="session")
def tiny_mnist_checkpoint(
    data_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A NoProp-DT checkpoint (one-hot, 3 steps) trained briefly on 640 MNIST images.

    It is trained once per session, in about 30 s of CPU time, and reaches
    about 45% test accuracy, so tests should check behaviour, not accuracy.
    """
    from training.trainer import TrainConfig, Trainer

    config = TrainConfig(
        dataset="mnist",
        num_steps=3,
        epochs=1,
        lr=5e-3,
        train_subset=640,
        test_subset=200,
        train_eval_size=200,
    )
    trainer = Trainer(config, tmp_path_factory.mktemp("tiny-mnist"), data_root)
    trainer.run()
    return trainer.checkpoint_path
