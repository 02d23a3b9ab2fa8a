"""Backbones by short name (twinface.registry): r18 r34 r50 r100 r200 mbf mbf_large resnext50 resnext101 densenet121
vit_t vit_s vit_b."""
from twinface.precision import check_checkpointing
from twinface.registry import backbone_spec, check_dropout
from twinface_torch.backbones.densenet import DenseNet
from twinface_torch.backbones.iresnet import IResNet
from twinface_torch.backbones.mobilefacenet import MobileFaceNet
from twinface_torch.backbones.resnext import ResNeXt
from twinface_torch.backbones.vit import VisionTransformer


def get_model(name, num_features=512, dropout=0.0, fp16=False, input_size=112, precision=None, checkpointing=False):
    """precision "fp32" | "fp16" | "bf16" (None: arcface_torch's `fp16` flag) for the conv trunk; checkpointing
    recomputes each IResNet / ResNeXt block in backprop instead of keeping its activations (training only)."""
    spec = backbone_spec(name)
    check_checkpointing(name, checkpointing)
    check_dropout(name, dropout)
    if spec.family == "iresnet":
        return IResNet(spec.kwargs["layers"], dropout, num_features, fp16, input_size, arch=name,
                       precision=precision, checkpointing=checkpointing)
    if spec.family == "densenet":
        return DenseNet(**spec.kwargs, num_features=num_features, dropout=dropout, fp16=fp16, input_size=input_size,
                        arch=name, precision=precision)
    if spec.family == "resnext":
        return ResNeXt(spec.kwargs["layers"], spec.kwargs["cardinality"], spec.kwargs["base_width"], dropout,
                       num_features, fp16, input_size, arch=name, precision=precision, checkpointing=checkpointing)
    if spec.family == "vit":
        return VisionTransformer(**spec.kwargs, num_features=num_features, fp16=fp16, input_size=input_size,
                                 arch=name, precision=precision)
    return MobileFaceNet(fp16, num_features, spec.kwargs["blocks"], spec.kwargs["scale"], input_size, arch=name,
                         precision=precision)
