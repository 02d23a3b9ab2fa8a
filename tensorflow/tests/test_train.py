"""The TF twin through the shared training loop: outputs, resume after a kill, NaN guard rails."""
import json

import numpy as np
import pytest

from twinface.testing import (check_densenet_trains, check_fp16_overflow_backs_off, check_nan_guard,
                              check_resnext_trains_with_checkpointing, check_resume_matches_uninterrupted,
                              check_tfrecord_trains_like_rec, check_training_outputs, check_truncated_state_is_named,
                              release_memory, tiny_dataset)
from twinface_tf.backbones import get_model
from twinface_tf.train import TFTwin


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("synth"))


@pytest.fixture(autouse=True)
def _release_memory():
    """Each training builds and exports a model; hand the memory back so the room keeps one test's footprint (a
    conftest.py here would shadow the tensorflow package under --import-mode=importlib)."""
    yield
    release_memory()


def _weights_of_model(model):
    return {v.path: v.numpy().copy() for v in model.variables}


def _weights(twin):
    return _weights_of_model(twin.backbone)


def _reloaded(path):
    # plain Keras weights: model.load_weights reads them into a fresh model
    model = get_model("mbf", num_features=32, input_size=32)
    model.load_weights(str(path))
    return _weights_of_model(model)


def test_training_from_tfrecord_equals_training_from_rec(data, tmp_path):
    check_tfrecord_trains_like_rec(TFTwin, _weights, data, tmp_path)


def test_training_writes_every_output(data, tmp_path):
    check_training_outputs(TFTwin, "backbone.weights.h5", "state.npz", _reloaded, _weights, data, tmp_path)


def _state_step(run):
    with np.load(run / "state.npz") as state:
        return json.loads(str(state["meta"]))["step"]


def test_resume_after_a_kill_ends_like_an_uninterrupted_run(data, tmp_path):
    check_resume_matches_uninterrupted(TFTwin, _weights, _state_step, data, tmp_path)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_nan_loss_skips_updates_and_stops_without_writing_nan_weights(data, tmp_path, precision):
    def poison(twin):
        weight = twin.head.weight.numpy()
        weight[0, 0] = np.nan
        twin.head.weight.assign(weight)

    def finite(run):
        model = get_model("mbf", num_features=32, input_size=32)
        model.load_weights(str(run / "backbone.weights.h5"))
        return all(np.isfinite(v.numpy()).all() for v in model.weights)
    check_nan_guard(TFTwin, poison, finite, data, tmp_path, precision)


def test_fp16_overflow_is_skipped_backs_off_and_the_run_goes_on(data, tmp_path):
    check_fp16_overflow_backs_off(TFTwin, lambda run: float(np.load(run / "state.npz")["loss_scale/0000"]), data, tmp_path)


def test_truncated_state_is_an_error_naming_the_file(data, tmp_path):
    check_truncated_state_is_named(TFTwin, "state.npz", data, tmp_path)


def test_resnext_trains_with_checkpointing(data, tmp_path):
    check_resnext_trains_with_checkpointing(TFTwin, data, tmp_path)


def test_densenet_trains(data, tmp_path):
    check_densenet_trains(TFTwin, data, tmp_path)
