"""Losses on head logits [N, C] and int64 labels [N]."""
from functools import partial

import torch.nn.functional as F

from twinface.registry import loss_defaults


def cross_entropy(logits, labels):
    return F.cross_entropy(logits, labels)


def focal_loss(logits, labels, gamma=2.0):
    """Down-weights easy samples: mean((1 - p)^gamma * ce), p = exp(-ce) (arcface-pytorch's FocalLoss)."""
    ce = F.cross_entropy(logits, labels, reduction="none")
    p = (-ce).exp()
    return ((1.0 - p) ** gamma * ce).mean()


LOSS_FUNCTIONS = {"cross_entropy": cross_entropy, "focal": focal_loss}


def get_loss(name, **overrides):
    """Loss callable (logits, labels) -> scalar, with the registry's defaults updated by `overrides`."""
    params = {**loss_defaults(name), **overrides}    # raises on an unknown name, listing the known ones
    return partial(LOSS_FUNCTIONS[name], **params)
