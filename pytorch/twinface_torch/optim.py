"""Optimizers with torch semantics (the TF twin reimplements exactly these updates)."""
import torch

OPTIMIZERS = ("sgd", "adamw")


def build_optimizer(name, params, lr, momentum=0.9, weight_decay=5e-4, betas=(0.9, 0.999), eps=1e-8):
    """SGD (coupled weight decay, dampening 0, no Nesterov) or AdamW (decoupled decay).

    Weight decay applies to every trainable parameter, as arcface_torch; frozen ones (requires_grad
    False, e.g. the features BN scale) never get a gradient and stay untouched. The caller sets
    param_group["lr"] each step.
    """
    params = [p for p in params if not isinstance(p, torch.Tensor) or p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
