"""Partial FC v2 (arcface_torch's partial_fc_v2): class centres sharded over workers, a sampled subset of them
per step, the margin of a MarginHead, and a cross-entropy whose softmax spans every worker's logits. The torch
twin's twinface_torch.partial_fc, the same math.

Which centres a worker holds and samples is decided in twinface.partial_fc (numpy), identically in both twins.
Called as `loss = head(embeddings, labels)` inside the worker's replica: the loss of the global batch, the same
value on every worker.
"""
import keras
import tensorflow as tf

from twinface import partial_fc as plan

from . import distributed as dist
from .heads import MarginRule, check_batch, l2_normalize


class PartialFC(keras.layers.Layer, MarginRule):
    def __init__(self, embedding_size, num_classes, sample_rate=1.0, rank=0, world_size=1, seed=0, s=64.0, m1=1.0,
                 m2=0.0, m3=0.0, interclass_filtering_threshold=0.0, gradient="straight_through", easy_margin=False,
                 **kwargs):
        super().__init__(**{"dtype": "float32", **kwargs})
        self._set_margin(s, m1, m2, m3, interclass_filtering_threshold, gradient, easy_margin)
        self.embedding_size, self.num_classes, self.sample_rate = embedding_size, num_classes, float(sample_rate)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.class_start, self.num_local = plan.shard(num_classes, world_size, rank)
        centres = plan.init_centres(seed, self.class_start, self.num_local, embedding_size)
        self.weight = self.add_weight(shape=centres.shape, name="weight",
                                      initializer=keras.initializers.Constant(centres))
        # steps trained: seeds the negatives' draw (set from the checkpoint on resume); not a saved weight
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="pfc_step")
        self.last_index = tf.Variable(tf.zeros([0], tf.int64), shape=[None], trainable=False, name="pfc_index")

    def _select(self, labels):
        def select(labels, step):
            return plan.select(labels, self.class_start, self.num_local, self.sample_rate, self.seed, int(step),
                               self.rank)
        index, local = tf.numpy_function(select, [labels, self.step], [tf.int64, tf.int64])
        self.step.assign_add(1)
        self.last_index.assign(index)                     # centres sampled at the last call (tests, the bench)
        return tf.ensure_shape(index, [None]), tf.ensure_shape(local, labels.shape)

    def call(self, embeddings, labels):
        embeddings = tf.cast(embeddings, "float32")
        labels = tf.cast(check_batch("PartialFC", embeddings, labels, self.embedding_size, self.num_classes),
                         tf.int64)
        embeddings = dist.gather(embeddings)
        index, local = self._select(dist.gather_labels(labels))
        centres = self.weight if self.sample_rate >= 1.0 else tf.gather(self.weight, index)
        cos = tf.clip_by_value(tf.matmul(l2_normalize(embeddings), l2_normalize(centres), transpose_b=True),
                               -1.0, 1.0)
        return distributed_cross_entropy(self.logits_from_cos(cos, local), local)

    def get_config(self):
        return {**super().get_config(), "embedding_size": self.embedding_size, "num_classes": self.num_classes,
                "sample_rate": self.sample_rate, "rank": self.rank, "world_size": self.world_size,
                "seed": self.seed, **self.margin_config()}


def distributed_cross_entropy(logits, local_labels):
    """Mean over the global batch of logsumexp(all workers' logits) - target logit. `local_labels` is the column
    of each row's target on this worker, -1 where the target lives on another worker (every row has it on
    exactly one). Same value as a cross-entropy over the concatenated logits."""
    top = dist.all_max(tf.reduce_max(logits, axis=1, keepdims=True))
    sum_exp = dist.sum_over_ranks(tf.reduce_sum(tf.exp(logits - top), axis=1, keepdims=True))
    here = (local_labels >= 0)[:, None]
    target = tf.gather(logits, tf.maximum(local_labels, 0), batch_dims=1)[:, None]
    target = dist.sum_over_ranks(tf.where(here, target, tf.zeros_like(target)))
    return tf.reduce_mean(tf.math.log(sum_exp) + top - target)

