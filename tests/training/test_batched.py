"""Batched NoProp-DT block losses (training/batched.py) and --batched-blocks."""

import copy
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

import training.losses
from training.batched import batched_denoising_mse, template_block
from training.checkpoint import load_checkpoint
from training.losses import block_denoising_mse
from training.model import ModelConfig, NoPropNet
from training.trainer import TrainConfig, Trainer, TrainingError

BATCH = 8
NUM_BLOCKS = 4
# The batched path runs wider convolutions and matrix products, which sum in a
# different order, so float32 results differ from the loop in the last bits. The
# largest gradient difference measured was about 5e-7. Biases that feed a
# BatchNorm have gradients near 1e-8, so atol, not rtol, covers those.
TOLERANCE = {"rtol": 1e-4, "atol": 1e-6}


def make_net(embedding: str = "one-hot", dropout: float = 0.0) -> NoPropNet:
    torch.manual_seed(0)
    config = ModelConfig(
        (1, 28, 28), 10, num_steps=NUM_BLOCKS, embedding=embedding, dropout=dropout
    )
    return NoPropNet(config).train()


def make_inputs(
    net: NoPropNet, num_selected: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return x (B, 1, 28, 28), labels (B,) and z_prev (K, B, d)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 1, 28, 28, generator=generator)
    labels = torch.randint(0, 10, (BATCH,), generator=generator)
    dim = net.config.resolved_embedding_dim
    z_prev = torch.randn(num_selected, BATCH, dim, generator=generator)
    return x, labels, z_prev


def loop_mse(
    net: NoPropNet,
    blocks: Sequence[int],
    x: torch.Tensor,
    labels: torch.Tensor,
    z_prev: torch.Tensor,
    monkeypatch: pytest.MonkeyPatch,
) -> torch.Tensor:
    """Run block_denoising_mse block by block, with sample_z returning z_prev[k]."""
    samples = iter(z_prev)
    monkeypatch.setattr(training.losses, "sample_z", lambda *_: next(samples))
    weights = block_weights(len(blocks))
    values = []
    for weight, t in zip(weights, blocks, strict=True):
        mse = block_denoising_mse(net, t, x, net.embedding(labels))
        (weight * mse).backward()
        values.append(mse.detach())
    return torch.stack(values)  # (K,)


def batched_mse(
    net: NoPropNet,
    blocks: Sequence[int],
    x: torch.Tensor,
    labels: torch.Tensor,
    z_prev: torch.Tensor,
) -> torch.Tensor:
    mse = batched_denoising_mse(net, blocks, x, net.embedding(labels), z_prev)
    (block_weights(len(blocks)) * mse).sum().backward()
    return mse.detach()  # (K,)


def block_weights(count: int) -> torch.Tensor:
    return torch.linspace(0.5, 2.0, count)  # unequal, so a swapped block shows


def run_both(
    monkeypatch: pytest.MonkeyPatch,
    blocks: Sequence[int] = tuple(range(1, NUM_BLOCKS + 1)),
    embedding: str = "one-hot",
) -> tuple[NoPropNet, NoPropNet, torch.Tensor, torch.Tensor]:
    """Train two copies of one net on one batch: the loop and the batched call."""
    loop_net = make_net(embedding)
    batched_net = copy.deepcopy(loop_net)
    x, labels, z_prev = make_inputs(loop_net, len(blocks))
    expected = loop_mse(loop_net, blocks, x, labels, z_prev, monkeypatch)
    actual = batched_mse(batched_net, blocks, x, labels, z_prev)
    return loop_net, batched_net, expected, actual


def test_batched_mse_matches_loop(monkeypatch):
    _, _, expected, actual = run_both(monkeypatch)

    assert actual.shape == (NUM_BLOCKS,)
    torch.testing.assert_close(actual, expected, **TOLERANCE)


def test_batched_gradients_match_loop(monkeypatch):
    loop_net, batched_net, _, _ = run_both(monkeypatch)

    for (name, expected), actual in zip(
        loop_net.named_parameters(), batched_net.parameters(), strict=True
    ):
        if expected.grad is None:
            assert actual.grad is None, name
            continue
        assert actual.grad is not None, name
        torch.testing.assert_close(actual.grad, expected.grad, **TOLERANCE, msg=name)


def test_batched_batchnorm_stats_match_loop(monkeypatch):
    loop_net, batched_net, _, _ = run_both(monkeypatch)
    untouched = make_net()

    for (name, expected), actual, initial in zip(
        loop_net.named_buffers(),
        batched_net.buffers(),
        untouched.buffers(),
        strict=True,
    ):
        torch.testing.assert_close(actual, expected, **TOLERANCE, msg=name)
        if name.endswith("running_mean"):
            assert not torch.equal(actual, initial), f"{name} was not updated"


def test_batched_subset_touches_only_selected_blocks(monkeypatch):
    blocks = (3, 1)
    loop_net, batched_net, expected, actual = run_both(monkeypatch, blocks)
    untouched = make_net()

    torch.testing.assert_close(actual, expected, **TOLERANCE)
    for index, block in enumerate(batched_net.blocks):
        grads = [parameter.grad for parameter in block.parameters()]
        if index + 1 in blocks:
            assert all(grad is not None for grad in grads), f"block {index + 1}"
        else:
            assert all(grad is None for grad in grads), f"block {index + 1}"
            initial = untouched.blocks[index].state_dict()
            for name, buffer in block.state_dict().items():
                assert torch.equal(buffer, initial[name]), f"block {index + 1} {name}"


