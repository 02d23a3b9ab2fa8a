"""Both twins' loaders hand the same pixels and labels in the same order: .rec vs TFRecord, epoch and stream
samplers, the torch DataLoader (worker processes) vs tf.data (the native TFRecord stream included)."""
import os

import numpy as np
import pytest

import twinface_tf.data as tf_data
import twinface_torch.data as torch_data
from twinface.data import convert
from twinface.data.dataset import open_dataset
from twinface.data.sampler import EpochSampler, StreamSampler
from twinface.testing import tiny_dataset


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    rec = os.path.join(tiny_dataset(tmp_path_factory.mktemp("tiny")), "train")
    tfr = str(tmp_path_factory.mktemp("tfr") / "set")
    convert.rec_to_tfrecord(rec, tfr, shards=3, progress=False)
    return open_dataset(rec + ".rec"), open_dataset(tfr)


def _epoch(batches):
    out = list(batches)
    return np.concatenate([b[0] for b in out]), np.concatenate([b[1] for b in out])


@pytest.mark.parametrize("kind", ["epoch", "stream"])
def test_twins_load_the_same_samples_in_the_same_order(parity, sets, kind):
    rec, tfr = sets
    sampler = (EpochSampler(len(tfr), 8, seed=5) if kind == "epoch" else StreamSampler(tfr.shard_of, 8, 10, seed=5))
    torch_images, torch_labels = _epoch(torch_data.batches(tfr, sampler, 2, 1, num_workers=2, size=32))
    tf_images, tf_labels = _epoch(tf_data.batches(tfr, sampler, 2, 1, num_workers=2, size=32))
    rec_images, rec_labels = _epoch(tf_data.batches(rec, sampler, 2, 1, num_workers=2, size=32))
    assert len(torch_labels) == 8 * (sampler.steps_per_epoch() - 1)
    assert np.array_equal(torch_labels, tf_labels) and np.array_equal(torch_labels, rec_labels)
    parity.check(f"data: TFRecord {kind} sampler, torch DataLoader vs tf.data pixels (epoch 2 from step 1)",
                 torch_images.astype(np.int16), tf_images.astype(np.int16), 0)
    parity.check(f"data: TFRecord vs .rec pixels, {kind} sampler order", tf_images.astype(np.int16),
                 rec_images.astype(np.int16), 0)
