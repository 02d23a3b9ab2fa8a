"""Keras layers that behave exactly like their torch counterparts, so both twins compute the same numbers.

Every weighted layer is named with its torch module path (`layer1.0.conv1`), which makes the weight mapping
between the twins a pure function of (name, layer kind).
"""
import math

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="twinface")
class TorchBatchNorm(keras.layers.BatchNormalization):
    """torch.nn.BatchNorm{1,2}d: eps 1e-5, torch momentum 0.1 (Keras 0.9).

    In training it normalises with the biased batch variance but feeds the UNBIASED one (n / (n - 1),
    n = values per channel) into moving_variance, as torch does; Keras would use the biased one.
    `gamma_trainable=False` freezes gamma (arcface_torch's `features` BatchNorm1d, gamma fixed at 1).
    """

    def __init__(self, gamma_trainable=True, momentum=0.9, epsilon=1e-5, **kwargs):
        super().__init__(momentum=momentum, epsilon=epsilon, **kwargs)
        self.gamma_trainable = gamma_trainable

    def build(self, input_shape):
        super().build(input_shape)
        self.gamma.trainable = self.gamma_trainable

    def call(self, inputs, training=None):
        # Statistics in float32 even under mixed precision, as Keras' own BN and torch autocast do.
        x = tf.cast(inputs, "float32")
        if training and self.trainable:
            if x.shape.is_fully_defined() and x.shape.num_elements() == x.shape[self.axis]:
                raise ValueError(f"{self.name}: training BatchNorm needs more than 1 value per channel "
                                 f"(torch raises too), got input shape {tuple(x.shape)}")
            mean, variance = tf.nn.moments(x, axes=self._reduction_axes)
            n = tf.cast(tf.size(x) // tf.shape(x)[self.axis], "float32")
            unbiased = variance * n / (n - 1.0)
            self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(self.moving_variance * self.momentum + unbiased * (1.0 - self.momentum))
        else:
            mean, variance = self.moving_mean, self.moving_variance
        outputs = tf.nn.batch_normalization(x, mean, variance, offset=self.beta, scale=self.gamma,
                                            variance_epsilon=self.epsilon)
        return tf.cast(outputs, self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "gamma_trainable": self.gamma_trainable}


@keras.saving.register_keras_serializable(package="twinface")
class GroupedConv2D(keras.layers.Conv2D):
    """Conv2D with 1 < groups < channels and the usual kernel (kh, kw, in / groups, out).

    Keras runs grouped convolutions on CPU inside an XLA-compiled function, which is slow here and which
    tf2onnx cannot convert. tf.nn.conv2d takes the grouped kernel natively (group g owns output channels
    g * out / groups onward, as in torch) and exports as one ONNX Conv with `group`.
    """

    def convolution_op(self, inputs, kernel):
        return tf.nn.conv2d(inputs, kernel, strides=self.strides, padding="VALID", dilations=self.dilation_rate)


def prelu(name, dtype=None):
    """torch.nn.PReLU(C): one slope per channel, init 0.25; alpha has shape (1, 1, C) for NHWC."""
    return keras.layers.PReLU(alpha_initializer=keras.initializers.Constant(0.25), shared_axes=[1, 2],
                              name=name, dtype=dtype)


def conv(x, filters, kernel_size, name, stride=1, padding=0, groups=1, kernel_initializer=None, dtype=None):
    """torch.nn.Conv2d(bias=False) on NHWC `x` with symmetric zero padding `padding` (never Keras "same").

    groups == in == out channels becomes a DepthwiseConv2D (kernel (kh, kw, C, 1)); other groups a grouped
    Conv2D (kernel (kh, kw, in / groups, out)).
    """
    if padding:
        x = keras.layers.ZeroPadding2D(padding, name=f"{name}.pad", dtype=dtype)(x)
    in_channels = x.shape[-1]
    if groups > 1 and groups == in_channels == filters:
        layer = keras.layers.DepthwiseConv2D(kernel_size, strides=stride, padding="valid", use_bias=False,
                                             depthwise_initializer=kernel_initializer, name=name, dtype=dtype)
    else:
        conv_class = GroupedConv2D if groups > 1 else keras.layers.Conv2D
        layer = conv_class(filters, kernel_size, strides=stride, padding="valid", groups=groups, use_bias=False,
                           kernel_initializer=kernel_initializer, name=name, dtype=dtype)
    return layer(x)


def torch_linear_init(fan_in):
    """torch.nn.Linear's default init for weight and bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return keras.initializers.RandomUniform(-bound, bound)


@keras.saving.register_keras_serializable(package="twinface")
class FaceModel(keras.Model):
    """Functional backbone that rejects a wrongly shaped input with a message naming the architecture."""

    def __call__(self, inputs, *args, **kwargs):
        expected = tuple(self.inputs[0].shape[1:])
        shape = tuple(inputs.shape)
        if len(shape) != 4 or any(e is not None and s is not None and s != e for s, e in zip(shape[1:], expected)):
            raise ValueError(f"{self.name}: expected input [N, H, W, 3] with H = W = {expected[0]} "
                             f"(float, NHWC, normalised (x - 127.5) / 127.5), got shape {shape}")
        return super().__call__(inputs, *args, **kwargs)
