"""The training loop: epochs of minibatches, evaluation, logs and checkpoints."""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from tqdm import tqdm

from training.checkpoint import (
    load_checkpoint,
    remove_partial_checkpoints,
    save_checkpoint,
)
from training.data import DatasetInfo, load_dataset, normalize
from training.distributed import Cluster, Layout, drop_state
from training.evaluation import accuracy
from training.finite import nonfinite_gradients, nonfinite_losses
from training.losses import (
    CT_WEIGHTINGS,
    DEFAULT_ETAS,
    BlockShare,
    LossTerms,
    loss_and_gradients,
)
from training.model import SOLVERS, VARIANTS, ModelConfig, build_model
from training.progress import TrainingLog

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
LR_SCHEDULES = ("constant", "cosine")


class TrainingError(Exception):
    """Training cannot start or continue (bad options, diverged loss)."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; stored in every checkpoint."""

    dataset: str = "mnist"
    variant: str = "dt"
    embedding: str = "one-hot"
    embedding_dim: int = 0
    num_steps: int = 10
    epochs: int = 100
    batch_size: int = 128
    lr: float = 1e-3
    lr_schedule: str = "constant"  # or "cosine": decays to 0 at the last epoch
    weight_decay: float = 1e-3
    eta: float | None = None  # None: the variant's default, DEFAULT_ETAS
    dropout: float = 0.2
    solver: str = "euler"  # CT and FM: the ODE solver used for evaluation
    ct_weighting: str = "uniform"  # CT: "uniform" or "elbo" (losses.ct_loss)
    batched_blocks: bool = False  # DT: all blocks in one vmap call per batch
    seed: int = 0
    train_subset: int = 0  # 0 uses the whole training split
    test_subset: int = 0  # 0 uses the whole test split
    train_eval_size: int = (
        5000  # training images scored for the per-epoch train accuracy
    )
    device: str = "cpu"

    def __post_init__(self) -> None:
        choices = {
            "variant": VARIANTS,
            "solver": SOLVERS,
            "ct_weighting": CT_WEIGHTINGS,
            "lr_schedule": LR_SCHEDULES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise TrainingError(
                    f"invalid {name} {getattr(self, name)!r}; expected one of {allowed}"
                )
        if self.eta is None:
            object.__setattr__(self, "eta", DEFAULT_ETAS[self.variant])
        if self.batched_blocks and self.variant != "dt":
            raise TrainingError(
                f"batched blocks (--batched-blocks) apply to variant 'dt' only, "
                f"not {self.variant!r}"
            )
        positive = ("epochs", "batch_size", "num_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise TrainingError(
                    f"{name} must be at least 1, got {getattr(self, name)}"
                )
        for name in ("lr", "eta"):
            if not getattr(self, name) > 0:
                raise TrainingError(
                    f"{name} must be positive, got {getattr(self, name)}"
                )
        for name in ("weight_decay", "train_subset", "test_subset", "train_eval_size"):
            if getattr(self, name) < 0:
                raise TrainingError(f"{name} must be >= 0, got {getattr(self, name)}")

    def model_config(self, info: DatasetInfo) -> ModelConfig:
        return ModelConfig(
            image_shape=info.image_shape,
            num_classes=len(info.class_names),
            variant=self.variant,
            num_steps=self.num_steps,
            embedding=self.embedding,
            embedding_dim=self.embedding_dim,
            dropout=self.dropout,
            solver=self.solver,
        )

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {field.name for field in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})


