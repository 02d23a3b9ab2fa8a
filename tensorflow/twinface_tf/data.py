"""tf.data pipeline over the common readers, in the order the shared EpochSampler dictates."""
import numpy as np
import tensorflow as tf

from twinface.data.batches import load_sample


def batches(dataset, sampler, epoch: int, start_step: int = 0, num_workers: int = 2, size: int = None):
    """Yield (images uint8 [B, S, S, 3], labels int64 [B]) for one epoch, decoded (and resized to `size`) by
    `num_workers` threads.

    The map is deterministic, so batches come out exactly as the sampler ordered them (as the torch twin's).
    """
    steps = list(sampler.batches(epoch, start_step))
    if not steps:
        return
    indices = np.concatenate([i for i, _ in steps])
    flips = np.concatenate([f for _, f in steps])

    def load(index, flip):
        image, label = load_sample(dataset, int(index), bool(flip), size)
        return image, np.int64(label)

    def load_tf(index, flip):
        image, label = tf.numpy_function(load, [index, flip], [tf.uint8, tf.int64])
        image.set_shape([None, None, 3])
        label.set_shape([])
        return image, label

    pipeline = (tf.data.Dataset.from_tensor_slices((indices, flips))
                .map(load_tf, num_parallel_calls=max(1, num_workers), deterministic=True)
                .batch(sampler.batch_size, drop_remainder=False)
                .prefetch(2))
    for images, labels in pipeline.as_numpy_iterator():
        yield images, labels
