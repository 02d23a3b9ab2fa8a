"""MTCNN's P-, R- and O-Net (Zhang et al. 2016) in torch, with facenet-pytorch's module names so that its state
dicts load strict; the TF twin is twinface_tf/mtcnn.py, the cascade around them common/twinface/detect.

Each net takes NHWC images (the detector-nets interface, twinface.detect.nets) and returns that interface's
outputs, so the ONNX graphs exported from these modules implement the same interface with no code around them.
Two details of the original Caffe nets are kept exactly: max-pooling rounds its output size up (ceil_mode), and
the dense layers read the conv features flattened in (N, W, H, C) order, the Caffe weights' transposed layout.
"""
import os

import numpy as np
import torch
from torch import nn

from twinface.atomic import atomic_path
from twinface.detect.nets import NetsByName
from twinface.detect.weights import check_state
from twinface.fixtures import MTCNN_NETS as NETS, mtcnn_state_dicts

ONNX_TOLERANCE = 1e-5


def _conv_stack(channels, kernels, pools):
    """[conv_i, prelu_i, (pool_i)] modules named as facenet-pytorch names them; pools[i] = (kernel, stride) or
    None."""
    layers, in_channels = [], 3
    for i, (out, kernel, pool) in enumerate(zip(channels, kernels, pools), start=1):
        layers += [(f"conv{i}", nn.Conv2d(in_channels, out, kernel)), (f"prelu{i}", nn.PReLU(out))]
        if pool:
            layers.append((f"pool{i}", nn.MaxPool2d(*pool, ceil_mode=True)))
        in_channels = out
    return layers


def _flatten_caffe(x):
    """NCHW -> (N, W * H * C) in (N, W, H, C) order: the dense weights were trained on Caffe's transposed maps."""
    return x.permute(0, 3, 2, 1).flatten(1)


def _face_prob(logits, dim):
    return torch.softmax(logits, dim=dim).select(dim, 1)


class _Net(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self._trunk = [name for name, _ in layers]
        for name, module in layers:
            self.add_module(name, module)

    def features(self, images_nhwc):
        x = images_nhwc.permute(0, 3, 1, 2)
        for name in self._trunk:
            x = getattr(self, name)(x)
        return x


class PNet(_Net):
    """[N, H, W, 3] -> (prob [N, h, w], offsets [N, h, w, 4]), fully convolutional."""

    def __init__(self):
        super().__init__(_conv_stack((10, 16, 32), (3, 3, 3), ((2, 2), None, None)))
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, images):
        x = self.features(images)
        return _face_prob(self.conv4_1(x), 1), self.conv4_2(x).permute(0, 2, 3, 1)


class RNet(_Net):
    """[N, 24, 24, 3] -> (prob [N], offsets [N, 4])."""

    def __init__(self):
        super().__init__(_conv_stack((28, 48, 64), (3, 3, 2), ((3, 2), (3, 2), None)))
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, crops):
        x = self.prelu4(self.dense4(_flatten_caffe(self.features(crops))))
        return _face_prob(self.dense5_1(x), 1), self.dense5_2(x)


class ONet(_Net):
    """[N, 48, 48, 3] -> (prob [N], offsets [N, 4], landmarks [N, 10])."""

    def __init__(self):
        super().__init__(_conv_stack((32, 64, 64, 128), (3, 3, 3, 2), ((3, 2), (3, 2), (2, 2), None)))
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, crops):
        x = self.prelu5(self.dense5(_flatten_caffe(self.features(crops))))
        return _face_prob(self.dense6_1(x), 1), self.dense6_2(x), self.dense6_3(x)


CLASSES = {"pnet": PNet, "rnet": RNet, "onet": ONet}


def read_state_dict(path: str) -> dict:
    """{tensor name: float32 array} of a .pt state dict, read tensors-only (weights_only=True)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {name: tensor.numpy().astype(np.float32) for name, tensor in state.items()}


def load_nets(state_dicts: dict = None) -> dict:
    """{"pnet": PNet, ...} in eval mode holding `state_dicts` ({net: {tensor: array}}, torch layout; default the
    facenet-pytorch fixtures)."""
    if state_dicts is None:
        state_dicts = mtcnn_state_dicts()
    nets = {}
    for name in NETS:
        net = CLASSES[name]()
        state = state_dicts[name]
        check_state({k: v.shape for k, v in net.state_dict().items()}, state, f"mtcnn {name}")
        net.load_state_dict({k: torch.as_tensor(np.asarray(v, np.float32)) for k, v in state.items()}, strict=True)
        nets[name] = net.eval()
    return nets


def _numpy(outputs) -> tuple:
    return tuple(out.numpy() for out in outputs)


class TorchDetectorNets(NetsByName):
    """The detector-nets interface (twinface.detect.nets) over the torch twin, numpy in and out."""
    name = "torch"

    def __init__(self, state_dicts: dict = None):
        self.nets = load_nets(state_dicts)

    def _run(self, name, x):
        with torch.inference_mode():
            return _numpy(self.nets[name](torch.from_numpy(np.ascontiguousarray(x, np.float32))))


# --- ONNX ---------------------------------------------------------------------------------------------------
INPUT = "images"
OUTPUTS = {"pnet": ("prob", "offsets"), "rnet": ("prob", "offsets"), "onet": ("prob", "offsets", "landmarks")}
# Inputs each export is checked on: PNet at odd and even sizes (ceil-mode pooling pads one row/column or none).
_CHECK_SHAPES = {"pnet": ((2, 12, 12, 3), (1, 13, 17, 3), (3, 37, 50, 3)), "rnet": ((5, 24, 24, 3),),
                 "onet": ((5, 48, 48, 3),)}


def _dynamic_axes(name):
    spatial = {1: "height", 2: "width"} if name == "pnet" else {}
    return {key: {0: "batch", **(spatial if key in (INPUT, "prob", "offsets") else {})}
            for key in (INPUT, *OUTPUTS[name])}


def export_onnx(out_dir: str, state_dicts: dict = None, opset: int = 17) -> dict:
    """Write pnet.onnx, rnet.onnx and onet.onnx (NHWC in, the interface's outputs; dynamic batch, and height and
    width for PNet) into `out_dir`; each is checked against torch with onnxruntime before it appears (atomic), and
    refused past ONNX_TOLERANCE. Returns {net: max abs diff}."""
    import onnxruntime as ort
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    diffs = {}
    for name, net in load_nets(state_dicts).items():
        path = os.path.join(out_dir, f"{name}.onnx")
        samples = [rng.uniform(-1, 1, shape).astype(np.float32) for shape in _CHECK_SHAPES[name]]
        with atomic_path(path, suffix=".onnx") as tmp, torch.no_grad():
            torch.onnx.export(net, (torch.from_numpy(samples[0]),), tmp, dynamo=False, opset_version=opset,
                              input_names=[INPUT], output_names=list(OUTPUTS[name]), dynamic_axes=_dynamic_axes(name))
            session = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
            diffs[name] = max(float(np.abs(ours - theirs).max())
                              for x in samples
                              for ours, theirs in zip(session.run(None, {INPUT: x}), _numpy(net(torch.from_numpy(x)))))
            print(f"onnx export {path}: max abs diff vs torch {diffs[name]:.3g}")
            if not diffs[name] <= ONNX_TOLERANCE:
                raise RuntimeError(f"onnx export {path}: onnxruntime differs from torch by {diffs[name]:.3g}, more "
                                   f"than {ONNX_TOLERANCE:g}; the file was not written")
    return diffs
