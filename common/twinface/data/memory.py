"""Decode a training set once into memory, already at the model's input size.

Small inputs make decoding, not the network, the cost of an epoch on a 2-core CPU (the default run trains at
32x32: 20,000 JPEG decodes per epoch against a network that takes ~4 ms per image). Both twins read the same
cached pixels, so batches stay identical across frameworks.
"""
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .batches import describe_failure
from .images import DamagedDataError, UnusableImageError
from .transforms import resize

log = logging.getLogger("twinface.data")


class InMemoryDataset:
    """A FaceDataset whose images are decoded and resized to `size` up front; unusable ones keep raising, so
    load_sample skips them as it does without the cache."""

    def __init__(self, dataset, size: int, workers: int = 2, progress: bool = True):
        from tqdm import tqdm
        self.base, self.size = dataset, size
        self.pixels = np.zeros((len(dataset), size, size, 3), np.uint8)
        self.unusable = {}

        def load(i):
            try:
                self.pixels[i] = resize(dataset.image(i), size)
            except DamagedDataError:
                raise
            except Exception as err:            # any one image's failure: raised again whenever it is asked for
                self.unusable[i] = err

        with ThreadPoolExecutor(max(1, workers)) as pool:     # cv2 decodes without the GIL
            list(tqdm(pool.map(load, range(len(dataset))), total=len(dataset), desc="decode to memory",
                      unit="img", disable=not progress, mininterval=2.0))
        if self.unusable:
            first = min(self.unusable)
            example = describe_failure(self.unusable[first], dataset.source(first))
            if len(self.unusable) == len(dataset):
                raise UnusableImageError(f"none of the {len(dataset)} images can be used, e.g. {example}")
            kinds = Counter(type(err).__name__ for err in self.unusable.values())
            log.warning(f"{len(self.unusable)} of {len(dataset)} images are unusable and will be skipped "
                        f"({', '.join(f'{n} {kind}' for kind, n in sorted(kinds.items()))}), e.g. {example}")

    def __len__(self):
        return len(self.base)

    @property
    def labels(self):
        return self.base.labels

    @property
    def num_classes(self):
        return self.base.num_classes

    def source(self, i):
        return self.base.source(i)

    @property
    def shard_of(self):                         # the stream sampler keeps the order of the shards it came from
        return getattr(self.base, "shard_of", None)

    def image(self, i):
        if i in self.unusable:
            raise self.unusable[i]
        return self.pixels[i]


def maybe_in_memory(dataset, size: int, budget_gb: float, workers: int = 2, progress: bool = True):
    """The dataset cached in memory when its decoded pixels fit `budget_gb`, else the dataset itself."""
    need = len(dataset) * size * size * 3 / 2 ** 30
    if budget_gb <= 0 or need > budget_gb:
        return dataset
    return InMemoryDataset(dataset, size, workers, progress)
