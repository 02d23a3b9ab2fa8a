"""5-point similarity alignment onto the ArcFace template: insightface's estimate_norm / norm_crop, in numpy + OpenCV.

A size that is a multiple of 112 scales the 112 template; any other size follows insightface's rule for 128:
the template scaled by size / 128 and moved right by 8 * size / 128 (insightface itself accepts only multiples
of 112 or 128; the same formula serves the rest). The warp is bilinear with a black border, as insightface's.
"""
import cv2
import numpy as np

# left eye, right eye, nose tip, left mouth corner, right mouth corner, for a 112x112 crop
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src -> dst (Umeyama 1991).

    Returns the 2x3 float64 matrix for cv2.warpAffine (skimage's SimilarityTransform.estimate, which insightface
    uses, solves the same problem the same way).
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"landmarks: expected two [K, 2] arrays with K >= 2, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1
    rot = u @ sign @ vt
    var_s = (s ** 2).sum() / len(src)
    if var_s <= 1e-12 * max(1.0, float(np.abs(src).max()) ** 2):
        raise ValueError("landmarks: all at one point; no similarity transform maps them onto the template")
    scale = (sig * np.diag(sign)).sum() / var_s
    t = mu_d - scale * rot @ mu_s
    return np.hstack([scale * rot, t[:, None]])


def template(size: int = 112) -> np.ndarray:
    """The 5 landmark positions in a size x size crop, in float32 arithmetic as insightface computes them."""
    if size % 112 == 0:
        return ARCFACE_TEMPLATE * np.float32(size / 112.0)
    ratio = np.float32(size / 128.0)
    dst = ARCFACE_TEMPLATE * ratio
    dst[:, 0] += np.float32(8.0) * ratio
    return dst


def estimate_norm(landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """The 2x3 matrix taking the 5 landmarks (eyes, nose, mouth corners; x, y) onto the template."""
    landmarks = np.asarray(landmarks, np.float64)
    if landmarks.shape != (5, 2):
        raise ValueError(f"landmarks: expected shape (5, 2) (eyes, nose, mouth corners), got {landmarks.shape}")
    if not np.isfinite(landmarks).all():
        raise ValueError("landmarks: not all finite")
    return similarity_transform(landmarks, template(size))


def norm_crop(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """The aligned size x size face crop, as insightface's norm_crop."""
    return cv2.warpAffine(image, estimate_norm(landmarks, size), (size, size), borderValue=0.0)
