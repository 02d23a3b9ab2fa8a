"""The convert pipeline end to end: lossless round trips through the ONNX hub, verification that fails loudly
and leaves nothing behind, --force, --images, and IResNet-50 at full size."""
import argparse
import os
import time

import numpy as np
import onnx
import pytest
import torch

from twinface.atomic import MARKER
from twinface.data.images import encode_image
from twinface_convert import cli, formats
from twinface_convert.arch import Backbone
from twinface_convert.convert import convert
from twinface_torch.calibrate import trained_like

SIZE = 32


def run_cli(*argv):
    parser = argparse.ArgumentParser(prog="twinface")
    cli.add_parser(parser.add_subparsers(dest="verb"))
    cli.run(parser.parse_args(["convert", *argv]))


@pytest.fixture(scope="module")
def r18_pth(tmp_path_factory):
    model = trained_like("r18", input_size=SIZE)
    path = str(tmp_path_factory.mktemp("src") / "backbone.pth")
    torch.save(model.state_dict(), path)
    return model, path


@pytest.mark.parametrize("arch", ["r18", "densenet121"])
def test_round_trip_through_both_twins_and_onnx_is_bit_identical(arch, tmp_path):
    # torch -> ONNX -> Keras .weights.h5 -> SavedModel -> ONNX -> torch, each hop verified on its own.
    model = trained_like(arch, input_size=SIZE)
    src = str(tmp_path / "backbone.pth")
    torch.save(model.state_dict(), src)
    d = str(tmp_path)
    run_cli(src, f"{d}/{arch}.weights.h5", "--keep-onnx", f"{d}/hub.onnx")
    os.makedirs(f"{d}/{arch}_savedmodel")
    run_cli(f"{d}/{arch}.weights.h5", f"{d}/{arch}_savedmodel", "--force")    # an empty directory may be replaced
    assert MARKER in os.listdir(f"{d}/{arch}_savedmodel")
    with pytest.raises(ValueError, match=rf"{arch}_savedmodel: a TensorFlow SavedModel runs its own graph code when "
                                         r"loaded .* with --trust-savedmodel"):
        run_cli(f"{d}/{arch}_savedmodel", f"{d}/{arch}.onnx")
    assert not os.path.exists(f"{d}/{arch}.onnx")
    run_cli(f"{d}/{arch}_savedmodel", f"{d}/{arch}.onnx", "--trust-savedmodel")
    run_cli(f"{d}/{arch}.onnx", f"{d}/back.pth")
    original, back = model.state_dict(), torch.load(f"{d}/back.pth", weights_only=True)
    assert list(back) == list(original)
    for name, tensor in original.items():
        if name.endswith("num_batches_tracked"):            # a step counter, not a weight: Keras has none
            assert tensor == 1 and back[name] == 0
        else:
            assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    hub = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(f"{d}/hub.onnx").graph.initializer}
    for name, tensor in original.items():                       # the kept hub is name-faithful too
        if not name.endswith("num_batches_tracked"):
            assert np.array_equal(hub[name], tensor.numpy()), name
    assert sorted(os.listdir(d)) == sorted(["back.pth", "backbone.pth", "hub.onnx", f"{arch}.onnx",
                                            f"{arch}.weights.h5", f"{arch}_savedmodel"])


def test_force_replaces_only_an_output_of_the_same_format_and_never_an_input(r18_pth, tmp_path):
    # `convert --force` to a name without extension (a SavedModel) used to delete any existing directory.
    _, src = r18_pth
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match=f"{photos}: exists and is not a SavedModel directory; refusing"):
        run_cli(src, str(photos), "--force")
    (tmp_path / "notes.pth").write_text("not weights")
    with pytest.raises(FileExistsError, match="notes.pth: exists and is not a file of the torch format"):
        run_cli(src, str(tmp_path / "notes.pth"), "--force")
    with pytest.raises(ValueError, match="is or holds the input"):
        run_cli(src, src, "--force")
    with pytest.raises(ValueError, match=f"{photos}: is or holds the input"):
        run_cli(src, str(photos), "--images", str(photos), "--force")
    with pytest.raises(ValueError, match="the same path as DST"):
        run_cli(src, str(tmp_path / "out.onnx"), "--keep-onnx", str(tmp_path / "out.onnx"))
    assert (photos / "holiday.jpg").read_bytes() == b"mine" and (tmp_path / "notes.pth").read_text() == "not weights"
    assert sorted(os.listdir(tmp_path)) == ["notes.pth", "photos"] and formats.source_format(src) == "torch"


