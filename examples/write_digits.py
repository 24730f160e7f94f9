"""Write the first MNIST test image of each digit to examples/digits/ as PNG.

Usage: python examples/write_digits.py [DATA_ROOT]; DATA_ROOT defaults to
$NOPROP_DATA_ROOT and must contain MNIST/raw/t10k-*-ubyte (torchvision's raw
layout). Needs only numpy and Pillow. File names carry the test-set index and
the label: mnist-test-00000-label-7.png.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

OUTPUT = Path(__file__).resolve().parent / "digits"


def read_idx(path: Path, magic: int, header_ints: int) -> np.ndarray:
    """Read an IDX file: a big-endian magic number, the sizes, then uint8 data."""
    data = path.read_bytes()
    header = np.frombuffer(data, dtype=">u4", count=header_ints)
    if header[0] != magic:
        raise ValueError(f"{path} has magic number {header[0]}; expected {magic}")
    return np.frombuffer(data, dtype=np.uint8, offset=4 * header_ints)


def main() -> int:
    data_root = Path(
        sys.argv[1] if len(sys.argv) > 1 else os.environ["NOPROP_DATA_ROOT"]
    )
    raw = data_root / "MNIST" / "raw"
    images = read_idx(raw / "t10k-images-idx3-ubyte", 2051, 4).reshape(-1, 28, 28)
    labels = read_idx(raw / "t10k-labels-idx1-ubyte", 2049, 2)

    OUTPUT.mkdir(exist_ok=True)
    for digit in range(10):
        index = int(np.flatnonzero(labels == digit)[0])
        path = OUTPUT / f"mnist-test-{index:05d}-label-{digit}.png"
        Image.fromarray(images[index]).save(path, optimize=True)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
