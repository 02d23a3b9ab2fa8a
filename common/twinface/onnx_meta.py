"""What every exported ONNX file records about itself, so a consumer needs no side channel.

Both twins stamp the same keys; `preprocess_*` tell how to feed the model (the model does not normalise
inside the graph, unlike MXNet-era insightface models).
"""
import numpy as np
import onnx

INPUT_NAME = "data"          # insightface's name; its tools pick graph.input[0] anyway
OUTPUT_NAME = "embedding"


def export_metadata(arch: str, framework: str, input_size: int = 112, num_features: int = 512) -> dict:
    return {
        "twinface.arch": arch,
        "twinface.framework": framework,
        "twinface.num_features": str(num_features),
        "preprocess.mean": "127.5",
        "preprocess.std": "127.5",
        "preprocess.color": "RGB",
        "preprocess.layout": "NCHW",
        "preprocess.input_size": f"{input_size}x{input_size}",
    }


def stamp_metadata(path: str, meta: dict) -> None:
    """Write `meta` into the model's metadata_props, replacing keys that already exist."""
    model = onnx.load(path)
    existing = {p.key: p for p in model.metadata_props}
    for key, value in meta.items():
        prop = existing.get(key) or model.metadata_props.add()
        prop.key, prop.value = key, str(value)
    onnx.save(model, path)


# Parameters that no inference graph computes with (ViT's mask_token, used by training-time patch masking): the
# exports keep them as initializers of their canonical name, so that importing the ONNX loses nothing.
TRAINING_ONLY = ("mask_token",)


def keep_training_only(path: str, tensors: dict) -> None:
    """Add each {canonical name: array} of TRAINING_ONLY to the ONNX file at `path` as an (unused) initializer."""
    if not tensors:
        return
    model = onnx.load(path)
    model.graph.initializer.extend(onnx.numpy_helper.from_array(np.asarray(v, np.float32), n)
                                   for n, v in tensors.items())
    onnx.save(model, path)


def read_metadata(path: str) -> dict:
    model = onnx.load(path, load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def check_against(onnx_path: str, inputs: np.ndarray, reference: np.ndarray, framework: str, path: str) -> float:
    """Run onnxruntime on NCHW `inputs` and compare with the framework's `reference` output.

    Raises past 1e-4 * max(1, max|reference|) (raw, un-normalised embeddings); returns the max abs diff.
    """
    import onnxruntime as ort
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    output = session.run([OUTPUT_NAME], {INPUT_NAME: inputs})[0]
    max_abs_diff = float(np.abs(output - reference).max())
    tolerance = 1e-4 * max(1.0, float(np.abs(reference).max()))
    print(f"onnx export {path}: max abs diff vs {framework} {max_abs_diff:.3g} (tolerance {tolerance:.3g})")
    if not max_abs_diff <= tolerance:
        raise RuntimeError(f"onnx export {path}: onnxruntime differs from {framework} by {max_abs_diff:.3g}, "
                           f"more than the tolerance {tolerance:.3g}")
    return max_abs_diff
