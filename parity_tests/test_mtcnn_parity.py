"""MTCNN's P-, R- and O-Net: torch vs TF vs onnxruntime (the torch twin's export, fixtures.mtcnn_onnx_dir()) on
random normalised inputs and on the real photos, PNet at odd and even sizes so that ceil-mode pooling both pads
and does not; and the TF ceil-mode pooling itself against torch's."""
import numpy as np
import pytest

from twinface.detect.nets import normalise
from twinface.testing import PNET_SIZES, face_crop

TOL = 1e-5
PHOTOS = ("t1.jpg", "obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg", "32bit.png")
SHOWN = {"tf": "TF", "onnx": "onnxruntime"}
OUTPUTS = {"pnet": ("prob", "offsets"), "rnet": ("prob", "offsets"), "onet": ("prob", "offsets", "landmarks")}


@pytest.fixture(scope="module")
def runtimes():
    from twinface.detect.onnx_nets import OnnxDetectorNets
    from twinface.fixtures import mtcnn_onnx_dir
    from twinface_tf.mtcnn import TFDetectorNets
    from twinface_torch.mtcnn import TorchDetectorNets
    return TorchDetectorNets(), TFDetectorNets(), OnnxDetectorNets(mtcnn_onnx_dir())


def _photo(name):
    import cv2
    from twinface.fixtures import photo
    return cv2.cvtColor(cv2.imread(photo(name), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _crops(size):
    """A hand-placed face box, and per photo its central square and three random squares, resized to `size`."""
    import cv2
    rng, crops = np.random.default_rng(7), [face_crop(size)[0]]
    for name in PHOTOS:
        image = _photo(name)
        h, w = image.shape[:2]
        side = int(0.6 * min(h, w))
        corners = [((h - side) // 2, (w - side) // 2)] + [(rng.integers(0, h - side), rng.integers(0, w - side))
                                                          for _ in range(3)]
        crops += [cv2.resize(image[y:y + side, x:x + side], (size, size), interpolation=cv2.INTER_AREA)
                  for y, x in corners]
    return normalise(np.stack(crops))


def _pnet_inputs():
    import cv2
    rng = np.random.default_rng(3)
    yield from ((f"random {h}x{w}", rng.uniform(-1, 1, (2, h, w, 3)).astype(np.float32)) for h, w in PNET_SIZES)
    for name, (h, w) in (("t1.jpg", (240, 320)), ("obama.jpg", (181, 137))):
        resized = cv2.resize(_photo(name), (w, h), interpolation=cv2.INTER_AREA)
        yield f"{name} at {h}x{w}", normalise(resized[None])


def _stage_inputs(net, size):
    yield "random", np.random.default_rng(5).uniform(-1, 1, (8, size, size, 3)).astype(np.float32)
    yield f"{len(PHOTOS) * 4 + 1} photo crops", _crops(size)


def _check(parity, net, inputs, runtimes):
    torch_nets, tf_nets, onnx_nets = runtimes
    for what, x in inputs:
        reference = getattr(torch_nets, net)(x)
        for other in (tf_nets, onnx_nets):
            for output, a, b in zip(OUTPUTS[net], reference, getattr(other, net)(x)):
                parity.check(f"mtcnn {net} {output} torch vs {SHOWN[other.name]} ({what})", a, b, TOL)


def test_pnet_agrees(parity, runtimes):
    _check(parity, "pnet", _pnet_inputs(), runtimes)


@pytest.mark.parametrize("net,size", [("rnet", 24), ("onet", 48)])
def test_rnet_onet_agree(net, size, parity, runtimes):
    _check(parity, net, _stage_inputs(net, size), runtimes)


@pytest.mark.parametrize("kernel,stride", [(2, 2), (3, 2)])
def test_ceil_mode_pooling_tf_vs_torch(kernel, stride, parity):
    import torch
    from twinface_tf.mtcnn import CeilMaxPool2D
    x = np.random.default_rng(1).uniform(-2, -1, (2, 10, 11, 3)).astype(np.float32)
    x[:, -1, -1, :] = 5.0                       # the maximum sits in the partial last window of both axes
    expected = torch.nn.functional.max_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), kernel, stride,
                                              ceil_mode=True).permute(0, 2, 3, 1).numpy()
    assert (expected[:, -1, -1, :] == 5.0).all()
    parity.check(f"mtcnn ceil-mode max-pool {kernel}/{stride} TF vs torch (max in the partial last window)",
                 expected, CeilMaxPool2D(kernel, stride)(x).numpy(), 0.0)
