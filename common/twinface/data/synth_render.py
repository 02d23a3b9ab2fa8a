"""Procedural face renderer behind `twinface.data.synth` (numpy + OpenCV only).

A face is a handful of shapes on a pseudo-3D head: every point carries a depth read off an ellipsoid, so yaw and
pitch move the nose more than the cheeks and foreshorten the far side. Identity parameters (shape, colours,
features, hair, marks, accessories) come from rng([seed, identity]); everything that changes between photos of
one person (pose, expression, light, background, occlusion, blur, noise, JPEG quality) comes from
rng([seed, identity, index]). The posed 5 landmarks are similarity-aligned onto the ArcFace template as a
detector + alignment would do, then a small residual jitter stands for landmark-detector error.

All geometry is in template units (a 112 x 112 crop); `size` only scales the final transform.
"""
from functools import lru_cache

import cv2
import numpy as np

TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)

SUBPIXEL_BITS = 4  # cv2 drawing keeps 1/16 pixel precision
_ONE = 1 << SUBPIXEL_BITS

# Anchor colours (RGB) sampled between, so every identity gets its own shade.
SKIN_TONES = np.array([[242, 208, 185], [224, 180, 150], [198, 150, 112], [160, 112, 78], [118, 78, 52], [78, 50, 34]],
                      dtype=np.float32)
HAIR_COLOURS = np.array([[22, 18, 16], [48, 32, 22], [88, 58, 36], [140, 98, 58], [196, 160, 98], [150, 64, 30],
                         [150, 148, 142], [220, 218, 210]], dtype=np.float32)
HAIR_WEIGHTS = np.array([0.24, 0.22, 0.16, 0.1, 0.1, 0.06, 0.07, 0.05])
IRIS_COLOURS = np.array([[48, 30, 20], [92, 58, 30], [120, 96, 48], [70, 110, 70], [70, 110, 170], [120, 130, 140]],
                        dtype=np.float32)
FRAME_COLOURS = np.array([[15, 15, 15], [70, 40, 25], [150, 150, 155], [190, 160, 80], [130, 20, 30], [30, 40, 110]],
                         dtype=np.float32)
HAIR_STYLES = ("bald", "short", "long", "fringe", "side_part", "curly", "buzz")
HAIR_STYLE_WEIGHTS = np.array([0.08, 0.26, 0.2, 0.13, 0.15, 0.1, 0.08])
BEARDS = ("none", "stubble", "full", "goatee", "moustache")
BEARD_WEIGHTS = np.array([0.64, 0.1, 0.1, 0.08, 0.08])


def _pick(rng, palette, weights=None):
    """A colour between two neighbouring palette entries, plus a little personal tint."""
    i = rng.choice(len(palette), p=weights)
    j = min(i + 1, len(palette) - 1)
    c = palette[i] + rng.uniform(0, 0.5) * (palette[j] - palette[i])
    return np.clip(c + rng.normal(0, 6, 3), 0, 255)


def _face_points(rng, count, cx, cy, rx, ry, y_min, y_max):
    """Uniform points inside the face ellipse between two heights (for marks on the skin)."""
    pts = np.empty((0, 2))
    while len(pts) < count:
        p = rng.uniform([cx - rx, y_min], [cx + rx, y_max], size=(2 * count + 4, 2))
        inside = ((p[:, 0] - cx) / rx) ** 2 + ((p[:, 1] - cy) / ry) ** 2 < 0.8
        pts = np.concatenate([pts, p[inside]])
    return pts[:count]


