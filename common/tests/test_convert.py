import os

import numpy as np
import pytest

from twinface.atomic import MARKER
from twinface.data.convert import folder_to_bin, folder_to_rec, make_pairs, rec_to_folder
from twinface.data.folder import scan_image_folder
from twinface.data.images import decode_image, encode_image
from twinface.data.recordio import InsightFaceRec, write_insightface_rec
from twinface.data.verification_bin import load_bin


def _class_image(label, k, size=16):
    """Class `label` is a flat grey level; k varies one pixel so every file differs."""
    img = np.full((size, size, 3), 40 * label + 20, np.uint8)
    img[0, 0] = k
    return encode_image(img, ".png")


def _make_folder(root, counts, size=16):
    for label, count in enumerate(counts):
        os.makedirs(root / f"id{label}")
        for k in range(count):
            (root / f"id{label}" / f"{k}.png").write_bytes(_class_image(label, k, size))


def test_rec_folder_rec_round_trip(tmp_path):
    samples = [(label, _class_image(label, k)) for label, count in enumerate([2, 1, 3]) for k in range(count)]
    write_insightface_rec(tmp_path / "a", samples)
    assert rec_to_folder(tmp_path / "a", tmp_path / "folder", progress=False) == {
        "num_images": 6, "num_classes": 3, "num_skipped": 0, "skipped": []}
    stats = folder_to_rec(tmp_path / "folder", tmp_path / "b", progress=False)
    assert (stats["num_images"], stats["num_classes"], stats["skipped"]) == (6, 3, [])
    a, b = InsightFaceRec(tmp_path / "a"), InsightFaceRec(tmp_path / "b")
    assert b.labels.tolist() == a.labels.tolist() == [0, 0, 1, 2, 2, 2]
    assert [b.encoded(i) for i in range(len(b))] == [data for _, data in samples]
    assert (tmp_path / "a.rec").read_bytes() == (tmp_path / "b.rec").read_bytes()


def test_rec_to_folder_reports_and_skips_records_that_are_no_usable_image(tmp_path):
    samples = [(0, _class_image(0, 0)), (0, b"\xff\xd8 not a jpeg"), (1, _class_image(1, 0)),
               (1, encode_image(np.zeros((16, 12, 3), np.uint8), ".png"))]          # not square: no aligned crop
    write_insightface_rec(tmp_path / "a", samples)
    stats = rec_to_folder(tmp_path / "a", tmp_path / "folder", progress=False)
    assert (stats["num_images"], stats["num_skipped"]) == (2, 2)
    assert [s.rsplit(" ", 1)[-1] for s in stats["skipped"]] == ["2", "4"]               # record keys, named
    assert len(scan_image_folder(tmp_path / "folder")[0]) == 2


def test_folder_to_rec_skips_corrupt_images_and_empty_identities(tmp_path):
    _make_folder(tmp_path / "src", [2, 1, 2])
    broken = tmp_path / "src" / "id1" / "0.png"
    broken.write_bytes(b"\x89PNG broken")  # id1 has no readable image left
    (tmp_path / "src" / "id2" / "bad.jpg").write_bytes(b"")
    stats = folder_to_rec(tmp_path / "src", tmp_path / "out", progress=False)
    assert stats["skipped"] == [str(broken), str(tmp_path / "src" / "id2" / "bad.jpg")]
    assert stats["num_skipped"] == 2 and stats["class_names"] == ["id0", "id2"]
    rec = InsightFaceRec(tmp_path / "out")
    assert rec.labels.tolist() == [0, 0, 1, 1] and rec.num_classes == 2
    assert rec.image(2)[1, 1, 0] == 100  # id2's grey level: labels moved down, images kept their identity


