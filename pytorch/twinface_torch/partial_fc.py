"""Partial FC v2 (arcface_torch's partial_fc_v2): class centres sharded over ranks, a sampled subset of them
per step, the margin of a MarginHead, and a cross-entropy whose softmax spans every rank's logits.

Which centres a rank holds and samples is decided in twinface.partial_fc (numpy), identically in both twins.
Called as `loss = head(embeddings, labels)`: the loss of the global batch, the same value on every rank.
"""
import torch
from torch import nn

from twinface import partial_fc as plan

from . import distributed as dist
from .heads import MarginRule, check_batch, l2_normalize


class PartialFC(nn.Module, MarginRule):
    def __init__(self, embedding_size, num_classes, sample_rate=1.0, rank=0, world_size=1, seed=0, s=64.0, m1=1.0,
                 m2=0.0, m3=0.0, interclass_filtering_threshold=0.0, gradient="straight_through", easy_margin=False):
        super().__init__()
        self._set_margin(s, m1, m2, m3, interclass_filtering_threshold, gradient, easy_margin)
        self.embedding_size, self.num_classes, self.sample_rate = embedding_size, num_classes, sample_rate
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.class_start, self.num_local = plan.shard(num_classes, world_size, rank)
        self.weight = nn.Parameter(torch.from_numpy(
            plan.init_centres(seed, self.class_start, self.num_local, embedding_size)))
        self.step = 0                   # steps trained: seeds the negatives' draw (restored on resume)
        self.last_index = None                            # centres sampled at the last call (tests, the bench)

    def forward(self, embeddings, labels):
        check_batch("PartialFC", embeddings, labels, self.embedding_size, self.num_classes)
        embeddings = dist.gather(embeddings)
        labels = dist.gather_labels(labels)
        index, local = plan.select(labels.cpu().numpy(), self.class_start, self.num_local, self.sample_rate,
                                   self.seed, self.step, self.rank)
        self.step += 1
        self.last_index = index
        index = torch.from_numpy(index).to(self.weight.device)
        local = torch.from_numpy(local).to(self.weight.device)
        centres = self.weight if len(index) == self.num_local else self.weight[index]
        cos = torch.clamp(l2_normalize(embeddings) @ l2_normalize(centres).T, -1.0, 1.0)
        return distributed_cross_entropy(self.logits_from_cos(cos, local), local)


def distributed_cross_entropy(logits, local_labels):
    """Mean over the global batch of logsumexp(all ranks' logits) - target logit. `local_labels` is the column of
    each row's target on this rank, -1 where the target lives on another rank (every row has it on exactly one).
    Same value as F.cross_entropy over the concatenated logits (log-sum-exp form, not arcface_torch's
    -log(max(p, 1e-30)): no clamp, no precision lost for confident rows)."""
    top = dist.all_max(logits.max(dim=1, keepdim=True).values)
    sum_exp = dist.sum_over_ranks(torch.exp(logits - top).sum(dim=1, keepdim=True))
    here = (local_labels >= 0).unsqueeze(1)
    target = logits.gather(1, local_labels.clamp(min=0).unsqueeze(1))
    target = dist.sum_over_ranks(torch.where(here, target, torch.zeros_like(target)))
    return (torch.log(sum_exp) + top - target).mean()