def test_batched_learned_embedding_gradient_matches_loop(monkeypatch):
    loop_net, batched_net, expected, actual = run_both(monkeypatch, embedding="learned")

    torch.testing.assert_close(actual, expected, **TOLERANCE)
    expected_grad = loop_net.embedding.weight.grad
    actual_grad = batched_net.embedding.weight.grad
    assert expected_grad is not None
    assert actual_grad is not None
    torch.testing.assert_close(actual_grad, expected_grad, **TOLERANCE)


def test_batched_dropout_differs_between_blocks():
    net = make_net(dropout=0.5)
    net.blocks[1].load_state_dict(net.blocks[0].state_dict())
    x, labels, z_prev = make_inputs(net, 1)
    same_z = z_prev.expand(2, -1, -1)  # (2, B, d), one z for both blocks

    mse = batched_denoising_mse(net, [1, 2], x, net.embedding(labels), same_z)

    assert mse[0] != mse[1], "identical blocks got identical dropout masks"


def test_batched_eval_mode_leaves_batchnorm_stats():
    net = make_net().eval()
    before = copy.deepcopy(net.state_dict())
    x, labels, z_prev = make_inputs(net, NUM_BLOCKS)

    batched_denoising_mse(
        net, range(1, NUM_BLOCKS + 1), x, net.embedding(labels), z_prev
    )

    for name, value in net.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_template_block_cached_per_model():
    net, other = make_net(), make_net()

    assert template_block(net) is template_block(net)
    assert template_block(net) is not template_block(other)


def test_batched_rejects_bad_z_prev_shape():
    net = make_net()
    x, labels, z_prev = make_inputs(net, 2)

    with pytest.raises(
        ValueError, match=r"z_prev has shape \(2, 8, 10\); expected \(3, 8, 10\)"
    ):
        batched_denoising_mse(net, [1, 2, 3], x, net.embedding(labels), z_prev)


@pytest.mark.parametrize(
    ("blocks", "message"),
    [
        ([], "blocks is empty"),
        ([0], r"invalid block indices \[0\]; expected values in 1..4"),
        ([1, NUM_BLOCKS + 1], r"invalid block indices \[5\]; expected values in 1..4"),
        ([2, 2], r"blocks \[2, 2\] repeats an index"),
    ],
)
def test_batched_rejects_bad_block_indices(blocks, message):
    net = make_net()
    x, labels, z_prev = make_inputs(net, len(blocks))

    with pytest.raises(ValueError, match=message):
        batched_denoising_mse(net, blocks, x, net.embedding(labels), z_prev)


def test_batched_rejects_bad_image_shape():
    net = make_net()
    x, labels, z_prev = make_inputs(net, 1)

    with pytest.raises(ValueError, match=r"x has shape \(8, 3, 28, 28\)"):
        batched_denoising_mse(
            net, [1], x.expand(-1, 3, -1, -1), net.embedding(labels), z_prev
        )


def test_batched_rejects_bad_target_shape():
    net = make_net()
    x, labels, z_prev = make_inputs(net, 1)
    u_y = net.embedding(labels)[:4]  # (4, d) for a batch of 8

    with pytest.raises(
        ValueError, match=r"u_y has shape \(4, 10\); expected \(8, 10\)"
    ):
        batched_denoising_mse(net, [1], x, u_y, z_prev)


def test_batched_rejects_mixed_train_and_eval_blocks():
    net = make_net()
    net.blocks[1].eval()
    x, labels, z_prev = make_inputs(net, 2)

    with pytest.raises(ValueError, match="invalid mix of train and eval mode"):
        batched_denoising_mse(net, [1, 2], x, net.embedding(labels), z_prev)


# --- the trainer's --batched-blocks option ---


def test_train_config_rejects_batched_blocks_outside_dt():
    with pytest.raises(TrainingError, match="apply to variant 'dt' only, not 'fm'"):
        TrainConfig(variant="fm", batched_blocks=True)


def test_trainer_with_batched_blocks_learns_real_mnist(data_root: Path, tmp_path: Path):
    config = TrainConfig(
        num_steps=3,
        epochs=1,
        lr=5e-3,
        batched_blocks=True,
        train_subset=640,
        test_subset=200,
        train_eval_size=200,
    )
    trainer = Trainer(config, tmp_path, data_root)

    row = trainer.run()

    assert row["test_accuracy"] > 0.3  # 10 classes: chance is 0.1
    checkpoint = load_checkpoint(trainer.checkpoint_path)
    assert checkpoint["train_config"]["batched_blocks"] is True
    assert all(row[f"block_{t}_mse"] > 0 for t in (1, 2, 3))

    # Batching changes the computation, not the model, so a resume may drop it.
    resumed = Trainer.from_checkpoint(
        trainer.checkpoint_path, data_root=data_root, epochs=2, batched_blocks=False
    )
    assert resumed.config.batched_blocks is False
    assert resumed.run()["epoch"] == 2
