"""Classification heads on top of the embedding.

MarginHead is the one combined-margin head: target logit = s * (psi(m1*theta + m2) - m3);
Softmax, SphereFace, ArcFace and CosFace are settings of it (twinface.registry.HEADS). Where it departs from
arcface_torch's CombinedMarginLoss (docs/design.md, "Margin heads"):
- arcface_torch applies only cos(theta) - m3 when m3 > 0, ignoring m2; here m2 and m3 always both apply.
- arcface_torch refuses m1 != 1. Here psi is SphereFace's monotonic psi(phi) = (-1)^k cos(phi) - 2k on
  [k pi, (k + 1) pi]; with m1 == 1 it is plain cos(phi), which is exactly arcface_torch.
- easy_margin (insightface's ArcFace option): the margin applies only where cos(theta) > 0.
With subcenters=K (Sub-center ArcFace) each class has K centres and its cosine is the largest of theirs.
AdaFace is its own head: the official implementation's formula (docs/heads.md).
"""
import math

import torch
from torch import nn

from twinface.registry import check_subcenters, head_defaults, margin_settings

GRADIENTS = ("straight_through", "analytic")


def l2_norms(x):
    """[N, 1] row norms sqrt(max(sum(x^2), 1e-24)), the same expression in both twins."""
    return torch.sqrt(torch.clamp((x * x).sum(dim=1, keepdim=True), min=1e-24))


def l2_normalize(x):
    # x / l2_norms(x): clamped before the sqrt, so an all-zero row has a zero gradient, not NaN. sqrt and division
    # are correctly rounded on every CPU; a vectorised rsqrt is not (TF's AVX-512 rsqrt(4) = 0.49999994), and
    # acos in the margin turns that ulp at cos = 1 into 3e-4.
    return x / l2_norms(x)


def check_labels(head, labels, num_classes):
    if labels.numel() and (int(labels.max()) >= num_classes or int(labels.min()) < -1):
        raise ValueError(f"{head}: labels must be in [-1, {num_classes - 1}] (-1 = no target), "
                         f"got min {int(labels.min())}, max {int(labels.max())}")


def check_batch(head, embeddings, labels, embedding_size, num_classes):
    if embeddings.dim() != 2 or embeddings.shape[1] != embedding_size:
        raise ValueError(f"{head}: expected embeddings [N, {embedding_size}], got shape {tuple(embeddings.shape)}")
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"{head}: expected labels [{embeddings.shape[0]}], got shape {tuple(labels.shape)}")
    if labels.dtype != torch.int64:
        raise ValueError(f"{head}: expected int64 labels, got {labels.dtype}")


class MarginRule:
    """The margin settings and their math, without class centres: MarginHead (every class) and
    twinface_torch.partial_fc.PartialFC (a shard of the classes, sampled) apply the very same rule."""

    def _set_margin(self, s, m1, m2, m3, interclass_filtering_threshold, gradient, easy_margin):
        who = type(self).__name__
        if gradient not in GRADIENTS:
            raise ValueError(f"{who}: gradient must be one of {GRADIENTS}, got {gradient!r}")
        if not m1 > 0:
            raise ValueError(f"{who}: m1 multiplies the angle and must be > 0, got {m1}")
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3
        self.interclass_filtering_threshold = interclass_filtering_threshold
        self.gradient = gradient
        self.easy_margin = easy_margin

    def logits_from_cos(self, cos, labels):
        """Margin and scale applied to clamped cosines [N, C]; rows labelled -1 get no margin."""
        target_index = labels.clamp(min=0).unsqueeze(1)
        is_target = torch.zeros_like(cos, dtype=torch.bool).scatter_(1, target_index, (labels >= 0).unsqueeze(1))
        if self.interclass_filtering_threshold > 0:
            # Very similar non-target classes are likely label noise (same person twice): drop their logit.
            keep = ~((cos > self.interclass_filtering_threshold) & ~is_target)
            cos = cos * keep.to(cos.dtype)
        target_cos = cos.gather(1, target_index)
        if self.gradient == "straight_through":
            # Exact forward value, gradient 1 w.r.t. the cosine: no 1/sqrt(1-cos^2), no NaN at cos = +-1.
            with torch.no_grad():
                margin = self.margin(target_cos)
            target_logit = target_cos + (margin - target_cos.detach())
        else:
            target_logit = self.margin(torch.clamp(target_cos, -1.0 + 1e-7, 1.0 - 1e-7))
        if self.easy_margin:
            target_logit = torch.where(target_cos > 0, target_logit, target_cos)
        return self.s * torch.where(is_target, target_logit, cos)

    def margin(self, cos):
        phi = self.m1 * torch.acos(cos) + self.m2
        if self.m1 == 1:
            return torch.cos(phi) - self.m3
        k = torch.floor(phi / math.pi).detach()          # SphereFace's piece: decreasing over the whole range
        return (1 - 2 * torch.remainder(k, 2)) * torch.cos(phi) - 2 * k - self.m3


