"""twinface.macs walks the architecture on paper; these hooks count the same operations on the real modules."""
import pytest
import torch
from torch import nn

from twinface.macs import count_macs
from twinface.registry import BACKBONES, backbone_spec
from twinface_torch.backbones import get_model


def hooked_count(model, input_size):
    """ptflops' convention, layer by layer: conv and linear MACs, 2 per BatchNorm output, 1 per PReLU / ReLU output,
    1 per pooling input (ptflops' pool hook)."""
    total = 0

    def hook(module, inputs, out):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += out.numel() * module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            total += 2 * out.numel()
        elif isinstance(module, (nn.PReLU, nn.ReLU)):
            total += out.numel()
        elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
            total += inputs[0].numel()

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, input_size, input_size))
    for handle in handles:
        handle.remove()
    return total


# The large IResNets share r50's blocks; r18 and r34 cover the stage depths, both MobileFaceNets the two stems.
@pytest.mark.parametrize("name,input_size,features", [("r18", 112, 512), ("r34", 64, 128), ("r50", 32, 512),
                                                      ("mbf", 112, 512), ("mbf_large", 64, 256),
                                                      ("densenet121", 112, 512), ("densenet121", 32, 128)])
def test_counted_macs_equal_the_real_modules(name, input_size, features):
    assert name in BACKBONES
    spec = backbone_spec(name)
    model = get_model(name, num_features=features, input_size=input_size)
    assert count_macs(spec.family, spec.kwargs, input_size, features) == hooked_count(model, input_size)
