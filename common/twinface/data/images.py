"""Image bytes <-> uint8 RGB arrays. OpenCV works in BGR; everything leaving this file is RGB.

What decodes is converted, never refused (unless its header declares more than MAX_IMAGE_PIXELS): grayscale becomes RGB, alpha is dropped (the colour under it is
kept), 16-bit samples are scaled to 8 bits, CMYK JPEGs are converted to RGB (all by OpenCV's IMREAD_COLOR).
A non-square image is not an aligned face crop: stretching it would distort the face, so it is refused
(NotSquareImageError) and skipped where training and ingestion skip unreadable images.
"""
import logging
import os
import struct

import cv2
import numpy as np

log = logging.getLogger("twinface.data")
# OpenCV's own limit is 2**30 pixels (3 GiB decoded); face crops and photos stay far below this one (192 MiB).
MAX_IMAGE_PIXELS = 2 ** 26
_ENCODE_EXTS = (".jpg", ".jpeg", ".png")
# Leading bytes of the formats we read, to name a file by what it holds rather than what it is called.
_SIGNATURES = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG\r\n\x1a\n", ".png"), (b"BM", ".bmp"))


class DamagedDataError(ValueError):
    """Damage to the storage itself (a TFRecord CRC mismatch, a truncated shard): training stops on it rather
    than skipping it, unless the config says data.damaged_records: skip."""


class UnusableImageError(ValueError):
    """An image training cannot use; the message names its source (a path or "x.rec record 17")."""


class CorruptImageError(UnusableImageError):
    """An image that cannot be decoded."""


class NotSquareImageError(UnusableImageError):
    """A decodable image that is not square, so not an aligned face crop."""


def decode_image(data: bytes, source: str) -> np.ndarray:
    if not data:
        raise CorruptImageError(f"{source}: empty image data")
    size = declared_size(data)
    if size and size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise CorruptImageError(f"{source}: declares {size[0]}x{size[1]} pixels, over the {MAX_IMAGE_PIXELS:,}-pixel "
                                "limit (a few compressed bytes can ask for gigabytes)")
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as err:
        raise CorruptImageError(f"{source}: cannot decode image ({len(data)} bytes): {err}") from err
    if img is None:
        raise CorruptImageError(f"{source}: cannot decode image ({len(data)} bytes, not a readable JPEG/PNG/BMP/WebP)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def declared_size(data: bytes):
    """(width, height) a PNG, JPEG or BMP header declares, read before decoding; None for other formats."""
    if data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data.startswith(b"BM") and len(data) >= 26:
        width, height = struct.unpack("<ii", data[18:26])
        return abs(width), abs(height)            # a negative height means rows stored top-down
    if data.startswith(b"\xff\xd8"):
        pos = 2
        while pos + 9 <= len(data) and data[pos] == 0xFF:
            marker = data[pos + 1]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):    # start of frame
                height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
                return width, height
            if marker == 0xFF:                    # fill byte before a marker
                pos += 1
                continue
            pos += 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
    return None


def encode_image(img_rgb: np.ndarray, ext: str = ".jpg", quality: int = 95) -> bytes:
    img_rgb = np.asarray(img_rgb)
    if img_rgb.dtype != np.uint8 or img_rgb.ndim != 3 or img_rgb.shape[2] != 3:
        raise ValueError(f"encode_image expects uint8 RGB HxWx3, got {img_rgb.dtype} {img_rgb.shape}")
    ext = ext.lower()
    if ext not in _ENCODE_EXTS:
        raise ValueError(f"encode_image: unsupported extension {ext!r}; use one of {', '.join(_ENCODE_EXTS)}")
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if ext != ".png" else []
    ok, buf = cv2.imencode(ext, cv2.cvtColor(img_rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ValueError(f"encode_image: OpenCV failed to encode a {img_rgb.shape} image as {ext}")
    return buf.tobytes()


def read_image(path) -> np.ndarray:
    path = os.fspath(path)
    with open(path, "rb") as f:
        return decode_image(f.read(), path)


def image_ext(data: bytes) -> str:
    """File extension matching the encoded bytes (".jpg" when unknown), so written files say what they hold."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    for signature, ext in _SIGNATURES:
        if data.startswith(signature):
            return ext
    return ".jpg"


def check_image(data: bytes, source: str):
    """None when `data` is an image training can use (decodes, square), else the reason, naming `source`.
    The one test ingestion (folder2rec, rec2folder) and training apply, so both skip the same images."""
    try:
        img = decode_image(data, source)
        require_square(img, source)
    except UnusableImageError as err:
        return str(err)
    return None


def usable_samples(samples, skipped: list):
    """(label, bytes) of the (source, label, bytes) triples whose bytes pass check_image; the sources of the
    others go to `skipped`, each with a warning saying why: folder2rec and rec2folder decide here, once."""
    for source, label, data in samples:
        reason = check_image(data, source)
        if reason is None:
            yield label, data
        else:
            log.warning("skipping %s", reason)
            skipped.append(source)


def require_square(img: np.ndarray, source: str) -> np.ndarray:
    h, w = img.shape[:2]
    if h != w:
        raise NotSquareImageError(f"{source}: expected a square aligned face crop, got {w}x{h}")
    return img


def fit_square(img: np.ndarray, size: int, source: str) -> np.ndarray:
    """Resize a square face crop to size x size; a non-square image raises NotSquareImageError."""
    h, w = require_square(img, source).shape[:2]
    if (h, w) == (size, size):
        return img
    interpolation = cv2.INTER_AREA if h > size else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interpolation)
