"""SRC -> ONNX hub -> DST, and the proof: SRC and DST run on the same images must give the same embeddings.

The hub is the name-faithful, unfolded ONNX export of the torch twin (twinface_torch.export): writing it takes
one torch trace instead of tf2onnx's graph conversion, and reading it back (by walking the graph) gives every
tensor bit for bit, which is checked on every run. DST is written from what the hub gives back, so between
the twins nothing is lost: parameters and BatchNorm statistics survive exactly.

DST only appears once verified: it is written under a temporary name beside its final place, run, compared,
and moved into place on PASS; on FAIL (or any error) nothing is left behind (twinface.atomic). --force
replaces only an output of DST's format, never an input.
"""
import contextlib
import os
import shutil
import time
from dataclasses import dataclass, field

import numpy as np

from twinface.atomic import MARKER, Outputs, check_destination, scratch_path

from . import formats
from .arch import Backbone, template_shapes

TOLERANCE = 1e-5          # max abs diff of L2-normalised embeddings, fp32 (docs/design.md, IResNet-50 at 112x112)
RANDOM_IMAGES = 4
MAX_IMAGES = 64
# What tf.saved_model.save writes: --force replaces a directory holding nothing else.
SAVEDMODEL_ENTRIES = {"saved_model.pb", "fingerprint.pb", "variables", "assets", MARKER}


class VerificationFailed(RuntimeError):
    """SRC and DST disagree past the tolerance; DST was not written."""


@dataclass
class Report:
    src_format: str
    dst_format: str
    backbone: Backbone
    max_abs_diff: float
    tolerance: float
    images: str                               # what the check ran on
    folded: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)


def convert(src: str, dst: str, arch: str = None, keep_onnx: str = None, force: bool = False, images: str = None,
            tolerance: float = TOLERANCE, log=print, trust_savedmodel: bool = False) -> Report:
    """Convert the backbone weights in `src` to `dst` (formats: twinface_convert.formats.SUPPORTED) and verify.

    arch: backbone name (r18 ... mbf_large); inferred from the tensor shapes when None.
    keep_onnx: also keep the ONNX hub file there.   images: a folder of aligned face crops to verify on
    (default: random images).   Raises VerificationFailed past `tolerance`, leaving DST as it was.
    trust_savedmodel: allow a SavedModel SRC, which runs its own graph when loaded (formats.read).
    """
    clock = _Clock()
    src_format, dst_format = formats.source_format(src), formats.target_format(dst)
    if keep_onnx and formats.target_format(keep_onnx) != "onnx":
        raise ValueError(f"--keep-onnx {keep_onnx}: the hub is an ONNX file; give a name ending in .onnx")
    if keep_onnx and os.path.abspath(keep_onnx) == os.path.abspath(dst):
        raise ValueError(f"--keep-onnx {keep_onnx}: the same path as DST; give the hub its own name")
    checks = dict(overwrite=force, flag="--force", inputs=[src, images])
    dst_checks, hub_checks = _checks_for(dst_format, checks), _checks_for("onnx", checks)
    check_destination(dst, **dst_checks)                         # refuse before any slow work
    if keep_onnx:
        check_destination(keep_onnx, **hub_checks)
    if dst_format == "safetensors":
        formats.require_safetensors(dst)
    if images and not os.path.isdir(images):
        raise FileNotFoundError(f"--images {images}: not a directory")

    source = formats.read(src, src_format, arch, trust_savedmodel=trust_savedmodel)
    backbone = source.backbone
    how = "as given by --arch" if arch else "inferred from the tensor shapes"
    log(f"read {src}: {source.description}, backbone {backbone}, {how}")
    if source.folded:
        log(folded_note(source.folded, backbone))
    batch, what = _verification_images(images, backbone.input_size)
    clock.lap("read")

    with _hub_path(keep_onnx, dst, hub_checks) as hub:
        formats.write(source.state, backbone, hub, "onnx")
        hub_state = formats.read(hub, "onnx", backbone.arch).state
        _check_identical(source.state, hub_state, hub)
        log(f"ONNX hub {keep_onnx or '(temporary)'}: all {len(hub_state)} tensors read back bit-identical")
        clock.lap("onnx hub")
        suffix = ".weights.h5" if dst_format == "keras" else os.path.splitext(dst)[1]
        with Outputs([dst], "twinface convert", suffixes=[suffix], **dst_checks) as (staged,):
            if dst_format == "onnx":
                shutil.copyfile(hub, staged)
            else:
                formats.write(hub_state, backbone, staged, dst_format)
            clock.lap("write")
            diff = max_abs_diff(formats.embedder(src, src_format, backbone)(batch),
                                formats.embedder(staged, dst_format, backbone)(batch))
            clock.lap("verify")
            verdict = "PASS" if diff <= tolerance else "FAIL"
            log(f"verify on {what}: max abs diff of L2-normalised embeddings, {src} vs {dst}: {diff:.3g} "
                f"(tolerance {tolerance:g}): {verdict}")
            if verdict == "FAIL":
                raise VerificationFailed(f"{src} -> {dst}: embeddings differ by {diff:.3g}, more than the "
                                         f"tolerance {tolerance:g}; {dst} was not written")
    seconds = {**clock.laps, "total": clock.total()}
    log(f"wrote {dst} in {seconds['total']:.1f} s ({clock})")
    return Report(src_format, dst_format, backbone, diff, tolerance, what, source.folded, seconds)


