"""The MTCNN cascade (Zhang et al. 2016), written once in numpy; the twins only run the three nets (nets.py).

P-Net scans an image pyramid for 12x12 face windows; R-Net (24x24) and O-Net (48x48) re-score, refine the
boxes and O-Net adds five landmarks. The arithmetic is the original's (Zhang et al.'s MATLAB release, as
facenet's detect_face.py carries it), quirks included, written in 0-based coordinates: a box here is
(x1, y1, x2, y2) with x2, y2 exclusive, i.e. the original's 1-based inclusive box (a, b, c, d) is
(a - 1, b - 1, c, d) here, and the original's side c - a + 1 is x2 - x1. Its quirks: P-Net windows start at
floor((2j + 1) / scale) (1-based), the first regression scales by the side minus one, and boxes are truncated to
integers (np.fix, 1-based) before R-Net and O-Net crop them and before the landmarks are decoded.
"""
from dataclasses import dataclass, field

import cv2
import numpy as np

from .nets import DetectorNets, normalise

CELL, STRIDE = 12, 2            # P-Net's window and stride, in pyramid pixels
CROP_BATCH = 256                # R-Net / O-Net crops per call: bounds memory on photos with many candidates


@dataclass
class DetectParams:
    """The cascade's settings; the defaults are the original MTCNN's (and facenet-pytorch's)."""
    min_face_size: float = 20.0                     # smallest face side searched, in image pixels
    scale_factor: float = 0.709                     # pyramid step (about 1 / sqrt(2))
    thresholds: tuple = (0.6, 0.7, 0.7)             # face probability to pass P-, R-, O-Net
    nms: tuple = (0.5, 0.7, 0.7, 0.7)               # IoU: within a scale, after P-Net, R-Net; O-Net (min ratio)

    def __post_init__(self):
        if not self.min_face_size >= 12:
            raise ValueError(f"min_face_size: expected >= 12 pixels (P-Net's window), got {self.min_face_size}")
        if not 0 < self.scale_factor < 1:
            raise ValueError(f"scale_factor: expected in (0, 1), got {self.scale_factor}")
        if len(self.thresholds) != 3 or not all(0 <= t <= 1 for t in self.thresholds):
            raise ValueError(f"thresholds: expected three probabilities, got {self.thresholds}")


@dataclass
class Faces:
    """Faces found in one image, best score first: boxes [K, 4] (x1, y1, x2, y2), scores [K], landmarks
    [K, 5, 2] (left eye, right eye, nose, left and right mouth corner; x, y)."""
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    scores: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
    landmarks: np.ndarray = field(default_factory=lambda: np.zeros((0, 5, 2), np.float32))

    def __len__(self):
        return len(self.scores)

    def select(self, keep) -> "Faces":
        return Faces(self.boxes[keep], self.scores[keep], self.landmarks[keep])

    def largest(self) -> "Faces":
        """The face with the largest box area (ties: the better score), or no face."""
        if not len(self):
            return self
        area = (self.boxes[:, 2] - self.boxes[:, 0]) * (self.boxes[:, 3] - self.boxes[:, 1])
        return self.select([int(np.argmax(area))])


def pyramid_scales(height: int, width: int, params: DetectParams) -> list:
    """Scales at which P-Net's 12-pixel window sees faces from min_face_size up to the image's short side."""
    scale = CELL / params.min_face_size
    side = min(height, width) * scale
    scales = []
    while side >= CELL:
        scales.append(scale)
        scale *= params.scale_factor
        side *= params.scale_factor
    return scales


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, mode: str = "union") -> np.ndarray:
    """Greedy non-maximum suppression: indices kept, best score first (ties: lower index first). `mode` union
    divides the overlap by the union of the two areas, min by the smaller area (O-Net's last pass)."""
    order = np.argsort(-scores, kind="stable")
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.clip(np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]), 0, None)
        h = np.clip(np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]), 0, None)
        inter = w * h
        denom = np.minimum(area[i], area[rest]) if mode == "min" else area[i] + area[rest] - inter
        order = rest[inter <= threshold * np.maximum(denom, 1e-12)]
    return np.asarray(keep, np.int64)


def regress(boxes: np.ndarray, offsets: np.ndarray, shrink: float = 0.0) -> np.ndarray:
    """Boxes moved by the nets' regression, in units of each box's width and height (less `shrink`: the
    original's first regression uses the side minus one)."""
    size = np.concatenate([boxes[:, 2:4] - boxes[:, 0:2]] * 2, axis=1) - shrink
    return boxes + offsets * size


