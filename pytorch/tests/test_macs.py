"""twinface.macs walks the architecture on paper; these hooks count the same operations on the real modules."""
import pytest
import torch
from torch import nn

from twinface.macs import count_macs
from twinface.registry import BACKBONES, backbone_spec
from twinface_torch.backbones import get_model
from twinface_torch.backbones.vit import Attention


def hooked_count(model, input_size):
    """ptflops' convention, layer by layer: conv and linear MACs, 2 per BatchNorm / LayerNorm output, 1 per PReLU /
    ReLU / ReLU6 output, 1 per pooling input (ptflops' pool hook); a ViT's attention products as arcface_torch's
    extra_gflops."""
    total = 0

    def hook(module, inputs, out):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += out.numel() * module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        elif isinstance(module, nn.Linear):                 # per token when the input is [N, tokens, in]
            total += out.numel() // module.out_features * module.in_features * module.out_features
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)):
            total += 2 * out.numel()
        elif isinstance(module, (nn.PReLU, nn.ReLU, nn.ReLU6)):
            total += out.numel()
        elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
            total += inputs[0].numel()
        elif isinstance(module, Attention):                 # q k^T and attn v: functional, as arcface_torch counts
            total += 2 * out.shape[1] ** 2 * out.shape[2]

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, input_size, input_size))
    for handle in handles:
        handle.remove()
    return total


# The large IResNets share r50's blocks; r18 and r34 cover the stage depths, both MobileFaceNets the two stems;
# resnext101 differs from resnext50 in its block count only.
@pytest.mark.parametrize("name,input_size,features", [("r18", 112, 512), ("r34", 64, 128), ("r50", 32, 512),
                                                      ("mbf", 112, 512), ("mbf_large", 64, 256),
                                                      ("resnext50", 48, 128), ("vit_t", 112, 512), ("vit_s", 32, 128),
                                                      ("vit_b", 48, 512), ("densenet121", 112, 512),
                                                      ("densenet121", 32, 128)])
def test_counted_macs_equal_the_real_modules(name, input_size, features):
    assert name in BACKBONES
    spec = backbone_spec(name)
    model = get_model(name, num_features=features, input_size=input_size)
    assert count_macs(spec.family, spec.kwargs, input_size, features) == hooked_count(model, input_size)
