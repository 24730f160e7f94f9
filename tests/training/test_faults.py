"""Training under faults: killed runs, non-finite losses and malformed datasets."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from training.checkpoint import load_checkpoint, partial_prefix
from training.cli import build_parser, config_from_args, main
from training.data import DatasetError, DatasetInfo, ImageSplit, validate_split
from training.evaluation import load_trained_model
from training.trainer import TrainConfig, Trainer, TrainingError

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 4
RUN_ARGS = [
    "--steps", "2", "--epochs", str(EPOCHS), "--batch-size", "64",
    "--train-subset", "192", "--test-subset", "64", "--train-eval-size", "64",
    "--lr", "2e-3", "--lr-schedule", "cosine", "--seed", "3",
]  # fmt: skip
KILL_SEED = 20261204
ATTEMPT_TIMEOUT_S = 180
TIMING_FIELDS = ("train_seconds", "eval_seconds")

# Runs the training command line in a child process. The first argument picks
# how the child kills itself at its first checkpoint write. "mid-write" writes
# half of the checkpoint's bytes to the temporary file and dies. "before-rename"
# writes all of them and dies before the rename. "none" leaves the child to be
# killed from outside.
LAUNCHER = """
import io, os, signal, sys
import torch

def die():
    os.kill(os.getpid(), signal.SIGKILL)

real_save, real_replace = torch.save, os.replace