def snap(boxes: np.ndarray) -> np.ndarray:
    """The original's np.fix of its 1-based corners (truncation toward zero), in this file's coordinates."""
    return np.concatenate([np.fix(boxes[:, 0:2] + 1) - 1, np.fix(boxes[:, 2:4])], axis=1)


def square(boxes: np.ndarray) -> np.ndarray:
    """Each box made square about its centre, side = its longer side (the next net takes square crops)."""
    centre = (boxes[:, 0:2] + boxes[:, 2:4]) / 2
    half = np.max(boxes[:, 2:4] - boxes[:, 0:2], axis=1, keepdims=True) / 2
    return np.concatenate([centre - half, centre + half], axis=1)


def crops(image: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """[K, size, size, 3] uint8: each (snapped, integer) box cut out, zero outside the image, resized."""
    height, width = image.shape[:2]
    out = np.zeros((len(boxes), size, size, 3), np.uint8)
    for k, (x1, y1, x2, y2) in enumerate(boxes.astype(np.int64)):
        if x2 <= x1 or y2 <= y1:
            continue
        patch = np.zeros((y2 - y1, x2 - x1, 3), np.uint8)
        sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)
        if sx2 > sx1 and sy2 > sy1:
            patch[sy1 - y1:sy2 - y1, sx1 - x1:sx2 - x1] = image[sy1:sy2, sx1:sx2]
        out[k] = cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA)
    return out


def _windows(prob: np.ndarray, offsets: np.ndarray, scale: float, threshold: float) -> tuple:
    """P-Net cells above the threshold as (boxes in image pixels, scores, offsets)."""
    ys, xs = np.nonzero(prob >= threshold)
    corner = np.stack([xs, ys], axis=1).astype(np.float64) * STRIDE
    boxes = np.concatenate([np.fix((corner + 1) / scale) - 1, np.fix((corner + CELL) / scale)], axis=1)
    return boxes, prob[ys, xs].astype(np.float64), offsets[ys, xs].astype(np.float64)


def _stage1(image, nets, params) -> np.ndarray:
    """P-Net over the pyramid: candidate boxes, regressed, squared and snapped for R-Net."""
    height, width = image.shape[:2]
    found = []
    for scale in pyramid_scales(height, width, params):
        size = (int(np.ceil(width * scale)), int(np.ceil(height * scale)))
        resized = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        prob, offsets = nets.pnet(normalise(resized)[None])
        boxes, scores, offs = _windows(prob[0], offsets[0], scale, params.thresholds[0])
        keep = nms(boxes, scores, params.nms[0])
        found.append((boxes[keep], scores[keep], offs[keep]))
    if not found:
        return np.zeros((0, 4))
    boxes, scores, offs = (np.concatenate(parts) for parts in zip(*found))
    keep = nms(boxes, scores, params.nms[1])
    return snap(square(regress(boxes[keep], offs[keep], shrink=1.0)))


def _run_batched(net, images: np.ndarray) -> list:
    outs = [net(normalise(images[i:i + CROP_BATCH])) for i in range(0, len(images), CROP_BATCH)]
    return [np.concatenate(parts) for parts in zip(*outs)]


def detect_faces(image: np.ndarray, nets: DetectorNets, params: DetectParams = None) -> Faces:
    """All faces in a uint8 RGB [H, W, 3] image, best score first."""
    params = params or DetectParams()
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"detect_faces: expected a uint8 RGB image [H, W, 3], got {image.dtype} {image.shape}")
    boxes = _stage1(image, nets, params)
    if not len(boxes):
        return Faces()
    prob, offsets = _run_batched(nets.rnet, crops(image, boxes, 24))
    ok = prob > params.thresholds[1]
    boxes, scores, offsets = boxes[ok], prob[ok].astype(np.float64), offsets[ok].astype(np.float64)
    keep = nms(boxes, scores, params.nms[2])
    boxes = snap(square(regress(boxes[keep], offsets[keep])))
    if not len(boxes):
        return Faces()
    prob, offsets, points = _run_batched(nets.onet, crops(image, boxes, 48))
    ok = prob > params.thresholds[2]
    boxes, scores = boxes[ok], prob[ok].astype(np.float64)
    side = (boxes[:, 2:4] - boxes[:, 0:2])[:, None, :]
    points = points[ok].astype(np.float64).reshape(-1, 2, 5).transpose(0, 2, 1)     # (x1..x5, y1..y5) -> [5, 2]
    landmarks = boxes[:, None, 0:2] + points * side
    boxes = regress(boxes, offsets[ok].astype(np.float64))
    keep = nms(boxes, scores, params.nms[3], mode="min")
    return Faces(boxes[keep].astype(np.float32), scores[keep].astype(np.float32), landmarks[keep].astype(np.float32))
