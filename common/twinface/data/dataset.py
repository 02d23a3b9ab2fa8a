"""One random-access view of a training set, whatever its format: the twins' data loaders read only this."""
import os

import numpy as np

from twinface.data.folder import scan_image_folder
from twinface.data.images import UnusableImageError, decode_image, fit_square
from twinface.data.recordio import InsightFaceRec
from twinface.data.tfrecord import INDEX, TFRecordError, TFRecordSet, is_tfrecord_dir

IMAGE_SIZE = 112


def face_crop(data: bytes, source: str) -> np.ndarray:
    """Encoded bytes -> uint8 RGB 112x112x3; an UnusableImageError names `source` (undecodable, not square)."""
    return fit_square(decode_image(data, source), IMAGE_SIZE, source)


class FaceDataset:
    """len, labels, num_classes, image(i) -> uint8 RGB 112x112x3, source(i) naming the image in errors.

    Subclasses provide __len__, labels, encoded(i) and source(i).
    """

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def labels(self) -> np.ndarray:
        raise NotImplementedError

    def encoded(self, i: int) -> bytes:
        raise NotImplementedError

    def source(self, i: int) -> str:
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if len(self) else 0

    def image(self, i: int) -> np.ndarray:
        """Raises an UnusableImageError naming source(i) (undecodable, or not square: not an aligned crop);
        a square crop of another size is resized to 112."""
        return face_crop(self.encoded(i), self.source(i))


class FolderDataset(FaceDataset):
    def __init__(self, root):
        self.root = os.fspath(root)
        samples, self.class_names = scan_image_folder(self.root)
        self.paths = [path for path, _ in samples]
        self._labels = np.array([label for _, label in samples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def encoded(self, i: int) -> bytes:
        with open(self.paths[i], "rb") as f:
            return f.read()

    def source(self, i: int) -> str:
        return self.paths[i]


class RecDataset(FaceDataset):
    def __init__(self, prefix):
        self.rec = InsightFaceRec(prefix)

    def __len__(self) -> int:
        return len(self.rec)

    @property
    def labels(self) -> np.ndarray:
        return self.rec.labels

    def encoded(self, i: int) -> bytes:
        return self.rec.encoded(i)

    def source(self, i: int) -> str:
        return self.rec.source(i)


class TFRecordDataset(FaceDataset):
    """A TFRecord data set (twinface.data.tfrecord). A damaged record (CRC mismatch, truncation, a missing key)
    stops the run with an error naming shard, record and byte offset, unless `damaged` is "skip": then it is
    skipped and counted like an undecodable image."""

    def __init__(self, root, damaged: str = "fail"):
        self.set, self.damaged = TFRecordSet(root, damaged=damaged), damaged

    def __len__(self) -> int:
        return len(self.set)

    @property
    def labels(self) -> np.ndarray:
        return self.set.labels

    def encoded(self, i: int) -> bytes:
        try:
            return self.set.read(i)[0]
        except TFRecordError as err:
            if self.damaged == "skip":
                raise UnusableImageError(str(err)) from None
            raise

    def source(self, i: int) -> str:
        return self.set.source(i)

    @property
    def shard_of(self) -> np.ndarray:
        return self.set.shard

    @property
    def num_classes(self) -> int:
        return self.set.num_classes


def open_dataset(path, damaged: str = "fail") -> FaceDataset:
    """A directory holding train.rec, a prefix.rec file (or its prefix), a TFRecord directory (shards and
    index.npz), or a folder of identity folders. `damaged` applies to TFRecord (TFRecordDataset)."""
    path = os.fspath(path)
    if is_tfrecord_dir(path) or os.path.isfile(os.path.join(path, INDEX)):
        return TFRecordDataset(path, damaged)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "train.rec")):
        return RecDataset(os.path.join(path, "train"))
    if path.endswith(".rec") and os.path.isfile(path):
        return RecDataset(path[:-4])
    if os.path.isfile(path + ".rec"):
        return RecDataset(path)
    if os.path.isdir(path) and any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(path)):
        return FolderDataset(path)
    raise ValueError(f"{path}: not a data set twinface can read; supported: a directory with train.rec + "
                     "train.idx, a directory of .tfrecord shards, a file prefix.rec (+ prefix.idx) or its prefix, "
                     "or a directory of identity folders (root/<identity>/<image>.jpg|png|bmp|webp)")
