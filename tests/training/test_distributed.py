"""Block-parallel and data-parallel NoProp-DT training under torchrun with gloo."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export import export_checkpoint
from training.checkpoint import load_checkpoint
from training.cli import lost_rank_message
from training.data import load_dataset
from training.distributed import Cluster, DistributedError, Layout
from training.losses import BlockShare, noprop_dt_step
from training.model import ModelConfig, NoPropNet
from training.trainer import TrainConfig, Trainer, TrainingError

# A run small enough for CI: 640 real MNIST images, 4 blocks, 10 steps an epoch.
RUN_OPTIONS = [
    "--dataset", "mnist", "--epochs", "1", "--steps", "4", "--batch-size", "64",
    "--lr", "5e-3",
    "--train-subset", "640", "--test-subset", "200", "--train-eval-size", "200",
    "--threads", "1",
]  # fmt: skip
RUN_SECONDS = 300


def torchrun(
    processes: int, options: list[str], output: Path
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m training`` under torchrun on this host, bounded in time."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc-per-node", str(processes), "-m", "training", *options,
        "-o", str(output),
    ]  # fmt: skip
    return subprocess.run(
        command, env=run_environment(), capture_output=True, text=True,
        timeout=RUN_SECONDS,
    )  # fmt: skip


def single_process(options: list[str], output: Path) -> None:
    command = [sys.executable, "-m", "training", *options, "-o", str(output)]
    result = subprocess.run(
        command, env=run_environment(), capture_output=True, text=True,
        timeout=RUN_SECONDS,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


def run_environment() -> dict[str, str]:
    # gloo and torchrun's rendezvous stay on the loopback interface.
    return {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}


def trained(result: subprocess.CompletedProcess[str], output: Path) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    return load_checkpoint(output / "checkpoint.pt")


def relative_weight_differences(first: dict, second: dict) -> dict[str, float]:
    """||a - b|| / ||a|| of each weight matrix or kernel of two state dicts.

    Biases and batch-norm shifts are left out: their gradients can be near 0,
    where Adam's normalized step turns rounding differences into whole steps.
    """
    assert first.keys() == second.keys()
    return {
        name: ((first[name] - second[name]).norm() / first[name].norm()).item()
        for name in first
        if first[name].is_floating_point() and first[name].ndim >= 2
    }


@pytest.fixture(scope="module")
def block_parallel_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """One epoch of NoProp-DT on 2 ranks with 2 blocks each, and its checkpoint."""
    output = tmp_path_factory.mktemp("block-parallel")
    result = torchrun(2, [*RUN_OPTIONS, "--data-root", str(data_root)], output)
    return result, trained(result, output)


# --- the layout of ranks ---


@pytest.mark.parametrize(("world_size", "block_groups"), [(2, 2), (4, 2), (3, 3)])
def test_layout_splits_blocks_into_disjoint_contiguous_runs(
    world_size: int, block_groups: int
) -> None:
    layouts = [
        Layout(world_size, rank, block_groups=block_groups)
        for rank in range(world_size)
    ]
    groups = {layout.block_group: layout.owned_blocks(10) for layout in layouts}

    assert sorted(t for blocks in groups.values() for t in blocks) == list(range(1, 11))
    assert all(
        blocks == tuple(range(blocks[0], blocks[-1] + 1)) for blocks in groups.values()
    )
    assert {layout.data_rank for layout in layouts} == set(
        range(world_size // block_groups)
    )
    for t in range(1, 11):
        owner = layouts[layouts[0].owner(t, 10)]
        assert owner.data_rank == 0
        assert t in owner.owned_blocks(10)


def test_layout_rejects_indivisible_block_groups() -> None:
    with pytest.raises(
        DistributedError, match=r"--block-groups 3 .* 4; accepted: \[1, 2, 4\]"
    ):
        Layout(world_size=4, block_groups=3)


def test_layout_rejects_more_groups_than_blocks() -> None:
    with pytest.raises(DistributedError, match=r"4 block groups \(--block-groups"):
        Layout(world_size=4, block_groups=4).owned_blocks(3)


def test_layout_rejects_block_groups_without_torchrun() -> None:
    with pytest.raises(DistributedError, match="this process runs alone"):
        Layout(world_size=1, block_groups=2)


def test_layout_reads_torchrun_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")

    layout = Layout.from_environment()

    assert (layout.block_groups, layout.data_parallel, layout.block_group) == (4, 1, 3)
    assert Layout.from_environment(2).data_rank == 1


def test_trainer_rejects_distributed_ct_before_any_collective(
    data_root: Path, tmp_path: Path
) -> None:
    cluster = Cluster(Layout(world_size=2, block_groups=2))  # never started
    config = TrainConfig(variant="ct", train_subset=64, test_subset=64)

    with pytest.raises(TrainingError, match="supports --variant dt, not 'ct'"):
        Trainer(config, tmp_path, data_root, cluster=cluster)


# --- a share of the blocks, in one process ---


def test_block_share_matches_whole_step_gradients() -> None:
    """Blocks computed apart get the same losses and gradients as in one step."""
    config = ModelConfig((1, 28, 28), num_classes=10, num_steps=4)
    torch.manual_seed(0)
    whole = NoPropNet(config)
    parts = NoPropNet(config)
    parts.load_state_dict(whole.state_dict())
    x = torch.randn(16, 1, 28, 28)  # (B, C, H, W)
    labels = torch.arange(16) % 10
    key = (7, 3, 0)

    terms = noprop_dt_step(whole, x, labels, share=BlockShare((1, 2, 3, 4), True, key))
    first = noprop_dt_step(parts, x, labels, share=BlockShare((1, 2), True, key))
    second = noprop_dt_step(parts, x, labels, share=BlockShare((3, 4), False, key))

    assert torch.equal(first.block_mse[:2], terms.block_mse[:2])
    assert torch.equal(second.block_mse[2:], terms.block_mse[2:])
    assert second.cross_entropy.item() == 0
    assert torch.equal(first.kl, terms.kl)
    for (name, p), q in zip(whole.named_parameters(), parts.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name


# --- real runs under torchrun ---


def test_torchrun_block_parallel_equals_one_process_exactly(
    block_parallel_run, data_root: Path, tmp_path: Path
) -> None:
    """With a one-hot embedding nothing is summed in a new order: bit-equal."""
    result, parallel = block_parallel_run
    single_process([*RUN_OPTIONS, "--data-root", str(data_root)], tmp_path)
    single = load_checkpoint(tmp_path / "checkpoint.pt")

    assert "rank 0 of 2 (gloo): block group 0 of 2" in result.stderr
    for name, tensor in single["model_state"].items():
        assert torch.equal(tensor, parallel["model_state"][name]), name
    single_state = single["optimizer_state"]["state"]
    parallel_state = parallel["optimizer_state"]["state"]
    assert single_state.keys() == parallel_state.keys()
    for index, entry in single_state.items():
        for key, value in entry.items():
            assert torch.equal(value, parallel_state[index][key]), (index, key)
    assert single["metrics"] == parallel["metrics"]
    # The epoch's mean losses add the ranks' parts in another order.
    losses = [key for key in single["history"][0] if "seconds" not in key]
    assert {k: parallel["history"][0][k] for k in losses} == pytest.approx(
        {k: single["history"][0][k] for k in losses}, rel=1e-6
    )


def test_torchrun_learned_embedding_matches_one_process_closely(
    data_root: Path, tmp_path: Path
) -> None:
    """A learned embedding's gradient is summed over ranks, in a new order."""
    options = [*RUN_OPTIONS, "--embedding", "learned", "--data-root", str(data_root)]
    parallel = trained(
        torchrun(2, options, tmp_path / "parallel"), tmp_path / "parallel"
    )
    single_process(options, tmp_path / "single")
    single = load_checkpoint(tmp_path / "single" / "checkpoint.pt")

    first, second = single["model_state"], parallel["model_state"]
    differences = relative_weight_differences(first, second)
    assert max(differences.values()) < 1e-2, differences
    embedding = (first["embedding.weight"] - second["embedding.weight"]).abs().max()
    assert embedding < 1e-4
    accuracy = single["metrics"]["test_accuracy"]
    assert parallel["metrics"]["test_accuracy"] == pytest.approx(accuracy, abs=0.01)


