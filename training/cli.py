"""Command line: ``python -m training`` or ``noprop-train``."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import torch

from training.checkpoint import CheckpointError
from training.data import DATA_ROOT_ENV, LOADERS, DatasetError
from training.distributed import Cluster, DistributedError, Layout
from training.losses import CT_WEIGHTINGS, DEFAULT_ETAS
from training.model import EMBEDDINGS, SOLVERS, VARIANTS
from training.trainer import TrainConfig, Trainer, TrainingError, resolve_device

logger = logging.getLogger("training")
DEFAULTS = TrainConfig()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Train a NoProp classifier (or the back-propagation baseline) and "
        "write checkpoint.pt, log.csv and curves.png to the output folder.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset",
        choices=sorted(LOADERS),
        default=DEFAULTS.dataset,
        help="dataset to train on",
    )
    data.add_argument(
        "--data-root",
        default=None,
        help=f"folder holding the datasets (default: ${DATA_ROOT_ENV})",
    )
    data.add_argument(
        "--download",
        action="store_true",
        help="download the dataset with torchvision when it is missing",
    )
    data.add_argument(
        "--train-subset",
        type=int,
        default=DEFAULTS.train_subset,
        help="train on this many images, a seeded sample (0: all)",
    )
    data.add_argument(
        "--test-subset",
        type=int,
        default=DEFAULTS.test_subset,
        help="evaluate on the first this many test images (0: all)",
    )
    data.add_argument(
        "--train-eval-size",
        type=int,
        default=DEFAULTS.train_eval_size,
        help="training images scored for the per-epoch train accuracy",
    )

    model = parser.add_argument_group("model")
    model.add_argument(
        "--variant",
        choices=VARIANTS,
        default=DEFAULTS.variant,
        help="dt: NoProp-DT; ct: NoProp-CT; fm: NoProp-FM (flow matching); "
        "backprop: the DT blocks trained end to end",
    )
    model.add_argument(
        "--embedding",
        choices=EMBEDDINGS,
        default=DEFAULTS.embedding,
        help="label embedding kind",
    )
    model.add_argument(
        "--embedding-dim",
        type=int,
        default=DEFAULTS.embedding_dim,
        help="dimensions of a learned embedding (0: 20)",
    )
    model.add_argument(
        "--steps",
        type=int,
        default=DEFAULTS.num_steps,
        help="dt and backprop: the number of blocks T; ct and fm: the "
        "integration steps used to evaluate",
    )
    model.add_argument(
        "--solver",
        choices=SOLVERS,
        default=DEFAULTS.solver,
        help="ct and fm: the ODE solver used to evaluate",
    )
    model.add_argument(
        "--dropout",
        type=float,
        default=DEFAULTS.dropout,
        help="dropout probability in the image path",
    )

    optim = parser.add_argument_group("optimization")
    optim.add_argument(
        "--epochs",
        type=int,
        default=argparse.SUPPRESS,
        help=f"passes over the training set (default: {DEFAULTS.epochs}). With "
        "--resume: the new total, and without it the checkpoint's total",
    )
    optim.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULTS.batch_size,
        help="images per minibatch",
    )
    optim.add_argument(
        "--lr", type=float, default=DEFAULTS.lr, help="AdamW learning rate"
    )
    optim.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine"),
        default=DEFAULTS.lr_schedule,
        help="learning rate over epochs: constant, or cosine decay to 0",
    )
    optim.add_argument(
        "--weight-decay",
        type=float,
        default=DEFAULTS.weight_decay,
        help="AdamW weight decay",
    )
    optim.add_argument(
        "--eta",
        type=float,
        default=None,
        help="weight of the denoising loss (default: "
        + ", ".join(f"{name} {value:g}" for name, value in DEFAULT_ETAS.items())
        + ")",
    )
    optim.add_argument(
        "--ct-weighting",
        choices=CT_WEIGHTINGS,
        default=DEFAULTS.ct_weighting,
        help="ct: weight the denoising error equally at every t with the "
        "schedule fixed (uniform), or by SNR'(t) as in the paper (elbo)",
    )
    optim.add_argument(
        "--seed",
        type=int,
        default=DEFAULTS.seed,
        help="seed of weights, noise, shuffling and subsets",
    )

    run = parser.add_argument_group("run")
    run.add_argument(
        "-o",
        "--output-dir",
        default=None,
        help="folder for checkpoint.pt, log.csv and curves.png "
        "(default: runs/noprop, or the resumed checkpoint's folder)",
    )
    run.add_argument(
        "--resume",
        metavar="CHECKPOINT",
        default=None,
        help="continue the run saved in this checkpoint; its options win "
        "over the ones given here, except --epochs, --output-dir, "
        "--batched-blocks and the parallelism of the launch",
    )
    run.add_argument("--device", default=DEFAULTS.device, help="auto, cpu or cuda[:N]")
    run.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads for torch (0: torch's default)",
    )

    parallel = parser.add_argument_group(
        "parallelism",
        "Launch with torchrun to train on several processes or GPUs, for example "
        "torchrun --nproc-per-node 2 -m training ...",
    )
    parallel.add_argument(
        "--block-groups",
        type=int,
        default=0,
        help="dt under torchrun: split the blocks among this many groups of "
        "ranks; the ranks of a group train its blocks data-parallel "
        "(0: one group per rank)",
    )
    parallel.add_argument(
        "--batched-blocks",
        action="store_true",
        help="dt: train a rank's blocks in one batched (vmap) computation per "
        "batch instead of one after another: fewer, larger kernels for GPUs, "
        "all blocks' activations in memory at once",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        dataset=args.dataset,
        variant=args.variant,
        embedding=args.embedding,
        embedding_dim=args.embedding_dim,
        num_steps=args.steps,
        epochs=getattr(args, "epochs", DEFAULTS.epochs),
        batch_size=args.batch_size,
        lr=args.lr,
        lr_schedule=args.lr_schedule,
        weight_decay=args.weight_decay,
        eta=args.eta,
        dropout=args.dropout,
        solver=args.solver,
        ct_weighting=args.ct_weighting,
        batched_blocks=args.batched_blocks,
        seed=args.seed,
        train_subset=args.train_subset,
        test_subset=args.test_subset,
        train_eval_size=args.train_eval_size,
        device=args.device,
    )


class RankStopped(Exception):
    """torchrun (or a user) sent this rank SIGTERM."""


def stop_on_sigterm(signum: int, frame: object) -> None:
    # torchrun may send SIGTERM again while this one unwinds; ignore the repeats.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise RankStopped(f"signal {signal.Signals(signum).name}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    if args.block_groups < 0:
        parser.error(f"--block-groups must be >= 0, got {args.block_groups}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cluster = start_cluster(args)
    except (DistributedError, TrainingError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        return train(args, cluster)
    finally:
        cluster.stop()


def start_cluster(args: argparse.Namespace) -> Cluster:
    """Join torchrun's process group, when there is one."""
    layout = Layout.from_environment(args.block_groups)
    if layout.world_size == 1:
        return Cluster(layout)
    if not layout.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    # torchrun stops the other ranks with SIGTERM when one fails.
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    device = resolve_device(args.device, layout)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Cluster.start(layout, device)


