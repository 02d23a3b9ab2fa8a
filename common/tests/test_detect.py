"""The MTCNN cascade, the face aligner and `twinface align`, run through onnxruntime (no framework in this room)
on the real photos that `make setup` fetches (twinface.fixtures; a missing one fails, it never skips)."""
import json
import os
import shutil
import struct

import cv2
import numpy as np
import pytest

from twinface import align, cli, fixtures
from twinface.data.images import encode_image, read_image
from twinface.detect import cascade
from twinface.detect.align_folder import JOURNAL, LANDMARKS, REPORT, align_folder
from twinface.detect.faces import FaceAligner, load_detector_nets

# Centres of the six faces in insightface's t1.jpg (1280 x 886), read off the photo by eye.
T1_FACES = [(958, 130), (320, 208), (791, 408), (110, 330), (517, 340), (1179, 337)]


@pytest.fixture(scope="module")
def nets():
    return load_detector_nets("onnx")


@pytest.fixture(scope="module")
def aligner(nets):
    return FaceAligner(nets)


# -- the cascade's parts, by hand ---------------------------------------------------------------------------------
def test_nms_union_and_min_by_hand():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 5, 5], [20, 20, 30, 30]], np.float64)
    scores = np.array([0.9, 0.95, 0.8, 0.7])
    # box 1 beats box 0 (IoU 90/110 = 0.82); box 2 overlaps box 1 by 4x5 = 20 -> IoU 20/105, kept at 0.5
    assert cascade.nms(boxes, scores, 0.5).tolist() == [1, 2, 3]
    # min mode divides by the smaller area: box 2 lies 20/25 = 0.8 inside box 1 -> suppressed at 0.7
    assert cascade.nms(boxes, scores, 0.7, mode="min").tolist() == [1, 3]
    # equal scores: the lower index wins
    assert cascade.nms(boxes[:2], np.array([0.5, 0.5]), 0.5).tolist() == [0]


def test_regress_square_and_pyramid_by_hand():
    box = np.array([[10.0, 20.0, 30.0, 60.0]])                    # 20 wide, 40 high
    np.testing.assert_allclose(cascade.regress(box, np.array([[0.1, -0.1, 0.5, 0.25]])), [[12, 16, 40, 70]])
    np.testing.assert_allclose(cascade.square(box), [[0, 20, 40, 60]])
    # 480 x 640 at min face 20: scales 0.6 * 0.709^k while 480 * scale >= 12
    scales = cascade.pyramid_scales(480, 640, cascade.DetectParams())
    expected = [0.6 * 0.709 ** k for k in range(20) if 480 * 0.6 * 0.709 ** k >= 12]
    np.testing.assert_allclose(scales, expected)
    assert len(scales) == 10


def test_crops_pad_outside_the_image_with_zeros():
    image = np.full((10, 10, 3), 200, np.uint8)
    out = cascade.crops(image, np.array([[-10.0, -10.0, 10.0, 10.0]]), 4)
    assert out[0, :2, :2].max() == 0 and out[0, 2:, 2:].min() == 200


def test_params_refuse_nonsense():
    with pytest.raises(ValueError, match="min_face_size"):
        cascade.DetectParams(min_face_size=5)
    with pytest.raises(ValueError, match="scale_factor"):
        cascade.DetectParams(scale_factor=1.2)


# -- the original's arithmetic, written independently in its own 1-based conventions ---------------------------
def _original_nms(b, threshold, method):
    x1, y1, x2, y2, score = b.T[:5]
    area, order, pick = (x2 - x1 + 1) * (y2 - y1 + 1), np.argsort(-b[:, 4], kind="stable"), []
    while order.size:
        i, rest = order[0], order[1:]
        pick.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        overlap = inter / (np.minimum(area[i], area[rest]) if method == "min" else area[i] + area[rest] - inter)
        order = rest[overlap <= threshold]
    return np.array(pick, int)


def _original_bbreg(b, reg):
    w, h = b[:, 2] - b[:, 0] + 1, b[:, 3] - b[:, 1] + 1
    return np.concatenate([b[:, :4] + reg * np.stack([w, h, w, h], 1), b[:, 4:5]], 1)


