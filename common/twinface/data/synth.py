"""The embedded default data set: procedurally rendered faces, in the spirit of DigiFace-1M.

Real face sets cannot ship and the default run must work offline on a small CPU, so twinface draws its own.
An identity is a fixed set of facial parameters (rng([seed, identity])); each of its photos varies pose,
expression, light, background, occlusion, blur, noise and JPEG quality (rng([seed, identity, index])). Output
is what insightface trains on: 112x112 RGB crops aligned to the ArcFace 5-point template, written as
train.rec/.idx (and train/<id>/<k>.jpg), plus val.bin of pairs from identities never seen in training.
Everything is a pure function of (seed, identity, index): worker count and order cannot change a byte.
"""
import json
import multiprocessing
import os
import sys
import time

import cv2
import numpy as np

from twinface.atomic import Outputs
from twinface.data.convert import make_pairs
from twinface.data.folder import write_image_folder
from twinface.data.images import decode_image, encode_image
from twinface.data.recordio import write_insightface_rec
from twinface.data.synth_render import TEMPLATE, identity_params, render, render_sample  # noqa: F401 (re-exported)
from twinface.data.verification_bin import load_bin, save_bin
from twinface.eval.verification import evaluate

GENERATOR = "twinface.data.synth"
VERSION = 1  # bump whenever a change to the renderer changes pixels: cached sets then regenerate
DEFAULTS = {"num_identities": 1000, "images_per_identity": 20, "val_identities": 200, "val_pairs": 3000, "seed": 0}
FORMATS = ("rec", "folder")


def encode_photo(params: dict, seed: int, identity: int, index: int) -> bytes:
    """The stored form of one photo: JPEG at the photo's own quality (a nuisance like blur or noise)."""
    img, _, quality = render_sample(params, seed, identity, index)
    return encode_image(img, ".jpg", quality)


def iter_identity_images(seed: int, identity: int, count: int):
    """The first `count` photos of an identity as uint8 RGB 112x112x3, exactly as a generated set stores them
    (JPEG-decoded)."""
    params = identity_params(seed, identity)
    for index in range(count):
        yield decode_image(encode_photo(params, seed, identity, index), f"synthetic identity {identity} photo {index}")


def _render_identity(task):
    seed, identity, indices = task
    params = identity_params(seed, identity)
    return [encode_photo(params, seed, identity, index) for index in indices]


def _init_worker():
    cv2.setNumThreads(1)  # the pool is the parallelism; OpenCV's own threads would only fight it


class _Renderer:
    """Ordered map of _render_identity over tasks, in-process (workers <= 1) or on a spawned pool: spawn,
    because forking a process that already runs torch/TensorFlow threads can deadlock."""

    def __init__(self, workers: int):
        self.pool = None
        if workers > 1:
            ctx = multiprocessing.get_context("spawn")
            self.pool = ctx.Pool(workers, initializer=_init_worker)

    def map(self, tasks):
        if self.pool is None:
            return map(_render_identity, tasks)
        return self.pool.imap(_render_identity, tasks, chunksize=4)

    def close(self):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


