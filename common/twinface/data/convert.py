"""Conversions between the data formats: image folder <-> insightface .rec, image folder -> verification .bin."""
import os

import numpy as np
from tqdm import tqdm

from twinface.atomic import Outputs, check_destination, writing
from twinface.data.folder import scan_image_folder, write_image_folder
from twinface.data import tfrecord
from twinface.data.images import declared_size, decode_image, encode_image, fit_square, image_ext, usable_samples
from twinface.data.recordio import InsightFaceRec, write_insightface_rec
from twinface.data.verification_bin import save_bin



def _read_bytes(path, size=-1) -> bytes:
    with open(path, "rb") as f:
        return f.read(size)


def _is_pickle(path) -> bool:
    return _read_bytes(path, 1) == b"\x80"


def _folder_samples(src_root, skipped: list, class_names: list, desc: str, progress: bool):
    """(label, bytes) of a folder's usable images; identities left without images are dropped and the following
    labels move down (labels stay 0..C-1). Fills `skipped` and the kept `class_names` as it goes."""
    samples, names = scan_image_folder(src_root)
    new_label = {}
    files = tqdm(samples, desc=desc, unit="img", disable=not progress)
    for label, data in usable_samples(((p, lab, _read_bytes(p)) for p, lab in files), skipped):
        if label not in new_label:
            new_label[label] = len(new_label)
            class_names.append(names[label])
        yield new_label[label], data


def folder_to_rec(src_root, dst_prefix, progress=True, overwrite=False) -> dict:
    """Pack an image folder into dst_prefix.rec/.idx (insightface layout), storing each file's bytes as they are.

    Undecodable images are skipped and listed in stats["skipped"]; an identity left without images is dropped
    and the following labels move down, so the .rec keeps labels 0..C-1. The pair appears (or replaces an
    earlier RecordIO pair, with overwrite) only once complete; see twinface.atomic.
    """
    skipped, class_names = [], []
    stats = write_insightface_rec(os.fspath(dst_prefix),
                                  _folder_samples(src_root, skipped, class_names, "folder -> rec", progress),
                                  writer="twinface data folder2rec", overwrite=overwrite, inputs=[src_root])
    return {**stats, "num_skipped": len(skipped), "skipped": skipped, "class_names": class_names}


def _rec_samples(rec, skipped: list, desc: str, progress: bool):
    """(label, bytes) of a .rec's usable images, every label checked before the first is read; fills `skipped`."""
    rec.labels
    images = tqdm(range(len(rec)), desc=desc, unit="img", disable=not progress)
    return usable_samples(((rec.source(i), *rec.record(i)) for i in images), skipped)


def rec_to_folder(src_prefix, dst_root, progress=True, overwrite=False) -> dict:
    """Unpack an insightface .rec into dst_root/<%05d label>/<%06d>.jpg, bytes unchanged.

    Written into a temporary sibling renamed into place at the end, so dst_root appears only complete; with
    overwrite it replaces only an earlier rec2folder output (or an empty directory), which stays intact until
    that rename. See twinface.atomic.
    """
    rec, skipped = InsightFaceRec(src_prefix), []
    records = _rec_samples(rec, skipped, "rec -> folder", progress)
    with Outputs([dst_root], "twinface data rec2folder", directory=True, overwrite=overwrite,
                 inputs=[rec.reader.rec_path, rec.reader.idx_path]) as (tmp,), writing(dst_root):
        count = write_image_folder(tmp, records)
    return {"num_images": count, "num_classes": rec.num_classes, "num_skipped": len(skipped), "skipped": skipped}


