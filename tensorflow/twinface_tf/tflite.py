"""TFLite export of a Keras backbone (fp32; fp16 weights; int8 weights and activations) and the embedder that runs
such a file (tf.lite.Interpreter with its default XNNPACK delegate). docs/tflite.md has the measured numbers.

The file takes what the twin's embed path takes: NHWC float32 [batch, S, S, 3] normalised as to_model_input does,
dynamic batch; it returns the raw float32 embedding. int8 keeps that float32 interface (the converter adds a
QUANTIZE at the input and a DEQUANTIZE at the output), so one embedder serves the three files.
"""
import contextlib
import os
import warnings

import numpy as np
import tensorflow as tf
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

from twinface.atomic import atomic_path, writing
from twinface.data.transforms import to_model_input

# int8: weights and activations, every op (what int8-only accelerators need); int8-float-prelu: the same but PReLU
# in float between a DEQUANTIZE and a QUANTIZE, which XNNPACK runs 3-4x faster on x86 (docs/tflite.md)
QUANTIZATIONS = ("fp32", "fp16", "int8", "int8-float-prelu")
MIN_COSINE = {"fp32": 0.9999, "fp16": 0.999}      # per image, against the Keras twin; int8 is measured, not bounded
CALIBRATION_IMAGES = 256
VERIFY_IMAGES = 64


def export_tflite(model, out_path, quantization="fp32", calibration=None, calibration_images=CALIBRATION_IMAGES,
                  verify_images=VERIFY_IMAGES, seed=0) -> dict:
    """Convert `model` to `out_path` and verify it; return what the check measured.

    `calibration` is a data set (open_dataset: .rec, TFRecord, folder) of real face images, or such images as a
    uint8 NHWC array. int8 needs it: a seeded sample of `calibration_images` is its representative set. The
    verification batch is `verify_images` others of the same sample; without data (fp32 / fp16 only) it is seeded
    noise images. The file appears only
    once it passed (MIN_COSINE, the lowest cosine of the batch); otherwise nothing is left at `out_path`.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r}: expected one of {', '.join(QUANTIZATIONS)}")
    integer = quantization.startswith("int8")
    if integer and calibration is None:
        raise ValueError(f"{quantization} quantization needs calibration data (--calibration: a .rec, TFRecord or "
                         "image folder)")
    size = model.inputs[0].shape[1]
    if calibration is None:
        check = np.random.default_rng(seed).integers(0, 256, (verify_images, size, size, 3), dtype=np.uint8)
        check_source, representative = f"{verify_images} seeded noise images", None
    else:
        check, representative = sample_images(calibration, verify_images, calibration_images, seed)
        check_source = f"{len(check)} images of {_name(calibration)}"
    check = to_model_input(check, "NHWC", size)
    content = _convert(model, size, quantization, representative if integer else None)
    with atomic_path(out_path, suffix=".tflite") as tmp:
        with writing(out_path), open(tmp, "wb") as f:
            f.write(content)
        report = verify_tflite(tmp, model, check, quantization, out_path)
    calibrated_on = f"{len(representative)} images of {_name(calibration)}" if integer else None
    report.update(verified_on=check_source, calibrated_on=calibrated_on, bytes=len(content))
    return report


def sample_images(data, verify_images, calibration_images, seed=0):
    """(verification images, calibration images): disjoint, seeded, uint8 NHWC, from the data set at `data` (or
    from `data` itself, uint8 images [N, H, W, 3]). A set too small for both keeps half of it (at most
    verify_images) for the check."""
    if isinstance(data, np.ndarray):
        count, image = len(data), data.__getitem__
    else:
        from twinface.data.dataset import open_dataset
        dataset = open_dataset(data)
        count, image = len(dataset), dataset.image
    if count < 2:
        raise ValueError(f"{_name(data)}: {count} image(s); calibration and the check need at least 2")
    order = np.random.default_rng(seed).permutation(count)
    n_check = min(verify_images, count // 2)
    pick = [order[:n_check], order[n_check:n_check + calibration_images]]
    return tuple(np.stack([image(int(i)) for i in indices]) for indices in pick)


def _name(data) -> str:
    return f"{len(data)} given images" if isinstance(data, np.ndarray) else str(data)


def _convert(model, size, quantization, representative) -> bytes:
    # Keras 3 variables are not frozen by TFLiteConverter.from_concrete_functions (the file would hold
    # READ_VARIABLE ops, unfolded BatchNorm and, run, NaN): freeze them into constants first.
    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="data")], autograph=False)
    def forward(data):
        return model(data, training=False)

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [convert_variables_to_constants_v2(forward.get_concrete_function())])
    if quantization != "fp32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantization == "fp16":
        converter.target_spec.supported_types = [tf.float16]
    if representative is not None:
        calibration = to_model_input(representative, "NHWC", size)
        converter.representative_dataset = lambda: ([calibration[i:i + 1]] for i in range(len(calibration)))
    if quantization == "int8":
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]   # no float fallback op
    with _quiet():
        if quantization != "int8-float-prelu":
            return converter.convert()
        # TF's selective quantization: every op int8 but PRELU, which XNNPACK takes in float only (its PReLU
        # visitor checks for a float input), so the graph stays in two delegate partitions, as fp32, instead of 35.
        options = tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=["PRELU"])
        return tf.lite.experimental.QuantizationDebugger(
            converter=converter, debug_dataset=converter.representative_dataset,
            debug_options=options).get_nondebug_quantized_model()


@contextlib.contextmanager
def _quiet():
    """Without TF Lite's warnings that tell a user nothing: tf.lite.Interpreter's deprecation notice (on every
    interpreter; its successor, ai_edge_litert, is not a dependency) and the converter's "Statistics for quantized
    inputs were expected" (int8 keeps a float input on purpose)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"\s*Warning: tf.lite.Interpreter is deprecated", UserWarning)
        warnings.filterwarnings("ignore", "Statistics for quantized inputs", UserWarning)
        yield


