"""Sub-center ArcFace and AdaFace in the TF twin: against numpy formulas, their state in training and conversion."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from twinface.testing import (SUBCENTRE_TARGETS, adaface_reference, check_resume_matches_uninterrupted,  # noqa: E402
                              head_test_batch, subcentre_reference, tiny_config, tiny_dataset)
from twinface_convert.mapping import keras_to_torch, torch_to_keras  # noqa: E402
from twinface_tf.heads import AdaFace, MarginHead, get_head  # noqa: E402
from twinface_tf.train import TFTwin  # noqa: E402

N, D, C, K = 6, 16, 5, 3


def _batch(seed=0):
    return head_test_batch(seed, N, D)


@pytest.mark.parametrize("name", sorted(SUBCENTRE_TARGETS))
def test_subcentre_logits_are_the_margin_on_each_class_best_subcentre(name):
    emb, labels = _batch()
    head = get_head(name, D, C, subcenters=K)
    head.build((None, D))
    assert tuple(head.weight.shape) == (C * K, D) and head.get_config()["subcenters"] == K
    expected = subcentre_reference(emb, head.weight.numpy(), labels, K, name)
    np.testing.assert_allclose(head(emb, labels).numpy(), expected, rtol=1e-5, atol=1e-4)


def test_the_layout_is_class_major():
    head = MarginHead(D, C, s=1.0, subcenters=K)
    weight = np.random.default_rng(0).normal(0, 1e-3, (C * K, D)).astype(np.float32)
    weight[3 * K + 2] = np.eye(D)[0]
    head.weight.assign(weight)
    logits = head(np.eye(D, dtype=np.float32)[:1] * 2, np.array([-1])).numpy()
    assert int(logits.argmax()) == 3 and float(logits[0, 3]) == pytest.approx(1.0)


def test_adaface_matches_the_official_formula_over_three_training_calls_then_eval():
    head = get_head("adaface", D, C)
    assert (float(head.batch_mean[0]), float(head.batch_std[0])) == (20.0, 100.0)
    weight = head.weight.numpy()
    mean, std = 20.0, 100.0
    step = tf.function(lambda e, y: head(e, y))                      # as in training: inside a graph
    for call in range(3):
        emb, labels = _batch(call)
        emb *= np.linspace(0.5, 30, N, dtype=np.float32)[:, None]
        labels[0] = -1
        got = step(tf.constant(emb), tf.constant(labels)).numpy()
        expected, mean, std = adaface_reference(emb, weight, labels, mean, std)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=64 * 1e-6)
        np.testing.assert_allclose([float(head.batch_mean[0]), float(head.batch_std[0])], [mean, std], rtol=1e-6)
    got = head(emb, labels, training=False).numpy()
    expected, _, _ = adaface_reference(emb, weight, labels, mean, std, training=False)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=64 * 1e-6)
    assert float(head.batch_mean[0]) == pytest.approx(mean, rel=1e-6)


def test_adaface_ema_round_trips_through_the_converter():
    head = AdaFace(D, C)
    head(*_batch())                                                   # moves the EMA off its start
    state = keras_to_torch(head)
    assert set(state) == {"weight", "batch_mean", "batch_std"}
    assert state["batch_mean"].shape == (1,) and state["batch_mean"][0] != 20.0
    other = AdaFace(D, C)
    torch_to_keras(state, other, source="adaface head")
    for name in ("weight", "batch_mean", "batch_std"):
        np.testing.assert_array_equal(getattr(other, name).numpy(), state[name])
    import torch
    from twinface_torch.heads import AdaFace as TorchAdaFace
    torch_head = TorchAdaFace(D, C)
    torch_head.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    assert float(torch_head.batch_std) == pytest.approx(float(state["batch_std"][0]))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("synth"))


def test_a_skipped_step_restores_adaface_s_norm_ema(data, tmp_path):
    twin = TFTwin()
    twin.build(tiny_config(data, tmp_path, head={"type": "adaface"}), 6)
    images = np.random.default_rng(0).integers(0, 255, (8, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(8) % 6
    twin.train_step(images, labels, 0.1, 0.1)
    before = [v.numpy().copy() for v in twin.head.non_trainable_variables]
    assert len(before) == 2 and before[0][0] != 20.0
    twin.backbone.trainable_variables[0].assign(tf.fill(twin.backbone.trainable_variables[0].shape, np.nan))
    assert np.isnan(twin.train_step(images, labels, 0.1, 0.1))
    for old, now in zip(before, twin.head.non_trainable_variables):
        np.testing.assert_array_equal(old, now.numpy())


def test_resume_restores_adaface_s_ema(data, tmp_path):
    def weights(twin):
        out = {v.path: v.numpy().copy() for v in twin.backbone.weights}
        out.update({f"head/{v.name}": v.numpy().copy() for v in twin.head.weights})
        assert out["head/batch_mean"][0] != 20.0
        return out

    def step(run):
        import json
        with np.load(run / "state.npz") as saved:
            return json.loads(str(saved["meta"]))["step"]
    check_resume_matches_uninterrupted(TFTwin, weights, step, data, tmp_path, head={"type": "adaface"})


def test_drop_noisy_cli_on_a_tf_run(data, tmp_path, capsys):
    from twinface.testing import check_drop_noisy
    check_drop_noisy(TFTwin, lambda twin: twin.head.weight.numpy(), data, tmp_path, capsys)