def make_pairs(labels: np.ndarray, num_pairs: int, seed: int):
    """-> (pairs [num_pairs, 2] int64 image indices, issame [num_pairs] bool).

    num_pairs // 2 same-identity pairs, the rest different-identity, each drawn uniformly from all pairs of its
    kind, none repeated; the order is shuffled so that every contiguous fold of the 10-fold protocol holds both
    kinds. Same labels and seed, same pairs.
    """
    labels = np.asarray(labels).ravel()
    if num_pairs < 2:
        raise ValueError(f"make_pairs: num_pairs must be >= 2, got {num_pairs}")
    n = len(labels)
    rng = np.random.default_rng(seed)
    # Images sorted by label: class c is the block order[starts[c] : starts[c] + counts[c]].
    order = np.argsort(labels, kind="stable")
    classes, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    class_of = np.searchsorted(classes, labels)
    same_cdf = np.cumsum(counts * (counts - 1) // 2)
    diff_cdf = np.cumsum(n - counts[class_of])  # image i pairs with n - |class(i)| others
    possible_same = int(same_cdf[-1]) if n else 0
    possible_diff = n * (n - 1) // 2 - possible_same
    num_same, num_diff = num_pairs // 2, num_pairs - num_pairs // 2
    if possible_same < num_same:
        raise ValueError(f"make_pairs: {num_same} same-identity pairs requested, only {possible_same} exist")
    if possible_diff < num_diff:
        raise ValueError(f"make_pairs: {num_diff} different-identity pairs requested, only {possible_diff} exist")

    def block(c):
        return order[starts[c]:starts[c] + counts[c]]

    def draw_same():
        c = np.searchsorted(same_cdf, rng.integers(possible_same), side="right")
        return rng.choice(block(c), 2, replace=False)

    def draw_diff():
        i = np.searchsorted(diff_cdf, rng.integers(diff_cdf[-1]), side="right")
        c = class_of[i]
        k = rng.integers(n - counts[c])  # k-th image outside class c's block
        return i, order[k if k < starts[c] else k + counts[c]]

    def all_same():
        return [(a, b) for c in range(len(classes)) for k, a in enumerate(block(c)) for b in block(c)[k + 1:]]

    def all_diff():
        return [(a, b) for c in range(len(classes)) for d in range(c + 1, len(classes))
                for a in block(c) for b in block(d)]

    same = _unique_pairs(draw_same, all_same, num_same, possible_same, rng)
    diff = _unique_pairs(draw_diff, all_diff, num_diff, possible_diff, rng)
    pairs = np.array(same + diff, dtype=np.int64)
    issame = np.array([True] * num_same + [False] * num_diff)
    shuffle = rng.permutation(num_pairs)
    return pairs[shuffle], issame[shuffle]


def _unique_pairs(draw, enumerate_all, count, possible, rng):
    """`count` distinct unordered pairs: uniform draws while at least half of all pairs remain (each draw then
    succeeds with probability >= 1/2), else a sample of the full list, which is then small."""
    if 2 * count > possible:
        every = enumerate_all()
        return [tuple(int(x) for x in every[k]) for k in rng.choice(len(every), count, replace=False)]
    seen, pairs = set(), []
    while len(pairs) < count:
        a, b = (int(x) for x in draw())
        if (min(a, b), max(a, b)) not in seen:
            seen.add((min(a, b), max(a, b)))
            pairs.append((a, b))
    return pairs


def folder_to_bin(src_root, dst_path, num_pairs=6000, seed=0, image_size=112, overwrite=False,
                  progress=True) -> dict:
    """Build an insightface verification .bin from an image folder: half same, half different pairs.

    Images already image_size x image_size keep their bytes; others are resized and re-encoded as JPEG.
    """
    dst_path = check_destination(dst_path, overwrite=overwrite, inputs=[src_root], recognise=_is_pickle,
                                 what="a pickled verification .bin")
    samples, _ = scan_image_folder(src_root)
    labels = np.array([label for _, label in samples], dtype=np.int64)
    pairs, issame = make_pairs(labels, num_pairs, seed)
    encoded, resized = {}, 0
    for index in tqdm(np.unique(pairs), desc="folder -> bin", unit="img", disable=not progress):
        path = samples[index][0]
        data = _read_bytes(path)
        img = decode_image(data, path)
        if img.shape[:2] != (image_size, image_size):
            data = encode_image(fit_square(img, image_size, path))
            resized += 1
        encoded[int(index)] = data
    save_bin(dst_path, [encoded[int(i)] for pair in pairs for i in pair], issame)
    return {"num_pairs": int(len(pairs)), "num_same": int(issame.sum()), "num_images": len(encoded),
            "num_resized": resized}


def _write_tfrecord(dst_dir, samples, shards, writer, inputs, overwrite, class_names=None,
                    num_classes=None) -> dict:
    """(label, bytes) samples -> a sharded TFRecord data set; the image bytes are copied, never re-encoded."""
    count = 0
    with tfrecord.TFRecordWriter(dst_dir, shards, writer, class_names=class_names, num_classes=num_classes,
                                 overwrite=overwrite, inputs=inputs) as out:
        for label, data in samples:
            ext = image_ext(data)
            size = declared_size(data) or decode_image(data, f"image {count}").shape[1::-1]
            out.write(data, label, (size[1], size[0]), "jpeg" if ext == ".jpg" else ext[1:])
            count += 1
        if not count:
            raise ValueError(f"{dst_dir}: no usable images to write")
    return {"num_images": count, "num_shards": shards}


def rec_to_tfrecord(src_prefix, dst_dir, shards=8, progress=True, overwrite=False) -> dict:
    """`twinface data rec2tfrecord`: an insightface .rec as TFRecord shards, record order, labels and class count
    kept (training from either reads the same samples in the same order, into the same head). Unusable images
    are skipped and listed."""
    rec, skipped = InsightFaceRec(src_prefix), []
    records = _rec_samples(rec, skipped, "rec -> tfrecord", progress)
    stats = _write_tfrecord(dst_dir, records, shards, "twinface data rec2tfrecord",
                            [rec.reader.rec_path, rec.reader.idx_path], overwrite, num_classes=rec.num_classes)
    return {**stats, "num_classes": rec.num_classes, "num_skipped": len(skipped), "skipped": skipped}


def folder_to_tfrecord(src_root, dst_dir, shards=8, progress=True, overwrite=False) -> dict:
    """`twinface data folder2tfrecord`: an image folder as TFRecord shards; the identity folder names are kept
    in the index (tfrecord2folder restores them)."""
    skipped, class_names = [], []
    stats = _write_tfrecord(dst_dir, _folder_samples(src_root, skipped, class_names, "folder -> tfrecord", progress),
                            shards, "twinface data folder2tfrecord", [src_root], overwrite, class_names)
    return {**stats, "num_classes": len(class_names), "num_skipped": len(skipped), "skipped": skipped}


def tfrecord_to_folder(src_dir, dst_root, progress=True, overwrite=False) -> dict:
    """`twinface data tfrecord2folder`: the images as files, bytes unchanged, in identity folders named as the
    index recorded them (%05d labels otherwise); written as rec2folder writes (atomic)."""
    records = tfrecord.TFRecordSet(src_dir, progress)
    samples = (records.read(i)[::-1] for i in tqdm(range(len(records)), desc="tfrecord -> folder", unit="img",
                                                   disable=not progress))
    with Outputs([dst_root], "twinface data tfrecord2folder", directory=True, overwrite=overwrite,
                 inputs=[src_dir]) as (tmp,), writing(dst_root):
        count = write_image_folder(tmp, samples, records.class_names)
    return {"num_images": count, "num_classes": records.num_classes}
