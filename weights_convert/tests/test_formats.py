"""Recognising, reading and writing each format: content over names, refusals that say why, Keras' object paths,
the SavedModel's serving layout."""
import os
import sys

import h5py
import numpy as np
import pytest
import torch

from twinface_convert import formats
from twinface_convert.arch import Backbone
from twinface_convert.convert import convert
from twinface_torch.backbones import get_model

SIZE = 32


@pytest.fixture(scope="module")
def mbf():
    torch.manual_seed(0)
    model = get_model("mbf", input_size=SIZE).eval()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():       # distinct statistics, not BN's ones and zeros
            if name.endswith(("running_mean", "bias")):
                tensor.uniform_(-0.1, 0.1)
            elif name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0)
    return model


@pytest.fixture(scope="module")
def mbf_state(mbf):
    return {k: v.numpy() for k, v in mbf.state_dict().items() if not k.endswith("num_batches_tracked")}


def test_unknown_content_lists_what_is_supported(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(64))
    with pytest.raises(ValueError, match=r"unknown weights format; supported: PyTorch .*safetensors .*\.weights\.h5"
                                         r".*SavedModel .*ONNX"):
        formats.source_format(str(path))
    with pytest.raises(ValueError, match="cannot tell the target format"):
        formats.target_format(str(tmp_path / "out.bin"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="without saved_model.pb"):
        formats.source_format(str(tmp_path / "empty_dir"))


def test_content_decides_not_the_name(mbf, tmp_path):
    path = str(tmp_path / "checkpoint.bin")                      # a torch zip under a meaningless name
    torch.save(mbf.state_dict(), path)
    assert formats.source_format(path) == "torch"
    legacy = str(tmp_path / "legacy.pth")                        # torch's pre-zip pickle format
    torch.save(mbf.state_dict(), legacy, _use_new_zipfile_serialization=False)
    assert formats.source_format(legacy) == "torch"
    assert formats.read(legacy, "torch").backbone == Backbone("mbf", 512, SIZE)
    hdf5 = str(tmp_path / "model.h5")
    with h5py.File(hdf5, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(ValueError, match=r"not named \*\.weights\.h5"):
        formats.source_format(hdf5)


def test_safetensors_is_recognised_and_its_missing_package_named(tmp_path, monkeypatch, mbf):
    monkeypatch.setitem(sys.modules, "safetensors", None)        # as on this stack: not installed
    header = b'{"fc.weight":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    path = str(tmp_path / "model.safetensors")
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header + bytes(4))
    assert formats.source_format(path) == "safetensors"
    with pytest.raises(ValueError, match=r"safetensors package is not installed \(pip install safetensors\)"):
        formats.read(path, "safetensors")
    src, dst = str(tmp_path / "b.pth"), str(tmp_path / "out.safetensors")
    torch.save(mbf.state_dict(), src)
    with pytest.raises(ValueError, match="safetensors package is not installed"):
        convert(src, dst)
    assert not os.path.exists(dst)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))                        # would create a file if unpickled


def test_pickles_are_loaded_with_weights_only(tmp_path):
    marker, path = str(tmp_path / "executed"), str(tmp_path / "evil.pth")
    torch.save({"fc.weight": torch.zeros(2), "payload": Payload(marker)}, path)
    with pytest.raises(ValueError, match="refused to unpickle it with weights_only=True"):
        formats.read(path, "torch")
    assert not os.path.exists(marker)


def test_training_checkpoint_gives_its_backbone(mbf, mbf_state, tmp_path):
    optimizer = torch.optim.SGD(mbf.parameters(), lr=0.1, momentum=0.9)
    head = torch.nn.Linear(512, 10, bias=False)
    state = {"backbone": mbf.state_dict(), "head": head.state_dict(), "optimizer": optimizer.state_dict(),
             "rng": torch.get_rng_state(), "meta": {"epoch": 3, "step": 1200, "config": "default.yaml"}}
    path = str(tmp_path / "training_state.pt")
    torch.save(state, path)
    checkpoint = formats.read(path, "torch")
    assert checkpoint.backbone == Backbone("mbf", 512, SIZE)
    assert set(checkpoint.state) == set(mbf_state)
    assert all(np.array_equal(checkpoint.state[k], v) for k, v in mbf_state.items())


