from pathlib import Path

import numpy as np
import pytest
import torch

from training.data import (
    DatasetError,
    ImageSplit,
    load_dataset,
    normalize,
    read_cifar_binary,
    resolve_data_root,
)


def test_mnist_loads_real_idx_files(data_root):
    train, info = load_dataset("mnist", data_root, train=True)
    test, _ = load_dataset("mnist", data_root, train=False)

    assert train.images.shape == (60_000, 1, 28, 28)
    assert train.images.dtype == torch.uint8
    assert test.images.shape == (10_000, 1, 28, 28)
    assert torch.bincount(test.labels).tolist()[:3] == [980, 1135, 1032]
    assert info.class_names == tuple("0123456789")


def test_cifar10_loads_real_binary_batches(data_root):
    train, info = load_dataset("cifar10", data_root, train=True)
    test, _ = load_dataset("cifar10", data_root, train=False)

    assert train.images.shape[1:] == (3, 32, 32)
    assert len(train) % 10_000 == 0
    assert len(test) == 10_000
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert info.class_names[0] == "airplane"
    assert info.class_names[-1] == "truck"


def test_cifar100_binary_reads_fine_labels(cifar100_root):
    train, info = load_dataset("cifar100", cifar100_root, train=True)
    test, _ = load_dataset("cifar100", cifar100_root, train=False)

    assert len(info.class_names) == 100
    assert train.images.shape == (600, 3, 32, 32)
    assert len(test) == 200
    assert int(train.labels.max()) >= 90
    assert set(train.labels.tolist()) == set(range(100))


def test_cifar_binary_pixel_layout(tmp_path):
    # One record: label 7, then the R, G and B planes, each 32 x 32 row-major.
    planes = np.stack([np.full((32, 32), value, np.uint8) for value in (10, 20, 30)])
    planes[0, 0, 1] = 99
    record = np.concatenate([[7], planes.ravel()]).astype(np.uint8)
    path = tmp_path / "batch.bin"
    record.tofile(path)

    split = read_cifar_binary(path, label_bytes=1, num_classes=10)

    assert split.labels.tolist() == [7]
    assert split.images[0, :, 5, 5].tolist() == [10, 20, 30]
    assert split.images[0, 0, 0, 1].item() == 99


def test_cifar_binary_rejects_wrong_size(tmp_path):
    path = tmp_path / "data_batch_1.bin"
    path.write_bytes(bytes(3073 + 100))

    with pytest.raises(
        DatasetError, match=r"data_batch_1.bin is malformed: 3173 bytes"
    ):
        read_cifar_binary(path, label_bytes=1, num_classes=10)


def test_cifar_binary_rejects_label_out_of_range(tmp_path):
    path = tmp_path / "test_batch.bin"
    path.write_bytes(bytes([12]) + bytes(3072))

    with pytest.raises(DatasetError, match="label 12 is out of range 0..9"):
        read_cifar_binary(path, label_bytes=1, num_classes=10)


def test_missing_mnist_names_path_and_files(tmp_path):
    with pytest.raises(DatasetError) as error:
        load_dataset("mnist", tmp_path, train=True)

    message = str(error.value)
    assert str(tmp_path / "MNIST" / "raw") in message
    assert "train-images-idx3-ubyte" in message
    assert "--download" in message


def test_truncated_mnist_is_rejected(data_root, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for path in (data_root / "MNIST" / "raw").iterdir():
        (raw / path.name).write_bytes(path.read_bytes())
    truncated = raw / "t10k-images-idx3-ubyte"
    truncated.write_bytes(truncated.read_bytes()[:5000])

    with pytest.raises(
        DatasetError,
        match=r"t10k-images-idx3-ubyte is malformed: its header declares shape "
        r"\(10000, 28, 28\), which needs 7840016 bytes, but the file has 5000",
    ):
        load_dataset("mnist", tmp_path, train=False)


def test_missing_cifar_names_both_layouts(tmp_path):
    with pytest.raises(DatasetError) as error:
        load_dataset("cifar100", tmp_path, train=True)

    assert "cifar-100-python/" in str(error.value)
    assert "cifar-100-binary/" in str(error.value)


def test_cifar10_binary_needs_test_batch(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    names = "airplane automobile bird cat deer dog frog horse ship truck"
    (folder / "batches.meta.txt").write_text(names.replace(" ", "\n"))

    with pytest.raises(DatasetError, match=r"test_batch.bin not found"):
        load_dataset("cifar10", tmp_path, train=False)


def test_unknown_dataset_lists_choices(tmp_path):
    with pytest.raises(
        DatasetError, match=r"unknown dataset 'imagenet'; expected one of"
    ):
        load_dataset("imagenet", tmp_path, train=True)


def test_data_root_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NOPROP_DATA_ROOT", str(tmp_path))

    assert resolve_data_root(None) == Path(tmp_path)


def test_data_root_missing_everywhere(monkeypatch):
    monkeypatch.delenv("NOPROP_DATA_ROOT", raising=False)

    with pytest.raises(
        DatasetError, match="pass --data-root DIR or set NOPROP_DATA_ROOT"
    ):
        resolve_data_root(None)


def test_data_root_not_a_directory(tmp_path):
    with pytest.raises(DatasetError, match="is not a directory"):
        resolve_data_root(tmp_path / "absent")


def test_subset_is_seeded_sample():
    split = ImageSplit(
        torch.zeros(100, 1, 28, 28, dtype=torch.uint8), torch.arange(100)
    )

    first = split.subset(10, seed=3).labels
    again = split.subset(10, seed=3).labels

    assert torch.equal(first, again)
    assert not torch.equal(first, torch.arange(10))
    assert torch.equal(split.subset(10).labels, torch.arange(10))


def test_normalize_uses_dataset_statistics(data_root):
    split, info = load_dataset("mnist", data_root, train=False)

    x = normalize(split.images[:2000], info)

    assert abs(x.mean().item()) < 0.05
    assert abs(x.std().item() - 1.0) < 0.05
