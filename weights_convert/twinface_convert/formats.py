"""Each weights format: recognise it, read it into canonical tensors, write it, and run it for verification.

Canonical tensors are the torch state_dict (names and layouts) as float32 numpy arrays; num_batches_tracked
is left out (a counter, not a weight; torch files get it back as 0).
Sources are recognised by content (the extension only breaks ties); targets by extension.
"""
import json
import os
import re
import tempfile
import zipfile
from dataclasses import dataclass, field

import numpy as np

from twinface.data.transforms import to_model_input
from twinface.onnx_meta import INPUT_NAME, OUTPUT_NAME, export_metadata

from .arch import Backbone, check_fits, infer_named, infer_unnamed

SUPPORTED = {
    "torch": "PyTorch .pth/.pt: a state_dict (arcface_torch's backbone.pth too) or a training checkpoint "
             "with a 'backbone' entry",
    "safetensors": "safetensors .safetensors (needs the safetensors package)",
    "keras": "Keras weights .weights.h5",
    "savedmodel": "TensorFlow SavedModel directory (no extension) written by twinface convert; its serving "
                  "signature takes 'data' NHWC float32 [N, S, S, 3], normalised (x - 127.5) / 127.5",
    "onnx": "ONNX .onnx: twinface's exports, arcface_torch's torch2onnx.py, insightface model-zoo IResNets, "
            "tf2onnx exports of the TF twin",
}
METADATA_ASSET = "twinface.json"          # a SavedModel's record of what it holds (assets/twinface.json)
SAFETENSORS_MAX_HEADER = 100 * 2 ** 20    # the safetensors library's own limit


def supported() -> str:
    return "; ".join(SUPPORTED.values())


@dataclass
class Checkpoint:
    state: dict                           # canonical name -> float32 array
    backbone: Backbone
    description: str                      # what the source turned out to be
    folded: list = field(default_factory=list)   # BatchNorms whose running statistics the source had folded away