def _original_rerec(b):
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    side = np.maximum(w, h)
    x1, y1 = b[:, 0] + w * 0.5 - side * 0.5, b[:, 1] + h * 0.5 - side * 0.5
    return np.concatenate([np.stack([x1, y1, x1 + side, y1 + side], 1), b[:, 4:5]], 1)


def _original_crops(img, b, size):
    height, width = img.shape[:2]
    out = np.zeros((len(b), size, size, 3), np.uint8)
    for k, (x1, y1, x2, y2) in enumerate(b[:, :4].astype(np.int64)):      # 1-based, inclusive
        tmp = np.zeros((y2 - y1 + 1, x2 - x1 + 1, 3), np.uint8)
        sx1, sy1, sx2, sy2 = max(x1, 1), max(y1, 1), min(x2, width), min(y2, height)
        tmp[sy1 - y1:sy2 - y1 + 1, sx1 - x1:sx2 - x1 + 1] = img[sy1 - 1:sy2, sx1 - 1:sx2]
        out[k] = cv2.resize(tmp, (size, size), interpolation=cv2.INTER_AREA)
    return out


def _original_detect(img, nets, minsize=20.0, th=(0.6, 0.7, 0.7), factor=0.709):
    """MTCNN's detect_face as its MATLAB release and facenet's port compute it: boxes (1-based, inclusive) with
    scores, and landmarks (0-based)."""
    from twinface.detect.nets import normalise
    h, w = img.shape[:2]
    scale, short, found = 12.0 / minsize, min(h, w) * 12.0 / minsize, []
    while short >= 12:
        im = cv2.resize(img, (int(np.ceil(w * scale)), int(np.ceil(h * scale))), interpolation=cv2.INTER_AREA)
        prob, off = (o[0] for o in nets.pnet(normalise(im)[None]))
        ys, xs = np.where(prob >= th[0])
        cell = np.stack([xs, ys], 1).astype(float)
        b = np.hstack([np.fix((2 * cell + 1) / scale), np.fix((2 * cell + 12) / scale), prob[ys, xs][:, None],
                       off[ys, xs]])
        found.append(b[_original_nms(b, 0.5, "union")])
        scale, short = scale * factor, short * factor
    b = np.concatenate(found)
    b = b[_original_nms(b, 0.7, "union")]
    rw, rh = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    b = np.concatenate([b[:, :4] + b[:, 5:9] * np.stack([rw, rh, rw, rh], 1), b[:, 4:5]], 1)
    b[:, :4] = np.fix(_original_rerec(b)[:, :4])
    prob, off = nets.rnet(normalise(_original_crops(img, b, 24)))
    ok = prob > th[1]
    b, off = np.hstack([b[ok, :4], prob[ok][:, None]]), off[ok]
    pick = _original_nms(b, 0.7, "union")
    b = _original_rerec(_original_bbreg(b[pick], off[pick]))
    b[:, :4] = np.fix(b[:, :4])
    prob, off, points = nets.onet(normalise(_original_crops(img, b, 48)))
    ok = prob > th[2]
    b, off, points = np.hstack([b[ok, :4], prob[ok][:, None]]), off[ok], points[ok]
    bw, bh = b[:, 2] - b[:, 0] + 1, b[:, 3] - b[:, 1] + 1
    landmarks = np.stack([bw[:, None] * points[:, :5] + b[:, 0:1] - 1, bh[:, None] * points[:, 5:] + b[:, 1:2] - 1], 2)
    b = _original_bbreg(b, off)
    pick = _original_nms(b, 0.7, "min")
    return b[pick], landmarks[pick]


@pytest.mark.parametrize("name", ["t1.jpg", "obama.jpg", "biden.jpg"])
def test_cascade_computes_what_the_original_computes(nets, name):
    """Same faces, boxes (the original's 1-based inclusive corners (a, b, c, d) are (a - 1, b - 1, c, d) here)
    and landmarks as the original MTCNN arithmetic on the same nets."""
    image = read_image(fixtures.photo(name))
    faces = cascade.detect_faces(image, nets)
    boxes, landmarks = _original_detect(image, nets)
    assert len(faces) == len(boxes) >= 1
    np.testing.assert_allclose(faces.boxes, boxes[:, :4] - [1, 1, 0, 0], atol=1e-3)
    np.testing.assert_allclose(faces.scores, boxes[:, 4], atol=1e-6)
    np.testing.assert_allclose(faces.landmarks, landmarks, atol=1e-3)


