"""What every exported ONNX file records about itself, so a consumer needs no side channel.

Both twins stamp the same keys; `preprocess_*` tell how to feed the model (the model does not normalise
inside the graph, unlike MXNet-era insightface models).
"""
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


def read_metadata(path: str) -> dict:
    model = onnx.load(path, load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}
