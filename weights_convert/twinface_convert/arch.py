"""Which backbone a checkpoint holds, read from its tensor shapes.

A checkpoint's tensors fix everything: the family (IResNet, ResNeXt, DenseNet, MobileFaceNet or ViT), the blocks
per stage, the embedding size (fc / features.layers.2 / feature.2 rows) and the input size (fc columns =
C * (size / 16)^2 with C = 512 for IResNet, 2048 for ResNeXt, 1024 for DenseNet-121; the GDC kernel = size / 16
for MobileFaceNet; feature.0 columns = dim * (size // 9)^2 for ViT, where twinface.vit.input_size_of_grid picks
the size among the nine that give the grid). Templates are torch models on the "meta" device: their shapes cost
no memory and no initialisation.
"""
import functools
from collections import Counter
from dataclasses import dataclass

import torch

from twinface.densenet import final_channels
from twinface.registry import BACKBONES, backbone_spec
from twinface.vit import input_size_of_grid
from twinface_torch.backbones import get_model


FC_CHANNELS = {"iresnet": 512, "resnext": 2048}      # channels of the last map, which fc reads flattened


@dataclass(frozen=True)
class Backbone:
    arch: str
    num_features: int = 512
    input_size: int = 112

    def __str__(self):
        return f"{self.arch} (num_features {self.num_features}, input_size {self.input_size})"


DENSENET_WIDTHS = sorted({final_channels(s.kwargs) for s in BACKBONES.values() if s.family == "densenet"})


@functools.lru_cache(maxsize=32)
def template(backbone: Backbone):
    """A torch model of `backbone` without storage: module structure and shapes only."""
    with torch.device("meta"):
        return get_model(backbone.arch, num_features=backbone.num_features, input_size=backbone.input_size).eval()


@functools.lru_cache(maxsize=32)
def template_shapes(backbone: Backbone) -> dict:
    """{canonical name: shape} of every tensor a checkpoint of `backbone` holds (num_batches_tracked aside).
    Cached: callers must not modify it."""
    return {name: tuple(t.shape) for name, t in template(backbone).state_dict().items()
            if not name.endswith("num_batches_tracked")}


