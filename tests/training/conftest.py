"""Fixtures for the training tests: small datasets in the official file layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.data import load_dataset

CIFAR100_TRAIN_SIZE = 600
CIFAR100_TEST_SIZE = 200


def write_cifar100_binary(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write CIFAR-100 binary records: coarse label, fine label, 3,072 pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"class_{index:02d}" for index in range(100)]
    (folder / "fine_label_names.txt").write_text("\n".join(names) + "\n")
    (folder / "coarse_label_names.txt").write_text(
        "\n".join(f"superclass_{index:02d}" for index in range(20)) + "\n"
    )
    for name, index in (
        ("train.bin", slice(0, CIFAR100_TRAIN_SIZE)),
        ("test.bin", slice(CIFAR100_TRAIN_SIZE, None)),
    ):
        fine = labels[index].astype(np.uint8)
        coarse = (fine // 5).astype(np.uint8)
        pixels = images[index].reshape(len(fine), -1)
        records = np.concatenate([coarse[:, None], fine[:, None], pixels], axis=1)
        records.tofile(folder / name)


@pytest.fixture(scope="session")
def cifar100_root(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small CIFAR-100 in the official binary layout, made of real CIFAR-10 images.

    No copy of CIFAR-100 is available offline, so real CIFAR-10 images stand in
    for it. The fine label of image i is 10 * (its CIFAR-10 class) + i % 10, so all
    100 classes occur and the CIFAR-10 class part of each label is learnable.
    """
    split, _ = load_dataset("cifar10", data_root, train=True)
    count = CIFAR100_TRAIN_SIZE + CIFAR100_TEST_SIZE
    images = split.images[:count].numpy()
    labels = split.labels[:count].numpy() * 10 + np.arange(count) % 10
    root = tmp_path_factory.mktemp("cifar100")
    write_cifar100_binary(root / "cifar-100-binary", images, labels)
    return root