def test_keras_weights_file_layout_inference_and_misfit(mbf_state, tmp_path):
    from twinface_convert.mapping import keras_to_torch, torch_to_keras
    from twinface_tf.backbones import get_model as keras_model
    from twinface_tf.checkpoint import save_backbone
    model = keras_model("mbf", input_size=SIZE)
    torch_to_keras(mbf_state, model)
    path = str(tmp_path / "mbf.weights.h5")
    save_backbone(model, path)
    with h5py.File(path, "r") as f:                              # our reading of Keras' object paths is Keras' own
        stored = {}
        f.visititems(lambda n, o: stored.__setitem__(n, np.asarray(o)) if isinstance(o, h5py.Dataset) else None)
    layout = formats.keras_h5_layout(model)
    assert set(layout) == set(stored)
    for h5_path, (name, var) in layout.items():
        assert np.array_equal(stored[h5_path], var.numpy()), (h5_path, name)
    checkpoint = formats.read(path, formats.source_format(path))
    assert checkpoint.backbone == Backbone("mbf", 512, SIZE)     # inferred from shapes alone
    expected = keras_to_torch(model)
    assert all(np.array_equal(checkpoint.state[k], v) for k, v in expected.items())
    with pytest.raises(ValueError, match=r"tensor 'layers\.0\.layers\.0\.weight' \(Keras 'layers/conv2d/vars/0'\) "
                                         r"has shape \(3, 3, 3, 128\), mbf_large .* expects \(3, 3, 3, 256\)"):
        formats.read(path, "keras", arch="mbf_large")


