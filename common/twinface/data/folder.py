"""Folder-per-identity image sets: root/<identity>/<image>."""
import os
import re

from twinface.data.images import image_ext

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _natural_key(name: str):
    """Numbers compare as numbers ("2" < "10"), so folders named by label keep their label as index."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)], name


def scan_image_folder(root):
    """-> (samples [(path, label)], class_names); identity folders without images are left out,
    so labels are 0..C-1 and every class has images. Hidden entries (".name") are ignored."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: image folder not found")
    class_dirs = sorted((e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")),
                        key=_natural_key)
    if not class_dirs:
        raise ValueError(f"{root}: no identity folders; expected {root}/<identity>/<image>"
                         f"{{{','.join(IMAGE_EXTS)}}}")
    samples, class_names = [], []
    for name in class_dirs:
        folder = os.path.join(root, name)
        files = sorted((e.name for e in os.scandir(folder) if e.is_file() and not e.name.startswith(".")
                        and os.path.splitext(e.name)[1].lower() in IMAGE_EXTS), key=_natural_key)
        if files:
            samples.extend((os.path.join(folder, f), len(class_names)) for f in files)
            class_names.append(name)
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