def _check_params(num_identities, images_per_identity, val_identities, val_pairs, seed, formats):
    for name, value, low in (("num_identities", num_identities, 1), ("images_per_identity", images_per_identity, 2),
                             ("val_identities", val_identities, 2), ("val_pairs", val_pairs, 20), ("seed", seed, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(f"synthetic data set: {name} must be an integer >= {low}, got {value!r}")
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"synthetic data set: formats must be a non-empty subset of {FORMATS}, got {formats!r}")


def _is_synth_dir(path) -> bool:
    manifest = os.path.join(path, "manifest.json")
    try:
        with open(manifest) as f:
            return json.load(f).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        return False


def _progress(enabled, message):
    if enabled:
        print(f"synth: {message}", file=sys.stderr, flush=True)


def _train_samples(renderer, root, seed, num_identities, images_per_identity, formats, progress, t0):
    """(label, JPEG bytes) in label order for the .rec writer; each identity's folder is written as it passes."""
    tasks = [(seed, identity, range(images_per_identity)) for identity in range(num_identities)]
    step = max(1, num_identities // 10)
    for identity, encoded in enumerate(renderer.map(tasks)):
        samples = [(identity, data) for data in encoded]
        if "folder" in formats:
            write_image_folder(os.path.join(root, "train"), samples)
        yield from samples
        done = identity + 1
        if done % step == 0 or done == num_identities:
            rate = done * images_per_identity / (time.perf_counter() - t0)
            _progress(progress, f"{done}/{num_identities} identities, {rate:.0f} images/s")


def _write_val(renderer, root, seed, first_identity, val_identities, images_per_identity, val_pairs):
    """val.bin: pairs drawn over the photos of held-out identities; only the photos some pair uses are rendered."""
    labels = np.repeat(np.arange(val_identities), images_per_identity)
    pairs, issame = make_pairs(labels, val_pairs, seed)
    # Alternate same/different (an odd extra "different" first), so every contiguous fold of the 10-fold
    # protocol holds both kinds even for a tiny set.
    same, diff = np.flatnonzero(issame), np.flatnonzero(~issame)
    extra = len(diff) - len(same)
    order = np.empty(val_pairs, np.int64)
    order[:extra] = diff[:extra]
    order[extra::2], order[extra + 1::2] = same, diff[extra:]
    pairs, issame = pairs[order], issame[order]
    used = np.unique(pairs)
    tasks = [(seed, first_identity + v, [int(i) % images_per_identity for i in used[labels[used] == v]])
             for v in range(val_identities)]
    photos = {}
    for (_, identity, indices), encoded in zip(tasks, renderer.map(tasks)):
        for index, data in zip(indices, encoded):
            photos[(identity - first_identity) * images_per_identity + index] = data
    bins = [photos[int(i)] for i in pairs.ravel()]
    save_bin(os.path.join(root, "val.bin"), bins, issame)
    return bins, issame, len(used)


def raw_pixel_accuracy(bins, issame) -> float:
    """10-fold verification accuracy of raw pixels: (x - 127.5) / 127.5, flattened, L2-normalised.

    The protocol only sees each pair's squared distance 2 - 2 cos, so each pair is handed to `evaluate` as two
    2-D unit vectors with the same cosine: identical distances, without holding 2N x 37632 floats.
    """
    cos = np.empty(len(issame))
    for start in range(0, len(issame), 128):
        stop = min(start + 128, len(issame))
        x = np.stack([decode_image(bins[k], f"pair {k // 2} image {k % 2}") for k in range(2 * start, 2 * stop)])
        x = x.reshape(len(x), -1).astype(np.float32) / 127.5 - 1
        x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
        cos[start:stop] = np.einsum("ij,ij->i", x[0::2], x[1::2])
    cos = np.clip(cos, -1, 1)
    emb = np.zeros((2 * len(cos), 2))
    emb[0::2, 0] = 1
    emb[1::2, 0], emb[1::2, 1] = cos, np.sqrt(1 - cos**2)
    return float(evaluate(emb, issame).acc_mean)


def raw_pixel_baseline(bin_path) -> float:
    """raw_pixel_accuracy of a verification .bin (any, not only ours): the floor a learned model must beat."""
    bins, issame = load_bin(bin_path)
    return raw_pixel_accuracy(bins, issame)


def _params(num_identities, images_per_identity, val_identities, val_pairs, seed) -> dict:
    return {"num_identities": int(num_identities), "images_per_identity": int(images_per_identity),
            "val_identities": int(val_identities), "val_pairs": int(val_pairs), "seed": int(seed)}


def generate(out_dir, num_identities=DEFAULTS["num_identities"], images_per_identity=DEFAULTS["images_per_identity"],
             val_identities=DEFAULTS["val_identities"], val_pairs=DEFAULTS["val_pairs"], seed=DEFAULTS["seed"],
             formats=FORMATS, workers=2, progress=True, overwrite=False) -> dict:
    """Render the set into out_dir and return its manifest (also written to out_dir/manifest.json).

    Training identities are 0..num_identities-1; val.bin uses identities num_identities..+val_identities-1, so no
    validation face is ever trained on. The set is built in a hidden sibling directory and renamed into place at
    the end: an interrupted run leaves no out_dir, never a half set that looks complete. overwrite=True replaces
    only an earlier synthetic set (or an empty directory). workers > 1 starts spawned processes, so a script
    calling this must do so under `if __name__ == "__main__":`.
    """
    formats = tuple(formats)
    _check_params(num_identities, images_per_identity, val_identities, val_pairs, seed, formats)
    out_dir = os.path.abspath(os.fspath(out_dir))
    renderer = None
    with Outputs([out_dir], GENERATOR, directory=True, overwrite=overwrite, recognise=_is_synth_dir,
                 what=f"a twinface synthetic data set (no manifest.json from {GENERATOR})") as (tmp,):
        try:
            t0 = time.perf_counter()
            renderer = _Renderer(workers)
            samples = _train_samples(renderer, tmp, seed, num_identities, images_per_identity, formats, progress, t0)
            if "rec" in formats:
                write_insightface_rec(os.path.join(tmp, "train"), samples)
            else:
                for _ in samples:
                    pass
            t_train = time.perf_counter()
            bins, issame, val_images = _write_val(renderer, tmp, seed, num_identities, val_identities,
                                                  images_per_identity, val_pairs)
            renderer.close()
            t_val = time.perf_counter()
            baseline = raw_pixel_accuracy(bins, issame)
            t_end = time.perf_counter()
            rendered = num_identities * images_per_identity + val_images
            manifest = {
                "generator": GENERATOR, "version": VERSION,
                "params": _params(num_identities, images_per_identity, val_identities, val_pairs, seed),
                "formats": list(formats),
                "image_size": 112, "template": TEMPLATE.tolist(),
                "counts": {"train_identities": num_identities, "train_images": num_identities * images_per_identity,
                           "val_identities": val_identities, "val_first_identity": num_identities,
                           "val_pairs": val_pairs, "val_same_pairs": int(issame.sum()),
                           "val_images_rendered": val_images},
                "raw_pixel_baseline": baseline,
                "timings": {"train_s": round(t_train - t0, 3), "val_s": round(t_val - t_train, 3),
                            "baseline_s": round(t_end - t_val, 3), "total_s": round(t_end - t0, 3),
                            "images_per_s": round(rendered / (t_val - t0), 1), "workers": workers},
            }
            with open(os.path.join(tmp, "manifest.json"), "w") as f:
                json.dump(manifest, f, indent=2)
        finally:
            if renderer is not None:
                renderer.close()
    _progress(progress, f"{rendered} images in {t_end - t0:.1f}s ({manifest['timings']['images_per_s']:.0f} "
                        f"images/s rendering); raw-pixel baseline on val.bin: {baseline:.4f}; wrote {out_dir}")
    return manifest


def _expected_files(formats):
    files = ["manifest.json", "val.bin"]
    if "rec" in formats:
        files += ["train.rec", "train.idx"]
    if "folder" in formats:
        files.append("train")
    return files


def ensure_dataset(out_dir, formats=FORMATS, workers=2, progress=True, **params) -> dict:
    """The manifest of the synthetic set in out_dir, generating it only when out_dir/manifest.json is missing,
    was made with other parameters or generator version, lacks a requested format or a file (cache on first use).
    params: any of DEFAULTS' keys; the rest take DEFAULTS' values."""
    unknown = set(params) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"ensure_dataset: unknown parameter(s) {sorted(unknown)}; expected some of {sorted(DEFAULTS)}")
    wanted = _params(**{**DEFAULTS, **params})
    formats = tuple(formats)
    out_dir = os.fspath(out_dir)
    try:
        with open(os.path.join(out_dir, "manifest.json")) as f:
            manifest = json.load(f)
        if (manifest.get("generator") == GENERATOR and manifest.get("version") == VERSION
                and manifest.get("params") == wanted and set(formats) <= set(manifest.get("formats", ()))
                and all(os.path.exists(os.path.join(out_dir, p)) for p in _expected_files(formats))):
            return manifest
    except (OSError, ValueError):
        pass
    return generate(out_dir, formats=formats, workers=workers, progress=progress, overwrite=True, **wanted)