def test_never_overwrites_without_permission(tmp_path):
    _make_folder(tmp_path / "src", [2, 2])
    folder_to_rec(tmp_path / "src", tmp_path / "out", progress=False)
    with pytest.raises(FileExistsError, match=rf"{tmp_path / 'out'}\.(rec|idx): already exists"):
        folder_to_rec(tmp_path / "src", tmp_path / "out", progress=False)
    rec_to_folder(tmp_path / "out", tmp_path / "dst", progress=False)
    with pytest.raises(FileExistsError, match=str(tmp_path / "dst")):
        rec_to_folder(tmp_path / "out", tmp_path / "dst", progress=False)
    (tmp_path / "x.bin").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="x.bin"):
        folder_to_bin(tmp_path / "src", tmp_path / "x.bin", num_pairs=2, progress=False)

    folder_to_rec(tmp_path / "src", tmp_path / "out", progress=False, overwrite=True)
    (tmp_path / "dst" / "00000" / "stale.jpg").write_bytes(b"")
    rec_to_folder(tmp_path / "out", tmp_path / "dst", progress=False, overwrite=True)
    assert sorted(os.listdir(tmp_path / "dst")) == [".twinface-output", "00000", "00001"]  # replaced, not mixed
    assert "stale.jpg" not in os.listdir(tmp_path / "dst" / "00000")
    folder_to_bin(tmp_path / "src", tmp_path / "v.bin", num_pairs=2, progress=False)
    folder_to_bin(tmp_path / "src", tmp_path / "v.bin", num_pairs=2, progress=False, overwrite=True)
    assert len(load_bin(tmp_path / "v.bin")[0]) == 4


def test_overwrite_replaces_only_what_twinface_wrote(tmp_path):
    # rec2folder --overwrite used to rmtree any directory, folder2rec/folder2bin to replace any file.
    _make_folder(tmp_path / "src", [2, 2])
    folder_to_rec(tmp_path / "src", tmp_path / "out", progress=False)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match=f"{tmp_path / 'photos'}: exists and is not a twinface output"):
        rec_to_folder(tmp_path / "out", tmp_path / "photos", progress=False, overwrite=True)
    (tmp_path / "notes.rec").write_text("my notes")
    with pytest.raises(FileExistsError, match=f"{tmp_path / 'notes.rec'}: exists and is not a RecordIO file"):
        folder_to_rec(tmp_path / "src", tmp_path / "notes", progress=False, overwrite=True)
    (tmp_path / "x.bin").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="x.bin: exists and is not a pickled verification .bin"):
        folder_to_bin(tmp_path / "src", tmp_path / "x.bin", num_pairs=2, progress=False, overwrite=True)
    assert (tmp_path / "photos" / "holiday.jpg").read_bytes() == b"mine"
    assert (tmp_path / "notes.rec").read_text() == "my notes" and (tmp_path / "x.bin").read_bytes() == b"old"
    assert not (tmp_path / "notes.idx").exists()
    (tmp_path / "empty").mkdir()                                # an empty directory holds nothing to lose
    rec_to_folder(tmp_path / "out", tmp_path / "empty", progress=False, overwrite=True)
    assert sorted(os.listdir(tmp_path / "empty")) == [".twinface-output", "00000", "00001"]


def test_an_unrelated_partial_directory_is_never_touched(tmp_path):
    # rec2folder used `<dst>.partial` as its work directory and deleted whatever was there, without --overwrite.
    _make_folder(tmp_path / "src", [2, 2])
    folder_to_rec(tmp_path / "src", tmp_path / "out", progress=False)
    (tmp_path / "dst.partial").mkdir()
    (tmp_path / "dst.partial" / "thesis.tex").write_text("mine")
    (tmp_path / "out.rec.partial").write_text("mine too")
    rec_to_folder(tmp_path / "out", tmp_path / "dst", progress=False)
    folder_to_rec(tmp_path / "dst", tmp_path / "out", progress=False, overwrite=True)
    assert (tmp_path / "dst.partial" / "thesis.tex").read_text() == "mine"
    assert (tmp_path / "out.rec.partial").read_text() == "mine too"
    assert sorted(os.listdir(tmp_path)) == ["dst", "dst.partial", "out.idx", "out.rec", "out.rec.partial", "src"]


