"""Losses on head logits [N, C] and int64 labels [N], and the triplet loss on embeddings [N, D]."""
import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from twinface.registry import TRIPLET_MINING, loss_defaults

from .heads import l2_normalize


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
    if name not in LOSS_FUNCTIONS:
        raise ValueError(f"loss {name!r} scores embeddings, not logits: it is TripletLoss, with head.type none")
    return partial(LOSS_FUNCTIONS[name], **params)


def pairwise_distances(embeddings, squared=False):
    """[N, N] euclidean distances between L2-normalised embeddings, from |a|^2 + |b|^2 - 2 a.b clamped at 0 with
    an exact 0 diagonal. sqrt(0) has an infinite derivative: where the distance is 0 the root is taken of 1e-16
    and masked out, so the gradient there is 0 (the TF twin does the same)."""
    x = l2_normalize(embeddings)
    sq = (x * x).sum(dim=1)
    d2 = torch.clamp(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), min=0.0)
    d2 = d2 * (1.0 - torch.eye(len(x), dtype=d2.dtype, device=d2.device))
    if squared:
        return d2
    zero = (d2 == 0).to(d2.dtype)
    return torch.sqrt(d2 + zero * 1e-16) * (1.0 - zero)


def _first(mask):
    """Index of the first True along the last axis (the tie rule of hard mining: the lowest index wins)."""
    index = torch.arange(mask.shape[-1], device=mask.device).expand(mask.shape)
    return torch.where(mask, index, mask.shape[-1]).argmin(dim=-1)


def triplet_loss(embeddings, labels, margin=0.2, mining="batch_hard", squared=False):
    """(loss, valid): the online-mined triplet loss of a batch and how many valid triplets (batch_all), anchors
    (batch_hard) or anchor-positive pairs (semi_hard) it had; valid == 0 means no triplet, loss 0. Rules:
    docs/losses.md."""
    if mining not in TRIPLET_MINING:
        raise ValueError(f"triplet_loss: mining must be one of {TRIPLET_MINING}, got {mining!r}")
    d = pairwise_distances(embeddings.float(), squared)
    same = labels[:, None] == labels[None, :]
    pos = same & ~torch.eye(len(labels), dtype=torch.bool, device=same.device)
    neg = ~same
    if mining == "batch_all":
        valid = pos[:, :, None] & neg[:, None, :]
        losses = torch.relu(d[:, :, None] - d[:, None, :] + margin) * valid
        active = (losses > 1e-16).sum()                    # averaged over the triplets that still violate the margin
        return losses.sum() / torch.clamp(active, min=1), int(valid.sum())
    with torch.no_grad():
        if mining == "batch_hard":      # per anchor the farthest positive and the closest negative
            p = _first(pos & (d == torch.where(pos, d, -1.0).amax(dim=1, keepdim=True)))[:, None]
            n = _first(neg & (d == torch.where(neg, d, math.inf).amin(dim=1, keepdim=True)))[:, None]
            valid = (pos.any(dim=1) & neg.any(dim=1))[:, None]
        else:   # semi_hard: per positive pair the closest negative farther than the positive, else the farthest
            p = None
            farthest = _first(neg & (d == torch.where(neg, d, -1.0).amax(dim=1, keepdim=True)))
            outside = neg[:, None, :] & (d[:, None, :] > d[:, :, None])
            closest = torch.where(outside, d[:, None, :], math.inf).amin(dim=2, keepdim=True)
            n = torch.where(outside.any(dim=2), _first(outside & (d[:, None, :] == closest)), farthest[:, None])
            valid = pos & neg.any(dim=1)[:, None]
    d_ap = d if p is None else d.gather(1, p)
    per = torch.relu(d_ap - d.gather(1, n) + margin) * valid
    return per.sum() / torch.clamp(valid.sum(), min=1), int(valid.sum())


class TripletLoss(nn.Module):
    """head.type none with loss.type triplet: the trainer's head slot, without parameters; returns (loss, valid)."""

    def __init__(self, margin=0.2, mining="batch_hard", squared=False):
        super().__init__()
        self.margin, self.mining, self.squared = margin, mining, squared

    def forward(self, embeddings, labels):
        return triplet_loss(embeddings, labels, self.margin, self.mining, self.squared)
