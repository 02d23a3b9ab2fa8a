"""Losses over head logits, and the triplet loss on embeddings, same definitions as the torch twin. Labels
int32/int64, shape [N]."""
import functools
import math

import keras
import tensorflow as tf

from twinface.registry import TRIPLET_MINING, loss_defaults

from .heads import l2_normalize


def per_sample_cross_entropy(logits, labels, who):
    logits, labels = tf.cast(logits, "float32"), tf.convert_to_tensor(labels)
    shapes_ok = logits.shape.rank == 2 and labels.shape.rank == 1 and \
        labels.shape[:1].is_compatible_with(logits.shape[:1])
    if not (shapes_ok and labels.dtype.is_integer):
        raise ValueError(f"{who}: expected logits [N, C] float and labels [N] int, got logits "
                         f"{tuple(logits.shape)} and labels {tuple(labels.shape)} {labels.dtype.name}")
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy (torch F.cross_entropy)."""
    return tf.reduce_mean(per_sample_cross_entropy(logits, labels, "cross_entropy"))


def focal_loss(logits, labels, gamma=2.0):
    """arcface-pytorch's FocalLoss: mean((1 - p)^gamma * ce) with p = exp(-ce); gamma = 0 is cross-entropy."""
    ce = per_sample_cross_entropy(logits, labels, "focal_loss")
    # gamma = 0 skips the power: d/dx x**0 at x = 0 is 0 * inf = NaN in TF (torch special-cases it to 0).
    weight = (1.0 - tf.exp(-ce)) ** gamma if gamma else 1.0
    return tf.reduce_mean(weight * ce)


LOSS_FUNCTIONS = {"cross_entropy": cross_entropy, "focal": focal_loss}


def get_loss(name, **overrides):
    """loss(logits, labels) for a name of twinface.registry.LOSSES, defaults replaced by `overrides`."""
    kwargs = {**loss_defaults(name), **overrides}
    if name not in LOSS_FUNCTIONS:
        raise ValueError(f"loss {name!r} scores embeddings, not logits: it is TripletLoss, with head.type none")
    return functools.partial(LOSS_FUNCTIONS[name], **kwargs)


def pairwise_distances(embeddings, squared=False):
    """[N, N] euclidean distances between L2-normalised embeddings, as the torch twin computes them (|a|^2 + |b|^2
    - 2 a.b clamped at 0, exact 0 diagonal, zero gradient of the root where the distance is 0)."""
    x = l2_normalize(tf.cast(embeddings, "float32"))
    sq = tf.reduce_sum(tf.square(x), axis=1)
    d2 = tf.maximum(sq[:, None] + sq[None, :] - 2.0 * tf.matmul(x, x, transpose_b=True), 0.0)
    d2 = d2 * (1.0 - tf.eye(tf.shape(x)[0]))
    if squared:
        return d2
    zero = tf.cast(tf.equal(d2, 0.0), d2.dtype)
    return tf.sqrt(d2 + zero * 1e-16) * (1.0 - zero)


def _first(mask):
    """Index of the first True along the last axis (the tie rule of hard mining: the lowest index wins)."""
    n = tf.shape(mask)[-1]
    index = tf.broadcast_to(tf.range(n), tf.shape(mask))
    return tf.argmin(tf.where(mask, index, n), axis=-1, output_type=tf.int32)


def triplet_loss(embeddings, labels, margin=0.2, mining="batch_hard", squared=False):
    """(loss, valid): the torch twin's online-mined triplet loss, same mining and tie rules (docs/losses.md);
    valid is an int32 tensor (valid == 0: no triplet in the batch, loss 0)."""
    if mining not in TRIPLET_MINING:
        raise ValueError(f"triplet_loss: mining must be one of {TRIPLET_MINING}, got {mining!r}")
    d = pairwise_distances(embeddings, squared)
    labels = tf.convert_to_tensor(labels)
    same = tf.equal(labels[:, None], labels[None, :])
    pos = same & ~tf.cast(tf.eye(tf.shape(labels)[0]), tf.bool)
    neg = ~same
    if mining == "batch_all":
        valid = pos[:, :, None] & neg[:, None, :]
        losses = tf.nn.relu(d[:, :, None] - d[:, None, :] + margin) * tf.cast(valid, d.dtype)
        active = tf.reduce_sum(tf.cast(losses > 1e-16, d.dtype))   # the triplets that still violate the margin
        return tf.reduce_sum(losses) / tf.maximum(active, 1.0), _count(valid)
    sg = tf.stop_gradient(d)
    if mining == "batch_hard":          # per anchor the farthest positive and the closest negative
        p = _first(pos & tf.equal(sg, tf.reduce_max(tf.where(pos, sg, -1.0), axis=1, keepdims=True)))[:, None]
        n = _first(neg & tf.equal(sg, tf.reduce_min(tf.where(neg, sg, math.inf), axis=1, keepdims=True)))[:, None]
        valid = (tf.reduce_any(pos, axis=1) & tf.reduce_any(neg, axis=1))[:, None]
        d_ap = tf.gather(d, p, batch_dims=1)
    else:       # semi_hard: per positive pair the closest negative farther than the positive, else the farthest
        farthest = _first(neg & tf.equal(sg, tf.reduce_max(tf.where(neg, sg, -1.0), axis=1, keepdims=True)))
        outside = neg[:, None, :] & (sg[:, None, :] > sg[:, :, None])
        closest = tf.reduce_min(tf.where(outside, tf.broadcast_to(sg[:, None, :], tf.shape(outside)), math.inf),
                                axis=2, keepdims=True)
        n = tf.where(tf.reduce_any(outside, axis=2), _first(outside & tf.equal(sg[:, None, :], closest)),
                     farthest[:, None])
        valid = pos & tf.reduce_any(neg, axis=1)[:, None]
        d_ap = d
    per = tf.nn.relu(d_ap - tf.gather(d, n, batch_dims=1) + margin) * tf.cast(valid, d.dtype)
    return tf.reduce_sum(per) / tf.maximum(tf.cast(_count(valid), d.dtype), 1.0), _count(valid)


def _count(mask):
    return tf.reduce_sum(tf.cast(mask, tf.int32))


class TripletLoss(keras.layers.Layer):
    """head.type none with loss.type triplet: the trainer's head slot, without variables; returns (loss, valid)."""

    def __init__(self, margin=0.2, mining="batch_hard", squared=False, **kwargs):
        super().__init__(**{"dtype": "float32", **kwargs})
        self.margin, self.mining, self.squared = float(margin), mining, bool(squared)

    def call(self, embeddings, labels):
        return triplet_loss(embeddings, labels, self.margin, self.mining, self.squared)

    def get_config(self):
        return {**super().get_config(), "margin": self.margin, "mining": self.mining, "squared": self.squared}