def test_failed_verification_exits_non_zero_and_writes_nothing(r18_pth, tmp_path, monkeypatch):
    from twinface import cli as twinface_cli
    _, src = r18_pth
    write = formats.write

    def corrupting_write(state, backbone, path, fmt):         # a converter bug: one tensor damaged on the way
        if fmt == "keras":
            state = {**state, "layer2.0.conv1.weight": state["layer2.0.conv1.weight"] * 1.01}
        write(state, backbone, path, fmt)

    monkeypatch.setattr(formats, "write", corrupting_write)
    monkeypatch.setitem(twinface_cli.VERBS, "convert", (cli.add_parser, cli.run))   # as the lead registers it
    dst = str(tmp_path / "out.weights.h5")
    with pytest.raises(SystemExit) as exit_info:
        twinface_cli.main(["convert", src, dst, "--keep-onnx", str(tmp_path / "hub.onnx")])
    assert exit_info.value.code not in (0, None)
    assert "embeddings differ by" in str(exit_info.value.code) and "was not written" in str(exit_info.value.code)
    assert os.listdir(tmp_path) == []                           # no DST, no hub, no temporary files


def test_existing_target_needs_force(r18_pth, tmp_path):
    _, src = r18_pth
    dst = tmp_path / "out.onnx"
    dst.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="pass --force"):
        run_cli(src, str(dst))
    assert dst.read_bytes() == b"precious"
    run_cli(src, str(dst), "--force")
    assert formats.read(str(dst), "onnx").backbone.arch == "r18"


def test_verification_on_an_image_folder(r18_pth, tmp_path):
    _, src = r18_pth
    rng = np.random.default_rng(0)
    folder = tmp_path / "faces" / "person_a"
    folder.mkdir(parents=True)
    for i in range(3):                                          # 64x64 crops, resized to the model's 32x32
        (folder / f"{i}.png").write_bytes(encode_image(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), ".png"))
    lines = []
    report = convert(src, str(tmp_path / "out.onnx"), images=str(tmp_path / "faces"), log=lines.append)
    assert report.images == f"3 images from {tmp_path / 'faces'}" and report.max_abs_diff <= 1e-5
    assert any(line.startswith("verify on 3 images") and line.endswith("PASS") for line in lines)
    (folder / "wide.png").write_bytes(encode_image(np.zeros((32, 48, 3), np.uint8), ".png"))
    with pytest.raises(ValueError, match=r"wide\.png: expected a square aligned face crop"):
        convert(src, str(tmp_path / "again.onnx"), images=str(tmp_path / "faces"), log=lines.append)
    assert not os.path.exists(tmp_path / "again.onnx")


# --- IResNet-50 at 112x112: the design tolerance and the speed of the name-faithful route ------------------------
@pytest.fixture(scope="module")
def r50_pth(tmp_path_factory):
    model = trained_like("r50", batch=4)
    path = str(tmp_path_factory.mktemp("r50") / "backbone.pth")
    torch.save(model.state_dict(), path)
    return model, path


def test_r50_torch_to_keras_within_tolerance_without_tf2onnx(r50_pth, tmp_path, monkeypatch):
    import tf2onnx

    def no_tf2onnx(*args, **kwargs):
        raise AssertionError("the twin-to-twin route must not go through tf2onnx")

    monkeypatch.setattr(tf2onnx.convert, "from_function", no_tf2onnx)
    lines = []
    start = time.perf_counter()
    report = convert(r50_pth[1], str(tmp_path / "r50.weights.h5"), log=lines.append)
    print(f"\nr50 torch -> TF: {time.perf_counter() - start:.1f} s", *lines, sep="\n")
    assert report.backbone.arch == "r50" and report.backbone.input_size == 112
    assert report.max_abs_diff <= 1e-5


def test_r50_insightface_model_zoo_style_onnx_to_torch(r50_pth, tmp_path):
    # insightface's model-zoo R50s are arcface_torch exports: legacy exporter, BN folded, input "input.1", NCHW.
    model, _ = r50_pth
    src = str(tmp_path / "w600k_r50_like.onnx")
    torch.onnx.export(model, torch.rand(1, 3, 112, 112), src, input_names=["input.1"], dynamo=False, opset_version=11,
                      dynamic_axes={"input.1": {0: "None"}})
    lines = []
    report = convert(src, str(tmp_path / "backbone.pth"), log=lines.append)
    print("", *lines, sep="\n")
    assert report.backbone.arch == "r50" and report.max_abs_diff <= 1e-5
    assert any(line.startswith("note: the exporter folded the running statistics") for line in lines)


def test_resnext_round_trip_through_both_twins_and_onnx_names_the_architecture_from_shapes(tmp_path):
    # torch -> ONNX -> Keras .weights.h5 -> torch, no --arch anywhere (tf2onnx of ResNeXt: test_onnx_import.py).
    model = trained_like("resnext50", input_size=SIZE, num_features=64)
    d = str(tmp_path)
    torch.save(model.state_dict(), f"{d}/backbone.pth")
    run_cli(f"{d}/backbone.pth", f"{d}/rx.onnx")
    assert formats.read(f"{d}/rx.onnx", "onnx").backbone == Backbone("resnext50", 64, SIZE)
    run_cli(f"{d}/rx.onnx", f"{d}/rx.weights.h5")
    run_cli(f"{d}/rx.weights.h5", f"{d}/back.pth")
    back = torch.load(f"{d}/back.pth", weights_only=True)
    for name, tensor in model.state_dict().items():
        if not name.endswith("num_batches_tracked"):
            assert torch.equal(back[name], tensor), name
