"""Face-adapted ResNeXt (Xie et al. 2017, 32x4d): IResNet's stem, stride plan and "E" output around
insightface's "IR"-style pre-BN bottleneck with a grouped 3x3 convolution (docs/backbones.md)."""
import functools

from torch import nn

from twinface.macs import group_width
from twinface_torch.backbones.iresnet import IResNet, conv1x1

EXPANSION = 4


class Bottleneck(nn.Module):
    """bn1 -> conv1 1x1 -> bn2 -> prelu1 -> conv2 3x3 grouped (stride) -> bn3 -> prelu2 -> conv3 1x1 -> bn4, plus
    the identity (or downsample); no activation after the add, as IBasicBlock."""

    def __init__(self, inplanes, planes, stride=1, downsample=None, cardinality=32, base_width=4):
        super().__init__()
        width, out = group_width(planes, cardinality, base_width), planes * EXPANSION
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = conv1x1(inplanes, width)
        self.bn2 = nn.BatchNorm2d(width, eps=1e-5)
        self.prelu1 = nn.PReLU(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=cardinality, bias=False)
        self.bn3 = nn.BatchNorm2d(width, eps=1e-5)
        self.prelu2 = nn.PReLU(width)
        self.conv3 = conv1x1(width, out)
        self.bn4 = nn.BatchNorm2d(out, eps=1e-5)
        self.downsample = downsample

    def forward(self, x):
        out = self.prelu1(self.bn2(self.conv1(self.bn1(x))))
        out = self.bn4(self.conv3(self.prelu2(self.bn3(self.conv2(out)))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class ResNeXt(IResNet):
    """IResNet with Bottleneck blocks: stage outputs 256 / 512 / 1024 / 2048, fc 2048 * (input_size / 16)^2 ->
    num_features."""

    def __init__(self, layers, cardinality=32, base_width=4, dropout=0.0, num_features=512, fp16=False,
                 input_size=112, arch="resnext", precision=None, checkpointing=False):
        block = functools.partial(Bottleneck, cardinality=cardinality, base_width=base_width)
        super().__init__(layers, dropout, num_features, fp16, input_size, arch, precision, checkpointing,
                         block=block, expansion=EXPANSION)


def resnext50(num_features=512, dropout=0.0, fp16=False, input_size=112, **options):
    return ResNeXt((3, 4, 6, 3), 32, 4, dropout, num_features, fp16, input_size, arch="resnext50", **options)


def resnext101(num_features=512, dropout=0.0, fp16=False, input_size=112, **options):
    return ResNeXt((3, 4, 23, 3), 32, 4, dropout, num_features, fp16, input_size, arch="resnext101", **options)