# --- recognising ----------------------------------------------------------------------------------------------
def source_format(path: str) -> str:
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "saved_model.pb")):
            return "savedmodel"
        raise ValueError(f"{path}: a directory without saved_model.pb is no weights format; supported: {supported()}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"{path}: an empty file (0 bytes) holds no weights")
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        if not path.endswith(".weights.h5"):
            raise ValueError(f"{path}: an HDF5 file not named *.weights.h5; Keras 3 reads weights only from "
                             f"files named so (legacy Keras 2 .h5 models are not supported)")
        return "keras"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile as err:
            raise ValueError(f"{path}: a damaged or truncated zip archive ({err}); torch saves .pth files as "
                             "zip archives") from None
        if any(n.endswith("data.pkl") for n in names):
            return "torch"
        if names and all(n.endswith(".npy") for n in names):
            raise ValueError(f"{path}: a numpy .npz archive, which is no weights format; save the torch "
                             f"state_dict (.pth) or safetensors instead. Supported: {supported()}")
        if "model.weights.h5" in names:
            raise ValueError(f"{path}: a whole Keras model (.keras); save its weights with "
                             f"model.save_weights('backbone.weights.h5') and convert that")
    elif head[:1] == b"\x80" and path.endswith((".pth", ".pt")):    # torch's legacy (pre-zip) pickle format
        return "torch"
    elif len(head) > 8 and head[8:9] == b"{":
        header_size = int.from_bytes(head[:8], "little")
        if header_size > min(size - 8, SAFETENSORS_MAX_HEADER):
            raise ValueError(f"{path}: a safetensors header of {header_size} bytes is claimed, but the file has "
                             f"{size} bytes (and headers are at most {SAFETENSORS_MAX_HEADER >> 20} MiB)")
        return "safetensors"
    elif path.endswith(".onnx") or head[:1] == b"\x08":        # protobuf field 1 (ir_version): no magic number
        return "onnx"
    raise ValueError(f"{path}: unknown weights format; supported: {supported()}")


def target_format(path: str) -> str:
    name = os.path.basename(path.rstrip("/\\")).lower()
    if name.endswith((".pth", ".pt")):
        return "torch"
    if name.endswith(".safetensors"):
        return "safetensors"
    if name.endswith(".weights.h5"):
        return "keras"
    if name.endswith(".onnx"):
        return "onnx"
    if path.endswith(("/", "\\")) or not os.path.splitext(name)[1]:
        return "savedmodel"
    raise ValueError(f"{path}: cannot tell the target format from the name; use .pth/.pt, .safetensors, "
                     f".weights.h5, .onnx, or a name without extension for a SavedModel directory")


def require_safetensors(path: str):
    try:
        import safetensors.torch
    except ImportError:
        raise ValueError(f"{path}: safetensors format, but the safetensors package is not installed "
                         f"(pip install safetensors)") from None
    return safetensors.torch


# --- reading --------------------------------------------------------------------------------------------------
def read(path: str, fmt: str, arch: str = None, trust_savedmodel: bool = False) -> Checkpoint:
    """The backbone weights in `path`. A SavedModel is read only with `trust_savedmodel`: loading one runs its
    graph (resource initialisers, restore functions), and TF graph ops can read and write files, so a SavedModel
    is a program from whoever wrote it. The assets/twinface.json it must carry proves nothing: it can be forged."""
    if fmt == "savedmodel" and not trust_savedmodel:
        raise ValueError(f"{path}: a TensorFlow SavedModel runs its own graph code when loaded (it can read and "
                         f"write files); convert it only if you trust whoever wrote it, with --trust-savedmodel")
    return {"torch": _read_torch, "safetensors": _read_safetensors, "keras": _read_keras,
            "savedmodel": _read_savedmodel, "onnx": _read_onnx}[fmt](path, arch)


def _named(tensors: dict, path: str, arch: str, description: str) -> Checkpoint:
    state = {k: v.detach().cpu().float().numpy() for k, v in tensors.items() if not k.endswith("num_batches_tracked")}
    backbone = infer_named({k: tuple(v.shape) for k, v in state.items()}, path, arch)
    return Checkpoint(state, backbone, description)


def _read_torch(path, arch):
    from twinface_torch.checkpoint import read_state_dict
    tensors = read_state_dict(path)                 # torch.load(weights_only=True): no arbitrary objects
    return _named(tensors, path, arch, "PyTorch checkpoint")


def load_safetensors(path: str) -> dict:
    """name -> torch tensor; the library's SafetensorError (offsets outside the file, sizes that disagree with
    shapes) becomes a ValueError naming the file."""
    module = require_safetensors(path)
    try:
        return module.load_file(path)
    except Exception as err:            # safetensors_rust.SafetensorError, which is no ValueError
        raise ValueError(f"{path}: not a readable safetensors file: {err}") from None


def _read_safetensors(path, arch):
    return _named(load_safetensors(path), path, arch, "safetensors")


# Keras' .weights.h5 addresses variables by object path, "layers/<snake_case class>[_<n>]/vars/<i>", the n-th
# layer of that class in model.layers; conv / dense kernels in Keras layout, turned to torch layout here.
_KERAS_TO_TORCH_SHAPE = {
    "conv2d": lambda s: (s[3], s[2], s[0], s[1]),
    "grouped_conv2d": lambda s: (s[3], s[2], s[0], s[1]),
    "depthwise_conv2d": lambda s: (s[2] * s[3], 1, s[0], s[1]),
    "dense": lambda s: (s[1], s[0]),
    "pos_embed": tuple,             # ViT's pos_embed and mask_token (MaskRestore): torch's own layout
    "mask_restore": tuple,
}


def keras_h5_layout(model) -> dict:
    """{.weights.h5 dataset path: (canonical name, Keras variable)}, following Keras' own naming."""
    from keras.src.utils.naming import to_snake_case

    from .mapping import canonical_variables
    names = {id(var): name for name, (var, _, _) in canonical_variables(model).items()}
    seen, layout = {}, {}
    for layer in model.layers:
        key = to_snake_case(type(layer).__name__)
        seen[key] = seen.get(key, -1) + 1
        store = {}
        layer.save_own_variables(store)
        for i, var in store.items():
            layout[f"layers/{key}{f'_{seen[key]}' if seen[key] else ''}/vars/{i}"] = (names[id(var)], var)
    return layout


def _read_keras(path, arch):
    import h5py

    from twinface_tf.backbones import get_model
    from twinface_tf.checkpoint import load_into

    from .mapping import keras_to_torch
    shapes = {}
    try:
        with h5py.File(path, "r") as f:
            f.visititems(lambda name, obj: shapes.__setitem__(name, obj.shape) if isinstance(obj, h5py.Dataset)
                         else None)
    except OSError as err:              # h5py reports a truncated or damaged file as an OSError
        raise ValueError(f"{path}: not a readable HDF5 file: {err}") from None
    weights = []
    for name, shape in shapes.items():
        match = re.fullmatch(r"layers/(.+?)(_\d+)?/vars/0", name)
        if match and match.group(1) in _KERAS_TO_TORCH_SHAPE and len(shape) >= 2:
            weights.append(_KERAS_TO_TORCH_SHAPE[match.group(1)](shape))
    backbone = infer_unnamed(weights, path, arch)[0]
    model = get_model(backbone.arch, num_features=backbone.num_features, input_size=backbone.input_size)
    layout = keras_h5_layout(model)
    for h5_path, (name, var) in layout.items():
        if shapes.get(h5_path) != tuple(var.shape):
            found = "missing" if h5_path not in shapes else f"has shape {shapes[h5_path]}"
            raise ValueError(f"{path}: tensor '{name}' (Keras '{h5_path}') {found}, {backbone} expects "
                             f"{tuple(var.shape)} (wrong --arch?)")
    extra = [p for p in shapes if p not in layout]
    if extra:
        raise ValueError(f"{path}: '{extra[0]}' (shape {shapes[extra[0]]}) has no place in {backbone} (wrong --arch?)")
    load_into(model, path)
    return Checkpoint(keras_to_torch(model), backbone, "Keras weights")


def _read_savedmodel(path, arch):
    import tensorflow as tf

    from twinface_tf.backbones import get_model

    from .mapping import canonical_variables, keras_to_torch
    meta_path = os.path.join(path, "assets", METADATA_ASSET)
    if not os.path.exists(meta_path):
        raise ValueError(f"{path}: a SavedModel without assets/{METADATA_ASSET}; only SavedModels written by "
                         f"twinface convert can be read (they index their weights by canonical name)")
    with open(meta_path) as f:
        meta = json.load(f)
    backbone = Backbone(arch or meta["twinface.arch"], int(meta["twinface.num_features"]),
                        int(meta["preprocess.input_size"].split("x")[0]))
    stored = tf.saved_model.load(path).twinface_weights
    model = get_model(backbone.arch, num_features=backbone.num_features, input_size=backbone.input_size)
    table = canonical_variables(model)
    shapes = {}
    for name, var in stored.items():                # compared in torch layout, so misfits read as elsewhere
        value = np.broadcast_to(np.float32(0), tuple(var.shape))
        shapes[name] = tuple(table[name][1](value).shape) if name in table else value.shape
    check_fits(shapes, backbone, path)
    for name, (var, _, _) in table.items():
        var.assign(stored[name])
    return Checkpoint(keras_to_torch(model), backbone, "TensorFlow SavedModel")


def _read_onnx(path, arch):
    from .onnx_import import read_onnx
    imported = read_onnx(path, arch)
    return Checkpoint(imported.state, imported.backbone, "ONNX", imported.folded)


# --- writing --------------------------------------------------------------------------------------------------
def torch_backbone(state: dict, backbone: Backbone, source: str):
    import torch

    from twinface_torch.backbones import get_model
    from twinface_torch.checkpoint import load_into
    model = get_model(backbone.arch, num_features=backbone.num_features, input_size=backbone.input_size)
    load_into(model, {k: torch.from_numpy(v) for k, v in state.items()}, source)
    return model.eval()


def keras_backbone(state: dict, backbone: Backbone, source: str):
    from twinface_tf.backbones import get_model

    from .mapping import torch_to_keras
    model = get_model(backbone.arch, num_features=backbone.num_features, input_size=backbone.input_size)
    torch_to_keras(state, model, source=source)
    return model


def write(state: dict, backbone: Backbone, path: str, fmt: str) -> None:
    """Write canonical `state` to `path` (the caller stages it: a temporary name, moved into place once verified)."""
    if fmt == "torch":
        from twinface_torch.checkpoint import save_backbone
        save_backbone(torch_backbone(state, backbone, path), path)
    elif fmt == "safetensors":
        model = torch_backbone(state, backbone, path)
        require_safetensors(path).save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    elif fmt == "keras":
        from twinface_tf.checkpoint import save_backbone
        save_backbone(keras_backbone(state, backbone, path), path)
    elif fmt == "savedmodel":
        _write_savedmodel(keras_backbone(state, backbone, path), backbone, path)
    elif fmt == "onnx":
        from twinface_torch.export import export_onnx
        export_onnx(torch_backbone(state, backbone, path), path, backbone.arch, input_size=backbone.input_size,
                    verify=False)
    else:
        raise ValueError(f"unknown format {fmt!r}; supported: {supported()}")


def _write_savedmodel(model, backbone: Backbone, path: str) -> None:
    """tf.saved_model for serving: signature 'serving_default' takes 'data' NHWC (TensorFlow's native layout,
    the layout decoded images come in), returns {'embedding': [N, F]}. The variables are also tracked by
    canonical name, which is what makes the directory readable again."""
    import tensorflow as tf

    from .mapping import canonical_variables
    size = backbone.input_size
    module = tf.Module()
    module.serve = tf.function(lambda data: {OUTPUT_NAME: model(data, training=False)},
                               input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name=INPUT_NAME)])
    module.twinface_weights = {name: var.value for name, (var, _, _) in canonical_variables(model).items()}
    meta = {**export_metadata(backbone.arch, "tf", size, backbone.num_features), "preprocess.layout": "NHWC"}
    with tempfile.TemporaryDirectory() as scratch:
        asset = os.path.join(scratch, METADATA_ASSET)
        with open(asset, "w") as f:
            json.dump(meta, f, indent=1)
        module.metadata = tf.saved_model.Asset(asset)
        tf.saved_model.save(module, path, signatures={"serving_default": module.serve})


