import os
import pickle

import numpy as np
import pytest

from twinface.data.convert import folder_to_rec
from twinface.data.dataset import FolderDataset, RecDataset, open_dataset
from twinface.data.images import CorruptImageError, encode_image
from twinface.data.recordio import write_insightface_rec


def _face(label, size=112):
    img = np.zeros((size, size, 3), np.uint8)
    img[..., 0] = 30 * label + 10  # red encodes the class, to check colour order and identity
    return encode_image(img, ".png")


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "faces"
    for label, count in enumerate([2, 1, 2]):
        os.makedirs(root / f"p{label}")
        for k in range(count):
            (root / f"p{label}" / f"{k}.png").write_bytes(_face(label, 112 if k == 0 else 56))
    return root


def test_folder_and_rec_datasets_agree(folder, tmp_path):
    os.makedirs(tmp_path / "recdir")
    folder_to_rec(folder, tmp_path / "recdir" / "train", progress=False)
    folder_ds, rec_ds = FolderDataset(folder), RecDataset(tmp_path / "recdir" / "train")
    for ds in (folder_ds, rec_ds):
        assert len(ds) == 5 and ds.num_classes == 3
        assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [0, 0, 1, 2, 2]
        for i, label in enumerate(ds.labels):
            img = ds.image(i)  # the 56x56 crops come back at 112
            assert img.shape == (112, 112, 3) and img.dtype == np.uint8
            assert abs(int(img[50, 50, 0]) - (30 * label + 10)) <= 1 and img[50, 50, 2] == 0
    assert folder_ds.class_names == ["p0", "p1", "p2"]
    assert folder_ds.source(3) == str(folder / "p2" / "0.png")
    assert rec_ds.source(3) == f"{tmp_path / 'recdir' / 'train'}.rec record 4"
    assert [folder_ds.encoded(i) for i in range(5)] == [rec_ds.encoded(i) for i in range(5)]


def test_open_dataset_dispatch(folder, tmp_path):
    os.makedirs(tmp_path / "recdir")
    folder_to_rec(folder, tmp_path / "recdir" / "train", progress=False)
    folder_to_rec(folder, tmp_path / "other", progress=False)
    assert isinstance(open_dataset(folder), FolderDataset)
    for path in [tmp_path / "recdir", tmp_path / "other.rec", tmp_path / "other"]:
        ds = open_dataset(path)
        assert isinstance(ds, RecDataset) and len(ds) == 5
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(_face(0))
    for path in [tmp_path / "flat", tmp_path / "nothing"]:
        with pytest.raises(ValueError, match=rf"{path}: not a data set.*train.rec.*identity folders"):
            open_dataset(path)


def test_corrupt_image_names_its_source(folder, tmp_path):
    (folder / "p1" / "0.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(CorruptImageError, match=str(folder / "p1" / "0.png")):
        FolderDataset(folder).image(2)
    write_insightface_rec(tmp_path / "t", [(0, _face(0)), (1, b"\xff\xd8\xff broken")])
    with pytest.raises(CorruptImageError, match=r"t.rec record 2"):
        RecDataset(tmp_path / "t").image(1)


def test_non_square_image_is_an_error(tmp_path):
    (tmp_path / "p0").mkdir()
    (tmp_path / "p0" / "wide.png").write_bytes(encode_image(np.zeros((112, 96, 3), np.uint8), ".png"))
    with pytest.raises(ValueError, match=r"wide.png.*96x112"):
        FolderDataset(tmp_path).image(0)


def test_rec_dataset_survives_pickling_for_data_workers(tmp_path):
    write_insightface_rec(tmp_path / "t", [(0, _face(0)), (1, _face(1))])
    ds = RecDataset(tmp_path / "t")
    ds.image(0)  # opens the file in this process
    copy = pickle.loads(pickle.dumps(ds))
    assert copy.image(1)[0, 0, 0] == 40 and copy.labels.tolist() == [0, 1]
