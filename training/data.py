"""Image classification datasets, held in memory as uint8 tensors.

MNIST and Fashion-MNIST are read here from the raw IDX files under
``ROOT/MNIST/raw`` and ``ROOT/FashionMNIST/raw``, and torchvision only
downloads them. CIFAR-10 and CIFAR-100 come through torchvision's python
version (``cifar-10-batches-py``, ``cifar-100-python``) or, for offline copies,
the official binary version (``cifar-10-batches-bin``, ``cifar-100-binary``)
read here.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

DATA_ROOT_ENV = "NOPROP_DATA_ROOT"
CIFAR_IMAGE_BYTES = 3 * 32 * 32


class DatasetError(Exception):
    """A dataset is missing, malformed or unknown."""


@dataclass(frozen=True)
class DatasetInfo:
    """Description of a dataset that a trained model needs, stored in checkpoints."""

    name: str
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]  # per channel, of pixels scaled to [0, 1]
    std: tuple[float, ...]

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "class_names": list(self.class_names),
            "image_shape": list(self.image_shape),
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, values: dict) -> DatasetInfo:
        return cls(
            name=values["name"],
            class_names=tuple(values["class_names"]),
            image_shape=tuple(values["image_shape"]),
            mean=tuple(values["mean"]),
            std=tuple(values["std"]),
        )


@dataclass
class ImageSplit:
    """One split: images (N, C, H, W) uint8 and labels (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.numel()

    def subset(self, count: int, seed: int | None = None) -> ImageSplit:
        """Return ``count`` examples: the first ones, or a seeded random sample."""
        if count <= 0 or count >= len(self):
            return self
        if seed is None:
            index = torch.arange(count)
        else:
            generator = torch.Generator().manual_seed(seed)
            index = torch.randperm(len(self), generator=generator)[:count]
        return ImageSplit(self.images[index], self.labels[index])


def normalize(images: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 (B, C, H, W), scaled to [0, 1] and standardized."""
    mean = torch.tensor(info.mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - mean) / std


def resolve_data_root(data_root: str | os.PathLike | None) -> Path:
    """Return the data root from the argument or NOPROP_DATA_ROOT."""
    value = data_root or os.environ.get(DATA_ROOT_ENV)
    if not value:
        raise DatasetError(
            f"no data root given; pass --data-root DIR or set {DATA_ROOT_ENV}"
        )
    root = Path(value).expanduser()
    if not root.is_dir():
        raise DatasetError(f"data root {root} is not a directory")
    return root


# --- MNIST and Fashion-MNIST (torchvision, raw IDX files) ---

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


IDX_UBYTE_TYPE = 0x08  # IDX type code of unsigned bytes
MNIST_IMAGE_SIZE = (28, 28)
MNIST_NUM_CLASSES = 10


def read_idx_ubyte(path: Path, ndim: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes, checking its magic number and size.

    The header is two zero bytes, the type code 0x08, the number of dimensions,
    then each dimension as a big-endian uint32. The header is checked here,
    because torchvision's reader fails on a bad one with unrelated errors
    (a reshape error for a wrong magic number), and torchvision reads the data.
    """
    header_size = 4 + 4 * ndim
    file_size = path.stat().st_size
    with path.open("rb") as file:
        header = file.read(header_size)
        if len(header) < header_size:
            raise DatasetError(
                f"{path} is malformed: {file_size} bytes is shorter than the "
                f"{header_size}-byte IDX header of a {ndim}-dimensional file"
            )
        magic = int.from_bytes(header[:4], "big")
        expected = IDX_UBYTE_TYPE << 8 | ndim
        if magic != expected:
            raise DatasetError(
                f"{path} has IDX magic number {magic} (0x{magic:08x}); expected "
                f"{expected} (0x{expected:08x}: unsigned bytes, {ndim} dimension(s))"
            )
        shape = tuple(
            int.from_bytes(header[4 * i : 4 * i + 4], "big") for i in range(1, ndim + 1)
        )
        expected_size = header_size + math.prod(shape)
        if file_size != expected_size:
            raise DatasetError(
                f"{path} is malformed: its header declares shape {shape}, which "
                f"needs {expected_size} bytes, but the file has {file_size}"
            )
    if math.prod(shape) == 0:
        return np.zeros(shape, dtype=np.uint8)  # torchvision cannot read no data
    from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor

    return read_sn3_pascalvincent_tensor(str(path), strict=True).numpy()


def read_mnist_split(raw: Path, train: bool, num_classes: int) -> ImageSplit:
    """Read one split of MNIST-format IDX files, checking sizes and labels."""
    prefix = "train" if train else "t10k"
    images_path = raw / f"{prefix}-images-idx3-ubyte"
    labels_path = raw / f"{prefix}-labels-idx1-ubyte"
    images = read_idx_ubyte(images_path, ndim=3)  # (N, H, W)
    labels = read_idx_ubyte(labels_path, ndim=1)  # (N,)

    if images.shape[1:] != MNIST_IMAGE_SIZE:
        raise DatasetError(
            f"{images_path} contains images of {images.shape[1]}x{images.shape[2]} "
            f"pixels; expected {MNIST_IMAGE_SIZE[0]}x{MNIST_IMAGE_SIZE[1]}"
        )
    if len(labels) != len(images):
        raise DatasetError(
            f"{labels_path} has {len(labels)} labels but {images_path} has "
            f"{len(images)} images; each image needs exactly one label"
        )
    out_of_range = np.flatnonzero(labels >= num_classes)
    if out_of_range.size:
        index = int(out_of_range[0])
        raise DatasetError(
            f"{labels_path} has {out_of_range.size} label(s) outside "
            f"0..{num_classes - 1}, the first {labels[index]} at index {index}"
        )
    images_tensor = torch.from_numpy(images).unsqueeze(1)  # (N, 1, H, W)
    return ImageSplit(images_tensor, torch.from_numpy(labels.astype(np.int64)))


def _load_idx(folder: str, root: Path, train: bool, download: bool) -> ImageSplit:
    """Read MNIST or FashionMNIST (``folder`` is also torchvision's class name)."""
    raw = root / folder / "raw"
    missing = [name for name in IDX_FILES if not (raw / name).is_file()]
    if missing and not download:
        raise DatasetError(
            f"{folder} not found: {raw} lacks {', '.join(missing)} "
            f"(expected the uncompressed IDX files {', '.join(IDX_FILES)}); "
            "pass --download to fetch it"
        )
    if missing:
        import torchvision.datasets

        try:
            getattr(torchvision.datasets, folder)(str(root), train, download=True)
        except Exception as error:  # torchvision raises many kinds on failed fetches
            raise DatasetError(
                f"could not download {folder} to {raw}: {error}"
            ) from error
    return read_mnist_split(raw, train, MNIST_NUM_CLASSES)


def load_mnist(
    root: Path, train: bool, download: bool
) -> tuple[ImageSplit, DatasetInfo]:
    split = _load_idx("MNIST", root, train, download)
    names = tuple(str(digit) for digit in range(10))
    return split, DatasetInfo("mnist", names, (1, 28, 28), (0.1307,), (0.3081,))


def load_fashion_mnist(
    root: Path, train: bool, download: bool
) -> tuple[ImageSplit, DatasetInfo]:
    split = _load_idx("FashionMNIST", root, train, download)
    info = DatasetInfo(
        "fashion-mnist", FASHION_CLASSES, (1, 28, 28), (0.2860,), (0.3530,)
    )
    return split, info


# --- CIFAR-10 and CIFAR-100 ---

CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


def read_cifar_binary(path: Path, label_bytes: int, num_classes: int) -> ImageSplit:
    """Read records of ``label_bytes`` label bytes and 3,072 pixels (R, G, B planes).

    For CIFAR-100 (two label bytes: coarse, fine) the fine label is kept.
    """
    record = label_bytes + CIFAR_IMAGE_BYTES
    size = path.stat().st_size
    if size == 0 or size % record:
        raise DatasetError(
            f"{path} is malformed: {size} bytes is not a positive multiple of the "
            f"{record}-byte record "
            f"({label_bytes} label bytes + {CIFAR_IMAGE_BYTES} pixels)"
        )
    raw = np.fromfile(path, dtype=np.uint8).reshape(-1, record)
    labels = raw[:, label_bytes - 1].astype(np.int64)
    if labels.max() >= num_classes:
        raise DatasetError(
            f"{path} is malformed: label {labels.max()} "
            f"is out of range 0..{num_classes - 1}"
        )
    images = raw[:, label_bytes:].reshape(-1, 3, 32, 32)
    return ImageSplit(torch.from_numpy(images.copy()), torch.from_numpy(labels))


def read_class_names(path: Path, count: int) -> tuple[str, ...]:
    if not path.is_file():
        raise DatasetError(
            f"{path} not found; expected {count} class names, one per line"
        )
    names = tuple(
        line.strip() for line in path.read_text().splitlines() if line.strip()
    )
    if len(names) != count:
        raise DatasetError(f"{path} lists {len(names)} class names; expected {count}")
    return names


def _concat(splits: list[ImageSplit]) -> ImageSplit:
    images = torch.cat([split.images for split in splits])
    return ImageSplit(images, torch.cat([split.labels for split in splits]))


def load_cifar10_binary(
    folder: Path, train: bool
) -> tuple[ImageSplit, tuple[str, ...]]:
    names = read_class_names(folder / "batches.meta.txt", 10)
    if not train:
        return _read_required(folder / "test_batch.bin", 1, 10), names
    paths = [folder / f"data_batch_{index}.bin" for index in range(1, 6)]
    present = [path for path in paths if path.is_file()]
    if not present:
        raise DatasetError(
            f"CIFAR-10 training data not found: {folder} has none of "
            "data_batch_1.bin .. data_batch_5.bin"
        )
    if len(present) < len(paths):
        missing = ", ".join(path.name for path in paths if path not in present)
        logger.warning("%s lacks %s; training on the batches present", folder, missing)
    return _concat([read_cifar_binary(path, 1, 10) for path in present]), names


def load_cifar100_binary(
    folder: Path, train: bool
) -> tuple[ImageSplit, tuple[str, ...]]:
    names = read_class_names(folder / "fine_label_names.txt", 100)
    path = folder / ("train.bin" if train else "test.bin")
    return _read_required(path, 2, 100), names


def _read_required(path: Path, label_bytes: int, num_classes: int) -> ImageSplit:
    if not path.is_file():
        raise DatasetError(f"{path} not found; expected the official CIFAR binary file")
    return read_cifar_binary(path, label_bytes, num_classes)


def _load_cifar_python(dataset_cls: type, root: Path, train: bool, download: bool):
    try:
        dataset = dataset_cls(str(root), train=train, download=download)
    except Exception as error:  # torchvision raises many kinds on bad files
        raise DatasetError(
            f"could not read {dataset_cls.__name__} from {root}: {error}"
        ) from error
    images = (
        torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
    )  # NHWC -> NCHW
    return ImageSplit(images, torch.tensor(dataset.targets, dtype=torch.long)), tuple(
        dataset.classes
    )


def _load_cifar(
    root: Path, train: bool, download: bool, *, number: int
) -> tuple[ImageSplit, tuple[str, ...]]:
    from torchvision.datasets import CIFAR10, CIFAR100

    python_folder, binary_folder, dataset_cls, binary_loader = {
        10: (
            "cifar-10-batches-py",
            "cifar-10-batches-bin",
            CIFAR10,
            load_cifar10_binary,
        ),
        100: ("cifar-100-python", "cifar-100-binary", CIFAR100, load_cifar100_binary),
    }[number]
    if (root / python_folder).is_dir() or (
        download and not (root / binary_folder).is_dir()
    ):
        return _load_cifar_python(dataset_cls, root, train, download)
    if (root / binary_folder).is_dir():
        return binary_loader(root / binary_folder, train)
    raise DatasetError(
        f"CIFAR-{number} not found under {root}: expected {python_folder}/ "
        f"(python version) or {binary_folder}/ (binary version); "
        "pass --download to fetch it"
    )


def load_cifar10(
    root: Path, train: bool, download: bool
) -> tuple[ImageSplit, DatasetInfo]:
    split, names = _load_cifar(root, train, download, number=10)
    return split, DatasetInfo("cifar10", names, (3, 32, 32), *CIFAR10_STATS)


def load_cifar100(
    root: Path, train: bool, download: bool
) -> tuple[ImageSplit, DatasetInfo]:
    split, names = _load_cifar(root, train, download, number=100)
    return split, DatasetInfo("cifar100", names, (3, 32, 32), *CIFAR100_STATS)


LOADERS: dict[str, Callable[[Path, bool, bool], tuple[ImageSplit, DatasetInfo]]] = {
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
}


def load_dataset(
    name: str, data_root: str | os.PathLike | None, train: bool, download: bool = False
) -> tuple[ImageSplit, DatasetInfo]:
    """Load one split of a dataset into memory and check its shape and labels."""
    if name not in LOADERS:
        raise DatasetError(
            f"unknown dataset {name!r}; expected one of {sorted(LOADERS)}"
        )
    root = resolve_data_root(data_root)
    split, info = LOADERS[name](root, train, download)
    validate_split(split, info)
    return split, info


def validate_split(split: ImageSplit, info: DatasetInfo) -> None:
    """Reject data whose shapes, counts or labels do not match the description."""
    if split.images.ndim != 4 or tuple(split.images.shape[1:]) != info.image_shape:
        raise DatasetError(
            f"{info.name} images have shape {tuple(split.images.shape)}; "
            f"expected (N, {', '.join(map(str, info.image_shape))})"
        )
    if split.images.dtype != torch.uint8:
        raise DatasetError(
            f"{info.name} images are {split.images.dtype}; expected uint8"
        )
    if split.labels.ndim != 1 or split.labels.dtype != torch.int64:
        raise DatasetError(
            f"{info.name} labels are {split.labels.dtype} of shape "
            f"{tuple(split.labels.shape)}; expected int64 of shape (N,)"
        )
    if split.images.shape[0] != len(split):
        raise DatasetError(
            f"{info.name} has {split.images.shape[0]} images but {len(split)} "
            "labels; each image needs exactly one label"
        )
    if len(split) == 0:
        raise DatasetError(f"{info.name} has no examples")
    num_classes = len(info.class_names)
    low, high = int(split.labels.min()), int(split.labels.max())
    if low < 0 or high >= num_classes:
        raise DatasetError(
            f"{info.name} labels span {low}..{high}; expected 0..{num_classes - 1}"
        )