# -- real photos ---------------------------------------------------------------------------------------------------
def _check_landmarks(faces):
    for box, points in zip(faces.boxes, faces.landmarks):
        x1, y1, x2, y2 = box
        assert ((points[:, 0] > x1) & (points[:, 0] < x2) & (points[:, 1] > y1) & (points[:, 1] < y2)).all()
        left_eye, right_eye, nose, mouth_left, mouth_right = points
        assert left_eye[0] < right_eye[0] and mouth_left[0] < mouth_right[0]
        assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])


def test_group_photo_every_face_found_once(nets):
    image = read_image(fixtures.photo("t1.jpg"))
    faces, below = FaceAligner(nets, faces="all").find(image)
    assert len(faces) == 6 and below == 0
    for cx, cy in T1_FACES:
        inside = [(b[0] < cx < b[2]) and (b[1] < cy < b[3]) for b in faces.boxes]
        assert sum(inside) == 1, (cx, cy, faces.boxes)
    _check_landmarks(faces)
    assert (np.diff(faces.scores) <= 0).all()


@pytest.mark.parametrize("name", ["obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg", "32bit.png"])
def test_one_face_in_each_portrait(nets, name):
    image = read_image(fixtures.photo(name))
    faces, _ = FaceAligner(nets, faces="all").find(image)
    assert len(faces) == 1
    _check_landmarks(faces)
    side = faces.boxes[0, 2] - faces.boxes[0, 0]
    assert side > 0.15 * min(image.shape[:2])      # the portrait's face, not something in the background


def test_aligned_crops_put_the_face_on_the_template(aligner):
    """An aligned crop puts the face on the template: the landmarks found again in the crop land within a few
    pixels of it (eyes and nose; the mouth corners move with the expression: a smile widens them)."""
    for name in ("obama.jpg", "biden.jpg"):
        image = read_image(fixtures.photo(name))
        faces, _ = aligner.find(image)
        crop = aligner.crops(image, faces)[0]
        again = cascade.detect_faces(cv2.copyMakeBorder(crop, 40, 40, 40, 40, cv2.BORDER_CONSTANT), aligner.nets)
        points = again.largest().landmarks[0] - 40
        error = np.abs(points - align.ARCFACE_TEMPLATE).max(axis=1)
        assert error[:3].max() < 3.5 and error[3:].max() < 6.0, points


def _with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """A JPEG with an EXIF APP1 segment holding only the Orientation tag (TIFF little endian, one IFD entry)."""
    tiff = b"II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + b"\0" * 4
    app1 = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:]


def test_exif_rotation_grayscale_alpha_and_webp_photos(aligner, tmp_path):
    upright = read_image(fixtures.photo("obama2.jpg"))
    found = aligner.find(upright)[0]
    reference, tolerance = found.landmarks[0], 0.03 * (found.boxes[0, 2] - found.boxes[0, 0])   # 3% of the face
    # stored rotated 90 degrees counter-clockwise with orientation 6 ("rotate 90 cw to view"): the same face
    stored = np.ascontiguousarray(np.rot90(upright, 1))
    rotated = tmp_path / "rotated.jpg"
    rotated.write_bytes(_with_exif_orientation(encode_image(stored, ".jpg", 98), 6))
    np.testing.assert_allclose(aligner.find(read_image(rotated))[0].landmarks[0], reference, atol=tolerance)
    gray = tmp_path / "gray.png"
    cv2.imwrite(str(gray), cv2.cvtColor(upright, cv2.COLOR_RGB2GRAY))
    webp = tmp_path / "photo.webp"
    cv2.imwrite(str(webp), cv2.cvtColor(upright, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_WEBP_QUALITY, 95])
    for path in (gray, webp, fixtures.photo("32bit.png")):        # 32bit.png has an alpha channel
        np.testing.assert_allclose(aligner.find(read_image(path))[0].landmarks[0], reference, atol=tolerance)


