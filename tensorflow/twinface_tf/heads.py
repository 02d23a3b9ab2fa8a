"""Classification heads: one combined-margin head (Softmax, SphereFace, ArcFace, CosFace are its settings)
and a plain linear head. Same constructor arguments and variable names as the torch twin.

MarginHead's rule (MarginRule) is what the sharded, sampled Partial FC (twinface_tf.partial_fc) applies too.
With subcenters=K (Sub-center ArcFace) each class has K centres and its cosine is the largest of theirs.
AdaFace is its own head: the official implementation's formula (docs/heads.md).
"""
import math

import keras
import tensorflow as tf

from twinface.registry import check_subcenters, head_defaults, margin_settings
from twinface_tf.layers import torch_linear_init

GRADIENTS = ("straight_through", "analytic")


def l2_norms(x):
    """[N, 1] row norms sqrt(max(sum(x^2), 1e-24)), the torch twin's expression."""
    return tf.sqrt(tf.maximum(tf.reduce_sum(tf.square(x), axis=1, keepdims=True), 1e-24))


def l2_normalize(x):
    # The torch twin's expression (see there why not rsqrt): x / l2_norms(x). DivNoNan, not `/`: grappler rewrites
    # Div(x, Sqrt(y)) into Mul(x, Rsqrt(y)) inside tf.function, which brought rsqrt back into the training step;
    # the denominator is never 0, so the result is the plain quotient.
    return tf.math.divide_no_nan(x, l2_norms(x))


class MarginRule:
    """The margin settings and their math, without class centres: MarginHead (every class) and
    twinface_tf.partial_fc.PartialFC (a shard of the classes, sampled) apply the very same rule."""

    def _set_margin(self, s, m1, m2, m3, interclass_filtering_threshold, gradient, easy_margin):
        who = type(self).__name__
        if gradient not in GRADIENTS:
            raise ValueError(f"{who}: gradient must be one of {GRADIENTS}, got {gradient!r}")
        if not m1 > 0:
            raise ValueError(f"{who}: m1 multiplies the angle and must be > 0, got {m1}")
        self.s, self.m1, self.m2, self.m3 = float(s), float(m1), float(m2), float(m3)
        self.interclass_filtering_threshold = float(interclass_filtering_threshold)
        self.gradient = gradient
        self.easy_margin = bool(easy_margin)

    def margin(self, cos):
        phi = self.m1 * tf.acos(cos) + self.m2
        if self.m1 == 1:
            return tf.cos(phi) - self.m3
        k = tf.stop_gradient(tf.floor(phi / math.pi))    # SphereFace's piece: decreasing over the whole range
        return (1.0 - 2.0 * tf.math.floormod(k, 2.0)) * tf.cos(phi) - 2.0 * k - self.m3

    def logits_from_cos(self, cos, labels):
        """Margin and scale applied to clamped cosines [N, C]; rows labelled -1 get no margin."""
        is_target = tf.one_hot(labels, tf.shape(cos)[1], on_value=True, off_value=False)  # all False for -1
        if self.interclass_filtering_threshold > 0:
            dirty = tf.stop_gradient(tf.cast((cos > self.interclass_filtering_threshold) & ~is_target, cos.dtype))
            cos = cos * (1.0 - dirty)
        target_cos = tf.gather(cos, tf.maximum(labels, 0), batch_dims=1)[:, None]
        if self.gradient == "straight_through":
            target = target_cos + tf.stop_gradient(self.margin(target_cos) - target_cos)
        else:
            target = self.margin(tf.clip_by_value(target_cos, -1.0 + 1e-7, 1.0 - 1e-7))
        if self.easy_margin:
            target = tf.where(target_cos > 0, target, target_cos)
        return self.s * tf.where(is_target, target, cos)

    def margin_config(self):
        return {"s": self.s, "m1": self.m1, "m2": self.m2, "m3": self.m3,
                "interclass_filtering_threshold": self.interclass_filtering_threshold, "gradient": self.gradient,
                "easy_margin": self.easy_margin}


