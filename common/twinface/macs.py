"""Operations of one forward pass, counted from the backbone definitions (twinface.registry), not typed in.

The count follows ptflops, which arcface_torch's flops.py uses for its published figures (IResNet-50 6.3 G at
112x112): each convolution out_h * out_w * out_channels * k * k * in_channels / groups, each fully connected
layer in * out (per token for a ViT's), 2 per element out of a BatchNorm or an affine LayerNorm (scale and shift),
1 per element out of a PReLU, ReLU or ReLU6, 1 per element into a max / average pool; additions, biases,
concatenations and softmax are left out. A ViT's attention products (q k^T and the weighted sum of v), which
ptflops' module hooks do not see, count 2 * tokens^2 * dim per block, as arcface_torch's own `extra_gflops` does.
The walk mirrors both twins' builders layer by layer; pytorch/tests/test_macs.py holds it to hooks on the real torch
modules, so a change to the architecture cannot leave these numbers behind.
"""
from twinface.densenet import dense_stages
from twinface.vit import PATCH


class _Counter:
    def __init__(self, size):
        self.size, self.macs = size, 0

    def bn(self, channels):
        self.macs += 2 * channels * self.size * self.size

    def act(self, channels):
        """A PReLU or ReLU on the current map."""
        self.macs += channels * self.size * self.size

    def pool(self, channels, kernel, stride, padding=0):
        self.macs += channels * self.size * self.size
        self.size = (self.size + 2 * padding - kernel) // stride + 1

    def conv(self, cin, cout, kernel=1, stride=1, groups=1, padding=None, bn=True, prelu=False):
        """A bias-free convolution on the current map, optionally followed by BatchNorm and PReLU."""
        pad = kernel // 2 if padding is None else padding
        self.size = (self.size + 2 * pad - kernel) // stride + 1
        self.macs += self.size * self.size * cout * kernel * kernel * cin // groups
        if bn:
            self.bn(cout)
        if prelu:
            self.act(cout)

    def linear_bn(self, cin, cout):
        """A fully connected layer followed by BatchNorm1d (the embedding layer of both families)."""
        self.macs += cin * cout + 2 * cout


def group_width(planes: int, cardinality: int, base_width: int) -> int:
    """Channels of a ResNeXt block's grouped 3x3 conv (torchvision's rule): 128 .. 1024 for 32x4d."""
    return int(planes * base_width / 64) * cardinality


def _basic_block(c, cin, planes, stride):
    c.bn(cin)                                          # bn1 on the block's input
    c.conv(cin, planes, 3, prelu=True)                 # conv1, bn2, prelu
    c.conv(planes, planes, 3, stride)                  # conv2, bn3


def _bottleneck(cardinality, base_width):
    def block(c, cin, planes, stride):
        width = group_width(planes, cardinality, base_width)
        c.bn(cin)                                                              # bn1
        c.conv(cin, width, prelu=True)                                         # conv1 1x1, bn2, prelu1
        c.conv(width, width, 3, stride, groups=cardinality, prelu=True)        # conv2 grouped, bn3, prelu2
        c.conv(width, 4 * planes)                                              # conv3 1x1, bn4
    return block


def _iresnet(c, layers, num_features, block=_basic_block, expansion=1):
    """IResNet's stem, stages and "E" output; ResNeXt is the same with its bottleneck (expansion 4)."""
    c.conv(3, 64, 3, prelu=True)
    inplanes = 64
    for planes, blocks in zip((64, 128, 256, 512), layers):
        # The first block of a stage halves the side (in its 3x3 conv) and has a 1x1 stride-2 shortcut + BN.
        shortcut = _Counter(c.size)
        shortcut.conv(inplanes, planes * expansion, 1, 2, padding=0)
        c.macs += shortcut.macs
        for index in range(blocks):
            block(c, inplanes if index == 0 else planes * expansion, planes, 2 if index == 0 else 1)
        inplanes = planes * expansion
    c.bn(inplanes)
    c.linear_bn(inplanes * c.size * c.size, num_features)


