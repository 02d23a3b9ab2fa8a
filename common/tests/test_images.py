import io
import struct

import cv2
import numpy as np
import pytest

from twinface.data.images import (CorruptImageError, NotSquareImageError, check_image, declared_size, decode_image,
                                  encode_image, fit_square, image_ext, read_image, usable_samples)


def _red_image():
    img = np.zeros((16, 16, 3), np.uint8)
    img[..., 0] = 200  # red in RGB
    img[4:8, 4:8, 2] = 90
    return img


def test_png_round_trip_is_exact_and_rgb():
    img = _red_image()
    data = encode_image(img, ".png")
    assert data.startswith(b"\x89PNG")
    assert np.array_equal(decode_image(data, "mem"), img)
    # OpenCV itself sees the red channel last (BGR): we converted on the way in.
    assert np.all(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[..., 2] == 200)


def test_jpeg_round_trip_is_close():
    img = _red_image()
    data = encode_image(img, ".jpg", quality=95)
    assert data[:3] == b"\xff\xd8\xff"
    out = decode_image(data, "mem")
    assert out.dtype == np.uint8 and out.shape == (16, 16, 3)
    assert np.abs(out.astype(int) - img).mean() < 4
    assert out[..., 0].mean() > 150 and out[..., 1].mean() < 30


def test_encode_rejects_wrong_input():
    with pytest.raises(ValueError, match="uint8 RGB"):
        encode_image(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="uint8 RGB"):
        encode_image(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="unsupported extension"):
        encode_image(np.zeros((8, 8, 3), np.uint8), ".gif")


@pytest.mark.parametrize("data", [b"", b"not an image at all", encode_image(_red_image())[:40]])
def test_corrupt_bytes_name_their_source(data):
    with pytest.raises(CorruptImageError, match="rec.rec record 17"):
        decode_image(data, "rec.rec record 17")


def test_read_image_names_the_path(tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(encode_image(_red_image(), ".png"))
    assert np.array_equal(read_image(good), _red_image())
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(CorruptImageError, match=str(bad)):
        read_image(bad)


def test_image_ext_follows_content():
    img = _red_image()
    assert image_ext(encode_image(img, ".png")) == ".png"
    assert image_ext(encode_image(img, ".jpg")) == ".jpg"
    assert image_ext(cv2.imencode(".bmp", img)[1].tobytes()) == ".bmp"
    assert image_ext(cv2.imencode(".webp", img)[1].tobytes()) == ".webp"


def test_fit_square():
    img = np.full((56, 56, 3), 77, np.uint8)
    out = fit_square(img, 112, "x")
    assert out.shape == (112, 112, 3) and np.all(out == 77)
    assert fit_square(out, 112, "x") is out
    with pytest.raises(NotSquareImageError, match=r"some/face.jpg.*square.*60x50"):
        fit_square(np.zeros((50, 60, 3), np.uint8), 112, "some/face.jpg")


def _pil_bytes(image, fmt, **options):
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def test_other_pixel_formats_decode_to_8bit_rgb():
    """Grayscale, alpha, palette, 16-bit and CMYK are converted, not refused (Pillow comes with matplotlib)."""
    from PIL import Image
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[...] = (200, 50, 10)
    cases = {
        "gray": (_pil_bytes(Image.fromarray(rgb[..., 0]), "PNG"), (200, 200, 200)),
        "gray+alpha": (_pil_bytes(Image.fromarray(rgb[..., 0]).convert("LA"), "PNG"), (200, 200, 200)),
        "rgba, fully transparent": (_pil_bytes(Image.fromarray(np.dstack([rgb, np.zeros((16, 16), np.uint8)])),
                                               "PNG"), (200, 50, 10)),
        "16-bit": (cv2.imencode(".png", rgb[..., ::-1].astype(np.uint16) * 257)[1].tobytes(), (200, 50, 10)),
        "cmyk jpeg": (_pil_bytes(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=100), (200, 50, 10)),
    }
    for name, (data, colour) in cases.items():
        out = decode_image(data, name)
        assert out.dtype == np.uint8 and out.shape == (16, 16, 3), name
        assert np.abs(out.astype(int) - colour).max() <= 2, (name, out[0, 0])


def test_check_image_is_the_one_ingestion_test():
    """Old code had no such check: folder2rec packed non-square images that training then refused."""
    assert check_image(encode_image(_red_image()), "ok.jpg") is None
    assert check_image(b"", "x.rec record 4") == "x.rec record 4: empty image data"
    assert "cannot decode" in check_image(b"\xff\xd8\xff junk", "bad.jpg")
    assert check_image(encode_image(np.zeros((20, 30, 3), np.uint8)), "wide.jpg") == \
        "wide.jpg: expected a square aligned face crop, got 30x20"


def test_usable_samples_keeps_the_good_and_lists_the_rest(caplog):
    good = encode_image(_red_image())
    samples = [("a.jpg", 0, good), ("b.jpg", 0, b"junk"), ("c.jpg", 1, encode_image(np.zeros((8, 9, 3), np.uint8))),
               ("d.jpg", 1, good)]
    skipped = []
    with caplog.at_level("WARNING", "twinface.data"):
        assert list(usable_samples(iter(samples), skipped)) == [(0, good), (1, good)]
    assert skipped == ["b.jpg", "c.jpg"]
    assert "skipping c.jpg: expected a square aligned face crop, got 9x8" in caplog.text


def _with_size(data: bytes, width: int, height: int) -> bytes:
    """`data` (a small PNG, JPEG or BMP) with its header's size replaced: the pixels stay a few bytes."""
    data = bytearray(data)
    if data.startswith(b"\x89PNG"):
        data[16:24] = struct.pack(">II", width, height)
    elif data.startswith(b"BM"):
        data[18:26] = struct.pack("<ii", width, height)
    else:
        sof = data.index(b"\xff\xc0")
        data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp"])
def test_decompression_bombs_are_refused_from_the_header(ext):
    """Old code handed any declared size to OpenCV, which allows 2**30 pixels: 3 GiB from a few bytes."""
    small = cv2.imencode(ext, np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    assert declared_size(small) == (8, 8)
    with pytest.raises(CorruptImageError, match=r"bomb: declares 10000x10000 pixels, over the 67,108,864-pixel"):
        decode_image(_with_size(small, 10000, 10000), "bomb")
