"""Hostile verification .bin pickles: bounded memory, no crash, one error naming the file."""
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest

from twinface.data import verification_bin
from twinface.data.images import encode_image
from twinface.data.verification_bin import UnsafePickleError, decode_bin, load_bin, save_bin

MIB = 2 ** 20


def _call(module_name: bytes, arg: int) -> bytes:
    """Protocol 2 opcodes for module.name(arg) with an int argument."""
    return b"c" + module_name + b"\nJ" + struct.pack("<i", arg) + b"\x85R"


def _write(tmp_path, data: bytes):
    path = tmp_path / "val.bin"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("name", [b"__builtin__\nbytes", b"builtins\nbytearray"])
def test_allocation_from_a_count_is_bounded_by_the_file_size(tmp_path, name):
    """Old code: a 20-byte file allocated whatever bytes(N) asked for (here 64 MiB, in the issue 1 GiB)."""
    path = _write(tmp_path, b"\x80\x02" + _call(name, 64 * MIB) + b".")
    assert path.stat().st_size < 40
    with pytest.raises(UnsafePickleError, match=rf"{path}: .*64 MiB|{path}: .*may build at most"):
        load_bin(path)


def test_many_small_allocations_add_up(tmp_path):
    """The issue's 66-byte file made two bytearray(1.5e9); ten of 10 MiB each are refused as a total too."""
    calls = b"(" + b"".join(_call(b"__builtin__\nbytearray", 10 * MIB) for _ in range(10)) + b"l"
    path = _write(tmp_path, b"\x80\x02" + calls + b".")
    with pytest.raises(UnsafePickleError, match="may build at most"):
        load_bin(path)


def test_memo_index_bomb_is_refused(tmp_path):
    """Old code: a 9-byte pickle whose PUT names memo index 2**22 made the C unpickler allocate 32 MiB for the
    memo table (2**32 - 1 asks for 64 GiB)."""
    path = _write(tmp_path, b"\x80\x02Nr" + struct.pack("<I", 2 ** 22) + b".")
    with pytest.raises(UnsafePickleError, match=rf"{path}: byte 3: memo index 4194304 skips past the 0 entries"):
        load_bin(path)


def test_calling_ndarray_directly_is_refused(tmp_path):
    path = _write(tmp_path, b"\x80\x02cnumpy\nndarray\nJ" + struct.pack("<i", 10 ** 8) + b"\x85R.")
    with pytest.raises(UnsafePickleError, match=rf"{path}: .*numpy.ndarray\(\.\.\.\) directly"):
        load_bin(path)


def test_object_arrays_are_refused_without_crashing(tmp_path):
    """Old code: an object array whose state lists fewer items than its shape crashed Python (segfault)."""
    array = np.array([b"a", b"b"], dtype=object)
    data = pickle.dumps(([b"x", b"y"], array), protocol=2)
    # numpy writes the element list after the shape; claim 10**6 elements for the 2 listed.
    data = data.replace(b"K\x02\x85", b"J" + struct.pack("<i", 10 ** 6) + b"\x85", 1)
    path = _write(tmp_path, data)
    code = ("import sys\nfrom twinface.data.verification_bin import load_bin\n"
            "try:\n    load_bin(sys.argv[1])\nexcept ValueError as e:\n    print('refused:', e)\n")
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-500:]
    assert f"refused: {path}: refusing numpy dtype 'O8'" in result.stdout


def test_shared_objects_are_copied_once(tmp_path):
    """Old code copied a bytearray once per reference: 200 references to 1 MiB made 200 MiB."""
    big = bytearray(MIB)
    path = _write(tmp_path, pickle.dumps(([big] * 200, [True] * 100), protocol=5))
    assert path.stat().st_size < 2 * MIB
    bins, issame = load_bin(path)
    assert len(bins) == 200 and all(b is bins[0] for b in bins) and issame.all()


@pytest.mark.parametrize("issame", ["deep", "self"])
def test_recursion_bombs_get_one_line(tmp_path, issame):
    bins = pickle.dumps([b"a", b"b"], protocol=2)[2:-1]     # without PROTO and STOP
    if issame == "deep":                                    # 100,000 nested lists (pickle.dumps itself recurses)
        value = b"]" * 100_000 + b"a" * 99_999
    else:                                                   # a list holding itself: [x] where x is the list
        value = b"]q\x09h\x09a"
    path = _write(tmp_path, b"\x80\x02" + bins + value + b"\x86.")
    with pytest.raises(ValueError, match=rf"{path}: issame_list item 0 is a list, expected a boolean"):
        load_bin(path)


def test_decoded_size_is_capped_and_repeated_images_decode_once(tmp_path, monkeypatch):
    image = encode_image(np.full((12, 12, 3), 7, np.uint8), ".png")
    path = tmp_path / "rep.bin"
    save_bin(path, [image, image, image, encode_image(np.zeros((12, 12, 3), np.uint8), ".png")], [True, False])
    bins, _ = load_bin(path)
    assert bins[0] is bins[2]                       # pickle's memo keeps one object; so does load_bin
    images = decode_bin(bins, str(path))
    assert images.shape == (4, 12, 12, 3) and (images[:3] == 7).all() and (images[3] == 0).all()
    monkeypatch.setattr(verification_bin, "MAX_DECODED_BYTES", 3 * 12 * 12 * 3)
    with pytest.raises(ValueError, match=rf"{path}: 4 images of 12x12 would take .* GiB decoded; the limit"):
        decode_bin(bins, str(path))
