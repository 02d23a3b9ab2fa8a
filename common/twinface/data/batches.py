"""Sample loading shared by the torch DataLoader and the tf.data pipeline: same bytes, same flips, same skips."""
import logging

import cv2
import numpy as np

from .images import DamagedDataError, UnusableImageError
from .transforms import resize

log = logging.getLogger("twinface.data")
MAX_CONSECUTIVE_SKIPS = 64
_skipped = set()        # sources already reported by this process (a data worker): each is reported once


def describe_failure(err: Exception, source: str) -> str:
    """One line for a per-image failure; our own errors already name their source, others get it and their type."""
    return str(err) if isinstance(err, UnusableImageError) else f"{source}: {type(err).__name__}: {err}"


def load_sample(dataset, index: int, flip: bool, size: int = None):
    """(uint8 RGB HWC image, label) of `index`, the image mirrored when `flip` and resized to `size` if given.

    Any failure to read one image (undecodable, not square, a vanished file, a damaged record) skips it: it is
    reported once per process with the running count, and replaced by the next readable sample, so a long run
    never dies on one bad file and the batch keeps its size. Damage to the storage itself (DamagedDataError)
    stops the run instead.
    """
    n = len(dataset)
    for attempt in range(min(n, MAX_CONSECUTIVE_SKIPS)):
        i = (index + attempt) % n
        try:
            image = dataset.image(i)
            break
        except DamagedDataError:
            raise
        except Exception as err:                   # one image's failure, whatever it is, costs only that image
            source = dataset.source(i)
            if source not in _skipped:
                _skipped.add(source)
                log.warning(f"skipped an unusable image ({len(_skipped)} so far in this process): "
                            f"{describe_failure(err, source)}")
    else:
        raise UnusableImageError(f"{MAX_CONSECUTIVE_SKIPS} consecutive unusable images from {dataset.source(index)} "
                                 "on: is the data set broken?")
    return finish_sample(image, flip, size), int(dataset.labels[i])   # the label of the image actually returned


def finish_sample(image: np.ndarray, flip: bool, size: int = None) -> np.ndarray:
    """A 112x112 crop resized to `size` (if given) and mirrored when `flip`: the last step of every loader."""
    if size:
        image = resize(image, size)
    return cv2.flip(image, 1) if flip else image            # the same pixels as image[:, ::-1], 30x faster
