"""Keras layers that behave exactly like their torch counterparts, so both twins compute the same numbers.

Every weighted layer is named with its torch module path (`layer1.0.conv1`), which makes the weight mapping
between the twins a pure function of (name, layer kind).
"""
import contextlib
import functools
import math

import keras
import tensorflow as tf


POLICIES = {"fp32": "float32", "fp16": "mixed_float16", "bf16": "mixed_bfloat16"}
_stats_frozen = [False]     # True while a checkpointed block is recomputed in backprop


@contextlib.contextmanager
def frozen_batchnorm_stats():
    """TorchBatchNorm layers called inside normalise with batch statistics but leave their moving ones alone."""
    previous, _stats_frozen[0] = _stats_frozen[0], True
    try:
        yield
    finally:
        _stats_frozen[0] = previous


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
            if not _stats_frozen[0]:
                self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
                self.moving_variance.assign(self.moving_variance * self.momentum + unbiased * (1.0 - self.momentum))
        else:
            mean, variance = self.moving_mean, self.moving_variance
        outputs = tf.nn.batch_normalization(x, mean, variance, offset=self.beta, scale=self.gamma,
                                            variance_epsilon=self.epsilon)
        return tf.cast(outputs, self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "gamma_trainable": self.gamma_trainable}


@functools.cache
def native_grouped_gradients() -> bool:
    """Whether TensorFlow can differentiate a grouped tf.nn.conv2d here: with its oneDNN CPU kernels or on a GPU.

    TF's Eigen CPU kernels (what runs when oneDNN is off, TF's default on CPUs without AVX-512 VNNI/BF16 or
    AMX) compute the grouped forward pass but raise "Gradients for grouped convolutions are not supported on
    CPU". The oneDNN state is read from TF's own switch; if that private hook moves, assume Eigen (the fallback
    is exact, only slower).
    """
    if tf.config.list_physical_devices("GPU"):
        return True
    try:
        from tensorflow.python.util import _pywrap_util_port
        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return False


