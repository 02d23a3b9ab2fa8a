"""The torch twin through the shared training loop: outputs, resume after a kill, NaN guard rails."""
import pytest
import torch

from twinface.testing import (check_nan_guard, check_resume_matches_uninterrupted, check_training_outputs, run_tiny,
                              tiny_dataset)
from twinface_torch.backbones import get_model
from twinface_torch.train import TorchTwin


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("synth"))


def _weights_of_model(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _weights(twin):
    return _weights_of_model(twin.backbone)


def _reloaded(path):
    # arcface_torch's format: a plain state_dict that loads strictly into a fresh model
    model = get_model("mbf", num_features=32, input_size=32)
    model.load_state_dict(torch.load(path, weights_only=True), strict=True)
    return _weights_of_model(model)


def test_training_writes_every_output(data, tmp_path):
    check_training_outputs(TorchTwin, "backbone.pth", "state.pt", _reloaded, _weights, data, tmp_path)


def test_resume_after_a_kill_ends_like_an_uninterrupted_run(data, tmp_path):
    check_resume_matches_uninterrupted(
        TorchTwin, _weights, lambda run: torch.load(run / "state.pt", weights_only=True)["meta"]["step"],
        data, tmp_path)


def test_nan_loss_skips_updates_and_stops_without_writing_nan_weights(data, tmp_path):
    def poison(twin):
        with torch.no_grad():
            twin.head.weight[0, 0] = float("nan")

    def finite(run):
        return all(torch.isfinite(v.float()).all() for v in torch.load(run / "backbone.pth", weights_only=True).values())
    check_nan_guard(TorchTwin, poison, finite, data, tmp_path)


def test_resume_without_a_checkpoint_is_a_clear_error(data, tmp_path):
    with pytest.raises(FileNotFoundError, match="no training state at .*state.pt"):
        run_tiny(TorchTwin, data, tmp_path / "empty", resume=True)
