"""Embedding arrays on disk and the two array helpers the verification protocol needs.

An embedding file is a plain `.npy` (float, shape [rows, dim], never pickled); when rows have names
(identity labels, image paths), they go one per line into a sidecar `<stem>.names.txt`.
"""
from pathlib import Path

import numpy as np


def _check_matrix(array, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name}: expected a 2-D array [rows, dim] with rows, dim > 0, got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{name}: expected a numeric array, got dtype {array.dtype}")
    return array


def l2_normalize(x) -> np.ndarray:
    """Rows divided by their L2 norm, as sklearn.preprocessing.normalize does it, bit for bit.

    Rows with a norm below 10 * eps keep their values (a zero row stays zero) instead of becoming NaN.
    Integer input becomes float64; float32 stays float32.
    """
    x = _check_matrix(x, "l2_normalize input")
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    norms[norms < 10 * np.finfo(norms.dtype).eps] = 1.0
    return x / norms[:, None]


def pair_embeddings(emb) -> tuple[np.ndarray, np.ndarray]:
    """Split verification embeddings [2N, dim] into the two sides of the N pairs (rows 2i and 2i+1)."""
    emb = _check_matrix(emb, "embeddings")
    if emb.shape[0] % 2:
        raise ValueError(f"embeddings: expected an even number of rows [2N, dim] (pair i = rows 2i, 2i+1), "
                         f"got shape {emb.shape}")
    return emb[0::2], emb[1::2]


def names_path(path) -> Path:
    """The sidecar file that holds the row names of embedding file `path`."""
    path = Path(path)
    return path.with_name(path.stem + ".names.txt")


def save_embeddings(path, emb, names=None) -> Path:
    """Write `emb` [rows, dim] to `path` (.npy appended if missing) and `names` to the sidecar; returns the .npy path."""
    emb = _check_matrix(emb, "embeddings")
    path = Path(path)
    if path.suffix != ".npy":
        path = path.with_name(path.name + ".npy")
    if names is not None:
        names = [str(n) for n in names]
        if len(names) != emb.shape[0]:
            raise ValueError(f"names: expected one name per embedding row ({emb.shape[0]}), got {len(names)}")
        for index, name in enumerate(names):
            if "\n" in name or "\r" in name:
                raise ValueError(f"names[{index}]: a name cannot contain a line break: {name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, emb, allow_pickle=False)
    sidecar = names_path(path)
    if names is not None:
        sidecar.write_text("".join(n + "\n" for n in names), encoding="utf-8")
    elif sidecar.exists():
        sidecar.unlink()  # a stale sidecar would silently label the new rows
    return path


def _check_npy_size(path: Path) -> None:
    """The header's shape x dtype must be exactly the bytes the file holds after it, checked before numpy
    allocates what the header claims (any size: a 100-byte file can claim terabytes)."""
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            shape, _, dtype = read_header[version](f)
        except Exception as error:          # numpy parses the header text: SyntaxError, TokenError, ...
            raise ValueError(f"{path}: not a plain numeric .npy array (unreadable header: {error})") from None
        data_bytes = path.stat().st_size - f.tell()
    if dtype.hasobject:
        raise ValueError(f"{path}: not a plain numeric .npy array (it holds pickled Python objects)")
    need = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if need != data_bytes:
        raise ValueError(f"{path}: header says shape {shape} of {dtype}, {need} bytes, but the file holds "
                         f"{data_bytes} bytes of data")


def load_embeddings(path) -> tuple[np.ndarray, list[str] | None]:
    """Read an embedding file written by save_embeddings: (emb [rows, dim], names or None)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: embedding file not found")
    _check_npy_size(path)
    try:
        emb = np.load(path, allow_pickle=False)
    except ValueError as error:
        raise ValueError(f"{path}: not a plain numeric .npy array ({error})") from error
    _check_matrix(emb, str(path))
    names = None
    sidecar = names_path(path)
    if sidecar.exists():
        text = sidecar.read_text(encoding="utf-8")
        names = text.removesuffix("\n").split("\n")
        if len(names) != emb.shape[0]:
            raise ValueError(f"{sidecar}: expected {emb.shape[0]} names (one per row of {path.name}), "
                             f"got {len(names)}")
    return emb, names