def folded_note(folded: list, backbone: Backbone) -> str:
    total = sum(name.endswith(".running_var") for name in template_shapes(backbone))
    return (f"note: the exporter folded the running statistics of {len(folded)} of {total} BatchNorm layers into "
            f"the weights (e.g. {', '.join(folded[:3])}). They are loaded as BatchNorm(gamma=scale, beta=shift, "
            f"mean=0, var=1-eps), which gives the same embeddings in inference. The statistics themselves are "
            f"gone: fine-tuning in train mode would normalise those layers with batch statistics instead, so keep "
            f"them in eval mode (frozen) or expect them to be re-learnt.")


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Max abs difference of the L2-normalised rows (float64); NaN anywhere counts as a difference of inf."""
    a, b = (np.asarray(x, np.float64) for x in (a, b))
    if a.shape != b.shape:
        raise VerificationFailed(f"embedding shapes differ: {a.shape} vs {b.shape}")
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    diff = np.abs(a - b)
    return float("inf") if np.isnan(diff).any() else float(diff.max())


def _check_identical(state: dict, back: dict, hub: str) -> None:
    for name, value in state.items():
        if name not in back or back[name].dtype != value.dtype or not np.array_equal(back[name], value):
            raise RuntimeError(f"{hub}: tensor '{name}' did not come back from the ONNX hub bit for bit (a bug in "
                               f"twinface_convert; please report it)")


def _verification_images(folder: str, size: int):
    """(uint8 RGB [N, size, size, 3], description): the folder's images (sorted, at most MAX_IMAGES) or noise."""
    if not folder:
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, (RANDOM_IMAGES, size, size, 3), dtype=np.uint8), f"{RANDOM_IMAGES} random images"
    from twinface.data.folder import IMAGE_EXTS
    from twinface.data.images import fit_square, read_image
    paths = sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
                   if os.path.splitext(name)[1].lower() in IMAGE_EXTS and not name.startswith("."))
    if not paths:
        raise ValueError(f"--images {folder}: no images ({', '.join(IMAGE_EXTS)}) found")
    batch = np.stack([fit_square(read_image(p), size, p) for p in paths[:MAX_IMAGES]])
    return batch, f"{len(batch)} images from {folder}"


@contextlib.contextmanager
def _hub_path(keep: str, dst: str, checks: dict):
    if keep:
        with Outputs([keep], "twinface convert", suffixes=[".onnx"], **checks) as (path,):
            yield path
    else:
        with scratch_path(dst, ".onnx") as path:
            yield path


def _checks_for(fmt: str, checks: dict) -> dict:
    """check_destination arguments for a `fmt` output: --force replaces only a `fmt` output."""
    def recognise(path):
        if fmt == "savedmodel":
            return set(os.listdir(path)) <= SAVEDMODEL_ENTRIES
        try:
            return formats.source_format(path) == fmt
        except (OSError, ValueError):
            return False
    return {**checks, "directory": fmt == "savedmodel", "recognise": recognise,
            "what": "a SavedModel directory" if fmt == "savedmodel" else f"a file of the {fmt} format"}


class _Clock:
    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.laps = {}

    def lap(self, name):
        now = time.perf_counter()
        self.laps[name] = now - self.last
        self.last = now

    def total(self):
        return time.perf_counter() - self.start

    def __str__(self):
        return ", ".join(f"{name} {seconds:.1f}" for name, seconds in self.laps.items())
