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
    assert len(faces) == 6 and below >= 1          # the original thresholds also pass a few non-faces
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