def _depthwise(c, cin, cout, groups, stride):
    c.conv(cin, groups, prelu=True)
    c.conv(groups, groups, 3, stride, groups=groups, prelu=True)
    c.conv(groups, cout)


def _mobilefacenet(c, blocks, scale, num_features):
    width = 64 * scale
    c.conv(3, width, 3, 2, prelu=True)
    if blocks[0] == 1:
        c.conv(width, width, 3, groups=64, prelu=True)
    else:
        for _ in range(blocks[0]):
            _depthwise(c, width, width, 128, 1)
    for cin, cout, groups, residual_blocks, residual_groups in (
            (width, width, 128, blocks[1], 128), (width, 2 * width, 256, blocks[2], 256),
            (2 * width, 2 * width, 512, blocks[3], 256)):
        _depthwise(c, cin, cout, groups, 2)
        for _ in range(residual_blocks):
            _depthwise(c, cout, cout, residual_groups, 1)
    c.conv(2 * width, 512, prelu=True)                         # conv_sep
    c.conv(512, 512, c.size, groups=512, padding=0)            # GDC: depthwise over the whole final map
    c.linear_bn(512, num_features)


def _vit(c, dim, depth, num_features):
    tokens = (c.size // PATCH) ** 2
    c.macs += tokens * dim * 3 * PATCH * PATCH                # patch_embed.proj
    per_token = (2 * dim + 3 * dim * dim + dim * dim       # norm1, qkv, proj
                 + 2 * dim + 4 * dim * dim + 4 * dim + 4 * dim * dim)    # norm2, fc1, ReLU6, fc2
    c.macs += depth * (tokens * per_token + 2 * tokens * tokens * dim)
    c.macs += tokens * 2 * dim                              # norm
    c.linear_bn(tokens * dim, dim)                          # feature.0, feature.1
    c.linear_bn(dim, num_features)                          # feature.2, feature.3


def _densenet(c, blocks, growth, init, bn_size, num_features):
    c.conv(3, init, 3)
    c.act(init)                                                # relu0
    c.pool(init, 3, 2, padding=1)
    for (cin, cout, halved), layers in zip(dense_stages(init, growth, blocks), blocks):
        for j in range(layers):
            channels = cin + j * growth
            c.bn(channels)                                     # norm1, relu1 on the concatenated input
            c.act(channels)
            c.conv(channels, bn_size * growth, prelu=True)     # conv1, norm2, relu2
            c.conv(bn_size * growth, growth, 3, bn=False)      # conv2
        if halved:
            c.bn(cout)
            c.act(cout)
            c.conv(cout, halved, bn=False)
            c.pool(halved, 2, 2)
    c.bn(cout)
    c.linear_bn(cout * c.size * c.size, num_features)


def count_macs(family: str, kwargs: dict, input_size: int = 112, num_features: int = 512) -> int:
    """Operations (ptflops' "MACs") of one image through the backbone `family` built with registry `kwargs`."""
    c = _Counter(input_size)
    if family == "iresnet":
        _iresnet(c, kwargs["layers"], num_features)
    elif family == "mobilefacenet":
        _mobilefacenet(c, kwargs["blocks"], kwargs["scale"], num_features)
    elif family == "resnext":
        _iresnet(c, kwargs["layers"], num_features, _bottleneck(kwargs["cardinality"], kwargs["base_width"]), 4)
    elif family == "densenet":
        _densenet(c, **kwargs, num_features=num_features)
    elif family == "vit":
        _vit(c, kwargs["dim"], kwargs["depth"], num_features)
    else:
        raise ValueError(f"count_macs: unknown backbone family {family!r}; expected iresnet, mobilefacenet, "
                         f"resnext, densenet or vit")
    return c.macs