def _as_depthwise(kernel, groups):
    """Grouped kernel (kh, kw, in / G, out) -> depthwise kernel (kh, kw, in, out / G).

    Input channel c (group c // (in / G)) feeds output g * (out / G) + m with weight kernel[..., c % (in / G),
    g * (out / G) + m]; a depthwise conv with multiplier out / G computes every such product as its channel
    c * (out / G) + m, and summing those over the in / G inputs of a group gives the grouped conv.
    """
    kh, kw, in_per_group, out = kernel.shape
    k = tf.reshape(kernel, [kh, kw, in_per_group, groups, out // groups])
    return tf.reshape(tf.transpose(k, [0, 1, 3, 2, 4]), [kh, kw, in_per_group * groups, out // groups])


def _from_depthwise(kernel, groups, in_per_group):
    """Inverse of _as_depthwise (for the kernel's gradient)."""
    kh, kw, _, mult = kernel.shape
    k = tf.reshape(kernel, [kh, kw, groups, in_per_group, mult])
    return tf.reshape(tf.transpose(k, [0, 1, 3, 2, 4]), [kh, kw, in_per_group, groups * mult])


def grouped_conv2d(x, kernel, strides, dilations, groups):
    """tf.nn.conv2d with a grouped kernel ("VALID"), differentiable on every device.

    The forward pass is always the native grouped convolution (same numbers everywhere, one ONNX Conv in
    exports). Where TF has no native gradient for it (Eigen CPU kernels), the gradients are those of the
    equivalent depthwise formulation (_as_depthwise), whose kernels exist on every device.
    """
    def forward(x, kernel):
        return tf.nn.conv2d(x, kernel, strides=strides, padding="VALID", dilations=dilations)

    if native_grouped_gradients():
        return forward(x, kernel)

    @tf.custom_gradient
    def conv_with_depthwise_gradient(x, kernel):
        def grad(dy):
            in_per_group, mult = kernel.shape[2], kernel.shape[3] // groups
            n, h, w = tf.unstack(tf.shape(dy)[:3])
            # the gradient of output g * mult + m reaches channel c * mult + m of every input c of group g
            dy_dw = tf.reshape(tf.broadcast_to(tf.reshape(dy, [n, h, w, groups, 1, mult]),
                                               [n, h, w, groups, in_per_group, mult]),
                               [n, h, w, groups * in_per_group * mult])
            stride4, dilation2 = [1, *strides, 1], list(dilations)
            dx = tf.nn.depthwise_conv2d_backprop_input(tf.shape(x), _as_depthwise(kernel, groups), dy_dw,
                                                       stride4, "VALID", dilations=dilation2)
            dk = tf.nn.depthwise_conv2d_backprop_filter(x, [*kernel.shape[:2], groups * in_per_group, mult],
                                                        dy_dw, stride4, "VALID", dilations=dilation2)
            return dx, _from_depthwise(dk, groups, in_per_group)
        return forward(x, kernel), grad

    return conv_with_depthwise_gradient(x, tf.convert_to_tensor(kernel))


@keras.saving.register_keras_serializable(package="twinface")
class GroupedConv2D(keras.layers.Conv2D):
    """Conv2D with 1 < groups < channels and the usual kernel (kh, kw, in / groups, out).

    Keras runs grouped convolutions on CPU inside an XLA-compiled function, which is slow here and which
    tf2onnx cannot convert. tf.nn.conv2d takes the grouped kernel natively (group g owns output channels
    g * out / groups onward, as in torch) and exports as one ONNX Conv with `group`; grouped_conv2d gives it
    gradients where TF's kernels have none.
    """

    def convolution_op(self, inputs, kernel):
        return grouped_conv2d(inputs, kernel, self.strides, self.dilation_rate, self.groups)


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


def recomputed(segment):
    """segment(x, training=True) through tf.recompute_grad: its activations are recomputed in backprop instead of
    kept. The recomputation runs under frozen_batchnorm_stats, so the moving statistics are updated once."""
    in_forward = []

    def run(x):
        with contextlib.nullcontext() if in_forward else frozen_batchnorm_stats():
            return segment(x, training=True)

    run_recomputed = tf.recompute_grad(run)

    def call(x):
        in_forward.append(True)    # the forward call happens now; the recomputation later, in backprop
        try:
            return run_recomputed(x)
        finally:
            in_forward.pop()
    return call


@keras.saving.register_keras_serializable(package="twinface")
class FaceModel(keras.Model):
    """Functional backbone that rejects a wrongly shaped input with a message naming the architecture.

    After checkpoint_between(cuts), training calls recompute each stretch of the graph between consecutive cuts
    in backprop (gradient checkpointing); the layers, their names and variables stay those of the one graph.
    """

    _segments = None

    def checkpoint_between(self, cuts):
        """`cuts`: KerasTensors of this graph in order; stretches between neighbours become recomputed units."""
        stem = keras.Model(self.inputs[0], cuts[0])
        middle = [recomputed(keras.Model(a, b)) for a, b in zip(cuts, cuts[1:])]
        head = keras.Model(cuts[-1], self.outputs[0])
        # a tuple of functions, not of models: Keras tracks no second copy of the (shared) layers' variables
        self._segments = (functools.partial(stem, training=True), *middle, functools.partial(head, training=True))

    def call(self, inputs, training=None, mask=None):
        if not (training and self._segments):
            return super().call(inputs, training=training, mask=mask)
        return functools.reduce(lambda x, segment: segment(x), self._segments, inputs)

    def __call__(self, inputs, *args, **kwargs):
        expected = tuple(self.inputs[0].shape[1:])
        shape = tuple(inputs.shape)
        if len(shape) != 4 or any(e is not None and s is not None and s != e for s, e in zip(shape[1:], expected)):
            raise ValueError(f"{self.name}: expected input [N, H, W, 3] with H = W = {expected[0]} "
                             f"(float, NHWC, normalised (x - 127.5) / 127.5), got shape {shape}")
        return super().__call__(inputs, *args, **kwargs)