class MarginHead(keras.layers.Layer, MarginRule):
    """logits = s * cos(theta), with the target column replaced by s * (psi(m1 * theta + m2) - m3).

    psi is cos when m1 == 1 (arcface_torch), otherwise SphereFace's monotonic (-1)^k cos(phi) - 2k on
    [k pi, (k + 1) pi]. Unlike arcface_torch, m2 and m3 always both apply (docs/design.md, "Margin heads").
    easy_margin=True (insightface's ArcFace option): targets with cos(theta) <= 0 keep plain s * cos.

    `weight` [num_classes * subcenters, embedding_size], init N(0, 0.01); class-major, as insightface's
    Sub-center ArcFace: row c * K + k is sub-centre k of class c, and class c's cosine is the max over its K.
    Rows labelled -1 have no target and keep plain s * cos. gradient="straight_through" (default, arcface_torch): exact forward value, d logit / d cos = s on
    the target, never NaN at cos = +-1. gradient="analytic": the true derivative of the margin function, with
    cos clamped to [-1 + 1e-7, 1 - 1e-7] inside acos to keep it finite.
    interclass_filtering_threshold t > 0: non-target cosines above t are zeroed (arcface_torch).
    """

    def __init__(self, embedding_size, num_classes, s=64.0, m1=1.0, m2=0.0, m3=0.0,
                 interclass_filtering_threshold=0.0, gradient="straight_through", easy_margin=False, subcenters=1,
                 **kwargs):
        # float32 whatever the global policy: only the backbone trunk runs in mixed precision
        super().__init__(**{"dtype": "float32", **kwargs})
        self._set_margin(s, m1, m2, m3, interclass_filtering_threshold, gradient, easy_margin)
        self.embedding_size, self.num_classes = embedding_size, num_classes
        self.subcenters = check_subcenters("MarginHead", subcenters)
        self.weight = self.add_weight(shape=(num_classes * subcenters, embedding_size), name="weight",
                                      initializer=keras.initializers.RandomNormal(0.0, 0.01))

    def call(self, embeddings, labels):
        embeddings = tf.cast(embeddings, "float32")
        labels = check_batch("MarginHead", embeddings, labels, self.embedding_size, self.num_classes)
        cos = tf.clip_by_value(tf.matmul(l2_normalize(embeddings), l2_normalize(self.weight), transpose_b=True),
                               -1.0, 1.0)
        if self.subcenters > 1:
            cos = tf.reduce_max(tf.reshape(cos, [-1, self.num_classes, self.subcenters]), axis=2)
        return self.logits_from_cos(cos, labels)

    def get_config(self):
        return {**super().get_config(), "embedding_size": self.embedding_size, "num_classes": self.num_classes,
                "subcenters": self.subcenters, **self.margin_config()}


class AdaFace(keras.layers.Layer):
    """AdaFace (Kim et al. 2022), the official implementation's formula, as the torch twin (see there).

    The EMA of the batches' norm statistics is the non-trainable variables `batch_mean`, `batch_std` [1]
    (checkpointed, converted with the weights); it moves only when training (the default, as a torch module's
    train mode; head(e, y, training=False) is torch's head.eval())."""
    EPS = 1e-3

    def __init__(self, embedding_size, num_classes, s=64.0, m=0.4, h=0.333, t_alpha=0.01, **kwargs):
        super().__init__(**{"dtype": "float32", **kwargs})
        self.embedding_size, self.num_classes = embedding_size, num_classes
        self.s, self.m, self.h, self.t_alpha = float(s), float(m), float(h), float(t_alpha)
        self.weight = self.add_weight(shape=(num_classes, embedding_size), name="weight",
                                      initializer=keras.initializers.RandomNormal(0.0, 0.01))
        self.batch_mean = self.add_weight(shape=(1,), name="batch_mean", trainable=False,
                                          initializer=keras.initializers.Constant(20.0))
        self.batch_std = self.add_weight(shape=(1,), name="batch_std", trainable=False,
                                         initializer=keras.initializers.Constant(100.0))

    def call(self, embeddings, labels, training=True):
        embeddings = tf.cast(embeddings, "float32")
        labels = check_batch("AdaFace", embeddings, labels, self.embedding_size, self.num_classes)
        norms = l2_norms(embeddings)
        cos = tf.clip_by_value(tf.matmul(tf.math.divide_no_nan(embeddings, norms), l2_normalize(self.weight),
                                         transpose_b=True), -1.0 + self.EPS, 1.0 - self.EPS)
        safe_norms = tf.stop_gradient(tf.clip_by_value(norms, 0.001, 100.0))
        batch_mean, batch_std = self.batch_mean, self.batch_std
        if training:
            n = tf.shape(safe_norms)[0]
            tf.debugging.assert_greater_equal(n, 2, message="AdaFace: a training batch needs >= 2 samples "
                                                            "(unbiased std of the norms)")
            mean = tf.reduce_mean(safe_norms)
            std = tf.sqrt(tf.reduce_sum(tf.square(safe_norms - mean)) / tf.cast(n - 1, tf.float32))   # torch.std
            t = self.t_alpha
            batch_mean = self.batch_mean.assign(mean * t + (1 - t) * self.batch_mean)
            batch_std = self.batch_std.assign(std * t + (1 - t) * self.batch_std)
        scaler = tf.clip_by_value((safe_norms - batch_mean) / (batch_std + self.EPS) * self.h, -1.0, 1.0)
        is_target = tf.one_hot(labels, self.num_classes, dtype=tf.float32)          # all 0 for -1
        theta = tf.clip_by_value(tf.acos(cos) + is_target * (self.m * scaler * -1), self.EPS, math.pi - self.EPS)
        return (tf.cos(theta) - is_target * (self.m + self.m * scaler)) * self.s

    def get_config(self):
        return {**super().get_config(), "embedding_size": self.embedding_size, "num_classes": self.num_classes,
                "s": self.s, "m": self.m, "h": self.h, "t_alpha": self.t_alpha}


