"""Photos -> aligned face crops: load a detector runtime, find faces, keep the confident ones, align them.

Photos are decoded by twinface.data.images (OpenCV: EXIF orientation applied, grayscale and alpha converted to
RGB). The cascade reports every face the original MTCNN settings pass; a face is *kept* only when its O-Net
score reaches min_score (default 0.95), because the original's 0.7 also passes face-like texture: on the test
photos real faces score 0.983-1.000 and the one false detection 0.94 (docs/detect.md).
"""
from dataclasses import dataclass

import numpy as np

from .. import align
from . import DEFAULT_MIN_SCORE, FACE_MODES, FRAMEWORKS, MAX_CROP_SIZE
from .cascade import DetectParams, Faces, detect_faces


def load_detector_nets(framework: str = "torch"):
    """The three MTCNN nets run by `framework`, with the pinned facenet-pytorch weights (twinface.fixtures)."""
    if framework == "torch":
        from twinface_torch.mtcnn import TorchDetectorNets
        return TorchDetectorNets()
    if framework == "tf":
        from twinface_tf.mtcnn import TFDetectorNets
        return TFDetectorNets()
    if framework == "onnx":
        from .. import fixtures
        from .onnx_nets import OnnxDetectorNets
        return OnnxDetectorNets(fixtures.mtcnn_onnx_dir())
    raise ValueError(f"detector framework: expected one of {', '.join(FRAMEWORKS)}, got {framework!r}")


@dataclass
class FaceAligner:
    """Finds faces in RGB photos and cuts insightface-aligned crops of them."""
    nets: object
    params: DetectParams = None
    min_score: float = DEFAULT_MIN_SCORE
    faces: str = "largest"
    size: int = 112

    def __post_init__(self):
        self.params = self.params or DetectParams()
        if self.faces not in FACE_MODES:
            raise ValueError(f"faces: expected one of {', '.join(FACE_MODES)}, got {self.faces!r}")
        if not 0 <= self.min_score <= 1:
            raise ValueError(f"min_score: expected a probability in [0, 1], got {self.min_score}")
        if not 16 <= self.size <= MAX_CROP_SIZE:
            raise ValueError(f"size: expected 16 to {MAX_CROP_SIZE} pixels, got {self.size}")

    def find(self, image: np.ndarray) -> tuple:
        """(faces kept, number of detections below min_score)."""
        found = detect_faces(image, self.nets, self.params)
        kept = found.select(found.scores >= self.min_score)
        return (kept.largest() if self.faces == "largest" else kept), len(found) - len(kept)

    def crops(self, image: np.ndarray, faces: Faces) -> list:
        return [align.norm_crop(image, points, self.size) for points in faces.landmarks]


def face_record(faces: Faces, index: int) -> dict:
    """One face as JSON-ready numbers: box (x1, y1, x2, y2), score, 5 landmarks (x, y)."""
    return {"box": [round(float(v), 2) for v in faces.boxes[index]],
            "score": round(float(faces.scores[index]), 5),
            "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in faces.landmarks[index]]}