# -- twinface align ------------------------------------------------------------------------------------------------
@pytest.fixture
def photos(tmp_path):
    src = tmp_path / "photos"
    for person, names in {"obama": ["obama.jpg", "obama2.jpg"], "group": ["t1.jpg"]}.items():
        (src / person).mkdir(parents=True)
        for name in names:
            shutil.copy(fixtures.photo(name), src / person / name)
    (src / "obama" / "notes.txt").write_text("not a photo")
    (src / "obama" / "broken.jpg").write_bytes(open(fixtures.photo("obama3.jpg"), "rb").read()[:400])
    blank = np.full((200, 300, 3), 128, np.uint8)
    (src / "group" / "wall.png").write_bytes(encode_image(blank, ".png"))
    return src


def test_align_folder_writes_crops_landmarks_and_a_report_of_every_other_file(photos, tmp_path, aligner):
    dst = tmp_path / "aligned"
    stats = align_folder(str(photos), str(dst), FaceAligner(aligner.nets, faces="all"), progress=False)
    assert stats["photos"] == 5 and stats["crops"] == 2 + 6 and stats["no_face"] == 1 and stats["unreadable"] == 1
    assert sorted(os.listdir(dst / "group")) == [f"t1_{k}.jpg" for k in range(6)]
    landmarks = json.loads((dst / LANDMARKS).read_text())
    assert sorted(landmarks) == ["group/t1.jpg", "obama/obama.jpg", "obama/obama2.jpg"]
    face = landmarks["obama/obama.jpg"][0]
    assert face["crop"] == "obama/obama_0.jpg" and len(face["landmarks"]) == 5 and face["score"] >= 0.95
    assert read_image(dst / face["crop"]).shape == (112, 112, 3)
    report = [line.split("\t") for line in (dst / REPORT).read_text().splitlines()[1:]]
    assert [(r[0], r[1]) for r in report] == [("group/wall.png", "no_face"), ("obama/broken.jpg", "unreadable"),
                                              ("obama/notes.txt", "not_a_photo")]
    assert "broken.jpg" in report[1][2]


def test_align_folder_resumes_after_a_kill_and_redoes_changed_photos(photos, tmp_path, aligner):
    dst = tmp_path / "aligned"
    align_folder(str(photos), str(dst), aligner, progress=False)
    first = (dst / "obama" / "obama.jpg").read_bytes()
    # a kill after two photos: the journal holds two entries and a torn third line, no landmarks.json yet
    lines = (dst / JOURNAL).read_text().splitlines()
    (dst / JOURNAL).write_text("\n".join(lines[:2]) + "\n" + lines[2][:30])
    os.remove(dst / LANDMARKS)
    stats = align_folder(str(photos), str(dst), aligner, progress=False)
    assert stats["resumed"] == 2 and stats["with_faces"] == 3
    assert (dst / "obama" / "obama.jpg").read_bytes() == first
    # a photo replaced by another: redone; a photo removed: its crop goes
    shutil.copy(fixtures.photo("biden.jpg"), photos / "obama" / "obama2.jpg")
    os.remove(photos / "group" / "t1.jpg")
    stats = align_folder(str(photos), str(dst), aligner, progress=False)
    assert stats["resumed"] == 3 and not (dst / "group" / "t1.jpg").exists()
    biden = json.loads((dst / LANDMARKS).read_text())["obama/obama2.jpg"][0]["box"]
    assert biden == pytest.approx(aligner.find(read_image(fixtures.photo("biden.jpg")))[0].boxes[0], abs=0.01)


def test_align_folder_refuses_what_it_must_not_touch(photos, tmp_path, aligner):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a twinface align output"):
        align_folder(str(photos), str(theirs), aligner, progress=False)
    assert (theirs / "keep.txt").read_text() == "mine"
    dst = tmp_path / "aligned"
    align_folder(str(photos), str(dst), aligner, progress=False)
    with pytest.raises(FileExistsError, match="other settings.*--overwrite"):
        align_folder(str(photos), str(dst), FaceAligner(aligner.nets, size=224), progress=False)
    align_folder(str(photos), str(dst), FaceAligner(aligner.nets, size=224), overwrite=True, progress=False)
    assert read_image(dst / "obama" / "obama.jpg").shape == (224, 224, 3)
    with pytest.raises(ValueError, match="is or holds the input"):
        align_folder(str(photos / "obama"), str(photos), aligner, progress=False)
    with pytest.raises(ValueError, match="inside the photo folder"):
        align_folder(str(photos), str(photos / "aligned"), aligner, progress=False)
    shutil.copy(fixtures.photo("biden.jpg"), photos / "obama" / "obama.png")
    with pytest.raises(ValueError, match=r"obama/obama\.jpg and obama/obama\.png: both would be aligned"):
        align_folder(str(photos), str(tmp_path / "other"), aligner, progress=False)


