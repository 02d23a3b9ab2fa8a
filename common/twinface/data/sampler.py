"""The one source of data order and augmentation decisions for both twins.

Both twins iterate the same `EpochSampler`, so for a given (seed, epoch) they see the same samples in the same
batches with the same flips. Sharding follows torch's DistributedSampler: one global permutation per epoch,
rank r takes every world_size-th index, so a single process is just the world-size-1 case.
"""
import numpy as np


class EpochSampler:
    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, drop_last: bool = True, flip: bool = True):
        if num_samples <= 0:
            raise ValueError(f"EpochSampler: the data set is empty (num_samples={num_samples})")
        if not 0 <= rank < world_size:
            raise ValueError(f"EpochSampler: rank {rank} outside world size {world_size}")
        per_rank = num_samples // world_size
        if drop_last and per_rank < batch_size:
            raise ValueError(f"EpochSampler: {num_samples} samples over {world_size} rank(s) cannot fill one batch "
                             f"of {batch_size}; lower train.batch_size")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle, self.drop_last, self.flip = shuffle, drop_last, flip

    def steps_per_epoch(self) -> int:
        per_rank = self.num_samples // self.world_size
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def epoch_order(self, epoch: int):
        """(indices, flips) for this rank's whole epoch, before batching."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.num_samples) if self.shuffle else np.arange(self.num_samples)
        flips = rng.random(self.num_samples) < 0.5 if self.flip else np.zeros(self.num_samples, bool)
        usable = (self.num_samples // self.world_size) * self.world_size
        return order[:usable][self.rank::self.world_size], flips[:usable][self.rank::self.world_size]

    def batches(self, epoch: int, start_step: int = 0):
        """Yield (indices, flips) per step; `start_step` skips steps already done (resume mid-epoch)."""
        order, flips = self.epoch_order(epoch)
        for step in range(start_step, self.steps_per_epoch()):
            sl = slice(step * self.batch_size, (step + 1) * self.batch_size)
            yield order[sl], flips[sl]


class IdentitySampler:
    """P identities x K images per batch (triplet mining needs positives in every batch), the same batches in
    both twins. Same interface as EpochSampler.

    An epoch has as many steps as EpochSampler would give (so the schedule reads the same). Its identities come
    from back-to-back random permutations of all identities, seeded by (seed, epoch); a global batch takes the
    next P x world_size of them (never one twice in a batch) and rank r keeps identities [r*P, (r+1)*P), so ranks
    mine disjoint identities. The K images of an identity, and the flips, come from a generator seeded by
    (seed, epoch, step, rank): a resumed run skips steps without drawing them. An identity with fewer than K
    images is drawn with replacement (`short_identities` counts them; the trainer says how often).
    """

    def __init__(self, labels: np.ndarray, batch_size: int, images_per_identity: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, flip: bool = True):
        labels = np.asarray(labels, np.int64)
        k = images_per_identity
        if batch_size % k:
            raise ValueError(f"IdentitySampler: train.batch_size {batch_size} is not a multiple of "
                             f"data.images_per_identity {k} (a batch is P identities x K images)")
        if not 0 <= rank < world_size:
            raise ValueError(f"IdentitySampler: rank {rank} outside world size {world_size}")
        order = np.argsort(labels, kind="stable")
        ids, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
        self.per_batch = batch_size // k                       # P
        if len(ids) < self.per_batch * world_size:
            raise ValueError(f"IdentitySampler: {len(ids)} identities cannot fill {world_size} rank(s) x "
                             f"{self.per_batch} identities per batch (train.batch_size {batch_size} / "
                             f"data.images_per_identity {k}); lower train.batch_size or raise images_per_identity")
        self.steps = len(labels) // (batch_size * world_size)
        if self.steps == 0:
            raise ValueError(f"IdentitySampler: {len(labels)} samples over {world_size} rank(s) cannot fill one batch "
                             f"of {batch_size}; lower train.batch_size")
        self.order, self.starts, self.counts = order, starts, counts
        self.k, self.seed, self.rank, self.world_size, self.flip = k, seed, rank, world_size, flip
        self.batch_size = batch_size
        self.short_identities = int((counts < k).sum())
        self.num_identities = len(ids)

    def steps_per_epoch(self) -> int:
        return self.steps

    def _identity_batches(self, epoch: int) -> np.ndarray:
        """[steps, P * world_size] identity positions (into self.starts) for the whole epoch."""
        rng = np.random.default_rng([self.seed, epoch])
        width = self.per_batch * self.world_size
        stream, carry, rows = [], [], []
        for _ in range(self.steps):
            # A batch that straddles two permutations may meet an identity twice: the repeat is carried over to open
            # a later batch. A fresh permutation (num_identities >= width distinct ones) always completes a batch.
            row, seen, deferred = [], set(), []
            while len(row) < width:
                if carry:
                    identity = carry.pop(0)
                else:
                    if not stream:
                        stream = rng.permutation(self.num_identities).tolist()[::-1]
                    identity = stream.pop()
                (deferred if identity in seen else row).append(identity)
                seen.add(identity)
            carry += deferred
            rows.append(row)
        return np.array(rows, np.int64)

    def short_draws(self, epoch: int) -> int:
        """How many of this rank's identity draws in `epoch` take an identity with fewer than K images."""
        return int((self.counts[self._rank_identities(epoch)] < self.k).sum())

    def _rank_identities(self, epoch: int) -> np.ndarray:
        return self._identity_batches(epoch)[:, self.rank * self.per_batch:(self.rank + 1) * self.per_batch]

    def batches(self, epoch: int, start_step: int = 0):
        """Yield (indices, flips) per step; `start_step` skips steps already done (resume mid-epoch)."""
        identities = self._rank_identities(epoch)
        for step in range(start_step, self.steps):
            rng = np.random.default_rng([self.seed, epoch, step, self.rank])
            picks = [rng.choice(self.counts[i], self.k, replace=bool(self.counts[i] < self.k))
                     for i in identities[step]]
            index = np.concatenate([self.order[self.starts[i] + p] for i, p in zip(identities[step], picks)])
            flips = rng.random(len(index)) < 0.5 if self.flip else np.zeros(len(index), bool)
            yield index, flips


def sampler_for(cfg, labels: np.ndarray, rank: int = 0, world_size: int = 1):
    """The config's sampler (data.sampler): shuffled epochs, or P x K identity batches."""
    if cfg.data.sampler == "identity":
        return IdentitySampler(labels, cfg.train.batch_size, cfg.data.images_per_identity, seed=cfg.seed,
                               rank=rank, world_size=world_size, flip=cfg.data.flip)
    return EpochSampler(len(labels), cfg.train.batch_size, seed=cfg.seed, rank=rank, world_size=world_size,
                        flip=cfg.data.flip)
