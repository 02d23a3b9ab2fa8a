"""Losses over head logits, same definitions as the torch twin. Labels int32/int64, shape [N]."""
import functools

import tensorflow as tf

from twinface.registry import loss_defaults


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
    return functools.partial(LOSS_FUNCTIONS[name], **kwargs)
