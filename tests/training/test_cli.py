import pytest

from training.cli import build_parser, main
from training.evaluation import load_trained_model

TINY_ARGS = [
    "--epochs", "1", "--steps", "2", "--batch-size", "64", "--train-subset", "256",
    "--test-subset", "100", "--train-eval-size", "100",
]  # fmt: skip


def test_help_gives_units_and_defaults():
    text = build_parser().format_help()

    assert "passes over the training set" in text
    assert "(default: 128)" in text
    assert "NOPROP_DATA_ROOT" in text
    assert "AdamW learning rate (default: 0.001)" in text


def test_cifar100_trains_end_to_end(cifar100_root, tmp_path, capsys):
    args = ["--dataset", "cifar100", "--data-root", str(cifar100_root)]

    code = main([*args, *TINY_ARGS, "-o", str(tmp_path)])

    assert code == 0
    assert "test accuracy" in capsys.readouterr().out
    trained = load_trained_model(tmp_path / "checkpoint.pt")
    assert len(trained.dataset.class_names) == 100
    assert trained.model.classifier.out_features == 100


def test_cifar10_learned_embedding_trains(data_root, tmp_path):
    args = [
        "--dataset",
        "cifar10",
        "--data-root",
        str(data_root),
        "--embedding",
        "learned",
    ]

    assert main([*args, *TINY_ARGS, "-o", str(tmp_path)]) == 0

    trained = load_trained_model(tmp_path / "checkpoint.pt")
    assert trained.dataset.class_names[3] == "cat"
    assert trained.model.embedding.weight.shape == (10, 20)


def test_resume_defaults_to_checkpoint_folder(data_root, tmp_path):
    args = ["--data-root", str(data_root)]
    assert main([*args, *TINY_ARGS, "-o", str(tmp_path)]) == 0

    code = main([*args, "--resume", str(tmp_path / "checkpoint.pt"), "--epochs", "2"])

    assert code == 0
    assert load_trained_model(tmp_path / "checkpoint.pt").checkpoint["epoch"] == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epochs", "0"], "epochs must be at least 1, got 0"),
        (["--data-root", "/nonexistent/data"], "/nonexistent/data is not a directory"),
        (
            ["--resume", "/nonexistent/run.pt"],
            "checkpoint /nonexistent/run.pt not found",
        ),
        (["--threads", "-2"], "--threads must be >= 0, got -2"),
    ],
)
def test_bad_options_fail_with_message(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        code = main([*args, "-o", str(tmp_path)])
        raise SystemExit(code)

    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_dataset_choice_fails(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--dataset", "imagenet"])

    assert exit_info.value.code == 2
    assert "invalid choice: 'imagenet'" in capsys.readouterr().err
