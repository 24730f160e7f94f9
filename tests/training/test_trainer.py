import csv
from dataclasses import replace

import pytest
import torch

from training.evaluation import accuracy, load_trained_model
from training.trainer import TrainConfig, Trainer, TrainingError

TINY = TrainConfig(
    dataset="mnist",
    num_steps=2,
    epochs=2,
    batch_size=64,
    train_subset=256,
    test_subset=100,
    train_eval_size=100,
    lr_schedule="cosine",
)


def test_short_training_learns(data_root, tmp_path):
    config = replace(TINY, num_steps=5, train_subset=1500, test_subset=500, lr=2e-3)
    trainer = Trainer(config, tmp_path, data_root)

    row = trainer.run()

    # 500 held-out real test images; chance is 10%.
    assert row["test_accuracy"] > 0.6
    assert row["test_accuracy_stochastic"] > 0.5
    restored = load_trained_model(trainer.checkpoint_path)
    assert accuracy(restored.model, trainer.test_split, trainer.info) == pytest.approx(
        row["test_accuracy"]
    )


def test_backprop_baseline_learns(data_root, tmp_path):
    config = replace(TINY, variant="backprop", num_steps=3, train_subset=1500, lr=2e-3)

    row = Trainer(config, tmp_path, data_root).run()

    assert row["test_accuracy"] > 0.5


def test_run_writes_log_and_plot(data_root, tmp_path):
    trainer = Trainer(TINY, tmp_path, data_root)

    trainer.run()

    with (tmp_path / "log.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert {"block_1_mse", "block_2_mse", "test_accuracy", "train_seconds"} <= set(
        rows[0]
    )
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_matches_uninterrupted_run(data_root, tmp_path):
    straight = Trainer(TINY, tmp_path / "straight", data_root)
    straight.run()

    interrupted = Trainer(TINY, tmp_path / "resumed", data_root)
    interrupted.run_epoch()  # the run is killed after its first epoch
    resumed = Trainer.from_checkpoint(interrupted.checkpoint_path, data_root=data_root)
    assert resumed.epoch == 1
    resumed.run()

    expected = straight.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)
    assert [row["epoch"] for row in resumed.log.history] == [1, 2]


def test_resume_can_extend_epochs(data_root, tmp_path):
    first = Trainer(replace(TINY, epochs=1), tmp_path, data_root)
    first.run()

    resumed = Trainer.from_checkpoint(
        first.checkpoint_path, data_root=data_root, epochs=2
    )
    resumed.run()

    assert resumed.epoch == 2
    assert load_trained_model(resumed.checkpoint_path).checkpoint["epoch"] == 2
    # The cosine decay is replanned over 2 epochs instead of ending at lr 0.
    assert resumed.log.history[-1]["lr"] == pytest.approx(0.5 * TINY.lr)


def test_prototype_embedding_starts_from_training_images(data_root, tmp_path):
    config = replace(TINY, embedding="prototype", epochs=1)
    trainer = Trainer(config, tmp_path, data_root)

    weight = trainer.model.embedding.weight.detach()

    assert weight.shape == (10, 784)
    images = trainer.train_split.images.float()
    for label in range(10):
        row = weight[label]
        matches = [
            index
            for index in torch.nonzero(trainer.train_split.labels == label).flatten()
            if torch.allclose(
                (images[index] / 255 - 0.1307) / 0.3081, row.view(1, 28, 28), atol=1e-5
            )
        ]
        assert matches, f"class {label} prototype is not one of its images"


def test_diverged_loss_names_block(data_root, tmp_path):
    trainer = Trainer(replace(TINY, epochs=1), tmp_path, data_root)
    with torch.no_grad():
        trainer.model.blocks[1].head[-1].weight.fill_(float("nan"))

    with pytest.raises(TrainingError, match="block 2 denoising loss nan") as error:
        trainer.run()

    assert "block 1" not in str(error.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epochs": 0}, "epochs must be at least 1, got 0"),
        ({"batch_size": -1}, "batch_size must be at least 1, got -1"),
        ({"lr": 0.0}, "lr must be positive, got 0.0"),
        ({"train_subset": -5}, "train_subset must be >= 0, got -5"),
        ({"lr_schedule": "step"}, "invalid lr_schedule 'step'"),
    ],
)
def test_train_config_rejects_bad_values(overrides, message):
    with pytest.raises(TrainingError, match=message):
        replace(TINY, **overrides)


def test_cuda_device_without_gpu_is_rejected(data_root, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")

    with pytest.raises(TrainingError, match="CUDA is not available"):
        Trainer(replace(TINY, device="cuda"), tmp_path, data_root)
