"""MobileFaceNet as in insightface's arcface_torch (adapted there from cavaface).

Module nesting follows arcface_torch so its checkpoints load with strict=True. In DepthWise and
Residual, `groups` is the width of the inner depthwise stage, not a divisor of the block's width.
"""
from torch import nn

from twinface.precision import resolve_precision
from twinface_torch.backbones.iresnet import check_input, check_input_size, trunk_precision


class ConvBlock(nn.Module):
    def __init__(self, in_c, out_c, kernel=(1, 1), stride=(1, 1), padding=(0, 0), groups=1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, stride=stride, padding=padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
            nn.PReLU(out_c),
        )

    def forward(self, x):
        return self.layers(x)


class LinearBlock(nn.Module):
    def __init__(self, in_c, out_c, kernel=(1, 1), stride=(1, 1), padding=(0, 0), groups=1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, stride=stride, padding=padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
        )

    def forward(self, x):
        return self.layers(x)


class DepthWise(nn.Module):
    """1x1 expand to `groups` channels -> depthwise conv -> linear 1x1 projection to out_c."""

    def __init__(self, in_c, out_c, residual=False, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=1):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_c, groups),
            ConvBlock(groups, groups, kernel, stride, padding, groups=groups),
            LinearBlock(groups, out_c),
        )

    def forward(self, x):
        out = self.layers(x)
        return x + out if self.residual else out


class Residual(nn.Module):
    def __init__(self, c, num_block, groups, kernel=(3, 3), stride=(1, 1), padding=(1, 1)):
        super().__init__()
        self.layers = nn.Sequential(
            *[DepthWise(c, c, True, kernel, stride, padding, groups) for _ in range(num_block)])

    def forward(self, x):
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise conv over the whole final map (7x7 at 112) instead of average pooling."""

    def __init__(self, embedding_size, kernel=7):
        super().__init__()
        self.layers = nn.Sequential(
            LinearBlock(512, 512, (kernel, kernel), groups=512),
            nn.Flatten(1),
            nn.Linear(512, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )

    def forward(self, x):
        return self.layers(x)


class MobileFaceNet(nn.Module):
    def __init__(self, fp16=False, num_features=512, blocks=(1, 4, 6, 2), scale=2, input_size=112,
                 arch="mobilefacenet", precision=None):
        super().__init__()
        check_input_size(arch, input_size)
        self.arch = arch
        self.precision = resolve_precision(arch, precision, fp16)
        self.input_size = input_size
        width = 64 * scale
        self.layers = nn.ModuleList([ConvBlock(3, width, (3, 3), (2, 2), (1, 1))])
        if blocks[0] == 1:
            self.layers.append(ConvBlock(width, width, (3, 3), (1, 1), (1, 1), groups=64))
        else:
            self.layers.append(Residual(width, blocks[0], groups=128))
        self.layers.extend([
            DepthWise(width, width, groups=128),
            Residual(width, blocks[1], groups=128),
            DepthWise(width, 2 * width, groups=256),
            Residual(2 * width, blocks[2], groups=256),
            DepthWise(2 * width, 2 * width, groups=512),
            Residual(2 * width, blocks[3], groups=256),
        ])
        self.conv_sep = ConvBlock(2 * width, 512)
        self.features = GDC(num_features, input_size // 16)

        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x):
        check_input(x, self.arch, self.input_size)
        # Mixed precision covers the trunk only; conv_sep and the GDC head run in fp32, as arcface_torch.
        with trunk_precision(x, self.precision):
            for layer in self.layers:
                x = layer(x)
        return self.features(self.conv_sep(x if self.precision == "fp32" else x.float()))


def get_mbf(num_features=512, blocks=(1, 4, 6, 2), scale=2, fp16=False, input_size=112, precision=None):
    return MobileFaceNet(fp16, num_features, blocks, scale, input_size, arch="mbf", precision=precision)


def get_mbf_large(num_features=512, blocks=(2, 8, 12, 4), scale=4, fp16=False, input_size=112, precision=None):
    return MobileFaceNet(fp16, num_features, blocks, scale, input_size, arch="mbf_large", precision=precision)
