"""Accuracy of a model on a split, and loading a trained model from a checkpoint."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from training.checkpoint import CheckpointError, load_checkpoint
from training.data import DatasetInfo, ImageSplit, normalize
from training.model import ModelConfig, build_model

EVAL_BATCH_SIZE = 1000


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module,
    images: torch.Tensor,
    info: DatasetInfo,
    deterministic: bool = True,
    batch_size: int = EVAL_BATCH_SIZE,
) -> torch.Tensor:
    """Return logits (N, num_classes) for uint8 images (N, C, H, W), in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outputs = []
    for start in range(0, images.shape[0], batch_size):
        batch = normalize(images[start : start + batch_size].to(device), info)
        outputs.append(model(batch, deterministic=deterministic).cpu())
    model.train(was_training)
    return torch.cat(outputs)


def accuracy(
    model: torch.nn.Module,
    split: ImageSplit,
    info: DatasetInfo,
    deterministic: bool = True,
) -> float:
    """Fraction of ``split`` classified correctly, in [0, 1]."""
    predictions = predict_logits(model, split.images, info, deterministic).argmax(1)
    return (predictions == split.labels).float().mean().item()


@dataclass
class TrainedModel:
    """A model rebuilt from a checkpoint, in eval mode, with its data description."""

    model: torch.nn.Module  # NoPropNet or ContinuousNoPropNet
    dataset: DatasetInfo
    checkpoint: dict


def load_trained_model(path: str | os.PathLike, device: str = "cpu") -> TrainedModel:
    """Rebuild the network stored in a checkpoint file."""
    checkpoint = load_checkpoint(path, map_location=device)
    try:
        config = ModelConfig.from_dict(checkpoint["model_config"])
        dataset = DatasetInfo.from_dict(checkpoint["dataset"])
        model = build_model(config).to(device)
        model.load_state_dict(checkpoint["model_state"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(
            f"checkpoint {path} does not describe a valid model: {error}"
        ) from error
    model.eval()
    return TrainedModel(model, dataset, checkpoint)


def with_integration(
    trained: TrainedModel, steps: int | None = None, solver: str | None = None
) -> TrainedModel:
    """Return a CT or FM model that integrates with ``steps`` steps of ``solver``.

    The new model gets a copy of the weights. None keeps the checkpoint's
    value. Raises ValueError for a DT or backprop model, whose steps are its
    blocks.
    """
    config = trained.model.config
    if steps is None and solver is None:
        return trained
    if not config.continuous:
        raise ValueError(
            f"integration steps and solver apply to ct and fm models; this "
            f"checkpoint's variant is {config.variant!r}, whose {config.num_steps} "
            "steps are its trained blocks"
        )
    config = replace(
        config,
        num_steps=config.num_steps if steps is None else steps,
        solver=config.solver if solver is None else solver,
    )
    device = next(trained.model.parameters()).device
    model = build_model(config).to(device)
    model.load_state_dict(trained.model.state_dict())
    model.eval()
    return TrainedModel(model, trained.dataset, trained.checkpoint)