def save_half_and_die(payload, file):
    buffer = io.BytesIO()
    real_save(payload, buffer)
    file.write(buffer.getvalue()[: buffer.tell() // 2])
    file.flush()
    os.fsync(file.fileno())
    die()

def die_before_rename(source, target):
    if os.path.basename(target) == "checkpoint.pt":
        die()
    real_replace(source, target)

mode = sys.argv[1]
if mode == "mid-write":
    torch.save = save_half_and_die
elif mode == "before-rename":
    os.replace = die_before_rename

from training.cli import main
sys.exit(main(sys.argv[2:]))
"""

TINY = TrainConfig(
    dataset="mnist",
    num_steps=2,
    epochs=1,
    batch_size=64,
    train_subset=256,
    test_subset=100,
    train_eval_size=100,
)


# --- killed runs ---


def start_run(args: list[str], self_kill: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("ab") as stderr:
        return subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, self_kill, *args],
            cwd=REPOSITORY_ROOT,
            env=env,
            stdout=stderr,
            stderr=stderr,
        )


def file_identity(path: Path) -> tuple[int, int] | None:
    try:
        status = path.stat()
    except FileNotFoundError:
        return None
    return status.st_ino, status.st_mtime_ns


def kill_after_checkpoint_write(process: subprocess.Popen, checkpoint: Path) -> float:
    """SIGKILL ``process`` once ``checkpoint`` is replaced, and return the seconds."""
    start = time.monotonic()
    before = file_identity(checkpoint)
    while process.poll() is None and time.monotonic() - start < ATTEMPT_TIMEOUT_S:
        if file_identity(checkpoint) != before:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    return time.monotonic() - start


def kill_after_delay(process: subprocess.Popen, delay: float) -> None:
    try:
        process.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)


def wait_for_exit(process: subprocess.Popen, log: Path) -> int:
    try:
        return process.wait(timeout=ATTEMPT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"training did not finish in {ATTEMPT_TIMEOUT_S} s:\n{tail(log)}")


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


def logged_epochs(run_dir: Path) -> list[int]:
    path = run_dir / "log.csv"
    if not path.exists():
        return []
    with path.open() as file:
        return [int(row["epoch"]) for row in csv.DictReader(file)]


def partial_files(run_dir: Path) -> list[str]:
    prefix = partial_prefix(run_dir / "checkpoint.pt")
    return sorted(
        path.name for path in run_dir.iterdir() if path.name.startswith(prefix)
    )


def check_checkpoint_after_kill(
    run_dir: Path, expected_config: dict, previous_epoch: int
) -> int:
    """Check what a kill left on disk and return the checkpoint's epoch (0: none)."""
    path = run_dir / "checkpoint.pt"
    if not path.exists():
        assert previous_epoch == 0, "the checkpoint of a finished epoch vanished"
        assert logged_epochs(run_dir) == []
        return 0

    checkpoint = load_checkpoint(path)
    epoch = checkpoint["epoch"]
    assert previous_epoch <= epoch <= EPOCHS
    assert checkpoint["train_config"] == expected_config
    assert [row["epoch"] for row in checkpoint["history"]] == list(range(1, epoch + 1))
    assert checkpoint["scheduler_state"]["last_epoch"] == epoch
    assert logged_epochs(run_dir) == list(range(1, len(logged_epochs(run_dir)) + 1))
    assert len(logged_epochs(run_dir)) <= epoch
    load_trained_model(path)
    return epoch


def command_for(run_dir: Path, data_root: Path) -> list[str]:
    checkpoint = run_dir / "checkpoint.pt"
    common = ["--data-root", str(data_root), "--threads", "1"]
    if checkpoint.exists():
        # No --epochs: a resumed run must keep the checkpoint's total.
        return ["--resume", str(checkpoint), *common]
    return [*RUN_ARGS, *common, "-o", str(run_dir)]


def train_uninterrupted(config: TrainConfig, run_dir: Path, data_root: Path) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = Trainer(config, run_dir, data_root)
        trainer.run()
    finally:
        torch.set_num_threads(threads)
    return load_checkpoint(trainer.checkpoint_path)


def assert_identical(actual, expected, where: str) -> None:
    """Compare nested checkpoint values exactly: tensors bit for bit."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), where
        assert actual.dtype == expected.dtype, where
        assert torch.equal(actual, expected), where
    elif isinstance(expected, dict):
        assert isinstance(actual, dict), where
        assert sorted(actual, key=str) == sorted(expected, key=str), where
        for key, value in expected.items():
            assert_identical(actual[key], value, f"{where}.{key}")
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected), where
        for index, (left, right) in enumerate(zip(actual, expected, strict=True)):
            assert_identical(left, right, f"{where}[{index}]")
    else:
        assert actual == expected, where


def without_timing(history: list[dict]) -> list[dict]:
    return [
        {key: value for key, value in row.items() if key not in TIMING_FIELDS}
        for row in history
    ]


def test_killed_runs_resume_to_identical_result(data_root, tmp_path):
    config = config_from_args(build_parser().parse_args(RUN_ARGS))
    expected = train_uninterrupted(config, tmp_path / "straight", data_root)
    run_dir = tmp_path / "killed"
    log = tmp_path / "killed.log"

    # Kills at random points scale with the time that the first checkpoint
    # took; the kill right after a checkpoint write measures it.
    rng = random.Random(KILL_SEED)
    plan = [
        "mid-write",
        "after-checkpoint",
        "before-rename",
        "random",
        "mid-write",
        "random",
    ]
    first_checkpoint_s = None
    epoch = 0
    kills = []
    for kill in plan:
        if epoch == EPOCHS:
            break
        self_kill = kill if kill in ("mid-write", "before-rename") else "none"
        process = start_run(command_for(run_dir, data_root), self_kill, log)
        if kill == "after-checkpoint":
            first_checkpoint_s = kill_after_checkpoint_write(
                process, run_dir / "checkpoint.pt"
            )
        elif kill == "random":
            kill_after_delay(process, rng.uniform(0.2, 1.5) * first_checkpoint_s)
        code = wait_for_exit(process, log)
        assert code in (0, -signal.SIGKILL), tail(log)
        if kill in ("mid-write", "before-rename"):
            assert code == -signal.SIGKILL, f"{kill} never fired:\n{tail(log)}"
            assert partial_files(run_dir), f"{kill} left no temporary file"
        kills.append((kill, code))
        epoch = check_checkpoint_after_kill(run_dir, asdict(config), epoch)

    assert sum(code == -signal.SIGKILL for _, code in kills) >= 4, kills
    process = start_run(command_for(run_dir, data_root), "none", log)
    assert wait_for_exit(process, log) == 0, tail(log)

    resumed = load_checkpoint(run_dir / "checkpoint.pt")
    assert resumed["epoch"] == EPOCHS
    assert_identical(resumed["model_state"], expected["model_state"], "model")
    assert_identical(
        resumed["optimizer_state"], expected["optimizer_state"], "optimizer"
    )
    assert_identical(
        resumed["scheduler_state"], expected["scheduler_state"], "scheduler"
    )
    assert_identical(resumed["rng_state"], expected["rng_state"], "rng")
    assert [row["lr"] for row in resumed["history"]] == [
        row["lr"] for row in expected["history"]
    ]
    assert without_timing(resumed["history"]) == without_timing(expected["history"])
    assert logged_epochs(run_dir) == list(range(1, EPOCHS + 1))
    assert partial_files(run_dir) == []


def test_resume_without_epochs_keeps_total(data_root, tmp_path, monkeypatch):
    args = ["--data-root", str(data_root), *RUN_ARGS, "--epochs", "1"]
    assert main([*args, "-o", str(tmp_path)]) == 0
    checkpoint = tmp_path / "checkpoint.pt"

    def fail_epoch(trainer: Trainer) -> dict:
        pytest.fail(f"resume trains toward {trainer.config.epochs} epochs, not 1")

    monkeypatch.setattr(Trainer, "run_epoch", fail_epoch)
    assert main(["--resume", str(checkpoint), "--data-root", str(data_root)]) == 0


def test_partial_checkpoint_removed_at_start(data_root, tmp_path, caplog):
    partial = tmp_path / f"{partial_prefix(tmp_path / 'checkpoint.pt')}k1ll3d"
    partial.write_bytes(b"half of a checkpoint")
    unrelated = tmp_path / "notes.txt"
    unrelated.write_text("kept")

    Trainer(TINY, tmp_path, data_root)

    assert not partial.exists()
    assert unrelated.read_text() == "kept"
    assert f"removed {partial}, a partial checkpoint" in caplog.text


# --- non-finite losses and gradients ---


def parameters_of(trainer: Trainer) -> dict[str, torch.Tensor]:
    # Not the state dict: every forward pass updates the BatchNorm statistics.
    parameters = trainer.model.named_parameters()
    return {name: value.detach().clone() for name, value in parameters}


def test_inf_block_loss_names_block_and_step(data_root, tmp_path):
    # eta / 2 * dSNR_t * mse_t exceeds float32's max (3.4e38) for block 2 only,
    # because dSNR is about 1 for block 1 and 98 for block 2, and an untrained
    # block's mse is about 0.9 (at most 2).
    trainer = Trainer(replace(TINY, eta=3e37), tmp_path, data_root)
    before = parameters_of(trainer)

    with pytest.raises(TrainingError) as error:
        trainer.run()

    message = str(error.value)
    assert "non-finite loss at epoch 1, batch 1 of 4 (optimizer step 1)" in message
    assert "block 2 denoising loss inf" in message
    assert "block 1" not in message
    assert_identical(parameters_of(trainer), before, "parameters")
    assert not trainer.checkpoint_path.exists()


def test_inf_cross_entropy_names_classifier(data_root, tmp_path):
    trainer = Trainer(TINY, tmp_path, data_root)
    # The classifier starts with zero weights, so its logits equal its bias.
    # The log-probability of every class but 0 is -3e38 - 3e38 = -inf.
    with torch.no_grad():
        trainer.model.classifier.bias.fill_(-3e38)
        trainer.model.classifier.bias[0] = 3e38

    with pytest.raises(TrainingError) as error:
        trainer.run()

    message = str(error.value)
    assert "at epoch 1, batch 1 of 4 (optimizer step 1)" in message
    assert "cross-entropy inf" in message
    assert "block" not in message


def test_inf_gradient_names_block_and_later_step(data_root, tmp_path):
    trainer = Trainer(replace(TINY, epochs=3), tmp_path, data_root)
    calls = []

    # Block 2's last layer gets one gradient per step, so call 7 is the third
    # batch of epoch 2.
    def poison_seventh_gradient(grad: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return torch.full_like(grad, float("inf")) if len(calls) == 7 else grad

    trainer.model.blocks[1].head[-1].weight.register_hook(poison_seventh_gradient)

    with pytest.raises(TrainingError) as error:
        trainer.run()

    message = str(error.value)
    expected = "non-finite gradients at epoch 2, batch 3 of 4 (optimizer step 7)"
    assert expected in message
    assert "in block 2 (max |gradient| inf)" in message
    assert "finite loss" in message
    assert load_checkpoint(trainer.checkpoint_path)["epoch"] == 1
    for name, value in trainer.model.state_dict().items():
        assert torch.isfinite(value.float()).all(), name


def test_inf_loss_fails_command_line(data_root, tmp_path, capsys):
    args = ["--data-root", str(data_root), *RUN_ARGS, "--eta", "3e37"]

    code = main([*args, "-o", str(tmp_path)])

    assert code == 2
    error = capsys.readouterr().err
    assert "error: non-finite loss at epoch 1, batch 1 of 3" in error
    assert "block 2 denoising loss inf" in error


# --- malformed datasets ---

IDX_IMAGES = 0x0803
IDX_LABELS = 0x0801


def write_idx(path: Path, array: np.ndarray, magic: int, shape=None) -> None:
    """Write an IDX file whose header declares ``shape`` (default: the array's)."""
    shape = array.shape if shape is None else shape
    header = magic.to_bytes(4, "big") + b"".join(
        size.to_bytes(4, "big") for size in shape
    )
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, train_images: np.ndarray, train_labels: np.ndarray):
    """Write MNIST IDX files: the given training split and a valid test split."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    test_images = rng.integers(0, 256, (20, 28, 28))
    write_idx(raw / "train-images-idx3-ubyte", train_images, IDX_IMAGES)
    write_idx(raw / "train-labels-idx1-ubyte", train_labels, IDX_LABELS)
    write_idx(raw / "t10k-images-idx3-ubyte", test_images, IDX_IMAGES)
    write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(20) % 10, IDX_LABELS)
    return raw


def valid_mnist() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (100, 28, 28)), np.arange(100) % 10


def wrong_image_magic(raw: Path) -> None:
    images, _ = valid_mnist()
    write_idx(raw / "train-images-idx3-ubyte", images, IDX_LABELS)


def float_image_type(raw: Path) -> None:
    images, _ = valid_mnist()
    write_idx(raw / "train-images-idx3-ubyte", images, 0x0D03)


def truncated_images(raw: Path) -> None:
    images, _ = valid_mnist()
    write_idx(raw / "train-images-idx3-ubyte", images[:99], IDX_IMAGES, (100, 28, 28))


def trailing_image_bytes(raw: Path) -> None:
    path = raw / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes() + bytes(10))


def header_only_labels(raw: Path) -> None:
    (raw / "train-labels-idx1-ubyte").write_bytes(IDX_LABELS.to_bytes(4, "big"))


def wrong_image_size(raw: Path) -> None:
    images = np.zeros((100, 32, 32))
    write_idx(raw / "train-images-idx3-ubyte", images, IDX_IMAGES)


def fewer_labels(raw: Path) -> None:
    _, labels = valid_mnist()
    write_idx(raw / "train-labels-idx1-ubyte", labels[:99], IDX_LABELS)


def label_out_of_range(raw: Path) -> None:
    _, labels = valid_mnist()
    labels[5], labels[70] = 12, 255
    write_idx(raw / "train-labels-idx1-ubyte", labels, IDX_LABELS)


def empty_split(raw: Path) -> None:
    write_idx(raw / "train-images-idx3-ubyte", np.zeros((0, 28, 28)), IDX_IMAGES)
    write_idx(raw / "train-labels-idx1-ubyte", np.zeros(0), IDX_LABELS)


MNIST_FAULTS = [
    (
        wrong_image_magic,
        r"train-images-idx3-ubyte has IDX magic number 2049 \(0x00000801\); "
        r"expected 2051 \(0x00000803: unsigned bytes, 3 dimension\(s\)\)",
    ),
    (float_image_type, r"IDX magic number 3331 \(0x00000d03\); expected 2051"),
    (
        truncated_images,
        r"train-images-idx3-ubyte is malformed: its header declares shape "
        r"\(100, 28, 28\), which needs 78416 bytes, but the file has 77632",
    ),
    (trailing_image_bytes, r"which needs 78416 bytes, but the file has 78426"),
    (
        header_only_labels,
        r"train-labels-idx1-ubyte is malformed: 4 bytes is shorter than the "
        r"8-byte IDX header",
    ),
    (
        wrong_image_size,
        r"train-images-idx3-ubyte contains images of 32x32 pixels; expected 28x28",
    ),
    (
        fewer_labels,
        r"train-labels-idx1-ubyte has 99 labels but .*train-images-idx3-ubyte "
        r"has 100 images; each image needs exactly one label",
    ),
    (
        label_out_of_range,
        r"train-labels-idx1-ubyte has 2 label\(s\) outside 0..9, "
        r"the first 12 at index 5",
    ),
    (empty_split, r"mnist has no examples"),
]


@pytest.mark.parametrize(
    ("damage", "message"),
    MNIST_FAULTS,
    ids=[damage.__name__ for damage, _ in MNIST_FAULTS],
)
def test_bad_mnist_rejected_before_training(damage, message, tmp_path):
    raw = write_mnist(tmp_path / "data", *valid_mnist())
    damage(raw)
    output_dir = tmp_path / "run"

    with pytest.raises(DatasetError, match=message):
        Trainer(replace(TINY, train_subset=0), output_dir, tmp_path / "data")

    assert not output_dir.exists()


def test_valid_tiny_mnist_files_load(tmp_path):
    write_mnist(tmp_path / "data", *valid_mnist())

    trainer = Trainer(
        replace(TINY, train_subset=0), tmp_path / "run", tmp_path / "data"
    )

    assert len(trainer.train_split) == 100
    assert trainer.train_split.labels[:12].tolist() == [*range(10), 0, 1]


def test_bad_mnist_fails_command_line(tmp_path, capsys):
    raw = write_mnist(tmp_path / "data", *valid_mnist())
    label_out_of_range(raw)
    args = ["--data-root", str(tmp_path / "data"), "-o", str(tmp_path / "run")]

    code = main([*args, "--epochs", "1"])

    assert code == 2
    error = capsys.readouterr().err
    assert "label(s) outside 0..9, the first 12 at index 5" in error
    assert not (tmp_path / "run").exists()


CIFAR10_NAMES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def write_cifar10_binary(root: Path, labels: list[int], names=CIFAR10_NAMES) -> Path:
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    (folder / "batches.meta.txt").write_text("\n".join(names) + "\n")
    records = np.zeros((len(labels), 1 + 3 * 32 * 32), np.uint8)
    records[:, 0] = labels
    records.tofile(folder / "data_batch_1.bin")
    records.tofile(folder / "test_batch.bin")
    return folder


def test_cifar10_label_out_of_range_rejected(tmp_path):
    write_cifar10_binary(tmp_path / "data", [0, 3, 10, 9])
    config = replace(TINY, dataset="cifar10")

    with pytest.raises(DatasetError, match=r"label 10 is out of range 0..9"):
        Trainer(config, tmp_path / "run", tmp_path / "data")

    assert not (tmp_path / "run").exists()


def test_cifar10_wrong_class_name_count_rejected(tmp_path):
    write_cifar10_binary(tmp_path / "data", [0, 1], names=CIFAR10_NAMES[:9])
    config = replace(TINY, dataset="cifar10")

    with pytest.raises(
        DatasetError, match=r"batches.meta.txt lists 9 class names; expected 10"
    ):
        Trainer(config, tmp_path / "run", tmp_path / "data")


def test_cifar10_empty_batch_rejected(tmp_path):
    folder = write_cifar10_binary(tmp_path / "data", [0, 1])
    (folder / "test_batch.bin").write_bytes(b"")
    config = replace(TINY, dataset="cifar10")

    with pytest.raises(
        DatasetError,
        match=r"test_batch.bin is malformed: 0 bytes is not a positive multiple "
        r"of the 3073-byte record",
    ):
        Trainer(config, tmp_path / "run", tmp_path / "data")


def test_cifar100_fine_label_out_of_range_rejected(tmp_path):
    folder = tmp_path / "data" / "cifar-100-binary"
    folder.mkdir(parents=True)
    names = [f"class_{index}" for index in range(100)]
    (folder / "fine_label_names.txt").write_text("\n".join(names))
    records = np.zeros((3, 2 + 3 * 32 * 32), np.uint8)
    records[:, 1] = [4, 150, 99]  # the second byte is the fine label
    records.tofile(folder / "train.bin")
    config = replace(TINY, dataset="cifar100")

    with pytest.raises(DatasetError, match=r"label 150 is out of range 0..99"):
        Trainer(config, tmp_path / "run", tmp_path / "data")


MNIST_INFO = DatasetInfo("mnist", tuple("0123456789"), (1, 28, 28), (0.1,), (0.3,))


@pytest.mark.parametrize(
    ("images", "labels", "message"),
    [
        (
            torch.zeros(5, 1, 28, 28, dtype=torch.uint8),
            torch.zeros(4, dtype=torch.long),
            r"mnist has 5 images but 4 labels; each image needs exactly one label",
        ),
        (
            torch.zeros(4, 28, 28, dtype=torch.uint8),
            torch.zeros(4, dtype=torch.long),
            r"mnist images have shape \(4, 28, 28\); expected \(N, 1, 28, 28\)",
        ),
        (
            torch.zeros(4, 1, 28, 28, dtype=torch.float32),
            torch.zeros(4, dtype=torch.long),
            r"mnist images are torch.float32; expected uint8",
        ),
        (
            torch.zeros(4, 1, 28, 28, dtype=torch.uint8),
            torch.zeros(4, 1, dtype=torch.long),
            r"mnist labels are torch.int64 of shape \(4, 1\); "
            r"expected int64 of shape \(N,\)",
        ),
        (
            torch.zeros(2, 1, 28, 28, dtype=torch.uint8),
            torch.tensor([3, -1]),
            r"mnist labels span -1..3; expected 0..9",
        ),
    ],
    ids=["count-mismatch", "missing-channel", "float-images", "2d-labels", "negative"],
)
def test_validate_split_rejects(images, labels, message):
    with pytest.raises(DatasetError, match=message):
        validate_split(ImageSplit(images, labels), MNIST_INFO)