def test_savedmodel_serves_nhwc_and_reads_back_bit_for_bit(mbf, mbf_state, tmp_path):
    import tensorflow as tf
    path = str(tmp_path / "mbf_savedmodel")
    formats.write(mbf_state, Backbone("mbf", 512, SIZE), path, "savedmodel")
    assert formats.source_format(path) == "savedmodel"
    checkpoint = formats.read(path, "savedmodel", trust_savedmodel=True)
    assert checkpoint.backbone == Backbone("mbf", 512, SIZE)
    assert all(np.array_equal(checkpoint.state[k], v) for k, v in mbf_state.items())
    serve = tf.saved_model.load(path).signatures["serving_default"]
    spec = serve.structured_input_signature[1]["data"]
    assert spec.shape.as_list() == [None, SIZE, SIZE, 3] and spec.dtype == tf.float32
    x = np.random.default_rng(0).uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
    served = serve(data=tf.constant(x))["embedding"].numpy()
    with torch.no_grad():
        reference = mbf(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    assert np.abs(served - reference).max() <= 1e-4 * np.abs(reference).max()
    with pytest.raises(ValueError, match=r"tensor 'layers\.0\.layers\.0\.weight' has shape \(128, 3, 3, 3\), "
                                         r"mbf_large .* expects \(256, 3, 3, 3\)"):
        formats.read(path, "savedmodel", arch="mbf_large", trust_savedmodel=True)


def test_a_savedmodel_is_never_loaded_without_trust(mbf_state, tmp_path, monkeypatch):
    # Loading runs the SavedModel's graph; twinface's own marker asset can be forged, so it earns no trust.
    import tensorflow as tf
    path = str(tmp_path / "mbf_savedmodel")
    formats.write(mbf_state, Backbone("mbf", 512, SIZE), path, "savedmodel")
    loads = []
    monkeypatch.setattr(tf.saved_model, "load", lambda *a, **k: loads.append(a))
    with pytest.raises(ValueError, match=r"mbf_savedmodel: a TensorFlow SavedModel runs its own graph code"):
        formats.read(path, "savedmodel")
    with pytest.raises(ValueError, match=r"--trust-savedmodel"):
        convert(path, str(tmp_path / "out.onnx"), log=lambda line: None)
    assert loads == [] and not os.path.exists(tmp_path / "out.onnx")


def test_safetensors_round_trips_through_the_hub(tmp_path, mbf):
    """A state_dict saved by safetensors itself (as Hugging Face / timm publish weights) converts to Keras and
    back, every tensor bit-identical, the embeddings verified on the way."""
    from safetensors.torch import load_file, save_file
    src = str(tmp_path / "mbf.safetensors")
    save_file({k: v.contiguous() for k, v in mbf.state_dict().items()}, src)
    assert formats.source_format(src) == "safetensors"
    report = convert(src, str(tmp_path / "mbf.weights.h5"), log=lambda *a: None)
    assert report.src_format == "safetensors" and report.backbone == Backbone("mbf", 512, SIZE)
    assert report.max_abs_diff <= 1e-5
    back = str(tmp_path / "back.safetensors")
    report = convert(str(tmp_path / "mbf.weights.h5"), back, log=lambda *a: None)
    assert report.dst_format == "safetensors" and report.max_abs_diff <= 1e-5
    tensors = load_file(back)
    model = get_model("mbf", input_size=SIZE)
    model.load_state_dict(tensors, strict=True)
    for name, tensor in mbf.state_dict().items():
        if not name.endswith("num_batches_tracked"):           # a counter: targets get it back as 0
            assert torch.equal(tensors[name], tensor), name


def _safetensors(path, header: bytes, data: bytes, claimed=None):
    with open(path, "wb") as f:
        f.write((len(header) if claimed is None else claimed).to_bytes(8, "little") + header + data)
    return str(path)


def test_safetensors_with_absurd_sizes_is_refused_naming_the_file(tmp_path):
    """Old code: a header length past the end read as 'unknown weights format', and offsets past the end or a
    shape that disagrees with them surfaced as a raw SafetensorError."""
    header = b'{"fc.weight":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    path = _safetensors(tmp_path / "huge.safetensors", header, bytes(4), claimed=2 ** 62)
    with pytest.raises(ValueError, match=rf"{path}: a safetensors header of {2 ** 62} bytes is claimed, but the "
                                         rf"file has {8 + len(header) + 4} bytes"):
        formats.source_format(path)
    for name, tensor in [("offsets", '{"dtype":"F32","shape":[250000000000],"data_offsets":[0,1000000000000]}'),
                         ("shape", '{"dtype":"F32","shape":[1000000,1000000],"data_offsets":[0,4]}')]:
        path = _safetensors(tmp_path / f"{name}.safetensors", b'{"fc.weight":' + tensor.encode() + b"}", bytes(4))
        assert formats.source_format(path) == "safetensors"
        with pytest.raises(ValueError, match=rf"{path}: not a readable safetensors file: "):
            formats.read(path, "safetensors")


def test_empty_truncated_and_foreign_files_are_refused_naming_the_file(mbf, tmp_path):
    """Old code: a 0-byte .pth read as 'unknown format', a truncated one raised a raw BadZipFile, a numpy .npz
    read as 'unknown format', and a truncated .weights.h5 raised a raw OSError from h5py."""
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"{empty}: an empty file \(0 bytes\) holds no weights"):
        formats.source_format(str(empty))
    whole, cut = tmp_path / "whole.pth", tmp_path / "cut.pth"
    torch.save(mbf.state_dict(), whole)
    cut.write_bytes(whole.read_bytes()[:len(whole.read_bytes()) // 2])
    with pytest.raises(ValueError, match=rf"{cut}: a damaged or truncated zip archive"):
        formats.source_format(str(cut))
    npz = tmp_path / "weights.npz"
    np.savez(npz, w=np.zeros(3))
    with pytest.raises(ValueError, match=rf"{npz}: a numpy .npz archive, which is no weights format"):
        formats.source_format(str(npz))
    h5 = tmp_path / "cut.weights.h5"
    with h5py.File(h5, "w") as f:
        f["layers/dense/vars/0"] = np.zeros((64, 64))
    h5.write_bytes(h5.read_bytes()[:1000])
    assert formats.source_format(str(h5)) == "keras"
    with pytest.raises(ValueError, match=rf"{h5}: not a readable HDF5 file"):
        formats.read(str(h5), "keras")
