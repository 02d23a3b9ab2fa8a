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
