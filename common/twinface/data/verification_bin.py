"""insightface verification sets (lfw.bin, cfp_fp.bin, ...): a pickle of (bins, issame_list).

bins holds 2N encoded images, pair i = images 2i and 2i+1. A pickle can run any code when loaded, so
these files are read with an unpickler that only builds plain data and numpy arrays.
"""
import builtins
import codecs
import io
import os
import pickle
import pickletools

import numpy as np
from numpy._core import multiarray

from twinface.atomic import atomic_path
from twinface.data.images import decode_image


# What a pickle may build is bounded by the file: the calls it makes may produce at most this many bytes
# in total (a legit .bin needs about its own size), and decoded images at most MAX_DECODED_BYTES.
ALLOCATION_FACTOR, ALLOCATION_SLACK = 16, 16 * 2 ** 20
MAX_DECODED_BYTES = 8 * 2 ** 30
# numpy dtypes a verification .bin may hold: plain numbers and booleans, never Python objects.
_SIMPLE_DTYPES = {np.dtype(c).str[1:] for c in "?bBhHiIlLqQefdFD"} | {"b1"}


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle asked for a global outside the allowed plain-data/numpy set, or for more memory than its
    size allows. A ValueError too, so the CLI reports it as one line."""


class _Budget:
    def __init__(self, source, size):
        self.source, self.size = source, size
        self.limit = self.left = ALLOCATION_FACTOR * size + ALLOCATION_SLACK

    def take(self, nbytes, what):
        self.left -= nbytes
        if self.left < 0:
            raise UnsafePickleError(f"{self.source}: {what} would allocate about {nbytes} bytes; a .bin of "
                                    f"{self.size} bytes may build at most {self.limit} ({ALLOCATION_FACTOR} x its "
                                    f"size + {ALLOCATION_SLACK >> 20} MiB)")


def _cost(arg) -> int:
    """Rough bytes a builtin call makes from `arg`: bytes(N) makes N; list(x) a pointer (and maybe an object)
    per item; str(b) up to 4 characters per byte."""
    if isinstance(arg, bool) or not isinstance(arg, (int, str, bytes, bytearray, np.ndarray, list, tuple, dict,
                                                      set, frozenset)):
        return 0
    if isinstance(arg, int):
        return max(arg, 0)
    if isinstance(arg, np.ndarray):
        return 64 * arg.size
    return 4 * len(arg) if isinstance(arg, (str, bytes, bytearray)) else 64 * len(arg)


class _PendingDtype:
    """numpy.dtype(name, align, copy) plus its BUILD state, made a real dtype only when it is a plain number type."""

    def __init__(self, name, align=False, copy=True):
        self.name, self.state = name, None

    def __setstate__(self, state):
        self.state = state

    def real(self, source) -> np.dtype:
        name, order = (_text(v) for v in (self.name, self.state[1] if isinstance(self.state, tuple) else None))
        plain = isinstance(self.state, tuple) and len(self.state) == 8 and order in ("<", ">", "|", "=") \
            and self.state[2:] == (None, None, None, -1, -1, 0)
        if not (plain and isinstance(name, str) and name.lstrip("<>|=") in _SIMPLE_DTYPES):
            raise UnsafePickleError(f"{source}: refusing numpy dtype {name!r:.40} with state {self.state!r:.120}; "
                                    "a verification .bin holds only plain numbers and booleans")
        dtype = np.dtype(name.lstrip("<>|="))
        return dtype.newbyteorder(order) if order in "<>" else dtype


def _text(value):
    """Python 2 pickles read with encoding="bytes" give their str as bytes."""
    return value.decode("latin1") if isinstance(value, bytes) else value


class _CheckedArray(np.ndarray):
    """numpy's pickled ndarray, its state checked first: a plain dtype and exactly the bytes its shape needs
    (numpy trusts the shape of an object array and crashes on a short one)."""

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5):
            raise pickle.UnpicklingError(f"{self.source}: an ndarray state is (version, shape, dtype, fortran, data)")
        version, shape, dtype, fortran, data = state
        dtype = _real_dtype(dtype, self.source)
        _check_buffer(data, dtype, shape, self.source)
        super().__setstate__((version, shape, dtype, bool(fortran), data))


def _real_dtype(dtype, source) -> np.dtype:
    if not isinstance(dtype, _PendingDtype):
        raise UnsafePickleError(f"{source}: expected a numpy dtype, got {type(dtype).__name__}")
    return dtype.real(source)


def _check_buffer(data, dtype, shape, source):
    if not (isinstance(shape, tuple) and all(isinstance(n, int) and n >= 0 for n in shape)):
        raise pickle.UnpicklingError(f"{source}: an array shape must be a tuple of sizes >= 0, got {shape!r:.80}")
    need = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if not isinstance(data, (bytes, bytearray)) or len(data) != need:
        got = f"{len(data)} bytes" if isinstance(data, (bytes, bytearray)) else type(data).__name__
        raise UnsafePickleError(f"{source}: an array of shape {shape} and dtype {dtype} needs {need} bytes of "
                                f"data in the file, got {got}")


def _allowed(budget: _Budget) -> dict:
    source = budget.source
    ndarray_name = _NdarrayName(source)

    def guarded(fn, name):
        def call(*args):
            budget.take(64 + sum(_cost(a) for a in args), f"{name}()")
            return fn(*args)
        return call

    def latin1_encode(text, encoding="latin1"):
        # Python 3 pickles bytes at protocol < 3 as _codecs.encode(text, "latin1"); nothing else is needed.
        if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1":
            raise UnsafePickleError(f"{source}: _codecs.encode is allowed only for latin1 text")
        budget.take(len(text), "_codecs.encode()")
        return text.encode("latin1")

    def reconstruct(subtype, shape, dtype):
        if subtype is not ndarray_name:
            raise UnsafePickleError(f"{source}: numpy _reconstruct of something other than numpy.ndarray")
        array = multiarray._reconstruct(_CheckedArray, (0,), b"b")
        array.source = source
        return array

    def scalar(dtype, data=None):
        dtype = _real_dtype(dtype, source)
        _check_buffer(data, dtype, (), source)
        return np.frombuffer(data, dtype)[0]

    def frombuffer(data, dtype, shape, order):
        dtype = _real_dtype(dtype, source)
        _check_buffer(data, dtype, shape, source)
        budget.take(len(data), "numpy _frombuffer()")
        return np.frombuffer(data, dtype).reshape(shape, order="F" if order == "F" else "C")

    numpy_names = {"_reconstruct": reconstruct, "scalar": scalar, "_frombuffer": frombuffer}
    return {
        # Python 2 pickles (the original .bin files) name the builtins module "__builtin__".
        **{(module, name): guarded(getattr(builtins, name), name) for module in ("builtins", "__builtin__")
           for name in ("list", "tuple", "dict", "set", "frozenset", "bytes", "bytearray", "bool", "int", "float",
                        "complex", "str")},
        # numpy's array/scalar reconstruction, under its numpy 1 (numpy.core) and numpy 2 (numpy._core) names.
        **{(f"numpy.{core}.{module}", name): numpy_names[name]
           for core in ("core", "_core")
           for module, names in (("multiarray", ("_reconstruct", "scalar")), ("numeric", ("_frombuffer",)))
           for name in names},
        ("numpy", "ndarray"): ndarray_name,
        ("numpy", "dtype"): _PendingDtype,
        ("_codecs", "encode"): latin1_encode,
    }


class _NdarrayName:
    """Stands for numpy.ndarray, which a pickle may name as _reconstruct's argument but never call (an
    uninitialised array of any shape)."""

    def __init__(self, source):
        self.source = source

    def __call__(self, *args):
        raise UnsafePickleError(f"{self.source}: a verification .bin may not call numpy.ndarray(...) directly")


def _check_opcodes(data: bytes, source: str):
    """The C unpickler grows its memo table to the largest index a PUT names (a 9-byte pickle can ask for
    32 GiB): memo indices must come in order, as every pickler writes them."""
    memo = 0
    try:
        for opcode, arg, pos in pickletools.genops(data):
            if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                if not isinstance(arg, int) or not 0 <= arg <= memo:
                    raise UnsafePickleError(f"{source}: byte {pos}: memo index {arg!r} skips past the {memo} "
                                            "entries stored so far")
                memo += arg == memo
            elif opcode.name == "MEMOIZE":
                memo += 1
    except UnsafePickleError:
        raise
    except Exception as err:                # load_bin names the file
        raise pickle.UnpicklingError(str(err)) from None


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source, size):
        super().__init__(file, encoding="bytes")
        self.source = source
        self.allowed = _allowed(_Budget(source, size))

    def find_class(self, module, name):
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        raise UnsafePickleError(f"{self.source}: refusing to load global {module}.{name}; a verification .bin "
                                "holds only image bytes and booleans (plain data and numpy arrays)")


def restricted_loads(data: bytes, source: str):
    """Unpickle plain data and numpy arrays only; any other global, or more memory than the data's size
    allows, raises UnsafePickleError naming it."""
    _check_opcodes(data, source)
    return _RestrictedUnpickler(io.BytesIO(data), source, len(data)).load()


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
    bins, issame = (_sequence(part, path, name) for part, name in zip(obj, ("bins", "issame_list")))
    converted = {}              # one copy per object: a pickle may list the same bytearray a million times
    bins = [converted[id(b)] if id(b) in converted else converted.setdefault(id(b), _as_bytes(b, path, i))
            for i, b in enumerate(bins)]
    issame = np.array([_as_flag(s, path, i) for i, s in enumerate(issame)], dtype=bool)
    if len(bins) != 2 * len(issame):
        raise ValueError(f"{path}: {len(bins)} images for {len(issame)} pairs; expected 2 images per pair")
    return bins, issame


def _sequence(part, path, name):
    if isinstance(part, np.ndarray) and part.ndim == 1:
        return part
    if not isinstance(part, (list, tuple)):
        raise ValueError(f"{path}: {name} must be a list, got {type(part).__name__}")
    return part


def _as_flag(item, path, index) -> bool:
    if isinstance(item, (bool, int, np.bool_, np.integer)):
        return bool(item)
    raise ValueError(f"{path}: issame_list item {index} is a {type(item).__name__}, expected a boolean")


def _as_bytes(item, path, index) -> bytes:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
        return item.tobytes()
    raise ValueError(f"{path}: image {index} is a {type(item).__name__}, expected encoded image bytes")


def decode_bin(bins, source) -> np.ndarray:
    """-> (2N, H, W, 3) uint8 RGB; every image must decode and share one size. An image listed more than once
    is decoded once; the result may take at most MAX_DECODED_BYTES."""
    if not len(bins):
        raise ValueError(f"{source}: no images")
    first = decode_image(bins[0], f"{source} image 0")
    if len(bins) * first.nbytes > MAX_DECODED_BYTES:
        raise ValueError(f"{source}: {len(bins)} images of {first.shape[1]}x{first.shape[0]} would take "
                         f"{len(bins) * first.nbytes / 2 ** 30:.1f} GiB decoded; the limit is "
                         f"{MAX_DECODED_BYTES / 2 ** 30:.0f} GiB")
    images = np.empty((len(bins),) + first.shape, np.uint8)
    decoded = {id(bins[0]): 0}
    images[0] = first
    for i, data in enumerate(bins[1:], 1):
        if id(data) in decoded:
            images[i] = images[decoded[id(data)]]
            continue
        img = decode_image(data, f"{source} image {i}")
        if img.shape != first.shape:
            raise ValueError(f"{source} image {i}: shape {img.shape} differs from image 0's {first.shape}")
        images[i], decoded[id(data)] = img, i
    return images


def save_bin(path, bins, issame) -> None:
    """Write (bins, issame_list) as insightface does, through a temporary file renamed into place (replaces `path`)."""
    path = os.fspath(path)
    bins = [bytes(b) for b in bins]
    issame = [bool(s) for s in issame]
    if len(bins) != 2 * len(issame):
        raise ValueError(f"{path}: {len(bins)} images for {len(issame)} pairs; expected 2 images per pair")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        pickle.dump((bins, issame), f, protocol=4)
