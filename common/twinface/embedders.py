"""Turn a weights file into `embed(images_uint8_nhwc) -> float32 [N, D]`, whatever framework made it.

ONNX runs here through onnxruntime (framework-neutral); torch and TF weights, and TFLite files (TF's interpreter),
load their twin lazily, so `twinface eval` on an ONNX file never imports a deep-learning framework.
"""
import os

import numpy as np

from .data.transforms import to_model_input

FRAMEWORK_BY_SUFFIX = {".onnx": "onnx", ".pth": "torch", ".pt": "torch", ".h5": "tf", ".keras": "tf",
                       ".tflite": "tflite"}
ACCEPTED = "an .onnx file, a .tflite file, torch .pth/.pt weights or Keras .weights.h5 weights"
FRAMEWORKS = ("torch", "tf", "onnx", "tflite")


def package_path(weights: str) -> str:
    """Where the torch twin's AOT-compiled package of `weights` lives: STEM.pt2 beside STEM.pth."""
    return os.path.splitext(weights)[0] + ".pt2"


def detect_framework(weights: str, framework: str = None) -> str:
    if os.path.isdir(weights):
        # A TensorFlow SavedModel is a program as much as weights (its graph can read and write files), so
        # only `twinface convert` reads one, and only one twinface wrote.
        what = "a TensorFlow SavedModel" if os.path.exists(os.path.join(weights, "saved_model.pb")) else "a directory"
        raise ValueError(f"{weights}: {what}, not a weights file; this command loads {ACCEPTED}. Convert a "
                         f"SavedModel first: twinface convert {weights} model.onnx (see twinface convert --help)")
    if framework:
        return framework
    suffix = os.path.splitext(weights)[1].lower()
    if suffix not in FRAMEWORK_BY_SUFFIX:
        raise ValueError(f"{weights}: cannot tell the framework from the extension {suffix!r}; "
                         f"known: {', '.join(sorted(FRAMEWORK_BY_SUFFIX))} (or pass --framework torch|tf|onnx|tflite)")
    return FRAMEWORK_BY_SUFFIX[suffix]


class OnnxEmbedder:
    """onnxruntime over an NCHW float model, e.g. our exports or insightface's model-zoo R50."""

    def __init__(self, path: str, threads: int = 0):
        import onnxruntime as ort
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        size = model_input.shape[-1]
        self.size = size if isinstance(size, int) else None       # a dynamic size takes images as they come

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: to_model_input(images, "NCHW", self.size)})[0]


def load_embedder(weights: str, framework: str = None, arch: str = None, **model_kwargs):
    """model_kwargs (input_size, num_features) describe torch/TF weights; an ONNX or TFLite file describes itself."""
    framework = detect_framework(weights, framework)
    if framework == "onnx":
        return OnnxEmbedder(weights)
    if framework == "tflite":
        from twinface_tf.tflite import TFLiteEmbedder
        return TFLiteEmbedder(weights)
    if framework == "torch":
        from twinface_torch.embed import Embedder
    elif framework == "tf":
        from twinface_tf.embed import Embedder
    else:
        raise ValueError(f"unknown framework {framework!r}; expected {', '.join(FRAMEWORKS)}")
    return Embedder(weights, arch=arch, **model_kwargs)
