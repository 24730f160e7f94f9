"""Test images for the load test: an image folder, the MNIST test set or the
repository's example digits."""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# "mnist-test-00000-label-7.png" has the label 7.
LABEL_IN_NAME = re.compile(r"label-([^-.]+)")
MNIST_RAW = Path("MNIST") / "raw"
MNIST_IMAGES = "t10k-images-idx3-ubyte"
MNIST_LABELS = "t10k-labels-idx1-ubyte"
IDX_IMAGES_HEADER = 16  # magic, count, rows, columns: four big-endian int32
IDX_LABELS_HEADER = 8  # magic, count
MNIST_SIDE = 28
MAX_TEST_IMAGES = 1000  # MNIST test images read; each request picks among them
# The example digits of a repository checkout: loadtest/../examples/digits.
EXAMPLE_DIGITS = Path(__file__).resolve().parent.parent / "examples" / "digits"


class ImageSourceError(Exception):
    """No test images could be read from the configured sources."""


@dataclass(frozen=True)
class TestImage:
    """One encoded image file, sent as-is, with its true label when known."""

    __test__ = False  # not a pytest test class, despite the name

    filename: str
    data: bytes
    label: str | None


def load_images(
    image_dir: Path | None, data_root: Path | None, max_images: int
) -> tuple[list[TestImage], str]:
    """Return at most ``max_images`` test images and a description of their source.

    The first source that is set wins: ``image_dir`` (image files, labels
    taken from ``label-N`` in the file names), then the MNIST test set in
    ``data_root`` (torchvision's raw IDX layout), then the repository's
    example digits. Raises ImageSourceError when the chosen source has none.
    """
    if image_dir is not None:
        return read_image_dir(image_dir, max_images), f"folder {image_dir}"
    if data_root is not None:
        raw = data_root / MNIST_RAW
        return read_mnist_test(raw, max_images), f"MNIST test set in {raw}"
    if EXAMPLE_DIGITS.is_dir():
        images = read_image_dir(EXAMPLE_DIGITS, max_images)
        return images, f"example digits in {EXAMPLE_DIGITS}"
    raise ImageSourceError(
        f"no image source: {EXAMPLE_DIGITS} does not exist, and neither an image "
        "folder (--image-dir, LOADTEST_IMAGE_DIR) nor a datasets folder "
        "(--data-root, NOPROP_DATA_ROOT) is set"
    )


def read_image_dir(folder: Path, max_images: int) -> list[TestImage]:
    """Read the image files of ``folder`` in name order, without decoding them."""
    if not folder.is_dir():
        raise ImageSourceError(f"image folder {folder} does not exist")
    paths = sorted(
        path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES
    )
    if not paths:
        raise ImageSourceError(
            f"image folder {folder} contains no files ending in "
            f"{', '.join(IMAGE_SUFFIXES)}"
        )
    images = []
    for path in paths[:max_images]:
        match = LABEL_IN_NAME.search(path.stem)
        label = match.group(1) if match else None
        images.append(TestImage(path.name, path.read_bytes(), label))
    return images


def read_mnist_test(raw: Path, max_images: int) -> list[TestImage]:
    """Encode the first ``max_images`` MNIST test images as PNG files."""
    images_path = raw / MNIST_IMAGES
    labels_path = raw / MNIST_LABELS
    for path in (images_path, labels_path):
        if not path.is_file():
            raise ImageSourceError(
                f"{path} not found; the datasets folder must contain MNIST/raw/ in "
                "torchvision's layout, or give an image folder instead"
            )

    pixels = np.fromfile(images_path, dtype=np.uint8, offset=IDX_IMAGES_HEADER)
    labels = np.fromfile(labels_path, dtype=np.uint8, offset=IDX_LABELS_HEADER)
    count = min(max_images, len(labels))
    pixels = pixels[: count * MNIST_SIDE * MNIST_SIDE]
    digits = pixels.reshape(count, MNIST_SIDE, MNIST_SIDE)  # (N, 28, 28)
    images = []
    for index, (digit, label) in enumerate(zip(digits, labels, strict=False)):
        filename = f"mnist-test-{index:05d}-label-{label}.png"
        images.append(TestImage(filename, encode_png(digit), str(label)))
    return images


def encode_png(pixels: np.ndarray) -> bytes:
    """Encode a uint8 (H, W) greyscale array as a PNG file."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")  # uint8 (H, W): mode L
    return buffer.getvalue()
