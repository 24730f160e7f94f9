"""NoProp-DT network: T denoising blocks, label embeddings and the final classifier.

The same blocks also make the back-propagation baseline, which chains them end
to end and trains them as one network. NoProp-CT and NoProp-FM live in
training/continuous.py; ``build_model`` makes any of them from a ModelConfig.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from training.schedule import DenoisingSchedule

VARIANTS = ("dt", "ct", "fm", "backprop")
CONTINUOUS_VARIANTS = ("ct", "fm")
SOLVERS = ("euler", "heun")
EMBEDDINGS = ("one-hot", "learned", "prototype")
LEARNED_EMBEDDING_DIM = 20


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a NoProp network; stored in every checkpoint."""

    image_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    variant: str = "dt"
    # DT and backprop: the number of blocks T. CT and FM: the number of
    # integration steps at inference, which the exporter may change.
    num_steps: int = 10
    embedding: str = "one-hot"
    embedding_dim: int = 0  # 0 picks the kind's default (see resolved_embedding_dim)
    dropout: float = 0.2
    solver: str = "euler"  # CT and FM: the ODE solver at inference

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(
                f"invalid variant {self.variant!r}; expected one of {VARIANTS}"
            )
        if self.embedding not in EMBEDDINGS:
            raise ValueError(
                f"invalid embedding {self.embedding!r}; expected one of {EMBEDDINGS}"
            )
        if self.solver not in SOLVERS:
            raise ValueError(
                f"invalid solver {self.solver!r}; expected one of {SOLVERS}"
            )
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be at least 1, got {self.num_steps}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}")
        if self.embedding_dim < 0:
            raise ValueError(f"embedding_dim must be >= 0, got {self.embedding_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        channels, height, width = self.image_shape
        if min(height, width) < 14 or channels < 1:
            raise ValueError(
                f"image_shape {self.image_shape} is too small; the block's three "
                "unpadded convolutions and two poolings need C >= 1 and H, W >= 14"
            )

    @property
    def continuous(self) -> bool:
        return self.variant in CONTINUOUS_VARIANTS

    @property
    def resolved_embedding_dim(self) -> int:
        if self.embedding == "one-hot":
            return self.num_classes
        if self.embedding == "prototype":
            return math.prod(self.image_shape)
        return self.embedding_dim or LEARNED_EMBEDDING_DIM

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        values = dict(values)
        values["image_shape"] = tuple(values["image_shape"])
        return cls(**values)


class ImageEncoder(nn.Module):
    """Conv32 -> pool -> conv64 -> conv128 -> pool -> FC256 -> BN, unpadded convs.

    With ``batch_norm=False`` (NoProp-CT and FM) the path ends FC256 -> ReLU.
    """

    def __init__(
        self, image_shape: tuple[int, int, int], dropout: float, batch_norm: bool = True
    ) -> None:
        super().__init__()
        channels, height, width = image_shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Dropout(dropout),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Conv2d(64, 128, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Dropout(dropout),
            nn.Flatten(),
        )
        out_height = ((height - 2) // 2 - 4) // 2
        out_width = ((width - 2) // 2 - 4) // 2
        self.fc = nn.Linear(128 * out_height * out_width, 256)
        self.bn = nn.BatchNorm1d(256) if batch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(self.features(x))  # (B, C, H, W) -> (B, 256)
        return F.relu(h) if self.bn is None else self.bn(h)


class LabelEncoder(nn.Module):
    """FC256 -> BN -> ReLU, plus a residual FC256 -> BN -> ReLU -> FC256 -> BN."""

    def __init__(self, embedding_dim: int) -> None:
        super().__init__()
        self.input = nn.Sequential(
            nn.Linear(embedding_dim, 256), nn.BatchNorm1d(256), nn.ReLU()
        )
        self.residual = nn.Sequential(
            nn.Linear(256, 256),
            nn.BatchNorm1d(256),
            nn.ReLU(),
            nn.Linear(256, 256),
            nn.BatchNorm1d(256),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.input(z)  # (B, d) -> (B, 256)
        return h + self.residual(h)


class DenoisingBlock(nn.Module):
    """Block t: maps (x, z_{t-1}) to class logits.

    Its prediction of the label embedding is u_hat_t = softmax(logits) @ W_embed.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.image = ImageEncoder(config.image_shape, config.dropout)
        self.label = LabelEncoder(config.resolved_embedding_dim)
        self.head = nn.Sequential(
            nn.Linear(512, 256),
            nn.BatchNorm1d(256),
            nn.ReLU(),
            nn.Linear(256, 128),
            nn.BatchNorm1d(128),
            nn.ReLU(),
            nn.Linear(128, config.num_classes),
        )

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        features = torch.cat([self.image(x), self.label(z)], dim=1)  # (B, 512)
        return self.head(features)  # (B, num_classes)


class LabelEmbedding(nn.Module):
    """W_embed, (num_classes, d): fixed one-hot rows, or learned rows."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.kind = config.embedding
        num_classes, dim = config.num_classes, config.resolved_embedding_dim
        if self.kind == "one-hot":
            self.register_buffer("weight", torch.eye(num_classes))
            return
        weight = torch.empty(num_classes, dim)
        if self.kind == "learned":
            nn.init.orthogonal_(weight)
        else:
            nn.init.zeros_(weight)  # set by initialize_prototypes before training
        self.weight = nn.Parameter(weight)

    @torch.no_grad()
    def initialize_prototypes(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Start each class at its training image closest to the rest of its class.

        The image with the least mean squared distance to the others of its
        class is the one closest to the class mean, so this is exact and O(n).
        """
        if self.kind != "prototype":
            raise ValueError(
                f"prototypes apply to the prototype embedding, not {self.kind}"
            )
        flat = images.flatten(1).to(self.weight.dtype)  # (N, C*H*W), normalized
        for label in range(self.weight.shape[0]):
            members = flat[labels == label]
            if members.numel() == 0:
                raise ValueError(
                    f"class {label} has no training images for its prototype"
                )
            distances = (members - members.mean(0)).pow(2).sum(1)
            self.weight[label] = members[distances.argmin()]

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.weight[labels]  # (B,) -> (B, d)


class NoPropNet(nn.Module):
    """T blocks, the label embedding and the linear classifier on z_T.

    ``forward`` runs inference. The "dt" variant runs the NoProp-DT denoising
    chain; the "backprop" variant chains the blocks as
    z_t = (1 - a_t) z_{t-1} + a_t u_hat_t with a_t = tanh(w_t) learned.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(
            DenoisingBlock(config) for _ in range(config.num_steps)
        )
        self.embedding = LabelEmbedding(config)
        self.classifier = nn.Linear(config.resolved_embedding_dim, config.num_classes)
        # Zero weights make the classifier's first updates point straight at the
        # class embeddings; a random start takes hundreds of steps to outweigh.
        # NOTE: AdamW grows these weights by about lr per step, so short runs end
        # with flat probabilities (top class about 0.4 after 3 MNIST epochs at lr
        # 1e-3): the ranking is right, the probabilities are not calibrated.
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)
        schedule = DenoisingSchedule.cosine(config.num_steps)
        self.register_buffer("alpha_bar", schedule.alpha_bar.float())
        a, b, c = schedule.step_coefficients()
        self.register_buffer("step_a", a.float())
        self.register_buffer("step_b", b.float())
        self.register_buffer("step_c", c.float())
        if config.variant == "backprop":
            # tanh(0.5493) = 0.5: each block starts by moving z halfway to u_hat.
            self.mix_weight = nn.Parameter(torch.full((config.num_steps,), 0.5493))

    @property
    def schedule(self) -> DenoisingSchedule:
        return DenoisingSchedule(self.alpha_bar.double())

    @property
    def num_blocks(self) -> int:
        return self.config.num_steps

    def schedule_record(self) -> dict:
        """Return the noise schedule as plain lists, for the checkpoint."""
        return {"alpha_bar": self.alpha_bar.tolist()}

    def predict_embedding(
        self,
        t: int,
        x: torch.Tensor,
        z: torch.Tensor,
        block: nn.Module | None = None,
    ) -> torch.Tensor:
        """u_hat_t(z_{t-1}, x) = softmax(block_t logits) @ W_embed, t in 1..T.

        ``block`` runs in place of block t, for a wrapper such as DDP's.
        """
        block = self.blocks[t - 1] if block is None else block
        logits = block(x, z)  # (B, num_classes)
        return F.softmax(logits, dim=1) @ self.embedding.weight  # (B, d)

    def initial_z(self, x: torch.Tensor, deterministic: bool) -> torch.Tensor:
        shape = (x.shape[0], self.config.resolved_embedding_dim)
        if deterministic or self.config.variant == "backprop":
            return x.new_zeros(shape)
        return torch.randn(shape, device=x.device, dtype=x.dtype)

    def forward(self, x: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
        """Return class logits (B, num_classes) for normalized images (B, C, H, W).

        deterministic=True starts from z_0 = 0 and adds no noise, so the same
        image always gets the same logits. False samples z_0 and every eps.
        """
        z = self.initial_z(x, deterministic)
        for t in range(1, self.config.num_steps + 1):
            z = self.step(t, x, z, deterministic)
        return self.classifier(z)

    def step(
        self, t: int, x: torch.Tensor, z: torch.Tensor, deterministic: bool
    ) -> torch.Tensor:
        """Return z_t from z_{t-1}."""
        u_hat = self.predict_embedding(t, x, z)
        if self.config.variant == "backprop":
            mix = torch.tanh(self.mix_weight[t - 1])
            return (1 - mix) * z + mix * u_hat
        z_next = self.step_a[t - 1] * u_hat + self.step_b[t - 1] * z
        if deterministic:
            return z_next
        return z_next + self.step_c[t - 1].sqrt() * torch.randn_like(z)


def build_model(config: ModelConfig) -> nn.Module:
    """Make the network of ``config.variant``: NoPropNet or ContinuousNoPropNet."""
    if config.continuous:
        from training.continuous import ContinuousNoPropNet

        return ContinuousNoPropNet(config)
    return NoPropNet(config)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