def verify_tflite(path, model, inputs, quantization, out_path) -> dict:
    """The file at `path` against the Keras twin on NHWC float `inputs`: per-image cosine of the raw embeddings.
    Raises below MIN_COSINE[quantization] (int8: reported only)."""
    reference = np.asarray(model(inputs, training=False), np.float64)
    runner = TFLiteEmbedder(path)
    got = runner.run(inputs).astype(np.float64)
    cosine = (got * reference).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1))
    report = {"quantization": quantization, "cosine_min": float(cosine.min()), "cosine_mean": float(cosine.mean()),
              "delegate_nodes": runner.delegate_nodes}
    bound = MIN_COSINE.get(quantization)
    if bound is not None and not report["cosine_min"] >= bound:
        raise RuntimeError(f"tflite export {out_path}: {quantization} file's embeddings reach cosine "
                           f"{report['cosine_min']:.6f} with the Keras twin's, below the required {bound}")
    return report


class TFLiteEmbedder:
    """A .tflite backbone: uint8 RGB NHWC images in, float32 [N, D] out. The batch is resized to each call's
    (the exports have a dynamic batch); a file with a fixed batch of 1 runs image by image."""

    def __init__(self, path: str, threads: int = None, delegates: bool = True):
        resolver = tf.lite.experimental.OpResolverType
        with _quiet():
            self.interpreter = tf.lite.Interpreter(
                model_path=path, num_threads=threads or len(os.sched_getaffinity(0)),
                experimental_op_resolver_type=resolver.AUTO if delegates else
                resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        inputs, outputs = self.interpreter.get_input_details(), self.interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(f"{path}: expected one input and one output, got {len(inputs)} and {len(outputs)}")
        signature, dtype = inputs[0]["shape_signature"].tolist(), inputs[0]["dtype"]
        if len(signature) != 4 or signature[3] != 3 or signature[1] != signature[2] or dtype != np.float32 \
                or signature[0] not in (-1, 1):
            raise ValueError(f"{path}: input {inputs[0]['name']!r} is {dtype.__name__} {signature}; expected float32 "
                             f"[batch, S, S, 3] (NHWC, batch dynamic or 1), as twinface export --format tflite writes")
        self.input, self.output = inputs[0]["index"], outputs[0]["index"]
        self.size, self.dynamic = int(signature[1]), signature[0] == -1
        self.interpreter.allocate_tensors()
        self.batch = 1

    @property
    def delegate_nodes(self) -> int:
        """Nodes a delegate (XNNPACK, TF Lite's default CPU delegate) took over; 0 when none applied."""
        return sum(op["op_name"] == "DELEGATE" for op in self.interpreter._get_ops_details())

    def run(self, x: np.ndarray) -> np.ndarray:
        """NHWC float32 model input -> raw embeddings."""
        if not self.dynamic:
            return np.concatenate([self._invoke(x[i:i + 1]) for i in range(len(x))])
        if len(x) != self.batch:
            self.interpreter.resize_tensor_input(self.input, list(x.shape), strict=True)
            self.interpreter.allocate_tensors()
            self.batch = len(x)
        return self._invoke(x)

    def _invoke(self, x):
        self.interpreter.set_tensor(self.input, np.ascontiguousarray(x, np.float32))
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output).copy()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.run(to_model_input(images, "NHWC", self.size))
