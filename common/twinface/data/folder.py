"""Folder-per-identity image sets: root/<identity>/<image>."""
import errno
import logging
import os
import re

from twinface.data.images import image_ext

log = logging.getLogger("twinface.data")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _natural_key(name: str):
    """Numbers compare as numbers ("2" < "10"), so folders named by label keep their label as index."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)], name


def _entries(folder, kind, skipped):
    """Names of the non-hidden directories (kind "dir") or image files (kind "image") in `folder`.
    What cannot be examined (a symlink loop, a broken link, no permission) is added to `skipped`, not raised."""
    try:
        entries = list(os.scandir(folder))
    except OSError as err:
        skipped.append(f"{folder}: {err.strerror}")
        return []
    names = []
    for e in entries:
        if e.name.startswith(".") or (kind == "image" and os.path.splitext(e.name)[1].lower() not in IMAGE_EXTS):
            continue
        try:
            wanted = e.is_dir() if kind == "dir" else e.is_file()
            if kind == "image" and not wanted and not e.is_dir():     # a link to nowhere, named like an image
                raise FileNotFoundError(errno.ENOENT, "broken link")
        except OSError as err:
            skipped.append(f"{e.path}: {err.strerror}")
            continue
        if wanted:
            names.append(e.name)
    return sorted(names, key=_natural_key)


def scan_image_folder(root):
    """-> (samples [(path, label)], class_names); identity folders without images are left out,
    so labels are 0..C-1 and every class has images. Hidden entries (".name") are ignored; entries that cannot
    be examined (symlink loops, broken links) are skipped and counted in a warning."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: image folder not found")
    skipped = []
    class_dirs = _entries(root, "dir", skipped)
    if not class_dirs:
        raise ValueError(f"{root}: no identity folders; expected {root}/<identity>/<image>"
                         f"{{{','.join(IMAGE_EXTS)}}}")
    samples, class_names = [], []
    for name in class_dirs:
        folder = os.path.join(root, name)
        files = _entries(folder, "image", skipped)
        if files:
            samples.extend((os.path.join(folder, f), len(class_names)) for f in files)
            class_names.append(name)
    if skipped:
        log.warning(f"{root}: skipped {len(skipped)} entries that cannot be read, e.g. {skipped[0]}")
    if not samples:
        raise ValueError(f"{root}: {len(class_dirs)} identity folders but no images with extension "
                         f"{', '.join(IMAGE_EXTS)}")
    return samples, class_names


def write_image_folder(root, samples, class_names=None) -> int:
    """Write (label, encoded bytes) as root/<class name or %05d>/<%06d><ext>; the extension follows the bytes
    (".jpg" for JPEG). Never replaces an existing file. Returns the number of images written."""
    root = os.fspath(root)
    made = set()
    count = 0
    for label, data in samples:
        label = int(label)
        if class_names is not None and not 0 <= label < len(class_names):
            raise ValueError(f"{root}: sample {count} has label {label}, but only {len(class_names)} class names")
        folder = os.path.join(root, class_names[label] if class_names is not None else f"{label:05d}")
        if folder not in made:
            os.makedirs(folder, exist_ok=True)
            made.add(folder)
        with open(os.path.join(folder, f"{count:06d}{image_ext(data)}"), "xb") as f:
            f.write(data)
        count += 1
    return count
