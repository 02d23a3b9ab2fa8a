"""Data-like weights for an untrained backbone: for checks and benchmarks that must not pass through identities."""
import torch
from torch import nn

from .backbones import get_model


def calibrate_batchnorm(model, x, randomize=True, seed=1):
    """BatchNorm running statistics of the batch `x` instead of the initial (0, 1) and, with `randomize`,
    distinct BatchNorm / LayerNorm affine and PReLU values (seeded); returns the model in eval mode.

    A fresh backbone is nothing like a trained one: identity BatchNorms let eval-mode checks pass a wrong
    mapping unnoticed, and a fresh IResNet-50 grows its activations to ~1e20."""
    generator = torch.Generator().manual_seed(seed)
    batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        if randomize:
            for m in model.modules():
                if m in batchnorms:
                    if m.weight.requires_grad:           # IResNet's `features` BN keeps its weight frozen at 1
                        m.weight.uniform_(0.5, 1.5, generator=generator)
                    m.bias.normal_(0.0, 0.1, generator=generator)
                elif isinstance(m, nn.PReLU):
                    m.weight.uniform_(0.0, 0.5, generator=generator)
                elif isinstance(m, nn.LayerNorm):            # ViT: a gamma / beta mix-up must show
                    m.weight.uniform_(0.5, 1.5, generator=generator)
                    m.bias.normal_(0.0, 0.1, generator=generator)
        for bn in batchnorms:
            bn.reset_running_stats()
            bn.momentum = None                           # cumulative average: one batch -> its statistics
        model.train()(x)
        for bn in batchnorms:
            bn.momentum = 0.1
    return model.eval()


def trained_like(arch, input_size=112, batch=8, **kwargs):
    """get_model(arch, ...) seeded, calibrated on `batch` uniform [-1, 1] images."""
    torch.manual_seed(0)
    model = get_model(arch, input_size=input_size, **kwargs)
    x = torch.rand(batch, 3, input_size, input_size, generator=torch.Generator().manual_seed(2)) * 2 - 1
    return calibrate_batchnorm(model, x)