class MarginHead(nn.Module, MarginRule):
    def __init__(self, embedding_size, num_classes, s=64.0, m1=1.0, m2=0.0, m3=0.0,
                 interclass_filtering_threshold=0.0, gradient="straight_through", easy_margin=False, subcenters=1):
        super().__init__()
        self._set_margin(s, m1, m2, m3, interclass_filtering_threshold, gradient, easy_margin)
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.subcenters = check_subcenters("MarginHead", subcenters)
        # Class-major, as insightface's Sub-center ArcFace: row c * K + k is sub-centre k of class c.
        self.weight = nn.Parameter(torch.normal(0.0, 0.01, (num_classes * subcenters, embedding_size)))

    def forward(self, embeddings, labels):
        check_batch("MarginHead", embeddings, labels, self.embedding_size, self.num_classes)
        check_labels("MarginHead", labels, self.num_classes)
        cos = torch.clamp(l2_normalize(embeddings) @ l2_normalize(self.weight).T, -1.0, 1.0)
        if self.subcenters > 1:     # amax: a tie shares the gradient equally, as tf.reduce_max does
            cos = cos.view(-1, self.num_classes, self.subcenters).amax(dim=2)
        return self.logits_from_cos(cos, labels)


class AdaFace(nn.Module):
    """AdaFace (Kim et al. 2022), the official implementation's formula (github mk-minchul/AdaFace, head.py):
    the clipped, detached embedding norm, standardised by an EMA of the batches' norm mean and unbiased std
    (updated before use, training only), scales an angular and an additive margin on the target. The EMA is the
    buffers `batch_mean`, `batch_std` (checkpointed, converted with the weights). Gradients are autograd's
    through acos, as there: cos is clamped to 1 - 1e-3, so they stay finite."""
    EPS = 1e-3

    def __init__(self, embedding_size, num_classes, s=64.0, m=0.4, h=0.333, t_alpha=0.01):
        super().__init__()
        self.embedding_size, self.num_classes = embedding_size, num_classes
        self.s, self.m, self.h, self.t_alpha = s, m, h, t_alpha
        self.weight = nn.Parameter(torch.normal(0.0, 0.01, (num_classes, embedding_size)))
        self.register_buffer("batch_mean", torch.full((1,), 20.0))
        self.register_buffer("batch_std", torch.full((1,), 100.0))

    def forward(self, embeddings, labels):
        check_batch("AdaFace", embeddings, labels, self.embedding_size, self.num_classes)
        check_labels("AdaFace", labels, self.num_classes)
        norms = l2_norms(embeddings)
        cos = torch.clamp((embeddings / norms) @ l2_normalize(self.weight).T, -1.0 + self.EPS, 1.0 - self.EPS)
        safe_norms = torch.clamp(norms, 0.001, 100.0).detach()
        if self.training:
            if len(labels) < 2:
                raise ValueError(f"AdaFace: a training batch needs >= 2 samples (unbiased std of the norms), "
                                 f"got {len(labels)}")
            with torch.no_grad():
                t = self.t_alpha
                self.batch_mean.copy_(safe_norms.mean() * t + (1 - t) * self.batch_mean)
                self.batch_std.copy_(safe_norms.std() * t + (1 - t) * self.batch_std)
        scaler = torch.clamp((safe_norms - self.batch_mean) / (self.batch_std + self.EPS) * self.h, -1.0, 1.0)
        is_target = torch.zeros_like(cos).scatter_(1, labels.clamp(min=0).unsqueeze(1),
                                                   (labels >= 0).to(cos.dtype).unsqueeze(1))
        theta = torch.clamp(torch.acos(cos) + is_target * (self.m * scaler * -1), self.EPS, math.pi - self.EPS)
        return (torch.cos(theta) - is_target * (self.m + self.m * scaler)) * self.s


class LinearHead(nn.Module):
    """Plain softmax classifier (no normalisation, no margin), nn.Linear's default init."""

    def __init__(self, embedding_size, num_classes):
        super().__init__()
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        bound = 1.0 / math.sqrt(embedding_size)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_classes).uniform_(-bound, bound))

    def forward(self, embeddings, labels):
        check_batch("LinearHead", embeddings, labels, self.embedding_size, self.num_classes)
        return embeddings @ self.weight.T + self.bias


def get_head(name, embedding_size, num_classes, **overrides):
    if name == "linear":
        return LinearHead(embedding_size, num_classes, **overrides)
    if name == "adaface":
        return AdaFace(embedding_size, num_classes, **{**head_defaults(name), **overrides})
    return MarginHead(embedding_size, num_classes, **margin_settings(name, overrides))
