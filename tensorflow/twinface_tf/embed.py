"""Embeddings from a Keras backbone file: uint8 RGB NHWC images in, float32 [N, D] out.

embed_images runs a traced tf.function of the model (several times faster than eager Keras calls, and the
fastest TF path measured by `twinface bench`, docs/bench.md), traced once per model; it reads the variables
at each call, so training may keep updating them. fast=False calls the model eagerly.
"""
import weakref

import numpy as np
import tensorflow as tf

from twinface.data.transforms import to_model_input

from .checkpoint import load_backbone

_traced = weakref.WeakKeyDictionary()      # model -> tf.function; dies with the model


def embed_images(model, images: np.ndarray, fast: bool = True) -> np.ndarray:
    x = tf.constant(to_model_input(images, "NHWC", model.inputs[0].shape[1]))
    return np.asarray(inference_function(model, fast)(x), dtype=np.float32)


def inference_function(model, fast: bool = True):
    """What embed_images runs: the model's tf.function (fast), else an eager inference-mode call."""
    if not fast:
        return lambda x: model(x, training=False)
    if model not in _traced:
        # The function must not keep its model alive: a weak reference, and no autograph (nothing to convert
        # here, and its conversion attempt holds on to the calling frames, the model among their locals).
        ref = weakref.ref(model)
        _traced[model] = tf.function(lambda x: ref()(x, training=False), reduce_retracing=True, autograph=False)
    return _traced[model]


class Embedder:
    def __init__(self, weights: str, arch: str = None, **kwargs):
        if not arch:
            raise ValueError(f"{weights}: pass --arch (e.g. r50) for Keras weights")
        self.model = load_backbone(weights, arch, **kwargs)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return embed_images(self.model, images)
