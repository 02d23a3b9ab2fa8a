"""The procedural default data set: determinism, layout, alignment, held-out validation, caching, and that it
poses a real recognition problem (identity visible, raw pixels not enough)."""
import contextlib
import json
import os
import time

import numpy as np
import pytest

from twinface.data import synth
from twinface.data.folder import scan_image_folder
from twinface.data.recordio import InsightFaceRec
from twinface.data.synth import (DEFAULTS, TEMPLATE, encode_photo, ensure_dataset, generate, identity_params,
                                 iter_identity_images, raw_pixel_baseline, render)
from twinface.data.synth_render import render_sample
from twinface.data.verification_bin import decode_bin, load_bin
from twinface.eval.verification import evaluate

TINY = {"num_identities": 6, "images_per_identity": 4, "val_identities": 4, "val_pairs": 20, "seed": 3}
FILES = ("train.rec", "train.idx", "val.bin")


def _tiny(root, workers=1, **changes):
    return generate(root, **{**TINY, **changes}, workers=workers, progress=False)


@contextlib.contextmanager
def _open_rec(prefix):
    rec = InsightFaceRec(prefix)
    try:
        yield rec
    finally:
        rec.reader.close()


def _read(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def tiny_sets(tmp_path_factory):
    """The same tiny set made by 2 workers and by 1, plus one with another seed."""
    root = tmp_path_factory.mktemp("synth")
    _tiny(root / "two", workers=2)
    _tiny(root / "one", workers=1)
    _tiny(root / "other_seed", seed=TINY["seed"] + 1)
    return root


def test_same_seed_same_bytes_whatever_the_worker_count(tiny_sets):
    for name in FILES:
        assert _read(tiny_sets / "two" / name) == _read(tiny_sets / "one" / name), name
    folder_two, _ = scan_image_folder(tiny_sets / "two" / "train")
    folder_one, _ = scan_image_folder(tiny_sets / "one" / "train")
    assert [os.path.relpath(p, tiny_sets / "two") for p, _ in folder_two] == \
           [os.path.relpath(p, tiny_sets / "one") for p, _ in folder_one]
    for (a, _), (b, _) in zip(folder_two, folder_one):
        assert _read(a) == _read(b), a


def test_other_seed_other_faces(tiny_sets):
    with _open_rec(tiny_sets / "one" / "train") as a, _open_rec(tiny_sets / "other_seed" / "train") as b:
        for i in range(len(a)):
            assert np.abs(a.image(i).astype(int) - b.image(i)).mean() > 5, f"image {i} barely changed with the seed"
    assert _read(tiny_sets / "one" / "val.bin") != _read(tiny_sets / "other_seed" / "val.bin")


def test_layout_counts_and_manifest(tiny_sets):
    root = tiny_sets / "one"
    n, k = TINY["num_identities"], TINY["images_per_identity"]
    samples, class_names = scan_image_folder(root / "train")
    assert class_names == [f"{c:05d}" for c in range(n)]
    assert [os.path.basename(p) for p, _ in samples[:k]] == [f"{j:06d}.jpg" for j in range(k)]
    with _open_rec(root / "train") as rec:
        assert len(rec) == n * k and rec.num_identity_records == n
        assert rec.labels.tolist() == np.repeat(np.arange(n), k).tolist()
        for i, (path, label) in enumerate(samples):
            assert label == rec.labels[i] and _read(path) == rec.encoded(i)
    bins, issame = load_bin(root / "val.bin")
    assert len(bins) == 2 * TINY["val_pairs"] and issame.sum() == TINY["val_pairs"] // 2
    images = decode_bin(bins, "val.bin")
    assert images.shape == (2 * TINY["val_pairs"], 112, 112, 3) and images.dtype == np.uint8
    with open(root / "manifest.json") as f:
        manifest = json.load(f)
    assert manifest["params"] == TINY and manifest["counts"]["train_images"] == n * k
    assert manifest["counts"]["val_first_identity"] == n


def test_stored_images_are_iter_identity_images(tiny_sets):
    k = TINY["images_per_identity"]
    photos = list(iter_identity_images(TINY["seed"], 2, k))
    assert len(photos) == k
    with _open_rec(tiny_sets / "one" / "train") as rec:
        for j, photo in enumerate(photos):
            assert photo.shape == (112, 112, 3) and photo.dtype == np.uint8
            np.testing.assert_array_equal(photo, rec.image(2 * k + j))


def test_val_pairs_come_from_held_out_identities_only(tiny_sets):
    n, k, seed = TINY["num_identities"], TINY["images_per_identity"], TINY["seed"]
    owner = {}  # encoded photo -> identity, for every photo a val pair may use and every training photo
    for identity in range(n + TINY["val_identities"]):
        params = identity_params(seed, identity)
        for j in range(k):
            owner[encode_photo(params, seed, identity, j)] = identity
    with _open_rec(tiny_sets / "one" / "train") as rec:
        assert {owner[rec.encoded(i)] for i in range(len(rec))} == set(range(n))
    bins, issame = load_bin(tiny_sets / "one" / "val.bin")
    ids = np.array([owner[b] for b in bins])  # KeyError here: a val image that no held-out identity rendered
    assert ids.min() >= n, "a validation image belongs to a training identity"
    np.testing.assert_array_equal(ids[0::2] == ids[1::2], issame)
    assert all(bins[2 * i] != bins[2 * i + 1] for i in range(len(issame))), "a pair compares a photo with itself"


def test_render_shapes_and_size_scaling():
    params = identity_params(0, 5)
    img, landmarks = render(params, 0, 5, 1)
    assert img.shape == (112, 112, 3) and img.dtype == np.uint8
    assert landmarks.shape == (5, 2) and landmarks.dtype == np.float32
    big, big_landmarks = render(params, 0, 5, 1, size=224)
    assert big.shape == (224, 224, 3)
    np.testing.assert_allclose(big_landmarks, 2 * landmarks, atol=1e-3)
    again, _ = render(identity_params(0, 5), 0, 5, 1)
    np.testing.assert_array_equal(img, again)


def test_landmarks_near_the_arcface_template_but_not_on_it():
    errors = np.array([np.linalg.norm(render(identity_params(0, i), 0, i, j)[1] - TEMPLATE, axis=1)
                       for i in range(30) for j in range(2)])
    # Budget: residual jitter (shift sd 1.3 px per axis, roll sd 3 deg, scale sd 4% at the points' ~25 px from
    # their centroid) gives ~2 px; yaw/pitch (sd 11/7 deg) move the nose and mouth against the eyes by a few px
    # that the similarity fit cannot remove. 4 px mean is ~11% of the 35 px eye distance: aligned, not pinned.
    assert errors.mean() < 4.0
    assert np.percentile(errors, 99) < 10.0
    assert errors.mean() > 1.0, "no pose or detector jitter left: every face sits exactly on the template"


def test_landmarks_mark_the_drawn_pupils_in_any_pose():
    neutral = {"blink": False, "gaze": np.zeros(2), "occlusion": "none", "wears_glasses": False, "noise": 0.0,
               "blur": 0.0, "low_res": 1.0, "ambient": 1.0, "intensity": 1.0}
    for identity in range(8):
        params = identity_params(0, identity)
        for yaw, pitch in ((0.0, 0.0), (-0.35, 0.2), (0.35, -0.2)):
            img, landmarks, _ = render_sample(params, 0, identity, 0, size=224,
                                              overrides={**neutral, "yaw": yaw, "pitch": pitch})
            luminance = img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
            for x, y in np.round(landmarks[:2]).astype(int):
                assert luminance[y - 1:y + 2, x - 1:x + 2].min() < 30, (identity, yaw, pitch, x, y)


def test_overrides_reject_unknown_nuisances():
    with pytest.raises(KeyError, match="yaww"):
        render_sample(identity_params(0, 0), 0, 0, 0, overrides={"yaww": 0.0})


def test_identity_is_visible_through_changing_conditions():
    people = [identity_params(0, 100 + p) for p in range(8)]
    conditions = range(6)
    # Every person photographed under the same 6 sets of conditions (pose, light, background, ...).
    photos = np.stack([[render(person, 0, 500 + c, 0)[0] for c in conditions] for person in people])
    labels = np.repeat(np.arange(len(people)), len(conditions))
    same = (labels[:, None] == labels[None]) & ~np.eye(len(labels), dtype=bool)
    different = labels[:, None] != labels[None]

    raw = photos.reshape(len(labels), -1).astype(np.float32) / 127.5 - 1
    raw /= np.linalg.norm(raw, axis=1, keepdims=True)
    raw_cos = raw @ raw.T
    # Conditions change photos a lot (the raw-pixel baseline must stay weak) ...
    assert raw_cos[same].mean() < 0.8 and raw_cos[different].mean() < 0.8
    # ... yet what makes a person differ from everyone photographed the same way is the same in every photo.
    residual = photos.astype(np.float32) - photos.mean(axis=0, keepdims=True).astype(np.float32)
    residual = residual.reshape(len(labels), -1)
    residual /= np.linalg.norm(residual, axis=1, keepdims=True)
    cos = residual @ residual.T
    assert cos[same].mean() > 0.35 and cos[different].mean() < 0.05
    np.fill_diagonal(cos, -np.inf)
    assert (labels[cos.argmax(1)] == labels).mean() >= 0.7  # chance: 1/8


def test_raw_pixels_separate_identities_a_little():
    photos = np.stack([img for i in range(8) for img in iter_identity_images(0, i, 5)])
    labels = np.repeat(np.arange(8), 5)
    x = photos.reshape(len(photos), -1).astype(np.float32) / 127.5 - 1
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cos = x @ x.T
    same = (labels[:, None] == labels[None]) & ~np.eye(len(labels), dtype=bool)
    within, between = cos[same].mean(), cos[labels[:, None] != labels[None]].mean()
    assert within > between + 0.03, "photos of one person look no more alike than photos of two"
    assert within < 0.8, "photos of one person are near copies of each other"


def test_raw_pixel_baseline_equals_the_protocol_on_full_vectors(tiny_sets):
    path = tiny_sets / "one" / "val.bin"
    bins, issame = load_bin(path)
    x = decode_bin(bins, str(path)).reshape(len(bins), -1).astype(np.float64) / 127.5 - 1
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    expected = evaluate(x, issame).acc_mean
    assert raw_pixel_baseline(path) == pytest.approx(expected, abs=1e-12)
    with open(tiny_sets / "one" / "manifest.json") as f:
        assert json.load(f)["raw_pixel_baseline"] == pytest.approx(expected, abs=1e-12)


def test_ensure_dataset_generates_once_then_reads_the_cache(tmp_path):
    out = tmp_path / "cache"
    first = ensure_dataset(out, workers=1, progress=False, **TINY)
    stamps = {name: os.stat(out / name).st_mtime_ns for name in ("manifest.json",) + FILES}
    start = time.perf_counter()
    second = ensure_dataset(out, workers=1, progress=False, **TINY)
    assert time.perf_counter() - start < 0.5
    assert second == first
    assert {name: os.stat(out / name).st_mtime_ns for name in stamps} == stamps
    third = ensure_dataset(out, workers=1, progress=False, **{**TINY, "seed": 9})
    assert third["params"]["seed"] == 9 and os.stat(out / "manifest.json").st_mtime_ns != stamps["manifest.json"]
    os.remove(out / "val.bin")
    ensure_dataset(out, workers=1, progress=False, **{**TINY, "seed": 9})
    assert (out / "val.bin").exists()
    with pytest.raises(TypeError, match="num_identitys"):
        ensure_dataset(out, num_identitys=3)


def test_interrupted_generation_leaves_no_set(tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "save_bin", interrupt)  # after all training images are written
    with pytest.raises(KeyboardInterrupt):
        _tiny(tmp_path / "new")
    assert os.listdir(tmp_path) == []  # neither the set nor its hidden work directory


def test_interrupted_regeneration_keeps_the_old_set(tmp_path, monkeypatch):
    out = tmp_path / "set"
    _tiny(out)
    old = _read(out / "manifest.json")
    monkeypatch.setattr(synth, "save_bin", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError, match="disk full"):
        _tiny(out, seed=8, overwrite=True)
    assert _read(out / "manifest.json") == old and sorted(os.listdir(tmp_path)) == ["set"]


def test_never_replaces_what_it_did_not_make(tmp_path):
    _tiny(tmp_path / "set")
    with pytest.raises(FileExistsError, match="overwrite"):
        _tiny(tmp_path / "set")
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="not a twinface synthetic data set"):
        _tiny(foreign, overwrite=True)
    assert (foreign / "holiday.jpg").read_bytes() == b"mine"


@pytest.mark.parametrize("change, message", [({"num_identities": 0}, "num_identities"),
                                             ({"images_per_identity": 1}, "images_per_identity"),
                                             ({"val_pairs": 10}, "val_pairs"),
                                             ({"formats": ("zip",)}, "formats")])
def test_bad_parameters_are_named(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        _tiny(tmp_path / "x", **change)
    assert not (tmp_path / "x").exists()


def test_defaults_stay_a_small_training_problem():
    assert DEFAULTS["num_identities"] * DEFAULTS["images_per_identity"] <= 30000
    assert DEFAULTS["val_pairs"] % 2 == 0 and DEFAULTS["val_identities"] >= 100
