"""IResNet as in insightface's arcface_torch.

Module attribute names and nesting are arcface_torch's, so its `backbone.pth` loads with
strict=True and no renaming; those names are also the canonical names of both twins.
"""
import contextlib
import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from twinface.precision import resolve_precision

REDUCED = {"fp16": torch.float16, "bf16": torch.bfloat16}
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


def check_input_size(arch, input_size):
    # Four stride-2 stages (or stride-2 stem + three stages) bring the side down by 16.
    if input_size < 16 or input_size % 16:
        raise ValueError(f"{arch}: input_size must be a positive multiple of 16, got {input_size}")


def check_input(x, arch, input_size):
    if torch.jit.is_tracing():    # sizes are traced values during ONNX export; the graph fixes C, H, W anyway
        return
    if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != input_size or x.shape[3] != input_size:
        raise ValueError(f"{arch}: expected input [N, 3, H, W] with H = W = {input_size}, "
                         f"got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{arch}: expected a float tensor normalised as (x - 127.5) / 127.5, got {x.dtype}")


def trunk_precision(x, precision):
    """Autocast for the conv trunk in `precision`; "fp32" runs without it."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(x.device.type, dtype=REDUCED[precision])


@contextlib.contextmanager
def batchnorm_stats_kept(module):
    """Let `module`'s BatchNorms update throwaway copies of their statistics, then put the real ones back.

    A checkpointed block runs its forward twice (once more in backprop); the second run must not apply the
    momentum update again. Copies, rather than track_running_stats=False, keep the tensors autograd saves the
    same in both runs, which torch.utils.checkpoint verifies.
    """
    kept = [(m, [getattr(m, n) for n in BN_STATS]) for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m, stats in kept:
        for name, stat in zip(BN_STATS, stats):
            setattr(m, name, stat.clone())
    try:
        yield
    finally:
        for m, stats in kept:
            for name, stat in zip(BN_STATS, stats):
                setattr(m, name, stat)


def recomputed(x, block):
    """block(x) without keeping its activations: they are recomputed in backprop (BN statistics updated once)."""
    return checkpoint(block, x, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), batchnorm_stats_kept(block)))


def conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class IBasicBlock(nn.Module):
    """Pre-activation-style block: BN first, PReLU in the middle, no activation after the add."""

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    """`block(inplanes, planes, stride, downsample)` builds each residual block, whose output has planes *
    `expansion` channels (IBasicBlock: 1; ResNeXt's bottleneck: 4)."""

    def __init__(self, layers, dropout=0.0, num_features=512, fp16=False, input_size=112, arch="iresnet",
                 precision=None, checkpointing=False, block=IBasicBlock, expansion=1):
        super().__init__()
        check_input_size(arch, input_size)
        self.arch = arch
        self.precision = resolve_precision(arch, precision, fp16)
        self.checkpointing = checkpointing
        self.input_size = input_size
        self.inplanes, self.block, self.expansion = 64, block, expansion
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes, eps=1e-5)
        self.prelu = nn.PReLU(self.inplanes)
        self.layer1 = self._make_layer(64, layers[0], stride=2)
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.bn2 = nn.BatchNorm2d(self.inplanes, eps=1e-5)
        self.dropout = nn.Dropout(p=dropout, inplace=False)
        self.fc = nn.Linear(self.inplanes * (input_size // 16) ** 2, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)
        # arcface_torch freezes the embedding BN's scale: only its shift is learnt.
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes, blocks, stride):
        out = planes * self.expansion
        downsample = None
        if stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(conv1x1(self.inplanes, out, stride), nn.BatchNorm2d(out, eps=1e-5))
        layers = [self.block(self.inplanes, planes, stride, downsample)]
        self.inplanes = out
        layers += [self.block(out, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        check_input(x, self.arch, self.input_size)
        # Mixed precision covers the conv trunk only; fc and features stay fp32, as arcface_torch.
        # Checkpointing per block, not per stage as arcface_torch: peak RSS of one r50 step at batch 64, 112x112,
        # CPU, measured 5325 MB without, 4222 MB per stage, 3867 MB per block.
        recompute = self.checkpointing and self.training and torch.is_grad_enabled()
        with trunk_precision(x, self.precision):
            x = self.prelu(self.bn1(self.conv1(x)))
            for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
                x = functools.reduce(recomputed, stage, x) if recompute else stage(x)
            x = self.bn2(x)
            x = torch.flatten(x, 1)
            x = self.dropout(x)
        x = self.fc(x if self.precision == "fp32" else x.float())
        return self.features(x)


def iresnet18(num_features=512, dropout=0.0, fp16=False, input_size=112, **options):
    return IResNet((2, 2, 2, 2), dropout, num_features, fp16, input_size, arch="iresnet18", **options)


def iresnet34(num_features=512, dropout=0.0, fp16=False, input_size=112, **options):
    return IResNet((3, 4, 6, 3), dropout, num_features, fp16, input_size, arch="iresnet34", **options)


def iresnet50(num_features=512, dropout=0.0, fp16=False, input_size=112, **options):
    return IResNet((3, 4, 14, 3), dropout, num_features, fp16, input_size, arch="iresnet50", **options)


def iresnet100(num_features=512, dropout=0.0, fp16=False, input_size=112, **options):
    return IResNet((3, 13, 30, 3), dropout, num_features, fp16, input_size, arch="iresnet100", **options)


def iresnet200(num_features=512, dropout=0.0, fp16=False, input_size=112, **options):
    return IResNet((6, 26, 60, 6), dropout, num_features, fp16, input_size, arch="iresnet200", **options)