class LinearHead(keras.layers.Layer):
    """Plain softmax classifier: embeddings @ weight.T + bias (torch nn.Linear init); labels are unused."""

    def __init__(self, embedding_size, num_classes, **kwargs):
        super().__init__(**{"dtype": "float32", **kwargs})
        self.embedding_size, self.num_classes = embedding_size, num_classes
        self.weight = self.add_weight(shape=(num_classes, embedding_size), name="weight",
                                      initializer=torch_linear_init(embedding_size))
        self.bias = self.add_weight(shape=(num_classes,), name="bias", initializer=torch_linear_init(embedding_size))

    def call(self, embeddings, labels):
        embeddings = tf.cast(embeddings, "float32")
        check_batch("LinearHead", embeddings, labels, self.embedding_size, self.num_classes)
        return tf.matmul(embeddings, self.weight, transpose_b=True) + self.bias

    def get_config(self):
        return {**super().get_config(), "embedding_size": self.embedding_size, "num_classes": self.num_classes}


def check_batch(who, embeddings, labels, embedding_size, num_classes):
    """embeddings [N, embedding_size] and int labels [N] in [-1, num_classes), or a clear error (a label out of
    range would otherwise become a silent all-zero one-hot row)."""
    labels = tf.convert_to_tensor(labels)
    if embeddings.shape.rank != 2 or embeddings.shape[1] != embedding_size:
        raise ValueError(f"{who}: expected embeddings [N, {embedding_size}], got shape {tuple(embeddings.shape)}")
    if labels.shape.rank != 1 or not labels.shape[:1].is_compatible_with(embeddings.shape[:1]):
        raise ValueError(f"{who}: expected labels [{embeddings.shape[0]}], got shape {tuple(labels.shape)}")
    if labels.dtype not in (tf.int32, tf.int64):
        raise ValueError(f"{who}: expected int32 or int64 labels, got {labels.dtype.name}")
    tf.debugging.assert_less(labels, tf.cast(num_classes, labels.dtype),
                             message=f"{who}: labels must be in [-1, {num_classes - 1}] (-1 = no target)")
    tf.debugging.assert_greater_equal(labels, tf.cast(-1, labels.dtype),
                                      message=f"{who}: labels must be in [-1, {num_classes - 1}] (-1 = no target)")
    return labels


def get_head(name, embedding_size, num_classes, **overrides):
    """A head from twinface.registry.HEADS (margin settings, `overrides` replace them) or "linear"."""
    if name == "linear":
        return LinearHead(embedding_size, num_classes, **overrides)
    if name == "adaface":
        return AdaFace(embedding_size, num_classes, **{**head_defaults(name), **overrides})
    return MarginHead(embedding_size, num_classes, **margin_settings(name, overrides))
