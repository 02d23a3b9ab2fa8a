"""TFLite rows: the Keras twin's TFLite exports (fp32, fp16 weights, int8, int8 with float PReLU) run by TF Lite's
interpreter with its default XNNPACK delegate, through the embedder `twinface embed` uses for a .tflite file."""
from twinface_tf.tflite import TFLiteEmbedder, export_tflite

from .measure import images
from .shared import tflite_path
from .tf_rows import load_model

# The bench's weights are seeded, not trained, and its images noise: int8 is calibrated on a few of those (the
# speed does not depend on the calibration; docs/tflite.md measures accuracy on a trained backbone).
CALIBRATION_IMAGES = 16


def prepare(spec, _):
    """Export the files the plan's TFLite rows run, each verified; the check's cosines are the row's facts."""
    model = load_model(spec)
    facts = {}
    for quantization in spec["quantizations"]:
        integer = quantization.startswith("int8")
        calibration = images(CALIBRATION_IMAGES + 8, spec["input_size"], seed=1) if integer else None
        report = export_tflite(model, tflite_path(spec["work_dir"], spec["model"], quantization), quantization,
                               calibration=calibration, calibration_images=CALIBRATION_IMAGES, verify_images=8)
        facts[quantization] = {k: report[k] for k in ("cosine_min", "cosine_mean", "delegate_nodes", "bytes")}
    return {"tflite": facts}


def inference(runtime, spec):
    """(build, call) as torch_rows.inference: the interpreter on every core the process may use."""
    path = tflite_path(spec["work_dir"], spec["model"], runtime[len("tflite-"):])
    state = {}

    def build():
        state["embed"] = TFLiteEmbedder(path)

    def call(images):
        return lambda: state["embed"](images)

    return build, call
