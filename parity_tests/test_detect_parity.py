"""The whole MTCNN cascade in both twins and onnxruntime on the real photos: the same faces, boxes and landmarks
within 0.5 px, and the same aligned crops. The cascade is one numpy function (twinface.detect.cascade), so what
is compared is the nets' output carried through the thresholds, NMS and regression."""
import numpy as np
import pytest

from twinface import fixtures
from twinface.data.images import read_image
from twinface.detect.cascade import detect_faces
from twinface.detect.faces import FaceAligner, load_detector_nets

PHOTOS = ("t1.jpg", "obama.jpg", "obama3.jpg", "biden.jpg", "32bit.png")
PIXELS = 0.5            # the bound for boxes and landmarks, in photo pixels


@pytest.fixture(scope="module")
def runtimes():
    return {name: load_detector_nets(name) for name in ("torch", "tf", "onnx")}


@pytest.mark.parametrize("photo", PHOTOS)
def test_cascade_finds_the_same_faces_in_every_runtime(parity, runtimes, photo):
    image = read_image(fixtures.photo(photo))
    found = {name: detect_faces(image, nets) for name, nets in runtimes.items()}
    reference = found["torch"]
    assert len(reference) >= 1
    for name in ("tf", "onnx"):
        assert len(found[name]) == len(reference), (photo, name, found[name].scores, reference.scores)
        parity.check(f"detect {photo}: boxes torch vs {name} (px, {len(reference)} faces)",
                     reference.boxes, found[name].boxes, PIXELS)
        parity.check(f"detect {photo}: landmarks torch vs {name} (px)", reference.landmarks, found[name].landmarks,
                     PIXELS)
        parity.check(f"detect {photo}: scores torch vs {name}", reference.scores, found[name].scores, 1e-5)


def test_aligned_crops_agree_across_runtimes(parity, runtimes):
    """Landmarks within a fraction of a pixel move the bilinear warp's samples by as little: crops differ by at
    most a few grey levels (measured 0-1; bound 2)."""
    image = read_image(fixtures.photo("t1.jpg"))
    crops = {}
    for name, nets in runtimes.items():
        aligner = FaceAligner(nets, faces="all")
        crops[name] = np.stack(aligner.crops(image, aligner.find(image)[0])).astype(np.int16)
    for name in ("tf", "onnx"):
        parity.check(f"align t1.jpg: 6 crops torch vs {name} (grey levels)", crops["torch"], crops[name], 2)
