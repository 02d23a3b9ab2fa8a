import builtins
import os
import pickle

import numpy as np
import pytest

from twinface.data.images import CorruptImageError, encode_image
from twinface.data.verification_bin import UnsafePickleError, decode_bin, load_bin, save_bin


def _bins(n_images):
    return [encode_image(np.full((12, 12, 3), 20 * i, np.uint8), ".png") for i in range(n_images)]


def test_save_load_round_trip(tmp_path):
    path = tmp_path / "lfw.bin"
    bins, issame = _bins(6), [True, False, True]
    save_bin(path, bins, np.array(issame))
    assert os.listdir(tmp_path) == ["lfw.bin"]  # no temporary file left behind
    loaded_bins, loaded_issame = load_bin(path)
    assert loaded_bins == bins
    assert loaded_issame.dtype == bool and loaded_issame.tolist() == issame
    # The layout insightface's load_bin expects: pickle of (list of bytes, list of bools), read with encoding='bytes'.
    with open(path, "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert raw == (bins, issame)


def test_decode_bin(tmp_path):
    images = decode_bin(_bins(4), "x.bin")
    assert images.shape == (4, 12, 12, 3) and images.dtype == np.uint8
    assert [int(img[0, 0, 0]) for img in images] == [0, 20, 40, 60]
    bins = _bins(4)
    bins[3] = b"\xff\xd8\xff broken"
    with pytest.raises(CorruptImageError, match="x.bin image 3"):
        decode_bin(bins, "x.bin")


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_loads_legit_numpy_pickles(tmp_path, protocol):
    """Files written by other tools may hold numpy arrays / numpy bools; those must load."""
    path = tmp_path / "np.bin"
    bins = _bins(4)
    issame = np.array([True, False])
    for payload in [(bins, issame), (bins, list(issame)), ([np.frombuffer(b, np.uint8) for b in bins], issame)]:
        path.write_bytes(pickle.dumps(payload, protocol=protocol))
        loaded_bins, loaded_issame = load_bin(path)
        assert loaded_bins == bins and loaded_issame.tolist() == [True, False]


def test_loads_numpy1_module_names(tmp_path):
    """numpy 1 wrote numpy.core.multiarray where numpy 2 writes numpy._core.multiarray."""
    path = tmp_path / "old.bin"
    data = pickle.dumps((_bins(2), [np.bool_(True)]), protocol=2)
    assert b"numpy._core.multiarray\nscalar" in data
    path.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    loaded_bins, loaded_issame = load_bin(path)
    assert loaded_bins == _bins(2) and loaded_issame.tolist() == [True]


def test_loads_python2_numpy_arrays(tmp_path):
    """Python 2 wrote a numpy dtype's name and byte order as str, which encoding="bytes" reads as bytes."""
    data = pickle.dumps((_bins(2), np.array([True])), protocol=2)
    for text in (b"b1", b"|"):                  # unicode (X) -> Python 2 str (U, SHORT_BINSTRING)
        data = data.replace(b"X" + len(text).to_bytes(4, "little") + text, b"U" + bytes([len(text)]) + text)
    path = tmp_path / "py2.bin"
    path.write_bytes(data)
    loaded_bins, loaded_issame = load_bin(path)
    assert loaded_bins == _bins(2) and loaded_issame.tolist() == [True]


class _EvalPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.eval, (f"open({self.marker!r}, 'w').write('pwned')",)


class _SystemPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_refuses_code_execution(tmp_path):
    marker = tmp_path / "executed"
    evil = pickle.dumps((_bins(2), [_EvalPayload(marker)]))
    pickle.loads(evil)  # an unrestricted load does run the payload: the marker proves it
    assert marker.exists()
    marker.unlink()

    path = tmp_path / "evil.bin"
    path.write_bytes(evil)
    with pytest.raises(UnsafePickleError, match=rf"{path}.*builtins\.eval"):
        load_bin(path)
    path.write_bytes(pickle.dumps([_SystemPayload(marker)]))
    with pytest.raises(UnsafePickleError, match=rf"{path}.*(posix|os|nt)\.system"):
        load_bin(path)
    assert not marker.exists()


def test_structure_errors(tmp_path):
    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps((_bins(3), [True, False])))
    with pytest.raises(ValueError, match=rf"{path}: 3 images for 2 pairs"):
        load_bin(path)
    path.write_bytes(pickle.dumps({"bins": []}))
    with pytest.raises(ValueError, match="expected a pickled"):
        load_bin(path)
    path.write_bytes(pickle.dumps((_bins(2), [True]))[:-10])
    with pytest.raises(ValueError, match=rf"{path}: not a readable"):
        load_bin(path)
    path.write_bytes(pickle.dumps((["text", "more"], [True])))
    with pytest.raises(ValueError, match="image 0 is a str"):
        load_bin(path)
    with pytest.raises(ValueError, match="3 images for 1 pairs"):
        save_bin(tmp_path / "out.bin", _bins(3), [True])
