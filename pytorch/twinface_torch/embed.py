"""Embeddings from a torch backbone file: uint8 RGB NHWC images in, float32 [N, D] out.

On CPU, embed_images runs a frozen TorchScript copy of the model on channels_last input (BatchNorm folded into
the convolutions; IResNets also in oneDNN's layout with pre-packed weights; ViT attention through torch's fused
kernel), the fastest torch path measured by `twinface bench` (docs/bench.md). The copy is built on first use,
once per model, and again only when the weights change (training evaluates between steps); fast=False runs the
module itself, eagerly.
"""
import itertools
import os
import sys
import warnings
import weakref

import numpy as np
import torch

from twinface.atomic import file_sha256
from twinface.data.transforms import to_model_input

from . import aot
from .backbones.iresnet import IResNet
from .backbones.vit import fused_attention
from .checkpoint import load_backbone

_frozen = weakref.WeakKeyDictionary()      # model -> (weights fingerprint, frozen copy); dies with the model


def embed_images(model, images: np.ndarray, fast: bool = True) -> np.ndarray:
    x = torch.from_numpy(to_model_input(images, "NCHW", model.input_size))
    device = next(model.parameters()).device
    forward = inference_function(model, fast)
    with torch.inference_mode():
        return forward(x.to(device)).float().cpu().numpy()


def inference_function(model, fast: bool = True):
    """What embed_images runs on NCHW input: the frozen copy where it applies (fast, CPU, fp32, eval mode), else
    the model itself."""
    if not (fast and fast_path_applies(model)):
        return model
    fingerprint = weights_fingerprint(model)
    cached = _frozen.get(model)
    if cached is None or cached[0] != fingerprint:
        frozen = freeze_for_inference(model)
        cached = _frozen[model] = (fingerprint, lambda x: frozen(x.contiguous(memory_format=torch.channels_last)))
    return cached[1]


def fast_path_applies(model) -> bool:
    # Freezing needs eval mode (BatchNorm on running statistics); fp16/bf16 autocast and CUDA keep the module.
    return not model.training and getattr(model, "precision", "fp32") == "fp32" and next(model.parameters()).device.type == "cpu"


def weights_fingerprint(model) -> tuple:
    """Changes whenever a weight does: in-place updates (optimizer steps, load_state_dict) bump a tensor's
    version counter, and a replaced tensor has another storage."""
    return tuple((t.data_ptr(), t._version) for t in itertools.chain(model.parameters(), model.buffers()))


def freeze_for_inference(model, onednn_layout: bool = None):
    """A frozen TorchScript copy of an eval-mode CPU model, BatchNorm folded into the convolutions before it,
    for channels_last input; the same function up to float rounding.

    onednn_layout (default: for IResNets only) also runs it in oneDNN's blocked layout with pre-packed weights:
    measured 5% faster on IResNets; slower on MobileFaceNet and ResNeXt (grouped convolutions: 8%), DenseNet (a
    reorder around each of its 58 concatenations: 19%) and ViT (its linears: 12%) (docs/bench.md).
    """
    if onednn_layout is None:
        onednn_layout = type(model) is IResNet              # ResNeXt subclasses it: not the same layers
    sample = torch.zeros(1, 3, model.input_size, model.input_size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), warnings.catch_warnings():
        # TorchScript is deprecated in favour of torch.compile, which is no faster here and takes about a
        # minute per model and batch size to compile (docs/bench.md).
        warnings.simplefilter("ignore", DeprecationWarning)
        with fused_attention(model):
            frozen = torch.jit.freeze(torch.jit.trace(model, sample, check_trace=False))
        return torch.jit.optimize_for_inference(frozen) if onednn_layout else frozen


class Embedder:
    """A backbone file's embeddings: its AOT-compiled package (aot.py) when one beside it fits, else embed_images."""

    def __init__(self, weights: str, arch: str = None, use_package: bool = True, **kwargs):
        if not arch:
            raise ValueError(f"{weights}: a torch state_dict does not record its architecture; pass --arch (e.g. r50)")
        self.model = load_backbone(weights, arch, **kwargs)
        self.package, package = None, aot.package_path(weights)
        if use_package and os.path.isfile(package):
            spec = aot.identity(arch, self.model.input_size, kwargs.get("num_features", 512), file_sha256(weights))
            self.package, reason = aot.load_package(package, spec)
            print(f"embedding with the AOT-compiled {package}" if self.package else
                  f"{reason}: not used, embedding with the default path (rewrite it: twinface export --format pt2 "
                  f"--weights {weights} --arch {arch} --input-size {self.model.input_size} --out {package} --force)",
                  file=sys.stderr)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if self.package is None:
            return embed_images(self.model, images)
        x = torch.from_numpy(to_model_input(images, "NCHW", self.model.input_size))
        with torch.inference_mode():                        # the package takes batches up to aot.MAX_BATCH
            return np.concatenate([self.package(chunk).numpy() for chunk in x.split(aot.MAX_BATCH)])
