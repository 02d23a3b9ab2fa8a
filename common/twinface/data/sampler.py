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


class StreamSampler:
    """Sequential reading of sharded data (TFRecord) with a window shuffle, the same order in both twins; the TF
    twin reads it natively (tf.data interleave over the shards), the torch twin through the index.

    Rank r owns shards r, r + world_size, ... for the whole run (ranks read disjoint shards). Each epoch it
    reads them in an order drawn from (seed, epoch, rank), one record from each in turn (tf.data's interleave,
    block length 1), cuts that stream into windows of `window` records and permutes each window; flips come
    from the same generator. Every rank runs the same number of steps: the smallest rank's records // batch.
    `shard_of[i]` is the shard of record i; a shard's records appear in the order of their indices.
    """

    def __init__(self, shard_of: np.ndarray, batch_size: int, window: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, flip: bool = True):
        shard_of = np.asarray(shard_of)
        num_shards = int(shard_of.max()) + 1 if len(shard_of) else 0
        if num_shards < world_size:
            raise ValueError(f"data.sampler stream: {num_shards} shard(s) cannot give each of {world_size} ranks its "
                             "own; write the data set with --shards of at least the number of processes")
        order = np.argsort(shard_of, kind="stable")             # each shard's records, ascending: its file order
        self.records = np.split(order, np.cumsum(np.bincount(shard_of, minlength=num_shards))[:-1])
        per_rank = [sum(len(self.records[s]) for s in range(r, num_shards, world_size)) for r in range(world_size)]
        if min(per_rank) < batch_size:
            raise ValueError(f"data.sampler stream: rank {int(np.argmin(per_rank))} holds {min(per_rank)} records, "
                             f"fewer than one batch of {batch_size}")
        self.steps = min(per_rank) // batch_size
        self.batch_size, self.window, self.seed, self.rank, self.flip = batch_size, window, seed, rank, flip
        self.shards = list(range(rank, num_shards, world_size))

    def steps_per_epoch(self) -> int:
        return self.steps

    def plan(self, epoch: int):
        """(shard order, stream, window permutations, flips): the stream lists record indices in reading order;
        the epoch's order is each window of it permuted, cut to steps x batch."""
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        shards = rng.permutation(self.shards)
        columns = [self.records[s] for s in shards]
        # round k takes record k of every shard still running, in the drawn shard order: sort by (k, column)
        position = np.concatenate([np.arange(len(c)) for c in columns])
        column = np.concatenate([np.full(len(c), j) for j, c in enumerate(columns)])
        stream = np.concatenate(columns)[np.lexsort((column, position))]
        perms = [rng.permutation(min(self.window, len(stream) - start)) for start in range(0, len(stream),
                                                                                           self.window)]
        flips = rng.random(self.steps * self.batch_size) < 0.5 if self.flip else np.zeros(self.steps * self.batch_size,
                                                                                           bool)
        return shards, stream, perms, flips

    def epoch_order(self, epoch: int):
        shards, stream, perms, flips = self.plan(epoch)
        order = np.concatenate([stream[k * self.window + p] for k, p in enumerate(perms)])
        return order[:len(flips)], flips

    def batches(self, epoch: int, start_step: int = 0):
        order, flips = self.epoch_order(epoch)
        for step in range(start_step, self.steps):
            sl = slice(step * self.batch_size, (step + 1) * self.batch_size)
            yield order[sl], flips[sl]


def sampler_for(cfg, dataset, rank: int = 0, world_size: int = 1):
    """The config's sampler (data.sampler): shuffled epochs, P x K identity batches, or shard streaming."""
    labels = dataset.labels
    if cfg.data.sampler == "stream":
        shard_of = getattr(dataset, "shard_of", None)
        if shard_of is None:
            raise ValueError(f"data.sampler stream reads sharded data (a TFRecord data set); {cfg.data.path} is not")
        return StreamSampler(shard_of, cfg.train.batch_size, cfg.data.stream_window, seed=cfg.seed, rank=rank,
                             world_size=world_size, flip=cfg.data.flip)
    if cfg.data.sampler == "identity":
        return IdentitySampler(labels, cfg.train.batch_size, cfg.data.images_per_identity, seed=cfg.seed,
                               rank=rank, world_size=world_size, flip=cfg.data.flip)
    return EpochSampler(len(labels), cfg.train.batch_size, seed=cfg.seed, rank=rank, world_size=world_size,
                        flip=cfg.data.flip)
