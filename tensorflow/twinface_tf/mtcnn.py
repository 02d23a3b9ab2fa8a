"""MTCNN's P-, R- and O-Net in Keras, the twin of twinface_torch/mtcnn.py: same layer names (so the torch state
dicts map by name through twinface_convert.mapping), same NHWC interface (twinface.detect.nets).

Two details of the original nets that Keras has no flag for are built explicitly:
- max-pooling with ceil_mode: CeilMaxPool2D pads the bottom and right with -inf up to the size torch's ceil mode
  reaches, computed from the runtime shape (PNet takes any H, W), then pools "valid";
- the dense layers read the conv features in (N, W, H, C) order (the Caffe weights' transposed layout): a Permute
  of H and W before Flatten, in the graph, so the dense weights keep torch's layout up to the usual transpose.
"""
import keras
import numpy as np
import tensorflow as tf

from twinface.detect.nets import NetsByName
from twinface.detect.weights import check_state
from twinface.fixtures import MTCNN_NETS as NETS, mtcnn_state_dicts
from twinface_convert.mapping import keras_to_torch, torch_to_keras
from twinface_tf.layers import prelu


class CeilMaxPool2D(keras.layers.Layer):
    """torch.nn.MaxPool2d(kernel, stride, ceil_mode=True) without padding, NHWC, for any input size."""

    def __init__(self, kernel, stride, **kwargs):
        super().__init__(**kwargs)
        self.kernel, self.stride = kernel, stride

    def call(self, x):
        # ceil mode's output size is ceil((n - k) / s) + 1: the last window may run past the end by
        # (s - (n - k) % s) % s; with k >= s it always starts inside, so -inf padding never wins a window.
        shape = tf.shape(x)
        pad = [(self.stride - (shape[i] - self.kernel) % self.stride) % self.stride for i in (1, 2)]
        x = tf.pad(x, [[0, 0], [0, pad[0]], [0, pad[1]], [0, 0]], constant_values=-np.inf)
        return tf.nn.max_pool2d(x, self.kernel, self.stride, "VALID")

    def compute_output_shape(self, input_shape):
        n, h, w, c = input_shape
        size = [None if d is None else -(-(d - self.kernel) // self.stride) + 1 for d in (h, w)]
        return (n, *size, c)

    def get_config(self):
        return {**super().get_config(), "kernel": self.kernel, "stride": self.stride}


def _conv_stack(x, channels, kernels, pools):
    for i, (out, kernel, pool) in enumerate(zip(channels, kernels, pools), start=1):
        x = keras.layers.Conv2D(out, kernel, name=f"conv{i}")(x)
        x = prelu(f"prelu{i}")(x)
        if pool:
            x = CeilMaxPool2D(*pool, name=f"pool{i}")(x)
    return x


def _flatten_caffe(x):
    return keras.layers.Flatten()(keras.layers.Permute((2, 1, 3))(x))


def _dense_prelu(x, units, i):
    return keras.layers.PReLU(name=f"prelu{i}")(keras.layers.Dense(units, name=f"dense{i}")(x))


def _face_prob(logits):
    return keras.ops.softmax(logits, axis=-1)[..., 1]


def pnet():
    images = keras.Input((None, None, 3))
    x = _conv_stack(images, (10, 16, 32), (3, 3, 3), ((2, 2), None, None))
    prob = _face_prob(keras.layers.Conv2D(2, 1, name="conv4_1")(x))
    return keras.Model(images, [prob, keras.layers.Conv2D(4, 1, name="conv4_2")(x)], name="pnet")


def rnet():
    crops = keras.Input((24, 24, 3))
    x = _conv_stack(crops, (28, 48, 64), (3, 3, 2), ((3, 2), (3, 2), None))
    x = _dense_prelu(_flatten_caffe(x), 128, 4)
    prob = _face_prob(keras.layers.Dense(2, name="dense5_1")(x))
    return keras.Model(crops, [prob, keras.layers.Dense(4, name="dense5_2")(x)], name="rnet")


def onet():
    crops = keras.Input((48, 48, 3))
    x = _conv_stack(crops, (32, 64, 64, 128), (3, 3, 3, 2), ((3, 2), (3, 2), (2, 2), None))
    x = _dense_prelu(_flatten_caffe(x), 256, 5)
    prob = _face_prob(keras.layers.Dense(2, name="dense6_1")(x))
    heads = [keras.layers.Dense(units, name=f"dense6_{i}")(x) for i, units in ((2, 4), (3, 10))]
    return keras.Model(crops, [prob, *heads], name="onet")


BUILDERS = {"pnet": pnet, "rnet": rnet, "onet": onet}


def load_nets(state_dicts: dict = None) -> dict:
    """{"pnet": Keras model, ...} holding `state_dicts` ({net: {tensor: array}}, torch names and layout; default
    the facenet-pytorch fixtures)."""
    state_dicts = mtcnn_state_dicts() if state_dicts is None else state_dicts
    nets = {}
    for name in NETS:
        model, source = BUILDERS[name](), f"mtcnn {name}"
        check_state({k: v.shape for k, v in keras_to_torch(model).items()}, state_dicts[name], source)
        torch_to_keras(state_dicts[name], model, source=source)
        nets[name] = model
    return nets


class TFDetectorNets(NetsByName):
    """The detector-nets interface over the TF twin. One tf.function per net with the batch (and PNet's height and
    width) left open, so an image pyramid runs one trace, not one per scale."""
    name = "tf"

    def __init__(self, state_dicts: dict = None):
        self.nets = load_nets(state_dicts)
        sizes = {"pnet": None, "rnet": 24, "onet": 48}
        self._calls = {name: tf.function(lambda x, model=model: model(x, training=False), input_signature=[
            tf.TensorSpec([None, sizes[name], sizes[name], 3], tf.float32)]) for name, model in self.nets.items()}

    def _run(self, name, x):
        return tuple(out.numpy() for out in self._calls[name](np.ascontiguousarray(x, np.float32)))