def identity_params(seed: int, identity: int) -> dict:
    """The stable look of one person: a flat dict of floats, strings and small arrays, from rng([seed, identity])."""
    rng = np.random.default_rng([seed, identity])
    p = {}
    # Landmark geometry differs per person; alignment then fits it onto the template as well as it can.
    p["eye_dx"] = 17.6 * rng.uniform(0.9, 1.1)
    p["eye_y"] = 51.6 + rng.normal(0, 1.5)
    p["nose_y"] = 71.7 + rng.uniform(-3.5, 3.5)
    p["mouth_y"] = 92.3 + rng.uniform(-3.5, 3.5)
    p["mouth_dx"] = 14.6 * rng.uniform(0.82, 1.18)
    # Head shape.
    p["head_rx"] = 41.0 * rng.uniform(0.86, 1.1)
    p["head_top"] = rng.uniform(2, 10)
    p["chin_y"] = p["mouth_y"] + rng.uniform(12, 20)
    p["jaw_power"] = rng.uniform(1.6, 3.4)  # 2 is an egg-shaped jaw, larger is squarer
    p["cheek_bulge"] = rng.uniform(-2, 3)
    p["ear_size"] = rng.uniform(0.8, 1.25)
    # Colours.
    tone = rng.uniform(0, len(SKIN_TONES) - 1)
    k = int(min(tone, len(SKIN_TONES) - 2))
    skin = SKIN_TONES[k] + (tone - k) * (SKIN_TONES[k + 1] - SKIN_TONES[k])
    skin = skin + np.array([1.0, 0.0, -1.0]) * rng.normal(0, 8) + rng.normal(0, 4, 3)  # warm/cool undertone
    p["skin"] = np.clip(skin, 20, 250)
    p["lip"] = np.clip(p["skin"] * rng.uniform(0.62, 0.85) + np.array([35, -8, -2]) * rng.uniform(0.4, 1.3), 0, 255)
    p["hair"] = _pick(rng, HAIR_COLOURS, HAIR_WEIGHTS)
    p["brow"] = np.clip(p["hair"] * rng.uniform(0.55, 0.95), 0, 255)
    p["iris"] = _pick(rng, IRIS_COLOURS)
    # Eyes, brows, nose, mouth.
    p["eye_w"] = rng.uniform(6.4, 8.8)
    p["eye_h"] = rng.uniform(2.2, 3.6)
    p["eye_tilt"] = rng.uniform(-1.6, 1.8)  # outer corner up (+) or down
    p["iris_r"] = rng.uniform(2.9, 3.7)
    p["brow_gap"] = rng.uniform(6.5, 11.0)
    p["brow_thick"] = rng.uniform(1.3, 3.6)
    p["brow_arch"] = rng.uniform(0.0, 3.5)
    p["brow_len"] = rng.uniform(0.9, 1.3)
    p["brow_slant"] = rng.uniform(-2.0, 2.0)
    p["nose_w"] = rng.uniform(4.0, 7.0)
    p["nose_depth"] = rng.uniform(8, 15)
    p["nostril"] = rng.uniform(0.6, 1.5)
    p["lip_upper"] = rng.uniform(1.6, 3.8)
    p["lip_lower"] = rng.uniform(2.2, 5.0)
    p["cupid"] = rng.uniform(0.0, 1.4)
    # Hair.
    p["hair_style"] = HAIR_STYLES[rng.choice(len(HAIR_STYLES), p=HAIR_STYLE_WEIGHTS)]
    p["hairline_y"] = rng.uniform(21, 33)
    p["hair_volume"] = rng.uniform(2, 9)
    p["recession"] = rng.uniform(0, 7) * (rng.random() < 0.35)  # M-shaped temples
    p["widows_peak"] = rng.uniform(0, 4) * (rng.random() < 0.25)
    p["part_side"] = float(rng.choice([-1, 1]))
    p["hair_length"] = rng.uniform(100, 125)
    p["hair_strands"] = rng.uniform(-1, 1, size=(int(rng.integers(6, 14)), 2))
    p["sideburn"] = rng.uniform(0, 12)
    # Personal skin marks: blotches (soft colour patches), freckles, moles; fixed places on the face.
    p["head_cy"] = 0.5 * (p["head_top"] + p["chin_y"])
    p["head_ry"] = 0.5 * (p["chin_y"] - p["head_top"])
    n_blotch = int(rng.integers(3, 8))
    p["blotch_xy"] = _face_points(rng, n_blotch, 56, p["head_cy"], p["head_rx"], p["head_ry"], 30, p["chin_y"] - 4)
    p["blotch_r"] = rng.uniform(3, 9, n_blotch)
    p["blotch_rgb"] = rng.normal(0, 1, (n_blotch, 3)) * 6 + np.array([14, -4, -6]) * rng.uniform(-0.5, 1.5, (n_blotch, 1))
    n_freckle = int(rng.integers(20, 60)) if rng.random() < 0.3 else 0
    p["freckle_xy"] = _face_points(rng, n_freckle, 56, p["eye_y"] + 14, 26, 12, p["eye_y"] + 4, p["nose_y"] + 6)
    p["freckle_r"] = rng.uniform(0.35, 0.8, n_freckle)
    n_mole = int(rng.integers(0, 4))
    p["mole_xy"] = _face_points(rng, n_mole, 56, p["head_cy"], p["head_rx"], p["head_ry"], 34, p["chin_y"] - 3)
    p["mole_r"] = rng.uniform(0.6, 1.5, n_mole)
    # Accessories that are part of how this person looks.
    p["beard"] = BEARDS[rng.choice(len(BEARDS), p=BEARD_WEIGHTS)]
    p["beard_rgb"] = np.clip(p["hair"] * rng.uniform(0.7, 1.1), 0, 255)
    p["glasses"] = rng.random() < 0.2
    p["glasses_round"] = rng.random() < 0.4
    p["glasses_rgb"] = _pick(rng, FRAME_COLOURS)
    p["glasses_size"] = rng.uniform(0.9, 1.2)
    p["glasses_thick"] = rng.uniform(0.8, 2.0)
    return p


def _clipped_normal(rng, sd, limit):
    return float(min(max(rng.normal(0, sd), -limit), limit))


def sample_nuisances(rng: np.random.Generator) -> dict:
    """What changes between photos of one person, drawn first from the image rng in a fixed order."""
    n = {}
    n["yaw"] = np.deg2rad(_clipped_normal(rng, 11, 25))
    n["pitch"] = np.deg2rad(_clipped_normal(rng, 7, 15))
    n["roll"] = np.deg2rad(_clipped_normal(rng, 3, 7))  # residual after alignment, as detector error leaves it
    n["scale"] = float(np.exp(_clipped_normal(rng, 0.04, 0.1)))
    n["shift"] = np.clip(rng.normal(0, 1.3, 2), -3.5, 3.5)
    n["smile"] = rng.uniform(0, 1) * (rng.random() < 0.45)
    n["mouth_open"] = rng.uniform(0, 1) * (rng.random() < 0.25)
    n["brow_raise"] = rng.uniform(0, 1) * (rng.random() < 0.3)
    n["blink"] = bool(rng.random() < 0.07)
    n["gaze"] = np.clip(rng.normal(0, 0.7, 2), -1.5, 1.5)
    azimuth, lift = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.9)
    n["light_dir"] = (float(np.cos(azimuth) * lift), float(np.sin(azimuth) * lift), float(np.sqrt(1 - lift**2)))
    n["ambient"] = float(rng.uniform(0.3, 0.75))
    n["intensity"] = float(rng.uniform(0.6, 1.3))
    n["cast"] = np.exp(np.clip(rng.normal(0, 0.07, 3), -0.2, 0.2)).astype(np.float32)
    n["background"] = str(rng.choice(("flat", "gradient", "texture", "clutter")))
    n["clothes_rgb"] = rng.uniform(0, 255, 3)
    n["wears_glasses"] = bool(rng.random() < 0.9)
    n["occlusion"] = str(rng.choice(("none", "bar", "hand", "sunglasses", "mask"), p=[0.88, 0.03, 0.03, 0.03, 0.03]))
    n["low_res"] = float(rng.uniform(0.35, 0.75)) if rng.random() < 0.15 else 1.0
    n["blur"] = float(rng.uniform(0.4, 1.3)) if rng.random() < 0.3 else 0.0
    n["noise"] = float(rng.uniform(0, 7))
    n["jpeg_quality"] = int(rng.integers(60, 96))
    return n