def test_an_output_never_replaces_its_input(tmp_path):
    # rec2folder SRC DST --overwrite, DST being the folder holding SRC, deleted the .rec, .idx and val.bin.
    _make_folder(tmp_path / "src", [2, 2])
    folder_to_rec(tmp_path / "src", tmp_path / "data" / "train", progress=False)
    rec_to_folder(tmp_path / "data" / "train", tmp_path / "data" / "images", progress=False)
    (tmp_path / "data" / MARKER).write_text("{}")             # even a folder twinface made once
    before = sorted(os.listdir(tmp_path / "data"))
    for dst in (tmp_path / "data", tmp_path / "data" / "train.rec"):
        with pytest.raises(ValueError, match=f"{dst}: is or holds the input .*train.rec; an output never"):
            rec_to_folder(tmp_path / "data" / "train", dst, progress=False, overwrite=True)
    with pytest.raises(ValueError, match="is or holds the input"):
        folder_to_bin(tmp_path / "src", tmp_path / "src", num_pairs=2, progress=False, overwrite=True)
    assert sorted(os.listdir(tmp_path / "data")) == before
    assert len(InsightFaceRec(tmp_path / "data" / "train")) == 4


def test_make_pairs_properties():
    labels = np.repeat(np.arange(6), [1, 2, 3, 4, 5, 6])
    pairs, issame = make_pairs(labels, 40, seed=3)
    assert pairs.shape == (40, 2) and pairs.dtype == np.int64 and issame.dtype == bool
    assert issame.sum() == 20
    assert pairs.min() >= 0 and pairs.max() < len(labels)
    assert np.array_equal(labels[pairs[:, 0]] == labels[pairs[:, 1]], issame)
    assert np.all(pairs[:, 0] != pairs[:, 1])
    assert len({tuple(sorted(p)) for p in pairs.tolist()}) == 40
    assert issame[:20].any() and (~issame[:20]).any()  # shuffled: not all same pairs first
    again, again_same = make_pairs(labels, 40, seed=3)
    assert np.array_equal(again, pairs) and np.array_equal(again_same, issame)
    assert not np.array_equal(make_pairs(labels, 40, seed=4)[0], pairs)


def test_make_pairs_uses_every_pair_when_few_exist():
    labels = np.array([0, 0, 1, 1, 2])
    pairs, issame = make_pairs(labels, 4, seed=0)  # exactly the 2 same pairs exist
    assert sorted(tuple(sorted(p)) for p in pairs[issame].tolist()) == [(0, 1), (2, 3)]
    assert np.all(labels[pairs[~issame, 0]] != labels[pairs[~issame, 1]])
    with pytest.raises(ValueError, match="3 same-identity pairs requested, only 2 exist"):
        make_pairs(labels, 6, seed=0)
    with pytest.raises(ValueError, match="different-identity pairs requested, only 0 exist"):
        make_pairs(np.zeros(5), 4, seed=0)


def test_folder_to_bin(tmp_path):
    _make_folder(tmp_path / "src", [3, 3, 4], size=20)
    stats = folder_to_bin(tmp_path / "src", tmp_path / "v.bin", num_pairs=10, seed=1, image_size=16,
                          progress=False)
    assert stats["num_pairs"] == 10 and stats["num_same"] == 5 and stats["num_resized"] == stats["num_images"]
    bins, issame = load_bin(tmp_path / "v.bin")
    assert len(bins) == 20 and issame.sum() == 5
    images = [decode_image(b, f"image {i}") for i, b in enumerate(bins)]
    assert all(img.shape == (16, 16, 3) for img in images)
    grey = [int(img[8, 8, 0]) for img in images]  # the class's grey level survives resizing
    assert [grey[2 * i] == grey[2 * i + 1] for i in range(10)] == issame.tolist()


def test_folder_to_bin_keeps_bytes_at_target_size(tmp_path):
    _make_folder(tmp_path / "src", [2, 2], size=16)
    stats = folder_to_bin(tmp_path / "src", tmp_path / "v.bin", num_pairs=2, image_size=16, progress=False)
    assert stats["num_resized"] == 0
    files = {open(p, "rb").read(): label for p, label in scan_image_folder(tmp_path / "src")[0]}
    bins, issame = load_bin(tmp_path / "v.bin")
    assert [files[bins[2 * i]] == files[bins[2 * i + 1]] for i in range(2)] == issame.tolist()
