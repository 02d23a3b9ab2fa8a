import numpy as np
import pytest

from twinface.data.batches import load_sample
from twinface.data.dataset import FolderDataset
from twinface.data.images import CorruptImageError, encode_image
from twinface.data.memory import InMemoryDataset, maybe_in_memory
from twinface.data.transforms import resize


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for identity in range(2):
        (tmp_path / f"id{identity}").mkdir()
        for k in range(3):
            img = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
            (tmp_path / f"id{identity}" / f"{k}.png").write_bytes(encode_image(img, ".png"))
    (tmp_path / "id1" / "1.png").write_bytes(b"not an image")
    return FolderDataset(tmp_path)


def test_cached_pixels_equal_decoding_on_the_fly_and_corrupt_images_still_skip(folder):
    cached = InMemoryDataset(folder, 32, workers=2, progress=False)
    assert len(cached) == len(folder) and cached.num_classes == 2 and (cached.labels == folder.labels).all()
    for i in range(len(folder)):
        if i in cached.corrupt:
            with pytest.raises(CorruptImageError, match="1.png"):
                cached.image(i)
        else:
            np.testing.assert_array_equal(cached.image(i), resize(folder.image(i), 32))
    bad = next(iter(cached.corrupt))
    image, label = load_sample(cached, bad, False, 32)          # replaced by the next readable sample
    np.testing.assert_array_equal(image, cached.image(bad + 1))
    assert label == cached.labels[bad + 1]


def test_cache_only_when_it_fits_the_budget(folder):
    assert maybe_in_memory(folder, 32, budget_gb=0) is folder
    assert maybe_in_memory(folder, 32, budget_gb=1e-9) is folder
    assert isinstance(maybe_in_memory(folder, 32, budget_gb=1.0, progress=False), InMemoryDataset)
