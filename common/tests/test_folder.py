import os

import numpy as np
import pytest

from twinface.data.folder import scan_image_folder, write_image_folder
from twinface.data.images import encode_image


def _touch(path, data=b"img"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def test_scan_is_sorted_and_filters(tmp_path):
    for rel in ["bob/2.jpg", "bob/10.JPEG", "bob/1.png", "bob/notes.txt", "alice/a.bmp", "alice/b.webp",
                "empty_dir/readme.md", ".hidden/x.jpg", "carol/.x.jpg", "carol/z.jpg"]:
        _touch(tmp_path / rel)
    _touch(tmp_path / "loose.jpg")  # not inside an identity folder
    samples, class_names = scan_image_folder(tmp_path)
    rel = [(os.path.relpath(p, tmp_path), label) for p, label in samples]
    assert class_names == ["alice", "bob", "carol"]  # folders without images are left out
    assert rel == [("alice/a.bmp", 0), ("alice/b.webp", 0),
                   ("bob/1.png", 1), ("bob/2.jpg", 1), ("bob/10.JPEG", 1), ("carol/z.jpg", 2)]
    assert scan_image_folder(str(tmp_path)) == (samples, class_names)


def test_numeric_folder_names_keep_their_number_as_label(tmp_path):
    for name in ["10", "2", "0", "1"]:
        _touch(tmp_path / name / "0.jpg")
    samples, class_names = scan_image_folder(tmp_path)
    assert class_names == ["0", "1", "2", "10"]
    assert [os.path.basename(os.path.dirname(p)) for p, _ in samples] == ["0", "1", "2", "10"]


def test_scan_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        scan_image_folder(tmp_path / "missing")
    _touch(tmp_path / "flat.jpg")
    with pytest.raises(ValueError, match="no identity folders"):
        scan_image_folder(tmp_path)
    _touch(tmp_path / "person" / "notes.txt")
    with pytest.raises(ValueError, match="no images"):
        scan_image_folder(tmp_path)


def test_write_then_scan_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    samples = [(label, encode_image(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), ext))
               for label, ext in [(0, ".jpg"), (0, ".png"), (1, ".jpg"), (2, ".jpg"), (2, ".jpg")]]
    assert write_image_folder(tmp_path / "out", iter(samples)) == 5
    assert sorted(os.listdir(tmp_path / "out" / "00000")) == ["000000.jpg", "000001.png"]
    scanned, class_names = scan_image_folder(tmp_path / "out")
    assert class_names == ["00000", "00001", "00002"]
    assert [(label, open(path, "rb").read()) for path, label in scanned] == samples


def test_write_uses_class_names_and_never_overwrites(tmp_path):
    data = encode_image(np.zeros((8, 8, 3), np.uint8))
    write_image_folder(tmp_path, [(1, data), (0, data)], class_names=["ann", "ben"])
    assert os.path.isfile(tmp_path / "ben" / "000000.jpg") and os.path.isfile(tmp_path / "ann" / "000001.jpg")
    with pytest.raises(FileExistsError, match="000000.jpg"):
        write_image_folder(tmp_path, [(1, b"other")], class_names=["ann", "ben"])
    assert open(tmp_path / "ben" / "000000.jpg", "rb").read() == data
    with pytest.raises(ValueError, match="label 5"):
        write_image_folder(tmp_path / "new", [(5, data)], class_names=["ann"])


def test_symlink_loops_and_broken_links_are_skipped_and_counted(tmp_path, caplog):
    """Old code: a self-referencing symlink raised a raw OSError (too many levels of symbolic links)."""
    _touch(tmp_path / "alice" / "a.jpg")
    os.symlink("loop", tmp_path / "loop")                          # identity folder pointing at itself
    os.symlink("self.jpg", tmp_path / "alice" / "self.jpg")        # image pointing at itself
    os.symlink("nowhere.jpg", tmp_path / "alice" / "gone.jpg")     # broken link
    os.symlink("..", tmp_path / "alice" / "up")                    # a directory loop inside a class: not followed
    with caplog.at_level("WARNING", "twinface.data"):
        samples, class_names = scan_image_folder(tmp_path)
    assert class_names == ["alice"] and [os.path.basename(p) for p, _ in samples] == ["a.jpg"]
    assert f"{tmp_path}: skipped 3 entries that cannot be read, e.g." in caplog.text
    assert "Too many levels of symbolic links" in caplog.text