# --- geometry -----------------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _linspace(a, b, n):
    """np.linspace, computed once per argument set: shapes reuse a few fixed parameter grids."""
    t = np.linspace(a, b, n)
    t.flags.writeable = False
    return t


@lru_cache(maxsize=None)
def _unit_arc(t0, t1, n):
    t = _linspace(t0, t1, n)
    return np.cos(t), np.sin(t)


def _arc(cx, cy, rx, ry, t0, t1, n):
    cos, sin = _unit_arc(t0, t1, n)
    return np.stack([cx + rx * cos, cy + ry * sin], axis=1)


def _face_outline(p, n=40):
    """Closed skin outline: elliptic forehead, jaw that narrows to the chin with a per-person power."""
    cx, cy, rx, top, chin = 56.0, p["head_cy"], p["head_rx"], p["head_top"], p["chin_y"]
    upper = _arc(cx, cy, rx, cy - top, np.pi, 2 * np.pi, n // 2)
    s = _linspace(0, 1, n // 2)
    w = rx * (1 - s ** p["jaw_power"]) ** 0.5 + p["cheek_bulge"] * np.sin(np.pi * s) * (1 - s)
    y = cy + s * (chin - cy)
    right = np.stack([cx + w, y], axis=1)[1:]
    left = np.stack([cx - w, y], axis=1)[::-1][1:-1]
    return np.concatenate([upper, right, left])


def _eye_shape(cx, cy, w, h, tilt, side, n=9):
    """Almond eye: upper and lower lids as sine arcs, outer corner raised by `tilt` (mirrored per side)."""
    x = w * _linspace(-1, 1, n)
    lift = tilt * (x * side / w) * 0.5
    bulge = np.sin(_linspace(0, np.pi, n)).clip(0, 1)
    top = np.stack([cx + x, cy - h * bulge ** 0.8 - lift], axis=1)
    bottom = np.stack([cx + x, cy + 0.8 * h * bulge - lift], axis=1)
    return np.concatenate([top, bottom[::-1][1:-1]])


def _geometry(p, n):
    """All shapes of one person with one expression: frontal 2-D points in template units (depth comes in _pose)."""
    shapes = {}
    cx, ey, edx = 56.0, p["eye_y"], p["eye_dx"]
    smile, opened, raised = n["smile"], n["mouth_open"], n["brow_raise"]
    shapes["face"] = _face_outline(p)
    ear_h = 11 * p["ear_size"]
    for side, name in ((-1, "ear_l"), (1, "ear_r")):
        shapes[name] = _arc(cx + side * (p["head_rx"] - 2), ey + 9, 5.5 * p["ear_size"], ear_h, 0, 2 * np.pi, 14)
    neck_w = 0.62 * p["head_rx"]
    shapes["neck"] = np.array([[cx - neck_w, p["mouth_y"]], [cx + neck_w, p["mouth_y"]], [cx + neck_w + 2, 125],
                               [cx - neck_w - 2, 125]])
    shapes["clothes"] = np.array([[cx - 70, 150], [cx - 64, p["chin_y"] + 14], [cx - neck_w, p["chin_y"] + 6],
                                  [cx, p["chin_y"] + 14], [cx + neck_w, p["chin_y"] + 6], [cx + 64, p["chin_y"] + 14],
                                  [cx + 70, 150]])
    eye_h = 0.25 if n["blink"] else p["eye_h"]
    for side, name in ((-1, "eye_l"), (1, "eye_r")):
        ex = cx + side * edx
        shapes[name] = _eye_shape(ex, ey, p["eye_w"], eye_h, p["eye_tilt"], side)
        shapes[name + "_iris"] = np.array([[ex + n["gaze"][0], ey + n["gaze"][1] * 0.5]])
        bx = _linspace(-0.35, 1.0, 7) * p["eye_w"] * p["brow_len"] + 1.5
        by = ey - p["brow_gap"] - 2.5 * raised - p["brow_arch"] * np.sin(np.pi * (bx + 3) / (p["eye_w"] * 2.6 + 3))
        by = by + p["brow_slant"] * (bx / p["eye_w"]) * 0.5
        t = p["brow_thick"] * _linspace(1.0, 0.45, 7)
        upper = np.stack([ex + side * bx, by - t / 2], axis=1)
        lower = np.stack([ex + side * bx, by + t / 2], axis=1)
        shapes["brow_" + name[-1]] = np.concatenate([upper, lower[::-1]])
    ny, nw = p["nose_y"], p["nose_w"]
    shapes["nose_tip"] = np.array([[cx, ny]])
    shapes["nose_ala"] = np.array([[cx - nw, ny - 1.5], [cx - nw - 0.8, ny + 1.2], [cx - nw * 0.4, ny + 2.8],
                                   [cx, ny + 2.0], [cx + nw * 0.4, ny + 2.8], [cx + nw + 0.8, ny + 1.2],
                                   [cx + nw, ny - 1.5]])
    shapes["nostrils"] = np.array([[cx - nw * 0.45, ny + 1.9], [cx + nw * 0.45, ny + 1.9]])
    shapes["bridge"] = np.array([[cx - 3.2, ey + 3], [cx - 3.6, ny - 4], [cx + 3.2, ey + 3], [cx + 3.6, ny - 4]])
    my = p["mouth_y"]
    mdx = p["mouth_dx"] * (1 + 0.12 * smile)
    corner_y = my - 3.0 * smile
    x = _linspace(-1, 1, 11)
    curve = (1 - x**2)
    gap = 4.5 * opened
    lip_top = my - p["lip_upper"] * curve ** 0.6 + p["cupid"] * np.exp(-(x * 6) ** 2) * curve - gap / 2 * curve
    seam_top = my + (corner_y - my) * x**2 - gap / 2 * curve
    seam_bottom = my + (corner_y - my) * x**2 + gap / 2 * curve + 1.2 * smile * curve
    lip_bottom = seam_bottom + p["lip_lower"] * curve ** 0.8
    xs = cx + x * mdx
    shapes["lip_upper"] = np.concatenate([np.stack([xs, lip_top], 1), np.stack([xs, seam_top], 1)[::-1]])
    shapes["lip_lower"] = np.concatenate([np.stack([xs, seam_bottom], 1), np.stack([xs, lip_bottom], 1)[::-1]])
    shapes["mouth_gap"] = np.concatenate([np.stack([xs, seam_top], 1), np.stack([xs, seam_bottom], 1)[::-1]])
    shapes["landmarks"] = np.array([[cx - edx, ey], [cx + edx, ey], [cx, ny], [cx - mdx, corner_y],
                                    [cx + mdx, corner_y]])
    shapes.update(_hair_geometry(p))
    shapes.update(_beard_geometry(p, mdx, corner_y))
    if p["glasses"]:
        shapes.update(_glasses_geometry(p))
    for name in ("blotch_xy", "freckle_xy", "mole_xy"):
        shapes[name] = p[name]
    return shapes


def _hair_geometry(p):
    style, cx, cy, rx = p["hair_style"], 56.0, p["head_cy"], p["head_rx"]
    top, vol, hl = p["head_top"], p["hair_volume"], p["hairline_y"]
    if style == "bald":
        # Only a rim of hair above the ears, peeking out behind the head.
        return {"hair_side_l": _arc(cx - rx + 2, p["eye_y"] - 2, 5, 13, 0, 2 * np.pi, 12),
                "hair_side_r": _arc(cx + rx - 2, p["eye_y"] - 2, 5, 13, 0, 2 * np.pi, 12)}
    if style == "curly":
        vol = vol + 6
    ry_top = cy - top + vol
    outer = _arc(cx, cy, rx + vol, ry_top, np.pi * 0.93, np.pi * 2.07, 24)
    side_y = p["eye_y"] + p["sideburn"] - 4
    x = _linspace(-1, 1, 15)
    line = hl - p["recession"] * np.abs(np.sin(np.pi * x)) ** 1.5 + p["widows_peak"] * np.exp(-(x * 5) ** 2)
    line = line + 9 * np.abs(x) ** 3  # hairline falls towards the temples
    if style == "fringe":
        line = np.maximum(line, p["eye_y"] - p["brow_gap"] - 4 + 1.5 * np.sin(x * 17) - 3 * np.abs(x))
    if style == "side_part":
        line = line + 6 * np.clip(p["part_side"] * x, 0, 1) - 3 * np.clip(-p["part_side"] * x, 0, 1)
    hairline = np.stack([cx + x * (rx - 3), line], axis=1)
    cap = np.concatenate([[[cx + rx + vol * 0.6, side_y]], [[cx + rx - 2, side_y]], hairline[::-1],
                          [[cx - rx + 2, side_y]], [[cx - rx - vol * 0.6, side_y]], outer])
    shapes = {"hair_cap": cap}
    if style == "long":
        length = p["hair_length"]
        shapes["hair_back"] = np.array([[cx - rx - vol, cy - 10], [cx - rx - vol - 4, length], [cx - rx + 8, length],
                                        [cx + rx - 8, length], [cx + rx + vol + 4, length], [cx + rx + vol, cy - 10]])
    if style == "curly":
        t = _linspace(np.pi * 0.9, np.pi * 2.1, 11)
        shapes["curls"] = np.stack([cx + (rx + vol - 2) * np.cos(t), cy + (ry_top - 2) * np.sin(t)], axis=1)
    s = p["hair_strands"]
    starts = np.stack([cx + s[:, 0] * rx * 0.7, top + 6 + (s[:, 1] + 1) * 6], axis=1)
    ends = np.stack([cx + s[:, 0] * rx * 0.95 + 6 * s[:, 1], (hl + top) / 2 + 8 + 4 * s[:, 1]], axis=1)
    shapes["strands"] = np.concatenate([starts, ends])
    return shapes


def _beard_geometry(p, mdx, corner_y):
    kind, cx = p["beard"], 56.0
    if kind == "none":
        return {}
    chin, my = p["chin_y"], p["mouth_y"]
    shapes = {}
    if kind in ("full", "stubble"):
        jaw = _face_outline(p)
        low = jaw[jaw[:, 1] > p["nose_y"] + 2]
        shapes["beard"] = np.concatenate([low, [[cx - mdx - 3, corner_y - 1], [cx - 4, my + 4],
                                                [cx + 4, my + 4], [cx + mdx + 3, corner_y - 1]][::-1]])
    if kind == "goatee":
        shapes["beard"] = np.array([[cx - mdx * 0.6, my + 3], [cx + mdx * 0.6, my + 3], [cx + mdx * 0.45, chin - 0.5],
                                    [cx, chin + 1.5], [cx - mdx * 0.45, chin - 0.5]])
    if kind in ("full", "goatee", "moustache"):
        shapes["moustache"] = np.array([[cx - mdx - 2, corner_y + 1.5], [cx - mdx * 0.5, my - p["lip_upper"] - 3.5],
                                        [cx, my - p["lip_upper"] - 3.0], [cx + mdx * 0.5, my - p["lip_upper"] - 3.5],
                                        [cx + mdx + 2, corner_y + 1.5], [cx, my - p["lip_upper"] - 0.8]])
    return shapes


def _glasses_geometry(p):
    s, cx, ey, edx = p["glasses_size"], 56.0, p["eye_y"], p["eye_dx"]
    shapes = {}
    for side, name in ((-1, "lens_l"), (1, "lens_r")):
        ex = cx + side * edx
        if p["glasses_round"]:
            shapes[name] = _arc(ex, ey + 0.5, 8.5 * s, 8 * s, 0, 2 * np.pi, 20)
        else:
            w, h = 10 * s, 6.5 * s
            shapes[name] = np.array([[ex - w, ey - h], [ex + w, ey - h], [ex + w, ey + h * 0.8], [ex + w * 0.6, ey + h],
                                     [ex - w * 0.6, ey + h], [ex - w, ey + h * 0.8]])
    shapes["temples"] = np.array([[cx - edx - 9 * s, ey - 2], [cx - p["head_rx"] + 1, ey - 1],
                                  [cx + edx + 9 * s, ey - 2], [cx + p["head_rx"] - 1, ey - 1]])
    shapes["bridge_glasses"] = np.array([[cx - edx + 8 * s, ey - 1], [cx, ey - 3], [cx + edx - 8 * s, ey - 1]])
    return shapes


# Depth (template units, towards the camera) added on top of the head ellipsoid, per shape; the nose's is personal.
_DEPTH = {"bridge": 4.0, "lens_l": 6.0, "lens_r": 6.0, "bridge_glasses": 9.0,
          "lip_upper": 2.0, "lip_lower": 2.0, "mouth_gap": 1.5, "moustache": 3.0, "ear_l": -22.0, "ear_r": -22.0,
          "hair_back": -30.0, "hair_side_l": -22.0, "hair_side_r": -22.0, "neck": -14.0, "clothes": -14.0}
# Silhouettes stay put when the head turns; only their front part moves.
_FLAT = {"face": 0.35, "hair_cap": 0.35, "curls": 0.35, "beard": 0.35}


def _pose(p, shapes, yaw, pitch):
    """Pose every shape at once: depth from the head ellipsoid (plus what sticks out of it: nose, lips,
    glasses), then an orthographic view rotated by yaw (vertical axis) and pitch (horizontal axis)."""
    names = list(shapes)
    counts = [len(shapes[k]) for k in names]
    pts = np.concatenate([shapes[k] for k in names])
    flat = np.repeat([_FLAT.get(k, 1.0) for k in names], counts)
    extra = np.repeat([_DEPTH.get(k, 0.0) for k in names], counts)
    nose = p["nose_depth"]
    starts = np.cumsum([0] + counts)
    for k, depth in (("nose_tip", [nose]), ("nose_ala", [3.0 + 0.4 * nose]), ("nostrils", [2.0 + 0.4 * nose]),
                     ("landmarks", [0.0, 0.0, nose, 2.0, 2.0])):  # eyes, nose tip, mouth corners
        i = names.index(k)
        extra[starts[i]:starts[i + 1]] = depth
    cy = p["head_cy"]
    x = pts[:, 0] - 56.0
    y = pts[:, 1] - cy
    u, v = x / p["head_rx"], y / (p["head_ry"] * 1.15)
    z = 0.95 * p["head_rx"] * np.sqrt(np.clip(1 - u * u - v * v, 0.0, 1.0)) * flat + extra
    x1 = x * np.cos(yaw) + z * np.sin(yaw)
    z1 = z * np.cos(yaw) - x * np.sin(yaw)
    y1 = y * np.cos(pitch) - z1 * np.sin(pitch)
    return np.stack([x1 + 56.0, y1 + cy], axis=1), names, starts


def _similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, shift) taking src [N,2] onto dst [N,2], as 2x3.
    In complex numbers it is dst ~ a * src + b, solved in closed form (what Umeyama gives without reflection)."""
    zs = src[:, 0] + 1j * src[:, 1]
    zd = dst[:, 0] + 1j * dst[:, 1]
    zs0, zd0 = zs - zs.mean(), zd - zd.mean()
    a = (np.conj(zs0) @ zd0) / (np.conj(zs0) @ zs0).real
    b = zd.mean() - a * zs.mean()
    return np.array([[a.real, -a.imag, b.real], [a.imag, a.real, b.imag]])


def _image_transform(landmarks, n, size):
    """Alignment of the posed landmarks onto the template, then the residual jitter, scaled to `size`."""
    align = np.vstack([_similarity(landmarks, TEMPLATE), [0, 0, 1]])
    c, s = np.cos(n["roll"]) * n["scale"], np.sin(n["roll"]) * n["scale"]
    centre = TEMPLATE.mean(0)
    jitter = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    jitter[:2, 2] = centre + n["shift"] - jitter[:2, :2] @ centre
    return (size / 112.0 * (jitter @ align))[:2]


# --- drawing ------------------------------------------------------------------------------------------------------

def _colour(c):
    return tuple(c.tolist()) if isinstance(c, np.ndarray) else c


def _fill(img, pts, colour):
    cv2.fillPoly(img, [np.round(pts * _ONE).astype(np.int32)], _colour(colour), cv2.LINE_AA, SUBPIXEL_BITS)


def _line(img, pts, colour, thickness, closed=False):
    cv2.polylines(img, [np.round(pts * _ONE).astype(np.int32)], closed, _colour(colour), max(1, round(thickness)),
                  cv2.LINE_AA, SUBPIXEL_BITS)


def _circles(img, centres, radii, colour, thickness=-1):
    colour = _colour(colour)
    c = np.round(np.asarray(centres, np.float64).reshape(-1, 2) * _ONE).astype(int).tolist()
    r = np.maximum(np.round(np.broadcast_to(radii, len(c)) * _ONE), 1).astype(int).tolist()
    for (x, y), ri in zip(c, r):
        cv2.circle(img, (x, y), ri, colour, thickness, cv2.LINE_AA, SUBPIXEL_BITS)


def _ellipse(img, centre, axes, angle, colour):
    cv2.ellipse(img, (round(centre[0] * _ONE), round(centre[1] * _ONE)),
                (max(1, round(axes[0] * _ONE)), max(1, round(axes[1] * _ONE))), angle, 0, 360, _colour(colour), -1,
                cv2.LINE_AA, SUBPIXEL_BITS)


def _background(rng, n, size):
    kind = n["background"]
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    if kind == "gradient":
        t = np.linspace(-0.5, 0.5, size, dtype=np.float32)
        angle = rng.uniform(0, 2 * np.pi)
        ramp = np.clip(0.5 + float(np.cos(angle)) * t[None, :] + float(np.sin(angle)) * t[:, None], 0, 1)
        return (a.astype(np.float32) + ramp[..., None] * (b - a).astype(np.float32)).astype(np.uint8)
    if kind == "texture":
        cells = int(rng.integers(3, 12))
        small = rng.uniform(0, 255, (cells, cells, 3)).astype(np.float32) * 0.6 + a.astype(np.float32) * 0.4
        return np.clip(cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC), 0, 255).astype(np.uint8)
    img = np.empty((size, size, 3), np.uint8)
    img[:] = np.round(a).astype(np.uint8)
    if kind == "clutter":
        k = size / 112.0
        for _ in range(int(rng.integers(4, 10))):
            c = rng.uniform(0, 255, 3)
            x, y = rng.uniform(-10, 122, 2) * k
            w, h = rng.uniform(6, 45, 2) * k
            if rng.random() < 0.5:
                _fill(img, np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]]), c)
            else:
                _circles(img, (x, y), w / 2, c)
    return img


def _draw_eye(img, eye, iris_xy, iris_r, iris_rgb, lid_rgb):
    """Sclera, iris and pupil clipped to the almond, then the upper lash line."""
    h, w = img.shape[:2]
    x0, y0 = np.maximum(np.floor(eye.min(0)).astype(int) - 1, 0)
    x1, y1 = np.minimum(np.ceil(eye.max(0)).astype(int) + 2, [w, h])
    if x1 - x0 < 2 or y1 - y0 < 2:
        return
    roi = img[y0:y1, x0:x1]
    off = np.array([x0, y0])
    mask = np.zeros(roi.shape[:2], np.uint8)
    _fill(mask, eye - off, 255)
    inner = roi.copy()
    _fill(inner, eye - off, (232, 226, 220))
    centre = iris_xy - off
    _circles(inner, centre, iris_r, iris_rgb)
    _circles(inner, centre, iris_r * 0.42, (12, 10, 10))
    _circles(inner, centre - iris_r * 0.3, max(iris_r * 0.2, 0.4), (250, 250, 250))
    a = mask[..., None].astype(np.float32) * (1 / 255)
    roi[:] = (inner * a + roi * (1 - a) + 0.5).astype(np.uint8)
    _line(img, eye[:len(eye) // 2 + 1], lid_rgb, 0.26 * iris_r)


def _draw_hair(img, mask, g, p, k):
    hair = p["hair"]
    if "hair_cap" in g:
        if p["hair_style"] == "buzz":
            layer = img.copy()
            _fill(layer, g["hair_cap"], hair)
            cv2.addWeighted(layer, 0.6, img, 0.4, 0, dst=img)
        else:
            _fill(img, g["hair_cap"], hair)
            _fill(mask, g["hair_cap"], 255)
    if "curls" in g:
        _circles(img, g["curls"], 6.5 * k, hair)
        _circles(img, g["curls"] + 1.5 * k, 2.5 * k, np.clip(hair * 1.2 + 8, 0, 255))
        _circles(mask, g["curls"], 6.5 * k, 255)
    if "strands" in g and p["hair_style"] != "buzz":
        s = g["strands"]
        half = len(s) // 2
        dark, light = _colour(hair * 0.78), _colour(np.clip(hair * 1.2 + 8, 0, 255))
        for i in range(half):
            _line(img, s[[i, half + i]], dark if i % 2 else light, k)


def _draw_face(img, mask, g, p, n, k):
    """Paint the person back to front; `k` is pixels per template unit after alignment."""
    skin, hair = p["skin"], p["hair"]
    for name in ("hair_back", "hair_side_l", "hair_side_r"):  # behind the head: only the rim shows
        if name in g:
            _fill(img, g[name], hair * 0.85)
            _fill(mask, g[name], 255)
    _fill(img, g["clothes"], n["clothes_rgb"])
    _fill(img, g["neck"], skin * 0.8)
    ear = _colour(skin * 0.92)
    for name in ("ear_l", "ear_r"):
        _fill(img, g[name], ear)
        _fill(mask, g[name], 255)
    _fill(mask, g["neck"], 255)
    # Personal blotches, blurred so they read as skin rather than stickers, only inside the face.
    marks = np.zeros(img.shape, np.float32)
    for c, r, rgb in zip(g["blotch_xy"], p["blotch_r"], p["blotch_rgb"]):
        _circles(marks, c, r * k, rgb)
    _fill(img, g["face"], skin)
    face = np.zeros(img.shape[:2], np.uint8)
    _fill(face, g["face"], 1)
    mask |= face * 255
    marks = cv2.GaussianBlur(marks, (0, 0), 2.0 * k) * face[..., None]
    img[:] = np.clip(img + marks, 0, 255).astype(np.uint8)
    _circles(img, g["freckle_xy"], np.maximum(p["freckle_r"] * k, 0.45), np.clip(skin * 0.84 - [0, 6, 10], 0, 255))
    _circles(img, g["mole_xy"], p["mole_r"] * k, (55, 35, 28))
    if "beard" in g:
        if p["beard"] == "stubble":  # a soft-edged shadow of the full beard
            alpha = np.zeros(img.shape[:2], np.float32)
            _fill(alpha, g["beard"], 0.4)
            alpha = cv2.GaussianBlur(alpha, (0, 0), 1.5 * k)[..., None]
            img[:] = img * (1 - alpha) + alpha * p["beard_rgb"].astype(np.float32)
        else:
            _fill(img, g["beard"], p["beard_rgb"])
    # Nose: side shadows, ala and nostrils.
    b = g["bridge"]
    _line(img, b[:2], skin * 0.82, 1.2 * k)
    _line(img, b[2:], skin * 0.82, 1.2 * k)
    _line(img, g["nose_ala"], skin * 0.7, 1.0 * k)
    for c in g["nostrils"]:
        _ellipse(img, c, (p["nostril"] * 1.3 * k, p["nostril"] * 0.8 * k), 0, skin * 0.38)
    # Eyes and brows.
    lid = np.clip(hair * 0.5, 0, 80)
    for side in ("l", "r"):
        eye = g["eye_" + side]
        if n["blink"]:
            _line(img, eye, skin * 0.45, 1.2 * k)
        else:
            _draw_eye(img, eye, g["eye_" + side + "_iris"][0], p["iris_r"] * k, p["iris"], lid)
        _fill(img, g["brow_" + side], p["brow"])
    # Mouth.
    if n["mouth_open"] > 0.05:
        gap = g["mouth_gap"]
        _fill(img, gap, (60, 20, 25))
        half = len(gap) // 2
        teeth = gap.copy()
        teeth[half:] = gap[half:] * 0.6 + gap[:half][::-1] * 0.4
        _fill(img, teeth, (225, 220, 205))
    _fill(img, g["lip_upper"], p["lip"] * 0.9)
    _fill(img, g["lip_lower"], p["lip"])
    if "moustache" in g:
        _fill(img, g["moustache"], p["beard_rgb"])
    _draw_hair(img, mask, g, p, k)
    if "lens_l" in g and n["wears_glasses"]:
        t, rgb = p["glasses_thick"] * k, _colour(p["glasses_rgb"])
        _line(img, g["lens_l"], rgb, t, closed=True)
        _line(img, g["lens_r"], rgb, t, closed=True)
        _line(img, g["temples"][:2], rgb, t)
        _line(img, g["temples"][2:], rgb, t)
        _line(img, g["bridge_glasses"], rgb, t)


def _occlude(img, g, n, rng, k):
    kind = n["occlusion"]
    if kind == "bar":
        y, h, tilt = rng.uniform(20, 100) * k, rng.uniform(8, 22) * k, rng.uniform(-10, 10) * k
        _fill(img, np.array([[-5, y], [117 * k, y + tilt], [117 * k, y + tilt + h], [-5, y + h]]), rng.uniform(0, 255, 3))
    elif kind == "hand":
        x = rng.uniform(15, 97) * k
        hand = np.clip(rng.uniform(110, 240) * np.array([1.0, 0.78, 0.62]), 0, 255)
        _ellipse(img, (x, 118 * k), (20 * k, 30 * k), rng.uniform(-30, 30), hand)
        for i in range(4):
            top = np.array([x - 15 * k + i * 10 * k, (78 + rng.uniform(-6, 6)) * k])
            _line(img, np.stack([top, top + [0, 30 * k]]), hand, 8 * k)
    elif kind == "sunglasses":
        left, right = g["eye_l"].mean(0), g["eye_r"].mean(0)
        _ellipse(img, left, (11 * k, 8 * k), 0, (20, 22, 25))
        _ellipse(img, right, (11 * k, 8 * k), 0, (20, 22, 25))
        _line(img, np.stack([left, right]), (20, 22, 25), 2 * k)
    elif kind == "mask":
        lm = g["landmarks"]
        pts = np.array([lm[0] + [-8 * k, 18 * k], lm[2] - [0, 6 * k], lm[1] + [8 * k, 18 * k], lm[4] + [10 * k, 14 * k],
                        (lm[3] + lm[4]) / 2 + [0, 22 * k], lm[3] + [-10 * k, 14 * k]])
        _fill(img, pts, np.array([[170, 200, 230], [235, 235, 235], [40, 40, 45]])[rng.integers(3)])


_GRIDS = {}
_NOISE = []


def _pixel_grid(size):
    if size not in _GRIDS:
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
        _GRIDS[size] = (xs, ys)
    return _GRIDS[size]


def _noise(rng, size, sigma):
    """Gaussian sensor noise cut from one fixed field at a random offset: as random per image, far cheaper."""
    if not _NOISE:
        _NOISE.append(np.random.default_rng(0).standard_normal((512, 512, 3), dtype=np.float32))
    if size > 256:
        return rng.standard_normal((size, size, 3), dtype=np.float32) * sigma
    y, x = rng.integers(0, 512 - size, 2)
    return _NOISE[0][y:y + size, x:x + size] * sigma


def _light(img, mask, p, n, m, size):
    """Lambert shading on the head ellipsoid plus a directional ramp on the background, then intensity and cast.
    Shading is smooth, so it is computed at half resolution (the 2x2 mask average softens the face edge)."""
    half = max(size // 2, 8)
    f = size / half
    xs, ys = _pixel_grid(half)
    inv = cv2.invertAffineTransform(m).tolist()
    u = (xs * (f * inv[0][0]) + ys * (f * inv[0][1]) + (inv[0][2] - 56.0)) * (1 / (p["head_rx"] + 4))
    v = (xs * (f * inv[1][0]) + ys * (f * inv[1][1]) + (inv[1][2] - p["head_cy"])) * (1 / (p["head_ry"] + 4))
    r = (m[:, :2] / np.hypot(m[0, 0], m[1, 0])).tolist()  # normals turn with the face's in-plane rotation
    nx, ny = u * r[0][0] + v * r[0][1], u * r[1][0] + v * r[1][1]
    nz = np.sqrt(np.clip(1 - u * u - v * v, 0.02, 1.0))
    lx, ly, lz = n["light_dir"]
    amb, gain = n["ambient"], n["intensity"]
    head = np.clip(nx * lx + ny * ly + nz * lz, 0, 1) * ((1 - amb) * gain) + amb * gain
    ramp = (xs * lx + ys * ly) * (1 / half) - 0.5 * (lx + ly)
    background = np.clip(ramp, -1, 1) * (0.4 * (1 - amb) * gain) + (amb + 0.6 * (1 - amb)) * gain
    a = cv2.resize(mask, (half, half), interpolation=cv2.INTER_AREA).astype(np.float32) * (1 / 255)
    shade = cv2.resize(background + a * (head - background), (size, size), interpolation=cv2.INTER_LINEAR)
    return img.astype(np.float32) * shade[..., None] * n["cast"]


def render_sample(params: dict, seed: int, identity: int, index: int, size: int = 112, overrides=None):
    """(image uint8 RGB, landmarks5 float32, jpeg_quality) of one photo; see `render`. `overrides` replaces
    drawn nuisances by name (e.g. {"yaw": 0.0}) to show one factor at a time."""
    rng = np.random.default_rng([seed, identity, index])
    n = sample_nuisances(rng)
    unknown = set(overrides or ()) - set(n)
    if unknown:
        raise KeyError(f"render overrides: unknown nuisance(s) {sorted(unknown)}; known: {sorted(n)}")
    n.update(overrides or {})
    pts, names, starts = _pose(params, _geometry(params, n), n["yaw"], n["pitch"])
    lm = names.index("landmarks")
    m = _image_transform(pts[starts[lm]:starts[lm + 1]], n, size)
    pts = pts @ m[:, :2].T + m[:, 2]
    g = {name: pts[starts[i]:starts[i + 1]] for i, name in enumerate(names)}
    img = _background(rng, n, size)
    mask = np.zeros((size, size), np.uint8)
    _draw_face(img, mask, g, params, n, float(np.hypot(m[0, 0], m[1, 0])))
    _occlude(img, g, n, rng, size / 112.0)
    out = _light(img, mask, params, n, m, size)
    if n["low_res"] < 1.0:
        small = max(8, int(size * n["low_res"]))
        out = cv2.resize(cv2.resize(out, (small, small), interpolation=cv2.INTER_AREA), (size, size),
                         interpolation=cv2.INTER_LINEAR)
    if n["blur"] > 0:
        out = cv2.GaussianBlur(out, (0, 0), n["blur"] * size / 112.0)
    out += _noise(rng, size, n["noise"])
    img = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    return img, g["landmarks"].astype(np.float32), n["jpeg_quality"]


def render(params: dict, seed: int, identity: int, index: int, size: int = 112):
    """One photo of the person `params` (from identity_params(seed, identity)): (RGB uint8 [size, size, 3],
    5 landmarks float32 [5, 2] in pixels: eye centres, nose tip, mouth corners). Deterministic in
    (seed, identity, index); before JPEG compression (the stored images also carry a per-image JPEG quality)."""
    img, landmarks, _ = render_sample(params, seed, identity, index, size)
    return img, landmarks