def test_cli_align_and_folder2rec_detect(photos, tmp_path, capsys):
    os.remove(photos / "group" / "t1.jpg")
    cli.main(["align", str(photos), str(tmp_path / "a"), "--framework", "onnx", "--size", "128"])
    out = capsys.readouterr().out
    assert "crops: 2" in out and "no_face: 1" in out and "unreadable: 1" in out
    assert read_image(tmp_path / "a" / "obama" / "obama.jpg").shape == (128, 128, 3)
    cli.main(["data", "folder2rec", str(photos), str(tmp_path / "train"), "--detect", "--detector", "onnx"])
    out = capsys.readouterr().out
    assert "num_images: 2" in out and os.path.isfile(tmp_path / "train.rec")
    assert os.path.isfile(tmp_path / "train.aligned" / REPORT)


# -- photos straight to embeddings ---------------------------------------------------------------------------------
def test_embed_and_verify_photos_with_detect(tmp_path, capsys, aligner):
    from twinface.embedders import OnnxEmbedder
    from twinface.eval.embeddings import l2_normalize, load_embeddings
    from twinface.testing import pool_onnx
    model = pool_onnx(tmp_path / "pool.onnx")
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("obama.jpg", "biden.jpg"):
        shutil.copy(fixtures.photo(name), photos / name)
    (photos / "wall.png").write_bytes(encode_image(np.full((200, 300, 3), 128, np.uint8), ".png"))
    cli.main(["embed", "--weights", model, "--images", str(photos), "--out", str(tmp_path / "emb"), "--detect"])
    captured = capsys.readouterr()
    assert "1 of 3 photos have no face" in captured.err and "wall.png (no face)" in captured.err
    emb, names = load_embeddings(str(tmp_path / "emb.npy"))
    assert [os.path.basename(n) for n in names] == ["biden.jpg", "obama.jpg"]
    # the embedding is that of the aligned crop (flip-summed), not of the photo
    image = read_image(photos / "obama.jpg")
    crop = aligner.crops(image, aligner.find(image)[0])[0][None]
    embed = OnnxEmbedder(model)
    np.testing.assert_allclose(emb[1], l2_normalize(embed(crop) + embed(crop[:, :, ::-1]))[0], atol=1e-5)

    cli.main(["verify", "--weights", model, str(photos / "obama.jpg"), str(photos / "obama.jpg"), "--detect"])
    assert "cosine similarity 1.0000" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"wall\.png: no face found \(see --min-size, --min-score\)"):
        cli.main(["verify", "--weights", model, str(photos / "obama.jpg"), str(photos / "wall.png"), "--detect"])


# -- what review found: nothing of the user's touched, nothing lost silently ---------------------------------------
def test_align_never_takes_another_twinface_output_for_its_own(photos, tmp_path, aligner):
    """A rec2folder output carries twinface's marker too: align must refuse it, with or without --overwrite."""
    theirs = tmp_path / "trainset"
    (theirs / "00000").mkdir(parents=True)
    (theirs / ".twinface-output").write_text(json.dumps({"writer": "twinface data rec2folder"}))
    (theirs / "00000" / "000000.jpg").write_bytes(b"user data")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="not a twinface align output"):
            align_folder(str(photos), str(theirs), aligner, overwrite=overwrite, progress=False)
    assert (theirs / "00000" / "000000.jpg").read_bytes() == b"user data"


