"""Pixel conventions at the neutral boundary: uint8 RGB HWC in, normalised float out.

Every path into a model (training, embedding, evaluation, export checks) goes through `to_model_input`, so the
twins, onnxruntime and the CLI can never disagree on preprocessing.
"""
import cv2
import numpy as np

MEAN = 127.5
STD = 127.5


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, 3] -> float32 (x - 127.5) / 127.5 in [-1, 1]."""
    return (images.astype(np.float32) - MEAN) / STD


def hflip(images: np.ndarray) -> np.ndarray:
    """Mirror images laid out [N, H, W, C] (or [H, W, C])."""
    return np.ascontiguousarray(images[..., ::-1, :])


def apply_flips(images: np.ndarray, flips: np.ndarray) -> np.ndarray:
    out = images.copy()
    out[flips] = out[flips][:, :, ::-1, :]
    return out


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Square image -> size x size (area interpolation: models trained below 112 see 112 crops shrunk)."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def to_model_input(images: np.ndarray, layout: str = "NCHW", size: int = None) -> np.ndarray:
    """uint8 NHWC RGB batch -> normalised float32 in the framework's layout ("NCHW" torch/ONNX, "NHWC" TF),
    resized to `size` when the model takes another input size than the images have."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images [N, H, W, 3] uint8 RGB, got shape {images.shape}")
    if size and images.shape[1:3] != (size, size):
        images = np.stack([resize(image, size) for image in images])
    x = normalize(images)
    if layout == "NCHW":
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    if layout == "NHWC":
        return x
    raise ValueError(f"unknown layout {layout!r}; expected 'NCHW' or 'NHWC'")
