"""insightface verification sets (lfw.bin, cfp_fp.bin, ...): a pickle of (bins, issame_list).

bins holds 2N encoded images, pair i = images 2i and 2i+1. A pickle can run any code when loaded, so
these files are read with an unpickler that only builds plain data and numpy arrays.
"""
import builtins
import codecs
import io
import os
import pickle

import numpy as np
from numpy._core import multiarray, numeric

from twinface.atomic import atomic_path
from twinface.data.images import decode_image


def _latin1_encode(text, encoding="latin1"):
    # Python 3 pickles bytes at protocol < 3 as _codecs.encode(text, "latin1"); nothing else is needed.
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode("latin1")


_BUILTINS = {name: getattr(builtins, name) for name in ("list", "tuple", "dict", "set", "frozenset", "bytes",
                                                          "bytearray", "bool", "int", "float", "complex", "str")}
_NUMPY = {"_reconstruct": multiarray._reconstruct, "scalar": multiarray.scalar, "_frombuffer": numeric._frombuffer}
_ALLOWED = {
    # Python 2 pickles (the original .bin files) name the builtins module "__builtin__".
    **{(module, name): obj for module in ("builtins", "__builtin__") for name, obj in _BUILTINS.items()},
    # numpy's array/scalar reconstruction, under its numpy 1 (numpy.core) and numpy 2 (numpy._core) names.
    **{(f"numpy.{core}.{module}", name): _NUMPY[name]
       for core in ("core", "_core")
       for module, names in (("multiarray", ("_reconstruct", "scalar")), ("numeric", ("_frombuffer",)))
       for name in names},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global outside the allowed plain-data/numpy set."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source):
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise UnsafePickleError(f"{self.source}: refusing to load global {module}.{name}; a verification .bin "
                                "holds only image bytes and booleans (plain data and numpy arrays)")


def restricted_loads(data: bytes, source: str):
    """Unpickle plain data and numpy arrays only; any other global raises UnsafePickleError naming it."""
    return _RestrictedUnpickler(io.BytesIO(data), source).load()


def load_bin(path):
    """-> (bins: list of encoded image bytes, issame: bool array); len(bins) == 2 * len(issame)."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        obj = restricted_loads(data, path)
    except UnsafePickleError:
        raise
    except Exception as err:
        raise ValueError(f"{path}: not a readable verification .bin pickle: {err}") from err
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise ValueError(f"{path}: expected a pickled (bins, issame_list) pair, got {type(obj).__name__}")
    bins, issame = obj
    bins = [_as_bytes(b, path, i) for i, b in enumerate(bins)]
    issame = np.asarray(issame)
    if issame.ndim != 1 or issame.dtype.kind not in "biu":
        raise ValueError(f"{path}: issame_list must be a flat list of booleans, got {issame.dtype} {issame.shape}")
    if len(bins) != 2 * len(issame):
        raise ValueError(f"{path}: {len(bins)} images for {len(issame)} pairs; expected 2 images per pair")
    return bins, issame.astype(bool)


def _as_bytes(item, path, index) -> bytes:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
        return item.tobytes()
    raise ValueError(f"{path}: image {index} is a {type(item).__name__}, expected encoded image bytes")


def decode_bin(bins, source) -> np.ndarray:
    """-> (2N, H, W, 3) uint8 RGB; every image must decode and share one size."""
    images = [decode_image(data, f"{source} image {i}") for i, data in enumerate(bins)]
    if not images:
        raise ValueError(f"{source}: no images")
    for i, img in enumerate(images):
        if img.shape != images[0].shape:
            raise ValueError(f"{source} image {i}: shape {img.shape} differs from image 0's {images[0].shape}")
    return np.stack(images)


def save_bin(path, bins, issame) -> None:
    """Write (bins, issame_list) as insightface does, through a temporary file renamed into place (replaces `path`)."""
    path = os.fspath(path)
    bins = [bytes(b) for b in bins]
    issame = [bool(s) for s in issame]
    if len(bins) != 2 * len(issame):
        raise ValueError(f"{path}: {len(bins)} images for {len(issame)} pairs; expected 2 images per pair")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        pickle.dump((bins, issame), f, protocol=4)
