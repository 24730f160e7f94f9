import pytest
import torch

from training import checkpoint as checkpoint_module
from training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def minimal_contents() -> dict:
    return {
        "model_config": {"num_steps": 2},
        "dataset": {"name": "mnist"},
        "model_state": {"weight": torch.arange(6.0).view(2, 3)},
        "history": [{"epoch": 1, "test_accuracy": 0.5}],
    }


def test_round_trip_keeps_tensors_and_values(tmp_path):
    path = save_checkpoint(tmp_path / "run" / "checkpoint.pt", minimal_contents())

    loaded = load_checkpoint(path)

    torch.testing.assert_close(
        loaded["model_state"]["weight"], torch.arange(6.0).view(2, 3)
    )
    assert loaded["history"] == [{"epoch": 1, "test_accuracy": 0.5}]
    assert loaded["versions"]["torch"] == str(torch.__version__)
    assert loaded["format"] == "noprop-checkpoint"


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "checkpoint.pt", minimal_contents())
    before = path.read_bytes()

    def crash(payload, file):
        file.write(b"partial data")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, minimal_contents())

    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint .*absent.pt not found"):
        load_checkpoint(tmp_path / "absent.pt")


def test_truncated_checkpoint_is_rejected(tmp_path):
    path = save_checkpoint(tmp_path / "checkpoint.pt", minimal_contents())
    path.write_bytes(path.read_bytes()[:300])

    with pytest.raises(CheckpointError, match="is truncated or corrupt"):
        load_checkpoint(path)


def test_foreign_torch_file_is_rejected(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)

    with pytest.raises(CheckpointError, match="is not a NoProp checkpoint"):
        load_checkpoint(path)


class Payload:
    """A class a malicious pickle could name; loading must never construct it."""


def test_pickled_objects_are_not_loaded(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "noprop-checkpoint", "object": Payload()}, path)

    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint(path)


def test_incomplete_checkpoint_lists_missing_keys(tmp_path):
    contents = minimal_contents()
    del contents["model_state"]
    path = save_checkpoint(tmp_path / "checkpoint.pt", contents)

    with pytest.raises(CheckpointError, match="it lacks model_state"):
        load_checkpoint(path)