def _sizes(family: str, shapes) -> list:
    """[(num_features, input_size)] that the weight shapes (torch layouts) allow for a family."""
    found = set()
    for shape in shapes:
        if family in FC_CHANNELS and len(shape) == 2:
            channels = FC_CHANNELS[family]
            side = round((shape[1] / channels) ** 0.5)
            if side and channels * side * side == shape[1]:
                found.add((shape[0], 16 * side))
        elif family == "densenet" and len(shape) == 2:
            for channels in DENSENET_WIDTHS:          # fc columns = final width * (size / 16)^2
                side = round((shape[1] / channels) ** 0.5)
                if side and channels * side * side == shape[1]:
                    found.add((shape[0], 16 * side))
        elif family == "mobilefacenet" and len(shape) == 4 and shape[:2] == (512, 1) and shape[2] == shape[3]:
            found.update((s[0], 16 * shape[2]) for s in shapes if len(s) == 2 and s[1] == 512)
        elif family == "vit" and len(shape) == 2 and shape[1] % shape[0] == 0:
            # feature.0 [dim, dim * side^2]; feature.2 [F, dim] is then any [., dim] weight (misfits drop out later)
            side = round((shape[1] // shape[0]) ** 0.5)
            if side * side * shape[0] == shape[1]:
                found.update((s[0], input_size_of_grid(side)) for s in shapes if len(s) == 2 and s[1] == shape[0])
    return sorted(found)


def _candidates(shapes, arch=None):
    """Backbones (registry order) whose num_features / input_size the shapes allow; `arch` narrows the set."""
    archs = [arch] if arch else list(BACKBONES)
    out = []
    for name in archs:
        sizes = _sizes(backbone_spec(name).family, shapes)
        any_size = backbone_spec(name).family == "vit"        # the patch grid, not stride-2 stages, sets the size
        out += [Backbone(name, f, s) for f, s in sizes if s > 0 and (any_size or s % 16 == 0)]
        if arch and not sizes:                      # nothing to read the sizes from: the defaults, then misfits
            out.append(Backbone(name))
    return out


def first_misfit(shapes: dict, backbone: Backbone):
    """(name, found shape or None, expected shape or None) of the first tensor that does not fit, else None."""
    expected = template_shapes(backbone)
    for name, shape in expected.items():
        if shapes.get(name) != shape:
            return name, shapes.get(name), shape
    extra = [name for name in shapes if name not in expected]
    return (extra[0], shapes[extra[0]], None) if extra else None


def misfit_message(source: str, misfit, backbone: Backbone) -> str:
    name, found, expected = misfit
    if found is None:
        return f"{source}: tensor '{name}' (shape {expected}) of {backbone} is missing"
    if expected is None:
        return f"{source}: tensor '{name}' (shape {found}) does not exist in {backbone}"
    return f"{source}: tensor '{name}' has shape {found}, {backbone} expects {expected}"


def check_fits(shapes: dict, backbone: Backbone, source: str) -> None:
    misfit = first_misfit(shapes, backbone)
    if misfit:
        raise ValueError(misfit_message(source, misfit, backbone) + " (wrong --arch?)")


def infer_named(shapes: dict, source: str, arch: str = None) -> Backbone:
    """The backbone whose canonical tensors are exactly `shapes` ({name: shape}); `arch` forces the family
    and blocks, and then a misfit is an error naming the first tensor that does not fit, with both shapes."""
    weights = [s for n, s in shapes.items() if n.endswith(".weight")]
    candidates = _candidates(weights, arch)
    for backbone in candidates:
        if first_misfit(shapes, backbone) is None:
            return backbone
    if arch:
        raise ValueError(misfit_message(source, first_misfit(shapes, candidates[0]), candidates[0]) +
                         " (wrong --arch?)")
    if not candidates:
        raise ValueError(f"{source}: no tensor gives an embedding size (IResNet / ResNeXt 'fc.weight' "
                         f"[F, 512*(S/16)^2] / [F, 2048*(S/16)^2], MobileFaceNet 'features.layers.2.weight' "
                         f"[F, 512], ViT 'feature.2.weight' [F, dim]): not a twinface/arcface_torch backbone "
                         f"({len(shapes)} tensors, first: {next(iter(shapes), None)!r})")
    nearest = min(candidates, key=lambda b: _distance(shapes, b))
    raise ValueError(f"{source}: the tensors match no known backbone ({', '.join(BACKBONES)}); nearest "
                     f"{nearest.arch}: " + misfit_message(source, first_misfit(shapes, nearest), nearest))


def infer_unnamed(weight_shapes: list, source: str, arch: str = None) -> list:
    """Backbones whose conv / linear weights (torch layouts, any order) are exactly `weight_shapes`.

    Used where names are absent (Keras .weights.h5 object paths) or not trusted (ONNX): a shape multiset.
    With `arch`, that backbone (sizes from the shapes where they tell) even when it does not fit, so the
    caller can name the first misfit.
    """
    found = Counter(map(tuple, weight_shapes))
    candidates = _candidates(found, arch)
    fits = [b for b in candidates if Counter(s for s in template_shapes(b).values() if len(s) >= 2) == found]
    if fits or arch:
        return fits or candidates
    raise ValueError(f"{source}: its {len(weight_shapes)} convolution / linear weights match no known backbone "
                     f"({', '.join(BACKBONES)}); pass --arch to see the first tensor that does not fit")


def _distance(shapes: dict, backbone: Backbone) -> int:
    expected = template_shapes(backbone)
    return sum(shapes.get(n) != s for n, s in expected.items()) + sum(n not in expected for n in shapes)
