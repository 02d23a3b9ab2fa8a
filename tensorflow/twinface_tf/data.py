"""tf.data pipelines over the common data sets, in the order the shared sampler dictates.

Random access (image folders, .rec, TFRecord through its index) maps the common reader over the sampler's
indices. A TFRecord data set under data.sampler stream is read natively instead: tf.data interleaves the
rank's shards, parses the Examples and window-shuffles them exactly as StreamSampler.plan says, so the torch
twin (reading the same order through the index) sees the same samples.
"""
import numpy as np
import tensorflow as tf

from twinface.data.batches import finish_sample, load_sample
from twinface.data.dataset import TFRecordDataset, face_crop
from twinface.data.images import DamagedDataError, UnusableImageError
from twinface.data.sampler import StreamSampler
from twinface.data.tfrecord import INDEX, TFRecordError

FEATURES = {"image/encoded": tf.io.FixedLenFeature([], tf.string),
            "image/class/label": tf.io.FixedLenFeature([], tf.int64)}


def batches(dataset, sampler, epoch: int, start_step: int = 0, num_workers: int = 2, size: int = None,
            deterministic: bool = True):
    """Yield (images uint8 [B, S, S, 3], labels int64 [B]) for one epoch, decoded (and resized to `size`) by
    `num_workers` threads. Deterministic maps keep the sampler's order (as the torch twin's); `deterministic`
    False lets the native TFRecord reader hand out whatever is ready first (faster, not reproducible)."""
    if isinstance(sampler, StreamSampler) and isinstance(dataset, TFRecordDataset) and dataset.damaged == "fail":
        yield from _stream(dataset, sampler, epoch, start_step, num_workers, size, deterministic)
        return
    steps = list(sampler.batches(epoch, start_step))
    if not steps:
        return
    indices = np.concatenate([i for i, _ in steps])
    flips = np.concatenate([f for _, f in steps])

    def load(index, flip):
        return _stacked(load_sample(dataset, int(i), bool(f), size) for i, f in zip(index, flip))

    raised = []
    keys = tf.data.Dataset.from_tensor_slices((indices, flips)).batch(sampler.batch_size)
    yield from _decoded(keys.map(lambda i, f: _numpy(load, [i, f], raised), num_parallel_calls=max(1, num_workers),
                                 deterministic=True), raised)


def _stacked(samples):
    samples = list(samples)
    return np.stack([s[0] for s in samples]), np.array([s[1] for s in samples], np.int64)


def _numpy(fn, args, raised: list):
    """fn, which loads a whole batch (one Python call per batch, not per image), in a numpy_function; a
    DamagedDataError it raises is kept in `raised` (tf.data would turn it into an anonymous
    InvalidArgumentError) for _decoded to raise as itself."""
    def call(*a):
        try:
            return fn(*a)
        except DamagedDataError as err:
            raised.append(err)
            raise

    images, labels = tf.numpy_function(call, args, [tf.uint8, tf.int64])
    images.set_shape([None, None, None, 3])
    labels.set_shape([None])
    return images, labels


def _decoded(batches, raised: list):
    try:
        yield from batches.prefetch(2).as_numpy_iterator()
    except tf.errors.OpError:
        if raised:
            raise raised[0] from None
        raise


def _stream(dataset, sampler, epoch, start_step, num_workers, size, deterministic):
    shards, stream, perms, _ = sampler.plan(epoch)
    order, flips = sampler.epoch_order(epoch)
    first, end = start_step * sampler.batch_size, len(order)
    if first >= end:
        return
    window = min(sampler.window, len(stream))
    table = np.zeros((len(perms), window), np.int32)           # window k's permutation in its first len(p) cells
    for k, p in enumerate(perms):
        table[k, :len(p)] = p
    table = tf.constant(table)
    files = [dataset.set.shards[s] for s in shards]
    records = (tf.data.Dataset.from_tensor_slices(files)
               .interleave(tf.data.TFRecordDataset, cycle_length=len(files), block_length=1,
                           num_parallel_calls=len(files), deterministic=deterministic)
               .batch(window).enumerate()
               .map(lambda k, w: tf.gather(w, table[tf.cast(k, tf.int32), :tf.shape(w)[0]]))
               .unbatch().take(end).skip(first))
    parsed = records.map(lambda r: tf.io.parse_single_example(r, FEATURES), num_parallel_calls=max(1, num_workers),
                         deterministic=deterministic)

    def load(data, labels, indices, flips):
        """The records' own bytes; an unusable image is replaced as load_sample replaces it."""
        return _stacked(one(*sample) for sample in zip(data, labels, indices, flips))

    def one(data, label, index, flip):
        index, label = int(index), int(label)
        if deterministic and label != dataset.labels[index]:
            raise TFRecordError(*dataset.set.where(index), f"the stream read label {label} where {INDEX} has "
                                f"{dataset.labels[index]} (the index does not describe this shard: stale?)")
        try:
            return finish_sample(face_crop(data, dataset.source(index)), bool(flip), size), label
        except UnusableImageError:
            return load_sample(dataset, index, bool(flip), size)

    raised = []
    keys = tf.data.Dataset.from_tensor_slices((order[first:], flips[first:]))
    samples = tf.data.Dataset.zip(parsed, keys).batch(sampler.batch_size).map(
        lambda ex, key: _numpy(load, [ex["image/encoded"], ex["image/class/label"], key[0], key[1]], raised),
        num_parallel_calls=max(1, num_workers), deterministic=deterministic)
    try:
        yield from _decoded(samples, raised)
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError, TFRecordError) as err:
        # a label mismatch too: TensorFlow's reader, failing on a damaged record, has once in ~40 runs here
        # handed on the records after it instead of the error; the damaged record is the news then
        _locate(dataset, stream, err)


def _locate(dataset, stream, err):
    """TensorFlow's message names neither shard nor record: find the damaged record with the common reader
    (which raises the TFRecordError naming shard, record and byte offset) among all the rank's records, as
    the native reader reads (and checks) them all, the epoch's unused tail and a resumed epoch's head too."""
    for index in stream:
        dataset.set.read(int(index))
    raise err
