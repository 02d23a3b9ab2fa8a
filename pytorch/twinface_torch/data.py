"""torch DataLoader over the common readers, in the order the shared EpochSampler dictates."""
import ctypes
import functools
import os
import signal
import sys

import numpy as np
import torch
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


PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int, worker_id: int):
    """A worker blocked on a full queue outlives a kill -9 of the trainer (torch's own watchdog only runs between
    batches), holding its memory. Ask the kernel to kill it with its parent, and leave at once if the parent is
    already gone (died before the request)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)


def _collate(samples):
    # tensors travel from the workers through shared memory; numpy arrays would be pickled through a pipe
    return torch.from_numpy(np.stack([s[0] for s in samples])), torch.tensor([s[1] for s in samples], dtype=torch.int64)


def batches(dataset, sampler, epoch: int, start_step: int = 0, num_workers: int = 2, size: int = None):
    """Yield (images uint8 [B, S, S, 3], labels int64 [B]) for one epoch, decoded (and resized to `size`) by
    `num_workers` processes."""
    keys = [list(zip(idx.tolist(), flips.tolist())) for idx, flips in sampler.batches(epoch, start_step)]
    loader = DataLoader(_Samples(dataset, size), batch_sampler=keys, num_workers=num_workers, collate_fn=_collate,
                        worker_init_fn=functools.partial(_die_with_parent, os.getpid()),
                        prefetch_factor=4 if num_workers else None, persistent_workers=False)
    for images, labels in loader:
        yield images.numpy(), labels.numpy()
