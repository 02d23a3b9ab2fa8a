import numpy as np
import pytest

from twinface.data.batches import load_sample
from twinface.data.dataset import FolderDataset
from twinface.data.images import CorruptImageError, UnusableImageError, encode_image
from twinface.data.memory import InMemoryDataset, maybe_in_memory
from twinface.data.transforms import resize


def _random_faces(root, per_identity, seed):
    """root/id0, root/id1, each with `per_identity` random 112x112 PNGs named 0.png, 1.png, ..."""
    rng = np.random.default_rng(seed)
    for identity in range(2):
        (root / f"id{identity}").mkdir()
        for k in range(per_identity):
            img = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
            (root / f"id{identity}" / f"{k}.png").write_bytes(encode_image(img, ".png"))


@pytest.fixture
def folder(tmp_path):
    _random_faces(tmp_path, 3, seed=0)
    (tmp_path / "id1" / "1.png").write_bytes(b"not an image")
    return FolderDataset(tmp_path)


def test_cached_pixels_equal_decoding_on_the_fly_and_corrupt_images_still_skip(folder):
    cached = InMemoryDataset(folder, 32, workers=2, progress=False)
    assert len(cached) == len(folder) and cached.num_classes == 2 and (cached.labels == folder.labels).all()
    for i in range(len(folder)):
        if i in cached.unusable:
            with pytest.raises(CorruptImageError, match="1.png"):
                cached.image(i)
        else:
            np.testing.assert_array_equal(cached.image(i), resize(folder.image(i), 32))
    bad = next(iter(cached.unusable))
    image, label = load_sample(cached, bad, False, 32)          # replaced by the next readable sample
    np.testing.assert_array_equal(image, cached.image(bad + 1))
    assert label == cached.labels[bad + 1]


def test_cache_only_when_it_fits_the_budget(folder):
    assert maybe_in_memory(folder, 32, budget_gb=0) is folder
    assert maybe_in_memory(folder, 32, budget_gb=1e-9) is folder
    assert isinstance(maybe_in_memory(folder, 32, budget_gb=1.0, progress=False), InMemoryDataset)


def _unusable_folder(tmp_path):
    """Two good images per identity, then one of each way an image can fail to be usable."""
    _random_faces(tmp_path, 2, seed=1)
    (tmp_path / "id0" / "2_wide.png").write_bytes(encode_image(np.zeros((112, 96, 3), np.uint8), ".png"))
    (tmp_path / "id0" / "3_empty.jpg").write_bytes(b"")
    (tmp_path / "id1" / "2_gone.png").write_bytes(encode_image(np.zeros((112, 112, 3), np.uint8), ".png"))
    dataset = FolderDataset(tmp_path)
    (tmp_path / "id1" / "2_gone.png").unlink()            # vanished after the scan: an OSError, not a decode error
    return dataset


def test_cache_skips_and_counts_every_kind_of_unusable_image(tmp_path, caplog):
    """Old code: the cache caught only CorruptImageError, so one non-square image ended the run at start-up."""
    dataset = _unusable_folder(tmp_path)
    with caplog.at_level("WARNING", "twinface.data"):
        cached = InMemoryDataset(dataset, 32, workers=2, progress=False)
    bad = sorted(dataset.source(i).rsplit("/", 1)[1] for i in cached.unusable)
    assert bad == ["2_gone.png", "2_wide.png", "3_empty.jpg"]
    assert "3 of 7 images are unusable" in caplog.text
    assert "1 CorruptImageError, 1 FileNotFoundError, 1 NotSquareImageError" in caplog.text
    labels = [load_sample(cached, i, False, 32)[1] for i in range(len(cached))]
    assert labels == [0, 0, 1, 1, 1, 1, 0]                 # each unusable image replaced by the next usable one


def test_loader_skips_every_kind_of_unusable_image_once_reported(tmp_path, caplog):
    """Old code: load_sample caught only CorruptImageError; a non-square image or a vanished file killed the
    data worker mid-epoch."""
    dataset = _unusable_folder(tmp_path)
    with caplog.at_level("WARNING", "twinface.data"):
        for _ in range(2):                                 # two epochs: each bad image is reported once
            images = [load_sample(dataset, i, False, 32)[0] for i in range(len(dataset))]
    assert all(image.shape == (32, 32, 3) for image in images)
    skips = [r.getMessage() for r in caplog.records if "skipped an unusable image" in r.getMessage()]
    assert len(skips) == 3
    assert any("2_wide.png: expected a square aligned face crop, got 96x112" in m for m in skips)
    assert any("2_gone.png: FileNotFoundError" in m for m in skips)


def test_cache_refuses_a_data_set_without_one_usable_image(tmp_path):
    (tmp_path / "id0").mkdir()
    (tmp_path / "id0" / "a.png").write_bytes(encode_image(np.zeros((20, 30, 3), np.uint8), ".png"))
    with pytest.raises(UnusableImageError, match=r"none of the 1 images.*a.png.*30x20"):
        InMemoryDataset(FolderDataset(tmp_path), 16, workers=1, progress=False)
