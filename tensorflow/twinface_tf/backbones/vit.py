"""ViT (arcface_torch backbones/vit.py) as Keras functional models; layer names are torch module paths.

`pos_embed` and `mask_token` are layers owning the one torch Parameter of that name (mapping: TorchParameter).
Training draws its randomness (patch masking, stochastic depth) through `noise` hooks (set_noise), so a test
can feed both twins the same numbers.
"""
import keras
import tensorflow as tf

from twinface.precision import resolve_precision
from twinface.vit import LN_EPS, MLP_RATIO, PATCH, check_vit_input_size, drop_path_rates, kept_tokens
from twinface_tf.layers import POLICIES, FaceModel, TorchBatchNorm, torch_linear_init


def trunc_normal():
    # arcface_torch: timm trunc_normal_(std=.02), whose bounds (+-2) sit at 100 std: in effect a plain normal
    return keras.initializers.RandomNormal(0.0, 0.02)


def uniform(layer, shape):
    """U[0, 1) noise of `shape`: layer.noise(shape) when a test set one, else tf.random.uniform."""
    if layer.noise is not None:
        return tf.convert_to_tensor(layer.noise(shape), dtype="float32")
    return tf.random.uniform(shape)


def batch_size(x):
    # static where known (a noise hook needs numbers), else the graph's value
    return x.shape[0] if x.shape[0] is not None else tf.shape(x)[0]


def set_noise(model, noise):
    """Make every random draw of `model` (masking, stochastic depth) call noise(shape), in forward order."""
    for layer in model.layers:
        if hasattr(layer, "noise"):
            layer.noise = noise


class TorchParameter(keras.layers.Layer):
    """A layer owning one tensor that torch holds as a bare nn.Parameter named like the layer."""

    torch_parameter = True

    def __init__(self, shape, initializer, **kwargs):
        super().__init__(**kwargs)
        self.value_shape, self.initializer = tuple(shape), keras.initializers.get(initializer)
        self.value = self.add_weight(shape=self.value_shape, initializer=self.initializer, name=self.name)

    def get_config(self):
        return {**super().get_config(), "shape": self.value_shape,
                "initializer": keras.initializers.serialize(self.initializer)}


@keras.saving.register_keras_serializable(package="twinface")
class PosEmbed(TorchParameter):
    """x + pos_embed, pos_embed [1, tokens, dim] as torch's (tokens in row-major grid order)."""

    def call(self, x):
        return x + tf.cast(self.value, x.dtype)


@keras.saving.register_keras_serializable(package="twinface")
class PatchMasking(keras.layers.Layer):
    """Training with mask_ratio > 0: per sample keep the kept_tokens(L) tokens of smallest noise; returns them and
    the permutation that restores grid order (MaskRestore). Otherwise x unchanged (the ids are then unused)."""

    def __init__(self, mask_ratio, **kwargs):
        super().__init__(**kwargs)
        self.mask_ratio = mask_ratio
        self.noise = None

    def call(self, x, training=None):
        if not (training and self.mask_ratio > 0):
            return x, tf.zeros(tf.shape(x)[:2], "int32")
        tokens = x.shape[1]
        ids_shuffle = tf.argsort(uniform(self, (batch_size(x), tokens)), axis=1, stable=True)
        ids_restore = tf.argsort(ids_shuffle, axis=1, stable=True)
        return tf.gather(x, ids_shuffle[:, :kept_tokens(tokens, self.mask_ratio)], batch_dims=1), ids_restore

    def get_config(self):
        return {**super().get_config(), "mask_ratio": self.mask_ratio}


@keras.saving.register_keras_serializable(package="twinface")
class MaskRestore(TorchParameter):
    """Undo PatchMasking after the final norm: mask_token [1, 1, dim] fills the masked places, grid order back."""

    def __init__(self, shape, initializer, mask_ratio, **kwargs):
        super().__init__(shape, initializer, **kwargs)
        self.mask_ratio = mask_ratio

    def call(self, inputs, training=None):
        x, ids_restore = inputs
        if not (training and self.mask_ratio > 0):
            return x
        masked = ids_restore.shape[1] - x.shape[1]
        fill = tf.tile(tf.cast(self.value, x.dtype), [tf.shape(x)[0], masked, 1])
        return tf.gather(tf.concat([x, fill], axis=1), ids_restore, batch_dims=1)

    def get_config(self):
        return {**super().get_config(), "mask_ratio": self.mask_ratio}


@keras.saving.register_keras_serializable(package="twinface")
class DropPath(keras.layers.Layer):
    """Stochastic depth as the torch twin: x * floor(1 - p + u) / (1 - p), one u per sample, in training only."""

    def __init__(self, p, **kwargs):
        super().__init__(**kwargs)
        self.p = p
        self.noise = None

    def call(self, x, training=None):
        if not training or self.p == 0:
            return x
        keep = 1.0 - self.p
        mask = tf.floor(keep + uniform(self, (batch_size(x), 1, 1)))
        return x * tf.cast(mask / keep, x.dtype)

    def get_config(self):
        return {**super().get_config(), "p": self.p}


