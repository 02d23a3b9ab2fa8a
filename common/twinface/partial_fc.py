"""Partial FC v2 bookkeeping both twins share: which class centres a rank holds, which it samples each step,
and where each label lands among them. numpy only, so both twins pick the very same centres.

Shards follow arcface_torch's partial_fc_v2: rank r holds `num_classes // world` centres, plus one more when
r < num_classes % world, starting at `class_start`. Each step keeps every centre that is a positive of the
(all-gathered) global batch and fills up to `int(sample_rate * num_local)` with random negatives. The random
draw comes from numpy's generator seeded by (seed, step, rank): deterministic, so a resumed run draws what the
uninterrupted one drew, and it needs no state in the checkpoint.
"""
import numpy as np


def shard(num_classes: int, world_size: int, rank: int):
    """(class_start, num_local): the slice of class ids [class_start, class_start + num_local) rank r holds."""
    if num_classes < world_size:
        raise ValueError(f"Partial FC: {num_classes} classes cannot be sharded over {world_size} ranks "
                         f"(each rank needs at least one class centre)")
    base, extra = divmod(num_classes, world_size)
    return base * rank + min(rank, extra), base + int(rank < extra)


def num_sampled(num_local: int, sample_rate: float) -> int:
    """Centres a rank keeps per step (at least its positives, which may be more)."""
    return num_local if sample_rate >= 1.0 else max(1, int(sample_rate * num_local))


def select(labels: np.ndarray, class_start: int, num_local: int, sample_rate: float, seed: int, step: int,
           rank: int):
    """(index, local_labels) for one step on one rank.

    labels: the global batch's class ids (all ranks' labels, gathered). index: sorted int64 rows of this rank's
    shard to use; all of them when sample_rate is 1.0. local_labels: per sample, the column in `index` of its
    class centre, or -1 when the centre lives on another rank.

    Negatives: a uniform random key per local centre, positives forced to the top, then the `num_sampled` largest
    keys (ties cannot reorder positives; among negatives a stable sort keeps the lower index first).
    """
    labels = np.asarray(labels, np.int64)
    local = labels - class_start
    mine = (local >= 0) & (local < num_local)
    count = num_sampled(num_local, sample_rate)
    if count >= num_local:
        index = np.arange(num_local, dtype=np.int64)
    else:
        positives = np.unique(local[mine])
        if len(positives) >= count:
            index = positives
        else:
            keys = np.random.default_rng([seed, step, rank]).random(num_local)
            keys[positives] = 2.0
            index = np.sort(np.argsort(-keys, kind="stable")[:count]).astype(np.int64)
    local_labels = np.full(len(labels), -1, np.int64)
    local_labels[mine] = np.searchsorted(index, local[mine])
    return index, local_labels


INIT_BLOCK = 4096           # classes per seeded block of initial centres


def init_centres(seed: int, class_start: int, num_local: int, embedding_size: int, std: float = 0.01):
    """Initial centres N(0, std) of classes [class_start, class_start + num_local), float32 [num_local, D].

    Drawn per block of INIT_BLOCK classes from a generator seeded by (seed, block): the values of a class do not
    depend on how the classes are sharded, so 1 and N ranks (and both twins) start from the same head, and no
    rank ever materialises the whole matrix (1M x 512 classes would be 2 GB)."""
    out = np.empty((num_local, embedding_size), np.float32)
    end = class_start + num_local
    for block in range(class_start // INIT_BLOCK, -(-end // INIT_BLOCK)):
        rows = np.random.default_rng([seed, 0x9FC, block]).standard_normal((INIT_BLOCK, embedding_size), np.float32)
        lo, hi = max(class_start, block * INIT_BLOCK), min(end, (block + 1) * INIT_BLOCK)
        out[lo - class_start:hi - class_start] = rows[lo - block * INIT_BLOCK:hi - block * INIT_BLOCK]
    return out * np.float32(std)


def needed(cfg, world_size: int) -> bool:
    """Partial FC replaces the plain head when the run is sharded or samples its classes (a triplet loss has no
    class centres: each rank mines its own identities)."""
    return cfg.head.type != "none" and (world_size > 1 or cfg.head.sample_rate < 1.0)


def check_supported(cfg, world_size: int):
    if not needed(cfg, world_size):
        return
    why = f"{world_size} processes" if world_size > 1 else f"head.sample_rate {cfg.head.sample_rate}"
    if cfg.head.type == "linear" or cfg.loss.type != "cross_entropy":
        raise ValueError(f"{why} trains the margin head as Partial FC, which takes a margin head type (not "
                         f"'linear') and loss.type cross_entropy; the config has head.type '{cfg.head.type}', "
                         f"loss.type '{cfg.loss.type}'")
    if cfg.head.type == "adaface" or cfg.head.subcenters > 1:
        # AdaFace's norm statistics would span the gathered global batch, sub-centres the sharded class ids:
        # neither is implemented for the sharded head
        raise ValueError(f"{why} trains the head as Partial FC, which supports neither head.type adaface nor "
                         f"head.subcenters > 1; the config has head.type '{cfg.head.type}', head.subcenters "
                         f"{cfg.head.subcenters} (train it in one process with head.sample_rate 1.0)")