def resolve_device(name: str, layout: Layout | None = None) -> torch.device:
    """Map "auto", "cpu" or "cuda[:N]" to a device, rejecting unavailable ones.

    Under torchrun, "auto" and "cuda" mean the GPU of the rank's LOCAL_RANK.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and layout is not None and layout.world_size > 1:
        name = f"cuda:{layout.local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(
            f"device {name!r} requested but CUDA is not available; use cpu"
        )
    try:
        return torch.device(name)
    except RuntimeError as error:
        raise TrainingError(
            f"invalid device {name!r}; expected auto, cpu or cuda[:N]"
        ) from error


class Trainer:
    """Train one NoProp network and write its checkpoint, log and plot to a folder."""

    def __init__(
        self,
        config: TrainConfig,
        output_dir: str | os.PathLike,
        data_root: str | os.PathLike | None = None,
        download: bool = False,
        resume: dict | None = None,
        cluster: Cluster | None = None,
    ) -> None:
        self.config = config
        self.output_dir = Path(output_dir)
        self.cluster = cluster or Cluster(Layout())
        self.layout = self.cluster.layout
        self.device = resolve_device(config.device, self.layout)
        self.check_parallel_options()
        torch.manual_seed(config.seed)

        self.train_split, self.info = load_dataset(
            config.dataset, data_root, True, download
        )
        self.test_split, _ = load_dataset(config.dataset, data_root, False, download)
        self.train_split = self.train_split.subset(
            config.train_subset, seed=config.seed
        )
        self.test_split = self.test_split.subset(config.test_subset)
        self.train_eval_split = self.train_split.subset(
            config.train_eval_size, seed=config.seed + 1
        )
        self.train_split.images = self.train_split.images.to(self.device)
        self.train_split.labels = self.train_split.labels.to(self.device)

        self.model = build_model(config.model_config(self.info)).to(self.device)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.scheduler = self.build_scheduler()
        self.log = TrainingLog(self.output_dir, self.model.num_blocks)
        self.epoch = 0
        self.share, self.owned_parameters = self.plan_share()
        if self.layout.is_main:
            remove_partial_checkpoints(self.checkpoint_path)
        if resume is not None:
            self.restore(resume)
        elif config.embedding == "prototype":
            images = normalize(self.train_split.images, self.info)
            self.model.embedding.initialize_prototypes(images, self.train_split.labels)

    def check_parallel_options(self) -> None:
        if not self.cluster.active:
            return
        if self.config.variant != "dt":
            raise TrainingError(
                f"distributed training supports --variant dt, not "
                f"{self.config.variant!r}: only NoProp-DT has independent blocks"
            )
        if self.config.batched_blocks and self.layout.data_parallel > 1:
            raise TrainingError(
                "batched blocks do not combine with data parallelism "
                f"({self.layout.data_parallel} ranks per block group); "
                "set --block-groups to the number of ranks"
            )

    def plan_share(self) -> tuple[BlockShare, list[torch.nn.Parameter]]:
        """Pick this rank's blocks and the parameters its optimizer updates."""
        if self.config.variant != "dt":
            return BlockShare(()), list(self.model.parameters())
        blocks = self.layout.owned_blocks(self.model.num_blocks)
        modules = self.cluster.wrap_blocks(self.model, blocks, self.device)
        share = BlockShare(
            blocks,
            head=self.layout.block_group == 0,
            modules=modules,
            batched=self.config.batched_blocks,
        )
        owned = [p for t in blocks for p in self.model.blocks[t - 1].parameters()]
        return share, owned + self.shared_parameters

    @property
    def shared_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters outside the blocks: the classifier and a learned embedding."""
        return [
            p
            for name, p in self.model.named_parameters()
            if not name.startswith("blocks.")
        ]

    def build_scheduler(self) -> torch.optim.lr_scheduler.LambdaLR:
        """Scale the learning rate per epoch: constant, or a cosine decay to 0.

        The factor is a closed form of the epoch and the run's total epochs, so a
        resumed run whose --epochs was raised decays over the new total.
        """
        total = self.config.epochs
        if self.config.lr_schedule == "cosine":
            factor = lambda epoch: 0.5 * (1 + math.cos(math.pi * epoch / total))  # noqa: E731
        else:
            factor = lambda epoch: 1.0  # noqa: E731
        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        output_dir: str | os.PathLike | None = None,
        data_root: str | os.PathLike | None = None,
        download: bool = False,
        epochs: int | None = None,
        cluster: Cluster | None = None,
        batched_blocks: bool | None = None,
    ) -> Trainer:
        """Resume the run saved in ``path``, optionally raising its epoch count.

        ``batched_blocks`` changes how the blocks are computed, not the model,
        so a resumed run may turn it on or off.
        """
        checkpoint = load_checkpoint(path)
        config = TrainConfig.from_dict(checkpoint["train_config"])
        if epochs is not None:
            config = replace(config, epochs=epochs)
        if batched_blocks is not None:
            config = replace(config, batched_blocks=batched_blocks)
        output_dir = output_dir or Path(path).parent
        return cls(config, output_dir, data_root, download, checkpoint, cluster)

    @property
    def checkpoint_path(self) -> Path:
        return self.output_dir / CHECKPOINT_NAME

    def restore(self, checkpoint: dict) -> None:
        self.model.load_state_dict(checkpoint["model_state"])
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        self.scheduler.load_state_dict(checkpoint["scheduler_state"])
        # The saved optimizer contains the last epoch's rate. A raised --epochs
        # changes it.
        epoch = self.scheduler.last_epoch
        for group, base_lr, factor in zip(
            self.optimizer.param_groups,
            self.scheduler.base_lrs,
            self.scheduler.lr_lambdas,
            strict=True,
        ):
            group["lr"] = base_lr * factor(epoch)
        drop_state(self.optimizer, self.owned_parameters)
        self.epoch = checkpoint["epoch"]
        self.log.history = list(checkpoint["history"])
        torch.set_rng_state(checkpoint["rng_state"])
        # NOTE: the CUDA generator's state is restored as on CPU, but this path
        # has not run on a GPU, and cuDNN kernels may be nondeterministic, so a
        # resumed CUDA run is not promised to be bit-identical.
        if self.device.type == "cuda" and "cuda_rng_state" in checkpoint:
            torch.cuda.set_rng_state(checkpoint["cuda_rng_state"], self.device)
        if self.log.history and self.layout.is_main:
            # A kill between saving and writing log.csv leaves it an epoch behind.
            self.log.write_csv()
        logger.info("resumed from epoch %d", self.epoch)

    def run(self) -> dict:
        """Train until ``config.epochs`` and return the last epoch's log row.

        Ranks other than 0 return an empty row.
        """
        logger.info(
            "training %s on %s: %d train / %d test images, %d epochs, device %s",
            self.config.variant,
            self.config.dataset,
            len(self.train_split),
            len(self.test_split),
            self.config.epochs,
            self.device,
        )
        if self.epoch >= self.config.epochs:
            logger.info(
                "checkpoint already has %d epochs; nothing to train", self.epoch
            )
        while self.epoch < self.config.epochs:
            self.run_epoch()
        if not (self.log.history and self.layout.is_main):
            return {}
        return self.log.history[-1]

    def run_epoch(self) -> dict:
        start = time.perf_counter()
        losses = self.train_one_epoch()
        train_seconds = time.perf_counter() - start
        self.cluster.sync_blocks(self.model)
        optimizer_state = self.cluster.gather_optimizer_state(
            self.optimizer, self.owned_parameters
        )
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this epoch trained at
        self.epoch += 1
        self.scheduler.step()
        if not self.layout.is_main:
            return {}

        start = time.perf_counter()
        metrics = self.evaluate()
        row = {
            "epoch": self.epoch,
            **losses,
            **metrics,
            "lr": lr,
            "train_seconds": train_seconds,
            "eval_seconds": time.perf_counter() - start,
        }
        self.log.history.append(row)

        # The checkpoint goes first, so log.csv never lists an epoch it lacks.
        self.save(optimizer_state)
        self.log.write_csv()
        self.log.plot()
        logger.info(
            "epoch %d: loss %.4f, train acc %.4f, test acc %.4f "
            "(stochastic %.4f), %.0f s",
            row["epoch"],
            row["loss"],
            row["train_accuracy"],
            row["test_accuracy"],
            row["test_accuracy_stochastic"],
            train_seconds,
        )
        return row

    def train_one_epoch(self) -> dict:
        self.model.train()
        generator = torch.Generator().manual_seed(
            self.config.seed * 100_003 + self.epoch
        )
        order = torch.randperm(len(self.train_split), generator=generator).to(
            self.device
        )
        batches = self.epoch_batches(order)
        totals: dict[str, torch.Tensor] = {}
        progress = tqdm(
            batches,
            desc=f"epoch {self.epoch + 1}/{self.config.epochs}",
            unit="batch",
            leave=False,
            mininterval=2.0,
            disable=not self.layout.is_main,
        )
        for step, index in enumerate(progress):
            terms = self.run_step(index, step)
            for name, value in self.loss_fields(terms).items():
                totals[name] = totals.get(name, 0) + value
        return {
            name: value / len(batches)
            for name, value in self.cluster.reduce_totals(totals).items()
        }

    def epoch_batches(self, order: torch.Tensor) -> list[torch.Tensor]:
        """Split an epoch's order into batches, and each into this rank's slice.

        A last batch too small to give every data rank two images is dropped:
        batch norm needs two.
        """
        batches = order.split(self.config.batch_size)
        parts = self.layout.data_parallel
        return [
            batch.tensor_split(parts)[self.layout.data_rank]
            for batch in batches
            if len(batch) >= 2 * parts
        ]

    def run_step(self, index: torch.Tensor, step: int) -> LossTerms:
        x = normalize(self.train_split.images[index], self.info)  # (B, C, H, W)
        labels = self.train_split.labels[index]  # (B,)
        global_step = self.epoch * self.batches_per_epoch + step
        # The noise of a step depends on the run's seed, the step and the data
        # rank, never on which rank owns a block.
        step_key = (self.config.seed, global_step, self.layout.data_rank)
        share = replace(self.share, step_key=step_key)

        self.optimizer.zero_grad(set_to_none=True)
        terms = loss_and_gradients(
            self.model, x, labels, self.config.eta, self.config.ct_weighting, share
        )
        self.check_finite(terms, step)
        self.optimizer.step()
        return terms

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.train_split) / self.config.batch_size)

    def check_finite(self, terms: LossTerms, step: int) -> None:
        """Stop the run before a NaN or infinity reaches the weights.

        ``step`` is the 0-based batch index in the current epoch. Under
        torch.distributed this also sums the shared parameters' gradients, and
        every rank stops when any rank finds a non-finite value.
        """
        bad_losses = nonfinite_losses(terms)
        bad_gradients = [] if bad_losses else nonfinite_gradients(self.model)
        failed_ranks = self.cluster.reduce_shared_gradients(
            self.shared_parameters, bool(bad_losses or bad_gradients)
        )
        if failed_ranks and not (bad_losses or bad_gradients):
            raise TrainingError(
                f"rank(s) {failed_ranks} found non-finite losses or gradients at "
                f"{self.describe_step(step)}; see their errors"
            )
        if bad_losses:
            raise TrainingError(
                f"non-finite loss at {self.describe_step(step)}: "
                f"{', '.join(bad_losses)}. The weights were not updated. "
                "Lower --lr or --eta, or check the data"
            )
        if bad_gradients:
            raise TrainingError(
                f"non-finite gradients at {self.describe_step(step)} in "
                f"{', '.join(bad_gradients)}, with a finite loss of "
                f"{terms.total.item():.6g}. The weights were not updated. "
                "Lower --lr or --eta, or check the data"
            )

    def describe_step(self, step: int) -> str:
        global_step = self.epoch * self.batches_per_epoch + step + 1
        return (
            f"epoch {self.epoch + 1}, batch {step + 1} of {self.batches_per_epoch} "
            f"(optimizer step {global_step})"
        )

    @staticmethod
    def loss_fields(terms: LossTerms) -> dict[str, torch.Tensor]:
        values = {
            "loss": terms.total,
            "cross_entropy": terms.cross_entropy,
            "kl": terms.kl,
        }
        for t, mse in enumerate(terms.block_mse, start=1):
            values[f"block_{t}_mse"] = mse
        return values

    def evaluate(self) -> dict:
        return {
            "train_accuracy": accuracy(self.model, self.train_eval_split, self.info),
            "test_accuracy": accuracy(self.model, self.test_split, self.info),
            "test_accuracy_stochastic": accuracy(
                self.model, self.test_split, self.info, deterministic=False
            ),
        }

    def save(self, optimizer_state: dict) -> Path:
        last = self.log.history[-1]
        contents = {
            "train_config": asdict(self.config),
            "model_config": self.model.config.to_dict(),
            "dataset": self.info.to_dict(),
            "schedule": self.model.schedule_record(),
            "model_state": self.model.state_dict(),
            "optimizer_state": optimizer_state,
            "scheduler_state": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "history": self.log.history,
            "metrics": {
                "test_accuracy": last["test_accuracy"],
                "test_accuracy_stochastic": last["test_accuracy_stochastic"],
                "train_accuracy": last["train_accuracy"],
                "test_images": len(self.test_split),
            },
            "rng_state": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            contents["cuda_rng_state"] = torch.cuda.get_rng_state(self.device)
        return save_checkpoint(self.checkpoint_path, contents)
