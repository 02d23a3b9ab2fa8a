"""The TF twin's rows: its inference runtimes and its training step, on the bench's shared weights."""
import numpy as np
import tensorflow as tf

from twinface.data.transforms import to_model_input
from twinface_convert.mapping import torch_to_keras
from twinface_tf.backbones import get_model
from twinface_tf.embed import embed_images
from twinface_tf.export import export_onnx
from twinface_tf.train import TFTwin

from .shared import onnx_path, train_config, weights_path


def load_model(spec, precision=None):
    """The Keras twin holding the torch twin's weights (same model, same numbers)."""
    model = get_model(spec["model"], num_features=spec["num_features"], input_size=spec["input_size"],
                      precision=precision)
    path = weights_path(spec["work_dir"], spec["model"])
    with np.load(path) as saved:
        torch_to_keras({k: saved[k] for k in saved.files}, model, source=path)
    return model


def prepare(spec, images):
    """tf2onnx export of the Keras twin, for the onnxruntime row."""
    export_onnx(load_model(spec), onnx_path(spec["work_dir"], spec["model"], "tf"), spec["model"],
                input_size=spec["input_size"])
    return {"threads": {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                        "inter_op": tf.config.threading.get_inter_op_parallelism_threads()}}


def inference(runtime, spec):
    """(build, call) as torch_rows.inference; every call fetches the result to numpy, as a user would."""
    model = load_model(spec, precision="bf16" if runtime.endswith("-bf16") else None)
    state = {}

    def build():
        if runtime == "tf-function":
            state["forward"] = tf.function(lambda x: model(x, training=False))
        elif runtime == "tf-xla":
            state["forward"] = tf.function(lambda x: model(x, training=False), jit_compile=True)
        else:
            state["forward"] = lambda x: model(x, training=False)

    def call(images):
        if runtime.startswith("tf-embed"):                  # also tf-embed-eigen / -avx2: other kernels
            return lambda: embed_images(model, images)
        x = tf.constant(to_model_input(images, "NHWC"))
        return lambda: state["forward"](x).numpy()

    return build, call


def training(spec, images, labels):
    """One call = one step of the real adapter (TFTwin.train_step): what training gets, minus data loading."""
    twin = TFTwin()
    twin.build(train_config(spec), spec["classes"])
    return lambda: twin.train_step(images, labels, 0.01, 0.01)
