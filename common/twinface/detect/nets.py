"""What the cascade asks of a detector runtime: the three MTCNN nets, numpy in and out.

The torch twin (twinface_torch.mtcnn), the TF twin (twinface_tf.mtcnn) and onnxruntime (detect.onnx_nets) each
implement it; everything else (pyramid, thresholds, NMS, box regression, landmarks) is cascade.py, written once.

Inputs are float32 NHWC RGB, already normalised as the weights expect ((pixel - 127.5) / 128). Offsets are the
box regression (dx1, dy1, dx2, dy2) in units of the box side; landmarks are (x1..x5, y1..y5) in units of the box
side, as the nets output them (left eye, right eye, nose, left and right mouth corner).
"""
from typing import Protocol

import numpy as np

NORM_MEAN, NORM_SCALE = 127.5, 1.0 / 128.0


def normalise(images_uint8: np.ndarray) -> np.ndarray:
    return (np.asarray(images_uint8, np.float32) - NORM_MEAN) * NORM_SCALE


class DetectorNets(Protocol):
    name: str          # "torch", "tf" or "onnx", for reports

    def pnet(self, images: np.ndarray) -> tuple:
        """[N, H, W, 3] -> (face probability [N, h, w], offsets [N, h, w, 4]); h = ceil((H - 2) / 2) - 4, same
        for w: one cell per 12x12 window at stride 2."""

    def rnet(self, crops: np.ndarray) -> tuple:
        """[N, 24, 24, 3] -> (face probability [N], offsets [N, 4])."""

    def onet(self, crops: np.ndarray) -> tuple:
        """[N, 48, 48, 3] -> (face probability [N], offsets [N, 4], landmarks [N, 10])."""


class NetsByName:
    """The interface for a runtime that runs a net by name: subclasses give `name` and `_run(net, x)`."""
    name = None

    def _run(self, net: str, x: np.ndarray) -> tuple:
        raise NotImplementedError

    def pnet(self, images):
        return self._run("pnet", images)

    def rnet(self, crops):
        return self._run("rnet", crops)

    def onet(self, crops):
        return self._run("onet", crops)
