"""torch DataLoader over the common readers, in the order the shared EpochSampler dictates."""
import numpy as np
from torch.utils.data import DataLoader, Dataset

from twinface.data.batches import load_sample


class _Samples(Dataset):
    """Keys are (index, flip) pairs coming from the sampler, so flips are decided in `common`, not here."""

    def __init__(self, dataset, size):
        self.dataset, self.size = dataset, size

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, flip = key
        return load_sample(self.dataset, index, flip, self.size)


def _collate(samples):
    return np.stack([s[0] for s in samples]), np.array([s[1] for s in samples], np.int64)


def batches(dataset, sampler, epoch: int, start_step: int = 0, num_workers: int = 2, size: int = None):
    """Yield (images uint8 [B, S, S, 3], labels int64 [B]) for one epoch, decoded (and resized to `size`) by
    `num_workers` processes."""
    keys = [list(zip(idx.tolist(), flips.tolist())) for idx, flips in sampler.batches(epoch, start_step)]
    loader = DataLoader(_Samples(dataset, size), batch_sampler=keys, num_workers=num_workers, collate_fn=_collate,
                        prefetch_factor=4 if num_workers else None, persistent_workers=False)
    yield from loader