def test_torchrun_checkpoint_loads_exports_and_classifies(
    block_parallel_run, data_root: Path, tmp_path: Path
) -> None:
    result, checkpoint = block_parallel_run
    path = Path(result.stdout.split("checkpoint ")[-1].strip())
    assert checkpoint["epoch"] == 1
    assert path.is_file()

    report = export_checkpoint(
        path, tmp_path / "model.onnx", data_root=data_root, verify_images=200
    )

    assert report.files[0].verification.argmax_mismatches == 0
    split, _ = load_dataset("mnist", data_root, train=False)
    images = split.images[:200].permute(0, 2, 3, 1).numpy()  # (N, H, W, C) uint8
    session = ort.InferenceSession(
        report.files[0].path, providers=["CPUExecutionProvider"]
    )
    (probabilities,) = session.run(None, {"image": images})
    accuracy = (probabilities.argmax(1) == split.labels[:200].numpy()).mean()
    assert np.allclose(probabilities.sum(1), 1, atol=1e-5)
    assert accuracy == pytest.approx(checkpoint["metrics"]["test_accuracy"], abs=1e-6)
    assert accuracy > 0.3  # 10 classes: chance is 0.1


def test_torchrun_block_and_data_parallel_combine(
    data_root: Path, tmp_path: Path
) -> None:
    """2 block groups x 2 data ranks train as 1 group x 2 data ranks do, exactly.

    The data ranks see the same slices and noise in both layouts, so splitting
    the blocks between two groups changes nothing.
    """
    options = [*RUN_OPTIONS, "--data-root", str(data_root)]
    combined = tmp_path / "combined"
    data_only = tmp_path / "data-only"

    first = trained(torchrun(4, [*options, "--block-groups", "2"], combined), combined)
    second = trained(
        torchrun(2, [*options, "--block-groups", "1"], data_only), data_only
    )

    for name, tensor in first["model_state"].items():
        assert torch.equal(tensor, second["model_state"][name]), name
    assert first["metrics"]["test_accuracy"] > 0.3


