"""twinface.eval.embeddings: .npy + names sidecar round trip, sklearn-exact normalisation, pair split, errors."""
import numpy as np
import pytest
from sklearn.preprocessing import normalize

from twinface.eval.embeddings import l2_normalize, load_embeddings, names_path, pair_embeddings, save_embeddings


def test_round_trip_with_names(tmp_path):
    emb = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    names = ["id 0/img 1.jpg", "ïdéntité/2.png", ""]
    path = save_embeddings(tmp_path / "out" / "lfw.npy", emb, names)
    assert path == tmp_path / "out" / "lfw.npy"
    assert names_path(path) == tmp_path / "out" / "lfw.names.txt"
    loaded, loaded_names = load_embeddings(path)
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, emb)
    assert loaded_names == names


def test_round_trip_without_names_appends_npy_and_drops_a_stale_sidecar(tmp_path):
    emb = np.arange(12, dtype=np.float64).reshape(4, 3)
    save_embeddings(tmp_path / "e.npy", emb, names=["a", "b", "c", "d"])
    path = save_embeddings(tmp_path / "e", emb[:2])
    assert path == tmp_path / "e.npy"
    assert not names_path(path).exists()
    loaded, names = load_embeddings(path)
    np.testing.assert_array_equal(loaded, emb[:2])
    assert names is None


def test_l2_normalize_is_sklearn_normalize_bit_for_bit():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 512)) * rng.uniform(0.01, 100, size=(50, 1))
    x[7] = 0.0  # zero rows stay zero instead of NaN
    x[9] = 1e-20  # and so do rows below sklearn's 10 * eps norm
    np.testing.assert_array_equal(l2_normalize(x), normalize(x))
    x32 = x.astype(np.float32)
    assert l2_normalize(x32).dtype == np.float32
    np.testing.assert_array_equal(l2_normalize(x32), normalize(x32))
    np.testing.assert_array_equal(l2_normalize([[3, 4]]), [[0.6, 0.8]])  # integers become float64
    assert not np.shares_memory(l2_normalize(x), x)


def test_pair_embeddings_splits_rows_2i_and_2i_plus_1():
    emb = np.arange(12.0).reshape(6, 2)
    first, second = pair_embeddings(emb)
    np.testing.assert_array_equal(first, [[0, 1], [4, 5], [8, 9]])
    np.testing.assert_array_equal(second, [[2, 3], [6, 7], [10, 11]])


@pytest.mark.parametrize("call, message", [
    (lambda: pair_embeddings(np.zeros((5, 4))), r"embeddings: expected an even number of rows \[2N, dim\].*\(5, 4\)"),
    (lambda: pair_embeddings(np.zeros((2, 3, 4))), r"embeddings: expected a 2-D array \[rows, dim\].*\(2, 3, 4\)"),
    (lambda: l2_normalize(np.zeros(4)), r"l2_normalize input: expected a 2-D array.*\(4,\)"),
    (lambda: l2_normalize(np.array([["a", "b"]])), r"l2_normalize input: expected a numeric array, got dtype <U1"),
    (lambda: save_embeddings("/nonexistent/x.npy", np.zeros((0, 4))), r"embeddings: expected a 2-D array.*\(0, 4\)"),
])
def test_wrong_shapes_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_names_must_match_rows_and_hold_no_line_breaks(tmp_path):
    with pytest.raises(ValueError, match=r"names: expected one name per embedding row \(2\), got 3"):
        save_embeddings(tmp_path / "e.npy", np.zeros((2, 4)), ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"names\[1\]: a name cannot contain a line break"):
        save_embeddings(tmp_path / "e.npy", np.zeros((2, 4)), ["a", "b\nc"])
    assert not (tmp_path / "e.npy").exists()  # nothing half-written


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npy: embedding file not found"):
        load_embeddings(tmp_path / "missing.npy")

    np.save(tmp_path / "flat.npy", np.zeros(5))
    with pytest.raises(ValueError, match=r"flat.npy: expected a 2-D array \[rows, dim\].*\(5,\)"):
        load_embeddings(tmp_path / "flat.npy")

    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="objects.npy: not a plain numeric .npy array"):
        load_embeddings(tmp_path / "objects.npy")

    path = save_embeddings(tmp_path / "e.npy", np.zeros((3, 4)), ["a", "b", "c"])
    names_path(path).write_text("a\nb\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"e.names.txt: expected 3 names \(one per row of e.npy\), got 2"):
        load_embeddings(path)


def _npy_header(shape, descr="<f4"):
    import io
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


@pytest.mark.parametrize("shape", [(10 ** 7, 10 ** 7), (3, 4)])
def test_npy_header_must_match_the_file_size(tmp_path, shape):
    """Old code: numpy believed the header, a 100-byte file claiming 10**14 floats failed with a raw
    MemoryError ("Unable to allocate 364. TiB")."""
    path = tmp_path / "bomb.npy"
    path.write_bytes(_npy_header(shape) + b"\0" * 16)
    with pytest.raises(ValueError, match=rf"bomb.npy: header says shape \({shape[0]}, {shape[1]}\) of float32, "
                                         rf"{4 * shape[0] * shape[1]} bytes, but the file holds 16 bytes of data"):
        load_embeddings(path)


def test_npy_with_a_broken_header(tmp_path):
    path = tmp_path / "junk.npy"
    path.write_bytes(b"\x93NUMPY\x01\x00\x10\x00{'descr': 'nope'")
    with pytest.raises(ValueError, match=r"junk.npy: not a plain numeric .npy array \(unreadable header"):
        load_embeddings(path)
