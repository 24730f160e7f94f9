"""Test image sources: an image folder, the MNIST test set, the example digits."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from loadtest.images import (
    EXAMPLE_DIGITS,
    ImageSourceError,
    load_images,
    read_image_dir,
)


def test_load_images_defaults_to_example_digits():
    images, source = load_images(None, None, max_images=100)
    assert str(EXAMPLE_DIGITS) in source
    assert len(images) == len(list(EXAMPLE_DIGITS.glob("*.png")))
    first = images[0]
    assert first.filename == "mnist-test-00000-label-7.png"
    assert first.label == "7"
    assert first.data == (EXAMPLE_DIGITS / first.filename).read_bytes()


def test_load_images_reads_mnist_test_set(data_root):
    images, source = load_images(None, data_root, max_images=5)
    assert "MNIST" in source
    assert len(images) == 5
    labels = np.fromfile(
        data_root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte", np.uint8, offset=8
    )
    for index, image in enumerate(images):
        assert image.label == str(labels[index])
        decoded = Image.open(io.BytesIO(image.data))
        assert decoded.format == "PNG"
        assert decoded.size == (28, 28)
    # The first test image is the same 7 as the committed example digit.
    example = Image.open(EXAMPLE_DIGITS / "mnist-test-00000-label-7.png")
    first = Image.open(io.BytesIO(images[0].data))
    assert np.array_equal(np.asarray(first), np.asarray(example))


def test_load_images_folder_without_labels(tmp_path):
    Image.new("L", (8, 8)).save(tmp_path / "b.png")
    Image.new("L", (8, 8)).save(tmp_path / "a.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    images, _ = load_images(tmp_path, None, max_images=10)
    assert [image.filename for image in images] == ["a.jpg", "b.png"]
    assert all(image.label is None for image in images)


def test_load_images_rejects_bad_sources(tmp_path):
    with pytest.raises(ImageSourceError, match="does not exist"):
        read_image_dir(tmp_path / "missing", 10)
    with pytest.raises(ImageSourceError, match="contains no files"):
        read_image_dir(tmp_path, 10)
    with pytest.raises(ImageSourceError, match="MNIST/raw"):
        load_images(None, tmp_path, max_images=10)
