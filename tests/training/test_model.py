import pytest
import torch

from training.model import ModelConfig, NoPropNet, count_parameters

MNIST_SHAPE = (1, 28, 28)


def small_net(**overrides) -> NoPropNet:
    values = {"image_shape": MNIST_SHAPE, "num_classes": 10, "num_steps": 3}
    values.update(overrides)
    return NoPropNet(ModelConfig(**values)).eval()


def test_block_parameter_count_matches_paper():
    net = small_net(num_steps=1)

    assert count_parameters(net.blocks[0]) == 919_946


@pytest.mark.parametrize(
    ("embedding", "dim"), [("one-hot", 10), ("learned", 20), ("prototype", 784)]
)
def test_embedding_dimensions(embedding, dim):
    net = small_net(embedding=embedding)

    assert net.embedding.weight.shape == (10, dim)
    assert net.classifier.in_features == dim


def test_learned_embedding_starts_orthogonal():
    weight = small_net(embedding="learned").embedding.weight.detach()

    torch.testing.assert_close(weight @ weight.T, torch.eye(10), atol=1e-5, rtol=0)


def test_one_hot_embedding_is_fixed():
    net = small_net()

    assert "embedding.weight" not in dict(net.named_parameters())
    torch.testing.assert_close(net.embedding.weight, torch.eye(10))


def test_cifar_shapes_forward():
    net = small_net(image_shape=(3, 32, 32), num_classes=100)

    logits = net(torch.randn(4, 3, 32, 32))

    assert logits.shape == (4, 100)


def test_deterministic_forward_repeats():
    net = small_net()
    torch.nn.init.normal_(net.classifier.weight)
    x = torch.randn(5, *MNIST_SHAPE)

    with torch.no_grad():
        first, second = net(x), net(x)
        stochastic = net(x, deterministic=False)

    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert not torch.allclose(first, stochastic)


def test_deterministic_forward_follows_step_formula():
    net = small_net(num_steps=2)
    x = torch.randn(3, *MNIST_SHAPE)

    with torch.no_grad():
        z = torch.zeros(3, 10)
        for t in (1, 2):
            u_hat = torch.softmax(net.blocks[t - 1](x, z), 1) @ torch.eye(10)
            z = net.step_a[t - 1] * u_hat + net.step_b[t - 1] * z
        expected = net.classifier(z)
        torch.testing.assert_close(net(x), expected)


def test_prototype_is_image_closest_to_class():
    net = small_net(embedding="prototype", num_classes=2)
    images = torch.zeros(5, *MNIST_SHAPE)
    images[0].fill_(1.0)  # class 0: values 1, 2 and 3 -> 2 is central
    images[1].fill_(2.0)
    images[2].fill_(3.0)
    images[3].fill_(-1.0)  # class 1: -1 and -4 -> tie broken by order
    images[4].fill_(-4.0)
    labels = torch.tensor([0, 0, 0, 1, 1])

    net.embedding.initialize_prototypes(images, labels)

    assert torch.all(net.embedding.weight[0] == 2.0)
    assert torch.all(net.embedding.weight[1] == -1.0)


def test_backprop_variant_has_mix_weights():
    net = small_net(variant="backprop")

    assert net.mix_weight.shape == (3,)
    assert torch.tanh(net.mix_weight).detach().sub(0.5).abs().max() < 1e-3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"variant": "vae"}, "invalid variant 'vae'"),
        ({"solver": "rk4"}, "invalid solver 'rk4'"),
        ({"embedding": "random"}, "invalid embedding 'random'"),
        ({"num_steps": 0}, "num_steps must be at least 1, got 0"),
        ({"num_classes": 1}, "num_classes must be at least 2, got 1"),
        ({"dropout": 1.0}, r"dropout must lie in \[0, 1\), got 1.0"),
        ({"image_shape": (1, 8, 8)}, r"image_shape \(1, 8, 8\) is too small"),
    ],
)
def test_model_config_rejects_bad_values(overrides, message):
    values = {"image_shape": MNIST_SHAPE, "num_classes": 10, **overrides}

    with pytest.raises(ValueError, match=message):
        ModelConfig(**values)
