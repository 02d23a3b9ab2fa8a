"""Embeddings from a Keras backbone file: uint8 RGB NHWC images in, float32 [N, D] out."""
import numpy as np
import tensorflow as tf

from twinface.data.transforms import to_model_input

from .checkpoint import load_backbone

_compiled = {}


def embed_images(model, images: np.ndarray) -> np.ndarray:
    # One traced inference function per model: eager Keras calls are several times slower.
    fn = _compiled.get(id(model))
    if fn is None or fn[0] is not model:
        fn = _compiled[id(model)] = (model, tf.function(lambda x: model(x, training=False), reduce_retracing=True))
    x = to_model_input(images, "NHWC", model.inputs[0].shape[1])
    return fn[1](tf.constant(x)).numpy().astype(np.float32)


class Embedder:
    def __init__(self, weights: str, arch: str = None, **kwargs):
        if not arch:
            raise ValueError(f"{weights}: pass --arch (e.g. r50) for Keras weights")
        self.model = load_backbone(weights, arch, **kwargs)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return embed_images(self.model, images)
