"""The triplet loss against its float64 definition, and in training: batches without a triplet are skipped."""
import numpy as np
import pytest
import tensorflow as tf

from twinface_tf.losses import TripletLoss, pairwise_distances, triplet_loss
from twinface_tf.train import TFTwin as Twin

from twinface.registry import TRIPLET_MINING
from twinface.testing import check_triplet_batches_without_triplets_are_skipped, tiny_dataset, triplet_reference


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("mining", TRIPLET_MINING)
def test_triplet_loss_matches_its_definition(mining, squared):
    rng = np.random.default_rng(11)
    emb, labels = rng.normal(size=(10, 6)), np.array([0, 0, 0, 1, 1, 2, 2, 2, 3, 4])
    loss, valid = TripletLoss(0.5, mining, squared)(tf.constant(emb, tf.float32), tf.constant(labels))
    ref_loss, ref_valid = triplet_reference(emb, labels, 0.5, mining, squared)
    assert int(valid) == ref_valid > 0 and float(loss) == pytest.approx(ref_loss, rel=1e-5)


def test_hard_mining_ties_go_to_the_lowest_index():
    """The torch twin's test: rows 1 and 2 are the same image twice, anchor 0 must take index 1."""
    x = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [-1.0, 0.2]], np.float32)
    labels = tf.constant([0, 0, 0, 1])
    emb, chosen = tf.Variable(x), tf.Variable(x)
    with tf.GradientTape() as tape:
        loss = triplet_loss(emb, labels, 1.0, "batch_hard")[0]
    got = tape.gradient(loss, emb).numpy()
    with tf.GradientTape() as tape:
        d = pairwise_distances(chosen)
        terms = [d[0, 1] - d[0, 3], d[1, 0] - d[1, 3], d[2, 0] - d[2, 3]]
        expected = tf.add_n([tf.nn.relu(t + 1.0) for t in terms]) / 3
    assert float(d[0, 1]) == float(d[0, 2])
    np.testing.assert_allclose(got, tape.gradient(expected, chosen).numpy(), rtol=0, atol=1e-7)
    assert not np.allclose(got[1], got[2])


def test_unknown_mining_is_refused():
    with pytest.raises(ValueError, match="mining must be one of"):
        triplet_loss(tf.zeros((2, 2)), tf.constant([0, 1]), mining="hardest")


def test_batches_without_triplets_are_skipped_and_counted(tmp_path):
    def weights(twin):
        return {v.path: v.numpy() for v in twin.backbone.variables}
    check_triplet_batches_without_triplets_are_skipped(Twin, weights, tiny_dataset(tmp_path / "synth"), tmp_path)
