"""Face-adapted ResNeXt (pytorch/twinface_torch/backbones/resnext.py) as Keras functional models; layer names are
torch module paths. The grouped 3x3 convolution is twinface_tf.layers' GroupedConv2D, as in MobileFaceNet."""
import functools

from twinface.macs import group_width
from twinface_tf.backbones.iresnet import conv_init, iresnet, residual_add
from twinface_tf.layers import TorchBatchNorm, conv, prelu

EXPANSION = 4


def bottleneck(x, planes, stride, name, dtype, cardinality=32, base_width=4):
    """bn1 -> conv1 1x1 -> bn2 -> prelu1 -> conv2 3x3 grouped (stride) -> bn3 -> prelu2 -> conv3 1x1 -> bn4, plus
    the identity (or downsample); no activation after the add."""
    width = group_width(planes, cardinality, base_width)
    out = TorchBatchNorm(name=f"{name}.bn1", dtype=dtype)(x)
    out = conv(out, width, 1, f"{name}.conv1", kernel_initializer=conv_init(), dtype=dtype)
    out = TorchBatchNorm(name=f"{name}.bn2", dtype=dtype)(out)
    out = prelu(f"{name}.prelu1", dtype)(out)
    out = conv(out, width, 3, f"{name}.conv2", stride=stride, padding=1, groups=cardinality,
               kernel_initializer=conv_init(), dtype=dtype)
    out = TorchBatchNorm(name=f"{name}.bn3", dtype=dtype)(out)
    out = prelu(f"{name}.prelu2", dtype)(out)
    out = conv(out, planes * EXPANSION, 1, f"{name}.conv3", kernel_initializer=conv_init(), dtype=dtype)
    out = TorchBatchNorm(name=f"{name}.bn4", dtype=dtype)(out)
    return residual_add(x, out, stride, name, dtype)


def resnext(layers, cardinality=32, base_width=4, num_features=512, dropout=0.0, fp16=False, input_size=112,
            name="resnext", precision=None, checkpointing=False):
    """IResNet's stem, stride plan and "E" output around Bottleneck blocks (stage outputs 256 .. 2048).

    Input [N, input_size, input_size, 3] float32, normalised (x - 127.5) / 127.5; output [N, num_features].
    """
    block = functools.partial(bottleneck, cardinality=cardinality, base_width=base_width)
    return iresnet(layers, num_features, dropout, fp16, input_size, name, precision, checkpointing, block=block)


def resnext50(num_features=512, dropout=0.0, fp16=False, input_size=112, **options):
    return resnext((3, 4, 6, 3), 32, 4, num_features, dropout, fp16, input_size, "resnext50", **options)


def resnext101(num_features=512, dropout=0.0, fp16=False, input_size=112, **options):
    return resnext((3, 4, 23, 3), 32, 4, num_features, dropout, fp16, input_size, "resnext101", **options)
