"""onnxruntime on each twin's ONNX export (the files the twins' `twinface export` writes)."""
import onnxruntime as ort

from twinface.data.transforms import to_model_input

from .shared import onnx_path


def inference(runtime, spec):
    path = onnx_path(spec["work_dir"], spec["model"], runtime.split("-")[1])
    state = {}

    def build():
        state["session"] = ort.InferenceSession(path, providers=["CPUExecutionProvider"])

    def call(images):
        session = state["session"]
        feed = {session.get_inputs()[0].name: to_model_input(images, "NCHW")}
        return lambda: session.run(None, feed)

    return build, call
