"""MobileFaceNet (arcface_torch backbones/mobilefacenet.py) as Keras functional models.

Layer names are the torch module paths: ConvBlock/LinearBlock are Sequentials `<path>.layers.{0,1,2}`
(conv, BN, PReLU), DepthWise is `<path>.layers.{0,1,2}` of those, Residual `<path>.layers.<j>` of DepthWise.
"""
import math

import keras

from twinface.precision import resolve_precision
from twinface_tf.layers import POLICIES, FaceModel, TorchBatchNorm, conv, prelu


def kaiming_fan_out(fan_out):
    # torch kaiming_normal_(mode="fan_out", nonlinearity="relu"); fan_out = out_channels * kh * kw whatever the
    # groups, which Keras' VarianceScaling gets wrong for DepthwiseConv2D (kernel (kh, kw, C, 1)).
    return keras.initializers.RandomNormal(0.0, math.sqrt(2.0 / fan_out))


def conv_block(x, out_c, kernel, name, dtype, stride=1, padding=0, groups=1, linear=False):
    """ConvBlock: conv (no bias), BN, PReLU; `linear=True` is LinearBlock (no PReLU)."""
    x = conv(x, out_c, kernel, f"{name}.layers.0", stride=stride, padding=padding, groups=groups,
             kernel_initializer=kaiming_fan_out(out_c * kernel * kernel), dtype=dtype)
    x = TorchBatchNorm(name=f"{name}.layers.1", dtype=dtype)(x)
    if not linear:
        x = prelu(f"{name}.layers.2", dtype)(x)
    return x


def depthwise(x, out_c, stride, groups, name, dtype, residual=False):
    """DepthWise: 1x1 ConvBlock to `groups` channels, 3x3 depthwise ConvBlock (stride), 1x1 LinearBlock."""
    y = conv_block(x, groups, 1, f"{name}.layers.0", dtype)
    y = conv_block(y, groups, 3, f"{name}.layers.1", dtype, stride=stride, padding=1, groups=groups)
    y = conv_block(y, out_c, 1, f"{name}.layers.2", dtype, linear=True)
    return keras.layers.Add(name=f"{name}.add", dtype=dtype)([x, y]) if residual else y


def residual(x, num_block, groups, name, dtype):
    for j in range(num_block):
        x = depthwise(x, x.shape[-1], 1, groups, f"{name}.layers.{j}", dtype, residual=True)
    return x


def mobilefacenet(blocks=(1, 4, 6, 2), scale=2, num_features=512, fp16=False, input_size=112,
                  name="mobilefacenet", precision=None):
    """Input [N, input_size, input_size, 3] float32, normalised (x - 127.5) / 127.5; output [N, num_features].

    precision "fp16" / "bf16" (or fp16=True) runs `layers.*` under "mixed_float16" / "mixed_bfloat16"; conv_sep
    and features stay float32, as arcface_torch.
    """
    if input_size <= 0 or input_size % 16:
        raise ValueError(f"{name}: input_size must be a positive multiple of 16 (four stride-2 stages), "
                         f"got {input_size}")
    trunk = POLICIES[resolve_precision(name, precision, fp16)]
    wide, wider = 64 * scale, 128 * scale
    inputs = keras.Input((input_size, input_size, 3), name="data", dtype="float32")
    x = conv_block(inputs, wide, 3, "layers.0", trunk, stride=2, padding=1)
    if blocks[0] == 1:
        x = conv_block(x, wide, 3, "layers.1", trunk, padding=1, groups=64)
    else:
        x = residual(x, blocks[0], 128, "layers.1", trunk)
    x = depthwise(x, wide, 2, 128, "layers.2", trunk)
    x = residual(x, blocks[1], 128, "layers.3", trunk)
    x = depthwise(x, wider, 2, 256, "layers.4", trunk)
    x = residual(x, blocks[2], 256, "layers.5", trunk)
    x = depthwise(x, wider, 2, 512, "layers.6", trunk)
    x = residual(x, blocks[3], 256, "layers.7", trunk)
    x = conv_block(x, 512, 1, "conv_sep", "float32")
    # GDC: a depthwise conv as large as the remaining map (7x7 at 112) leaves 1x1, so flatten order is moot.
    x = conv_block(x, 512, input_size // 16, "features.layers.0", "float32", groups=512, linear=True)
    x = keras.layers.Flatten(name="features.layers.1", dtype="float32")(x)
    x = keras.layers.Dense(num_features, use_bias=False, kernel_initializer=kaiming_fan_out(num_features),
                           name="features.layers.2", dtype="float32")(x)
    x = TorchBatchNorm(name="features.layers.3", dtype="float32")(x)
    return FaceModel(inputs, x, name=name)


def get_mbf(num_features=512, blocks=(1, 4, 6, 2), scale=2, fp16=False, input_size=112, precision=None):
    return mobilefacenet(blocks, scale, num_features, fp16, input_size, name="mbf", precision=precision)


def get_mbf_large(num_features=512, blocks=(2, 8, 12, 4), scale=4, fp16=False, input_size=112, precision=None):
    return mobilefacenet(blocks, scale, num_features, fp16, input_size, name="mbf_large", precision=precision)