@keras.saving.register_keras_serializable(package="twinface")
class AttentionCore(keras.layers.Layer):
    """softmax(q k^T * head_dim^-0.5) v per head from the qkv Dense's output, in float32 (as arcface_torch)."""

    def __init__(self, heads, **kwargs):
        super().__init__(**kwargs)
        self.heads = heads

    def call(self, qkv):
        batch, tokens, dim = tf.shape(qkv)[0], tf.shape(qkv)[1], qkv.shape[-1] // 3
        head_dim = dim // self.heads
        qkv = tf.transpose(tf.reshape(qkv, [batch, tokens, 3, self.heads, head_dim]), [2, 0, 3, 1, 4])
        attn = tf.nn.softmax(tf.matmul(qkv[0], qkv[1], transpose_b=True) * head_dim ** -0.5, axis=-1)
        return tf.reshape(tf.transpose(tf.matmul(attn, qkv[2]), [0, 2, 1, 3]), [batch, tokens, dim])

    def get_config(self):
        return {**super().get_config(), "heads": self.heads}


def dense(units, name, dtype, bias=True):
    return keras.layers.Dense(units, use_bias=bias, kernel_initializer=trunc_normal(), name=name, dtype=dtype)


def layer_norm(name, dtype):
    return keras.layers.LayerNormalization(epsilon=LN_EPS, name=name, dtype=dtype)


def block(x, dim, heads, drop_path, name, trunk):
    """x + drop_path(attn(norm1(x))), then x + drop_path(mlp(norm2(x))); the residual stream stays float32."""
    drop = DropPath(drop_path, name=f"{name}.drop_path", dtype=trunk)
    y = dense(3 * dim, f"{name}.attn.qkv", trunk, bias=False)(layer_norm(f"{name}.norm1", trunk)(x))
    y = dense(dim, f"{name}.attn.proj", trunk)(AttentionCore(heads, name=f"{name}.attn", dtype="float32")(y))
    x = keras.layers.Add(name=f"{name}.add1", dtype="float32")([x, drop(y)])
    y = dense(dim * MLP_RATIO, f"{name}.mlp.fc1", trunk)(layer_norm(f"{name}.norm2", trunk)(x))
    y = keras.layers.ReLU(max_value=6.0, name=f"{name}.mlp.act", dtype=trunk)(y)     # ReLU6, not GELU
    y = dense(dim, f"{name}.mlp.fc2", trunk)(y)
    return keras.layers.Add(name=f"{name}.add2", dtype="float32")([x, drop(y)])


def vit(dim, depth, heads, mask_ratio, drop_path_rate, num_features=512, fp16=False, input_size=112, name="vit",
        precision=None):
    """Input [N, input_size, input_size, 3] float32, normalised (x - 127.5) / 127.5; output [N, num_features].

    precision "fp16" / "bf16" (or fp16=True) runs patch_embed and the blocks' Dense / LayerNorm layers under the
    mixed policy; attention scores, the residual stream, the final norm and `feature` stay float32.
    """
    side = check_vit_input_size(name, input_size)
    tokens = side * side
    trunk = POLICIES[resolve_precision(name, precision, fp16)]
    inputs = keras.Input((input_size, input_size, 3), name="data", dtype="float32")
    fan_in = 3 * PATCH * PATCH
    x = keras.layers.Conv2D(dim, PATCH, strides=PATCH, padding="valid", kernel_initializer=torch_linear_init(fan_in),
                            bias_initializer=torch_linear_init(fan_in), name="patch_embed.proj", dtype=trunk)(inputs)
    x = keras.layers.Reshape((tokens, dim), name="patch_embed.flatten", dtype=trunk)(x)
    x = PosEmbed((1, tokens, dim), trunc_normal(), name="pos_embed", dtype="float32")(x)
    x, ids_restore = PatchMasking(mask_ratio, name="random_masking", dtype="float32")(x)
    for i, p in enumerate(drop_path_rates(drop_path_rate, depth)):
        x = block(x, dim, heads, p, f"blocks.{i}", trunk)
    x = layer_norm("norm", "float32")(x)
    x = MaskRestore((1, 1, dim), trunc_normal(), mask_ratio, name="mask_token", dtype="float32")([x, ids_restore])
    x = keras.layers.Reshape((tokens * dim,), name="flatten", dtype="float32")(x)
    x = dense(dim, "feature.0", "float32", bias=False)(x)
    x = TorchBatchNorm(epsilon=2e-5, name="feature.1", dtype="float32")(x)
    x = dense(num_features, "feature.2", "float32", bias=False)(x)
    x = TorchBatchNorm(epsilon=2e-5, name="feature.3", dtype="float32")(x)
    return FaceModel(inputs, x, name=name)
