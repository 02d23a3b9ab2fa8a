"""TFRecord in the TF twin: TensorFlow reads what twinface writes and vice versa; the native stream reader
follows StreamSampler's order exactly; damage is named by shard, record and byte offset."""
import logging
import os
import subprocess

import numpy as np
import pytest
import tensorflow as tf

from twinface.data import convert, tfrecord
from twinface.data.batches import load_sample
from twinface.data.dataset import open_dataset
from twinface.data.images import encode_image
from twinface.data.sampler import EpochSampler, StreamSampler
from twinface.testing import tiny_dataset
from twinface_tf import data


@pytest.fixture(scope="module")
def tfr(tmp_path_factory):
    rec = os.path.join(tiny_dataset(tmp_path_factory.mktemp("tiny")), "train")
    dst = str(tmp_path_factory.mktemp("tfr") / "set")
    convert.rec_to_tfrecord(rec, dst, shards=5, progress=False)     # 36 records: shards of 8, 7, 7, 7, 7
    return dst


def test_tensorflow_parses_our_records(tfr):
    records = tfrecord.TFRecordSet(tfr)
    spec = {**data.FEATURES, "image/format": tf.io.FixedLenFeature([], tf.string),
            "image/height": tf.io.FixedLenFeature([], tf.int64), "image/width": tf.io.FixedLenFeature([], tf.int64)}
    seen = 0
    for s, shard in enumerate(records.shards):
        mine = np.flatnonzero(records.shard == s)
        for i, raw in zip(mine, tf.data.TFRecordDataset(shard)):
            ex = tf.io.parse_single_example(raw, spec)
            assert ex["image/encoded"].numpy() == records.read(int(i))[0]
            assert int(ex["image/class/label"]) == records.labels[i]
            assert (ex["image/format"].numpy(), int(ex["image/height"]), int(ex["image/width"])) == (b"jpeg", 112, 112)
            seen += 1
    assert seen == len(records) == 36


def test_landmarks_are_a_float_list_tensorflow_reads(tmp_path):
    points = np.arange(10, dtype=np.float32) * 1.5
    with tfrecord.TFRecordWriter(tmp_path / "lm", 1, "test", overwrite=False) as w:
        w.write(encode_image(np.zeros((4, 4, 3), np.uint8), ".png"), 0, (4, 4), "png", landmarks=points)
    (raw,) = list(tf.data.TFRecordDataset(str(tmp_path / "lm" / tfrecord.shard_names(1)[0])))
    ex = tf.io.parse_single_example(raw, {"image/landmarks": tf.io.FixedLenFeature([10], tf.float32)})
    assert np.array_equal(ex["image/landmarks"].numpy(), points)


def test_our_reader_reads_what_tensorflow_writes(tmp_path):
    os.makedirs(tmp_path / "tfw")
    rng = np.random.default_rng(0)
    images = [encode_image(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in range(5)]
    with tf.io.TFRecordWriter(str(tmp_path / "tfw" / "faces.tfrecord")) as w:
        for k, image in enumerate(images):
            ex = tf.train.Example(features=tf.train.Features(feature={
                "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
                "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[k % 2]))}))
            w.write(ex.SerializeToString())
    dataset = open_dataset(tmp_path / "tfw")
    assert dataset.labels.tolist() == [0, 1, 0, 1, 0]
    assert [dataset.encoded(i) for i in range(5)] == images


def _expected(dataset, sampler, epoch, start_step, size):
    for idx, flips in sampler.batches(epoch, start_step):
        samples = [load_sample(dataset, int(i), bool(f), size) for i, f in zip(idx, flips)]
        yield np.stack([s[0] for s in samples]), np.array([s[1] for s in samples])


@pytest.mark.parametrize("rank, world, window, start", [(0, 1, 5, 0), (0, 1, 64, 2), (1, 2, 4, 1)])
def test_the_native_stream_follows_the_stream_sampler(tfr, rank, world, window, start, monkeypatch):
    dataset = open_dataset(tfr)
    sampler = StreamSampler(dataset.shard_of, 4, window, seed=7, rank=rank, world_size=world)
    want = list(_expected(dataset, sampler, 1, start, 32))

    def not_the_native_path(i):
        raise AssertionError("the TFRecord stream went through the common reader")

    monkeypatch.setattr(dataset.set, "read", not_the_native_path)
    got = list(data.batches(dataset, sampler, 1, start, num_workers=2, size=32))
    assert len(got) == len(want) == sampler.steps_per_epoch() - start
    for (gi, gl), (wi, wl) in zip(got, want):
        assert np.array_equal(gl, wl) and np.array_equal(gi, wi)


def test_the_native_stream_without_determinism_still_reads_every_record_once(tfr):
    dataset = open_dataset(tfr)
    sampler = StreamSampler(dataset.shard_of, 4, 36, seed=0, flip=False)   # one window: all 36 records
    images = np.concatenate([im for im, _ in data.batches(dataset, sampler, 0, deterministic=False)])
    digest = sorted(hash(im.tobytes()) for im in images)
    assert digest == sorted(hash(dataset.image(i).tobytes()) for i in range(36))


def _damaged_copy(tfr, tmp_path, record):
    dst = tmp_path / "damaged"
    subprocess.run(["cp", "-r", tfr, dst], check=True)
    shard, k, offset = tfrecord.TFRecordSet(dst).where(record)
    raw = bytearray(open(shard, "rb").read())
    raw[offset + 12 + 30] ^= 0xFF
    open(shard, "wb").write(bytes(raw))
    return dst, f"{shard}: record {k} at byte offset {offset}: data CRC"


@pytest.mark.parametrize("kind", ["stream", "epoch"])
def test_a_damaged_record_is_named_by_either_tf_reader(tfr, tmp_path, kind):
    dst, says = _damaged_copy(tfr, tmp_path, 7)
    dataset = open_dataset(dst)
    sampler = (StreamSampler(dataset.shard_of, 4, 8, seed=0) if kind == "stream"
               else EpochSampler(len(dataset), 4, seed=0))
    with pytest.raises(tfrecord.TFRecordError, match=says):
        list(data.batches(dataset, sampler, 0))


def test_skipping_damaged_records_replaces_them_and_says_so(tfr, tmp_path, caplog):
    dst, says = _damaged_copy(tfr, tmp_path, 7)
    skipping = open_dataset(dst, damaged="skip")
    sampler = StreamSampler(skipping.shard_of, 4, 8, seed=0)
    with caplog.at_level(logging.WARNING, "twinface.data"):
        got = list(data.batches(skipping, sampler, 0))
    assert "skipped an unusable image" in caplog.text and says in caplog.text
    want = list(_expected(skipping, sampler, 0, 0, None))
    assert all(np.array_equal(g[1], w[1]) and np.array_equal(g[0], w[0]) for g, w in zip(got, want))
    assert 7 in np.concatenate([idx for idx, _ in sampler.batches(0)])       # the damaged record was due