# --- running, for verification ---------------------------------------------------------------------------------
def embedder(path: str, fmt: str, backbone: Backbone):
    """uint8 RGB NHWC images -> float32 embeddings, computed by the file's own runtime and loader."""
    if fmt in ("torch", "safetensors"):
        from twinface_torch.embed import embed_images
        if fmt == "torch":
            from twinface_torch.checkpoint import load_backbone
            model = load_backbone(path, backbone.arch, num_features=backbone.num_features,
                                  input_size=backbone.input_size)
        else:
            tensors = load_safetensors(path)
            model = torch_backbone({k: v.numpy() for k, v in tensors.items()}, backbone, path)
        return lambda images: embed_images(model, images)
    if fmt == "keras":
        from twinface_tf.checkpoint import load_backbone
        model = load_backbone(path, backbone.arch, num_features=backbone.num_features, input_size=backbone.input_size)
        # one batch: an eager call is quicker than tracing a tf.function (twinface_tf.embed) for it
        return lambda images: np.asarray(model(to_model_input(images, "NHWC"), training=False), np.float32)
    if fmt == "savedmodel":
        import tensorflow as tf
        serve = tf.saved_model.load(path).signatures["serving_default"]
        return lambda images: serve(**{INPUT_NAME: tf.constant(to_model_input(images, "NHWC"))})[OUTPUT_NAME].numpy()
    if fmt == "onnx":
        from twinface.embedders import OnnxEmbedder
        embed = OnnxEmbedder(path)
        batch = embed.session.get_inputs()[0].shape[0]
        if not isinstance(batch, int):
            return embed
        # a fixed batch size (old exports without a dynamic batch): feed that many images at a time
        return lambda images: np.concatenate([embed(images[i:i + batch]) for i in range(0, len(images), batch)])
    raise ValueError(f"unknown format {fmt!r}; supported: {supported()}")

