"""Face-adapted DenseNet-BC after insightface's MXNet `fdensenet` (docs/backbones.md).

Stem 3x3 conv (stride 1) -> BN -> ReLU -> 3x3 max pool (stride 2), four dense blocks joined by transitions
(BN -> PReLU -> 1x1 conv halving the channels -> 2x2 average pool), then the "E" embedding output of IResNet:
bn2 -> dropout -> fc -> features (BatchNorm1d, scale frozen at 1). Trunk module names are torchvision's
DenseNet names without its `features.` container, whose name here is the embedding BatchNorm's.
"""
from collections import OrderedDict

import torch
from torch import nn

from twinface.densenet import dense_stages
from twinface.precision import resolve_precision
from twinface_torch.backbones.iresnet import check_input, check_input_size, trunk_precision


class DenseLayer(nn.Module):
    """norm1 -> relu1 -> 1x1 conv1 (bn_size * growth) -> norm2 -> relu2 -> 3x3 conv2 (growth), appended to x."""

    def __init__(self, channels, growth, bn_size):
        super().__init__()
        width = bn_size * growth
        self.norm1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.PReLU(channels)
        self.conv1 = nn.Conv2d(channels, width, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(width)
        self.relu2 = nn.PReLU(width)
        self.conv2 = nn.Conv2d(width, growth, 3, padding=1, bias=False)

    def forward(self, x):
        new = self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))
        return torch.cat([x, new], 1)       # old channels first, as torchvision and fdensenet's HybridConcurrent


def transition(channels, out):
    return nn.Sequential(OrderedDict(norm=nn.BatchNorm2d(channels), relu=nn.PReLU(channels),
                              conv=nn.Conv2d(channels, out, 1, bias=False), pool=nn.AvgPool2d(2, 2)))


class DenseNet(nn.Module):
    def __init__(self, blocks=(6, 12, 24, 16), growth=32, init=64, bn_size=4, num_features=512, dropout=0.0,
                 fp16=False, input_size=112, arch="densenet", precision=None):
        super().__init__()
        check_input_size(arch, input_size)      # max pool + three transitions: side / 16
        self.arch = arch
        self.precision = resolve_precision(arch, precision, fp16)
        self.input_size = input_size
        self.conv0 = nn.Conv2d(3, init, 3, padding=1, bias=False)
        self.norm0 = nn.BatchNorm2d(init)
        self.relu0 = nn.ReLU()
        self.pool0 = nn.MaxPool2d(3, 2, padding=1)
        trunk = [self.conv0, self.norm0, self.relu0, self.pool0]
        for i, ((cin, cout, halved), layers) in enumerate(zip(dense_stages(init, growth, blocks), blocks), start=1):
            block = nn.Sequential()
            for j in range(layers):
                block.add_module(f"denselayer{j + 1}", DenseLayer(cin + j * growth, growth, bn_size))
            self.add_module(f"denseblock{i}", block)
            trunk.append(block)
            if halved:
                self.add_module(f"transition{i}", transition(cout, halved))
                trunk.append(getattr(self, f"transition{i}"))
        self.trunk = trunk                      # a plain list: the modules stay registered under their names
        self.bn2 = nn.BatchNorm2d(cout)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(cout * (input_size // 16) ** 2, num_features)
        self.features = nn.BatchNorm1d(num_features)
        # fdensenet's "E" output (MXNet fix_gamma=True): the embedding BN's scale stays 1, as IResNet.
        self.features.weight.requires_grad = False

        # insightface's train.py initialises fdensenet with MXNet Xavier(uniform, factor "in", magnitude 2):
        # kaiming uniform, fan_in; biases 0.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_uniform_(m.weight, mode="fan_in", nonlinearity="relu")
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        check_input(x, self.arch, self.input_size)
        # Mixed precision covers the trunk only; fc and features stay fp32, as IResNet.
        with trunk_precision(x, self.precision):
            for module in self.trunk:
                x = module(x)
            x = self.dropout(torch.flatten(self.bn2(x), 1))
        x = self.fc(x if self.precision == "fp32" else x.float())
        return self.features(x)
