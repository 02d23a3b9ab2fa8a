"""ONNX export of a Keras backbone via tf2onnx: input "data" NCHW [batch, 3, S, S], output "embedding".

tf2onnx folds every BatchNorm and decomposes PReLU (docs/design.md), so this file serves inference only; weights
travel between the twins through the torch-side, name-faithful export.
"""
import contextlib
import logging
import os

import numpy as np
import onnx
import tensorflow as tf
import tf2onnx

from twinface.atomic import atomic_path
from twinface.onnx_meta import (INPUT_NAME, OUTPUT_NAME, TRAINING_ONLY, check_against, export_metadata,
                                keep_training_only, stamp_metadata)


def export_onnx(model, path, arch, input_size=112, opset=17, verify=True):
    """Write `model` (inference mode) to `path`; return max |onnxruntime - Keras| on a random batch of 3
    (NaN when verify=False).

    The file appears only once complete (and verified when verify=True): written beside `path`, then moved.
    """
    logging.getLogger("tf2onnx").setLevel(logging.WARNING)
    signature = [tf.TensorSpec([None, 3, input_size, input_size], tf.float32, name=INPUT_NAME)]

    @tf.function(input_signature=signature)
    def nchw_model(data):
        # ONNX consumers (insightface's tools among them) feed NCHW; the Keras twin is NHWC.
        return {OUTPUT_NAME: model(tf.transpose(data, [0, 2, 3, 1]), training=False)}

    with atomic_path(path, suffix=".onnx") as tmp_path:
        onnx_model = convert_lean(nchw_model, signature, opset)
        for value in (*onnx_model.graph.input, *onnx_model.graph.output):
            value.type.tensor_type.shape.dim[0].dim_param = "batch"    # tf2onnx names it "unk__<n>"
        onnx.save(onnx_model, tmp_path)
        keep_training_only(tmp_path, {layer.name: layer.weights[0].numpy() for layer in model.layers
                                      if layer.name in TRAINING_ONLY})
        stamp_metadata(tmp_path, export_metadata(arch, "tf", input_size, model.output_shape[-1]))
        max_abs_diff = verify_onnx(tmp_path, model, input_size, path) if verify else float("nan")
    return max_abs_diff


def convert_lean(function, signature, opset):
    """tf2onnx's conversion without its safety copies, and with them only if an optimiser fails.

    By default tf2onnx deep-copies the whole graph, weights included, before each of its optimisers so that it
    can drop one that raises; that doubles an export's peak memory (measured: IResNet-34 10.2 -> 5.9 GB,
    IResNet-50 11.8 -> 7.3 GB). Its switch is the presence of TF2ONNX_CATCH_ERRORS in the environment (any
    value turns the copies off, a quirk of tf2onnx 1.17), so it is set for the first attempt only.
    """
    try:
        with _catch_errors_variable("FALSE"):
            return tf2onnx.convert.from_function(function, input_signature=signature, opset=opset)[0]
    except Exception as error:  # noqa: BLE001 - any optimiser fault: the careful (copying) mode decides
        logging.getLogger(__name__).warning("tf2onnx without graph copies failed (%s); converting again with them",
                                            error)
    with _catch_errors_variable(None):
        return tf2onnx.convert.from_function(function, input_signature=signature, opset=opset)[0]


@contextlib.contextmanager
def _catch_errors_variable(value):
    """TF2ONNX_CATCH_ERRORS set to `value` (None: unset) for the block, the caller's setting restored after."""
    key = "TF2ONNX_CATCH_ERRORS"
    saved = os.environ.pop(key, None)
    if value is not None:
        os.environ[key] = value
    try:
        yield
    finally:
        os.environ.pop(key, None)
        if saved is not None:
            os.environ[key] = saved


def verify_onnx(onnx_path, model, input_size, path):
    """onnxruntime vs Keras on one random batch of 3; raises past tolerance, else returns the max abs diff."""
    sample = np.random.default_rng(0).uniform(-1, 1, (3, 3, input_size, input_size)).astype(np.float32)
    reference = np.asarray(model(sample.transpose(0, 2, 3, 1), training=False), dtype=np.float32)
    return check_against(onnx_path, sample, reference, "tf", path)