def train(args: argparse.Namespace, cluster: Cluster) -> int:
    rank = f"rank {cluster.layout.rank}: " if cluster.active else ""
    trainer = None
    try:
        if args.resume:
            trainer = Trainer.from_checkpoint(
                args.resume,
                args.output_dir,
                args.data_root,
                args.download,
                getattr(args, "epochs", None),
                cluster,
                args.batched_blocks,
            )
        else:
            output_dir = args.output_dir or "runs/noprop"
            trainer = Trainer(
                config_from_args(args),
                output_dir,
                args.data_root,
                args.download,
                cluster=cluster,
            )
        row = trainer.run()
        cluster.barrier()
    except (
        TrainingError,
        DatasetError,
        CheckpointError,
        DistributedError,
        ValueError,
    ) as error:
        print(f"error: {rank}{error}", file=sys.stderr)
        return 2
    except RankStopped as error:
        print(f"error: {rank}{stopped_message(error, trainer)}", file=sys.stderr)
        return 1
    except RuntimeError as error:
        # gloo reports a lost peer as a plain RuntimeError.
        if not cluster.active:
            raise
        print(f"error: {rank}{lost_rank_message(error, trainer)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(f"{rank}interrupted. {resume_hint(trainer)}", file=sys.stderr)
        return 130
    if row:
        print(
            f"epoch {row['epoch']}: test accuracy {100 * row['test_accuracy']:.2f}% "
            f"(stochastic {100 * row['test_accuracy_stochastic']:.2f}%), "
            f"checkpoint {trainer.checkpoint_path}"
        )
    return 0


def stopped_message(error: RankStopped, trainer: Trainer | None) -> str:
    """Explain that this rank got SIGTERM, and how to resume the run."""
    return (
        f"stopped by {error}. torchrun sends it to every rank when one rank "
        f"fails or the run is interrupted. {resume_hint(trainer)}"
    )


def lost_rank_message(error: Exception, trainer: Trainer | None) -> str:
    """Explain that the run lost a rank, and how to resume it."""
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return (
        f"lost contact with another rank, which most likely failed or was "
        f"killed ({type(error).__name__}: {first_line}). {resume_hint(trainer)}"
    )


def resume_hint(trainer: Trainer | None) -> str:
    """Say where the last finished epoch is and how to continue from it."""
    if trainer is None or not trainer.checkpoint_path.is_file():
        return "No epoch had finished, so there is no checkpoint to resume"
    where = trainer.checkpoint_path
    return (
        f"The last finished epoch is in {where}; resume with the same command "
        f"and --resume {where}"
    )
