"""Sample loading shared by the torch DataLoader and the tf.data pipeline: same bytes, same flips, same skips."""
import logging

import numpy as np

from .images import CorruptImageError
from .transforms import resize

log = logging.getLogger("twinface.data")


def load_sample(dataset, index: int, flip: bool, size: int = None):
    """(uint8 RGB HWC image, label) of `index`, the image mirrored when `flip` and resized to `size` if given.

    A corrupt or undecodable image is skipped: it is reported with its source and replaced by the next
    readable sample, so a long run never dies on one bad file and the batch keeps its size.
    """
    n = len(dataset)
    for attempt in range(min(n, 64)):
        i = (index + attempt) % n
        try:
            image = dataset.image(i)
            break
        except CorruptImageError as e:
            log.warning(f"skipped corrupt image {dataset.source(i)}: {e}")
    else:
        raise CorruptImageError(f"64 consecutive unreadable images from {dataset.source(index)} on: is the data set broken?")
    label = int(dataset.labels[i])                 # the label of the image actually returned
    if size:
        image = resize(image, size)
    return (np.ascontiguousarray(image[:, ::-1]) if flip else image), label