def test_torchrun_batched_blocks_learn_on_each_rank(
    data_root: Path, tmp_path: Path
) -> None:
    options = [*RUN_OPTIONS, "--data-root", str(data_root), "--batched-blocks"]

    checkpoint = trained(torchrun(2, options, tmp_path), tmp_path)

    assert checkpoint["train_config"]["batched_blocks"] is True
    assert checkpoint["metrics"]["test_accuracy"] > 0.3
    assert all(checkpoint["history"][0][f"block_{t}_mse"] > 0 for t in range(1, 5))


def test_torchrun_rejects_indivisible_block_groups(
    data_root: Path, tmp_path: Path
) -> None:
    options = [*RUN_OPTIONS, "--data-root", str(data_root), "--block-groups", "3"]

    result = torchrun(2, options, tmp_path)

    assert result.returncode != 0
    assert "error: --block-groups 3 must divide the number of ranks, 2" in result.stderr
    assert not (tmp_path / "checkpoint.pt").exists()


def rank_pids(launcher: int) -> list[int]:
    """The ``python -m training`` processes that ``launcher`` started, from /proc."""
    ranks = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(fields[1]) == launcher and b"training" in command:
            ranks.append(int(entry.name))
    return sorted(ranks)


def test_killed_rank_stops_run_with_resumable_checkpoint(
    data_root: Path, tmp_path: Path
) -> None:
    options = [*RUN_OPTIONS, "--data-root", str(data_root), "--epochs", "3"]
    options[options.index("640")] = "1280"  # epochs long enough to kill one
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc-per-node", "2", "-m", "training", *options, "-o", str(tmp_path),
    ]  # fmt: skip
    launcher = subprocess.Popen(
        command, env=run_environment(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + RUN_SECONDS
        while not (tmp_path / "checkpoint.pt").exists():
            assert launcher.poll() is None, launcher.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.2)
        ranks = rank_pids(launcher.pid)
        assert len(ranks) == 2, ranks
        os.kill(ranks[1], signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
        launcher.wait()

    assert launcher.returncode != 0
    # Rank 0 either loses its connection to rank 1 or gets torchrun's SIGTERM.
    assert "error: rank 0: " in stderr
    assert ("lost contact with another rank" in stderr) or (
        "stopped by signal SIGTERM" in stderr
    )
    assert f"--resume {tmp_path / 'checkpoint.pt'}" in stderr
    assert "exitcode  : -9" in stderr  # torchrun names the killed rank
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] in (1, 2)

    resume = ["--resume", str(tmp_path / "checkpoint.pt"), "--data-root"]
    resumed = trained(torchrun(2, [*resume, str(data_root)], tmp_path), tmp_path)
    assert resumed["epoch"] == 3
    assert [row["epoch"] for row in resumed["history"]] == [1, 2, 3]


def test_lost_rank_message_quotes_error_and_resume_state() -> None:
    error = RuntimeError("[pair.cc:545] Read error: Connection reset by peer\nGLHF")

    message = lost_rank_message(error, trainer=None)

    assert message.startswith("lost contact with another rank")
    assert "Connection reset by peer)" in message
    assert "GLHF" not in message
    assert message.endswith(
        "No epoch had finished, so there is no checkpoint to resume"
    )