def test_align_reports_hidden_files_follows_linked_folders_and_survives_unreadable_entries(tmp_path, aligner):
    src, other = tmp_path / "photos", tmp_path / "elsewhere"
    (src / "alice").mkdir(parents=True)
    other.mkdir()
    shutil.copy(fixtures.photo("obama2.jpg"), src / "alice" / "a.jpg")
    shutil.copy(fixtures.photo("obama2.jpg"), src / "alice" / ".b.jpg")
    shutil.copy(fixtures.photo("biden.jpg"), other / "c.jpg")
    os.symlink(other, src / "bob")                              # a linked identity folder
    os.symlink(src, src / "alice" / "loop")                     # a link back up the tree: walked once
    os.symlink(tmp_path / "nowhere.jpg", src / "alice" / "gone.jpg")
    (src / "alice" / "tab\there.txt").write_text("x")
    stats = align_folder(str(src), str(tmp_path / "out"), aligner, progress=False)
    assert stats["crops"] == 2 and stats["hidden"] == 1 and stats["unreadable"] == 1
    assert (tmp_path / "out" / "bob" / "c.jpg").is_file()
    report = (tmp_path / "out" / REPORT).read_text().splitlines()
    assert report[1:] == ["alice/.b.jpg\thidden\ta hidden file or folder (name starts with '.'): not read",
                          "alice/gone.jpg\tunreadable\tNo such file or directory",
                          "alice/tab\\there.txt\tnot_a_photo\textension not one of .jpg, .jpeg, .png, .bmp, .webp"]


def test_align_resume_trusts_the_disk_not_only_the_journal(tmp_path, aligner):
    src, dst = tmp_path / "photos", tmp_path / "out"
    (src / "x").mkdir(parents=True)
    shutil.copy(fixtures.photo("t1.jpg"), src / "x" / "group.jpg")
    shutil.copy(fixtures.photo("obama2.jpg"), src / "x" / "a.jpg")
    all_faces = FaceAligner(aligner.nets, faces="all")
    align_folder(str(src), str(dst), all_faces, progress=False)
    # a kill between group.jpg's crops and its journal line, then group.jpg removed: its crops must go
    lines = (dst / JOURNAL).read_text().splitlines()
    (dst / JOURNAL).write_text("\n".join(line for line in lines if "group.jpg" not in line) + "\n")
    os.remove(src / "x" / "group.jpg")
    align_folder(str(src), str(dst), all_faces, progress=False)
    assert sorted(os.listdir(dst / "x")) == ["a_0.jpg"]
    # a crop deleted by hand: its photo is redone, not listed with a missing crop
    os.remove(dst / "x" / "a_0.jpg")
    stats = align_folder(str(src), str(dst), all_faces, progress=False)
    assert stats["resumed"] == 0 and (dst / "x" / "a_0.jpg").is_file()
    # a destination holding only align's marker (a kill before its settings were written) starts afresh
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / ".twinface-output").write_text(json.dumps({"writer": "twinface align"}))
    assert align_folder(str(src), str(fresh), all_faces, progress=False)["crops"] == 1


def test_align_names_what_differs_and_what_was_too_small(photos, tmp_path, aligner):
    dst = tmp_path / "out"
    align_folder(str(photos), str(dst), aligner, progress=False)
    with pytest.raises(FileExistsError, match=r"other settings \(size 112 -> 224\); pass --overwrite"):
        align_folder(str(photos), str(dst), FaceAligner(aligner.nets, size=224), progress=False)
    params = cascade.DetectParams(min_face_size=2000)
    align_folder(str(photos), str(tmp_path / "big"), FaceAligner(aligner.nets, params), progress=False)
    report = (tmp_path / "big" / REPORT).read_text()
    assert "obama/obama.jpg\tno_face\t910x1137 photo is smaller than the minimum face size 2000" in report


def test_folder2rec_detect_checks_the_rec_first_and_keeps_the_alignment(photos, tmp_path, capsys):
    os.remove(photos / "group" / "t1.jpg")
    args = ["data", "folder2rec", str(photos), str(tmp_path / "train"), "--detect", "--detector", "onnx"]
    cli.main(args)
    with pytest.raises(SystemExit, match=r"train\.idx: already exists; pass --overwrite"):
        cli.main(args)
    capsys.readouterr()
    cli.main(args + ["--overwrite"])
    assert "resumed: 4" in capsys.readouterr().out
