"""TFLite export (fp32 / fp16 / int8) against the Keras twin, and .tflite files through the CLI's embedders."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from twinface.cli import main  # noqa: E402
from twinface.data.dataset import open_dataset  # noqa: E402
from twinface.data.transforms import to_model_input  # noqa: E402
from twinface.testing import tiny_dataset  # noqa: E402
from twinface_tf import tflite  # noqa: E402
from twinface_tf.backbones import get_model  # noqa: E402
from twinface_tf.checkpoint import save_backbone  # noqa: E402

SIZE, FEATURES = 32, 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="module")
def model():
    """MobileFaceNet (PReLU, depthwise and grouped convolutions, the GDC); BN statistics made non-trivial."""
    model = get_model("mbf", num_features=FEATURES, input_size=SIZE)
    model(np.random.default_rng(0).uniform(-1, 1, (8, SIZE, SIZE, 3)).astype(np.float32), training=True)
    return model


def face_images(data, count):
    train = open_dataset(os.path.join(data, "train.rec"))
    return np.stack([train.image(i) for i in range(count)])


def cosines(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("quantization", ["fp32", "fp16"])
def test_float_exports_are_verified_and_run_under_xnnpack(model, data, tmp_path, quantization):
    path = tmp_path / f"mbf.{quantization}.tflite"
    report = tflite.export_tflite(model, str(path), quantization, calibration=os.path.join(data, "train.rec"))
    assert os.listdir(tmp_path) == [path.name]
    assert tflite.MIN_COSINE[quantization] <= report["cosine_min"] <= report["cosine_mean"] <= 1 + 1e-9
    assert report["verified_on"].startswith("18 images of ") and report["calibrated_on"] is None  # half the 36
    # The default delegate (XNNPACK) took the graph over; without default delegates no node is delegated, and
    # the builtin kernels give the same embeddings.
    assert report["delegate_nodes"] > 0
    builtin = tflite.TFLiteEmbedder(str(path), delegates=False)
    assert builtin.delegate_nodes == 0
    images = face_images(data, 5)
    reference = model(to_model_input(images, "NHWC", SIZE), training=False).numpy()
    delegated = tflite.TFLiteEmbedder(str(path), threads=2)
    for batch in (1, 5, 2):                           # resized to each call's batch, back and forth
        got = delegated(images[:batch])
        assert got.shape == (batch, FEATURES)
        assert cosines(got, reference[:batch]).min() >= tflite.MIN_COSINE[quantization]
    np.testing.assert_allclose(builtin(images), delegated(images), rtol=1e-3, atol=1e-3 * np.abs(reference).max())


@pytest.fixture(scope="module")
def int8_exports(model, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8")
    return {q: (out / f"mbf.{q}.tflite", tflite.export_tflite(model, str(out / f"mbf.{q}.tflite"), q,
                                                                calibration=os.path.join(data, "train.rec")))
            for q in ("int8", "int8-float-prelu")}


@pytest.mark.parametrize("quantization", ["int8", "int8-float-prelu"])
def test_int8_exports_are_calibrated_on_real_images_and_close(model, tmp_path, int8_exports, quantization):
    path, report = int8_exports[quantization]
    assert report["calibrated_on"].startswith("18 images of ")           # the half not used for the check
    # Measured: both min 0.9996, mean 0.9997 (tiny set, seeded untrained model); int8 has no required bound.
    print(f"{quantization} cosine min {report['cosine_min']:.4f} mean {report['cosine_mean']:.4f}")
    assert 0.9 < report["cosine_min"] <= report["cosine_mean"] < 1.0
    details = tflite.TFLiteEmbedder(str(path)).interpreter.get_input_details()[0]
    assert details["dtype"] == np.float32                               # float interface kept
    with pytest.raises(ValueError, match=f"{quantization} quantization needs calibration data"):
        tflite.export_tflite(model, str(tmp_path / "none.tflite"), quantization)


def test_float_prelu_keeps_the_graph_in_few_xnnpack_partitions(int8_exports):
    """XNNPACK takes PReLU in float only: full int8 splits the graph at each of MobileFaceNet's PReLUs."""
    ops = {q: [op["op_name"] for op in tflite.TFLiteEmbedder(str(path)).interpreter._get_ops_details()]
           for q, (path, _) in int8_exports.items()}
    assert ops["int8"].count("DELEGATE") > ops["int8"].count("PRELU") > 10
    assert ops["int8-float-prelu"].count("DELEGATE") <= 2
    assert ops["int8-float-prelu"].count("QUANTIZE") == ops["int8-float-prelu"].count("PRELU") + 1   # + the input


def test_calibration_and_check_images_are_disjoint_and_seeded(data):
    images = face_images(data, 10)
    check, calibration = tflite.sample_images(images, 4, 3, seed=1)
    again, _ = tflite.sample_images(images, 4, 3, seed=1)
    assert check.shape == (4, 112, 112, 3) and calibration.shape == (3, 112, 112, 3)
    np.testing.assert_array_equal(check, again)
    rows = {image.tobytes() for image in check}
    assert not rows & {image.tobytes() for image in calibration}
    assert rows <= {image.tobytes() for image in images}


def test_failed_verification_leaves_no_file(model, tmp_path, monkeypatch):
    monkeypatch.setitem(tflite.MIN_COSINE, "fp32", 1.5)                 # no file can pass
    with pytest.raises(RuntimeError, match=r"mbf\.tflite: fp32 file's embeddings reach cosine .* below the required"):
        tflite.export_tflite(model, str(tmp_path / "mbf.tflite"), "fp32")
    assert os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def weights(model, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("weights") / "mbf.weights.h5")
    save_backbone(model, path)
    return path


def export_argv(weights, out, *extra):
    return ["export", "--format", "tflite", "--weights", weights, "--arch", "mbf", "--input-size", str(SIZE),
            "--num-features", str(FEATURES), "--out", str(out), *extra]


def test_export_out_rules(weights, data, tmp_path):
    with pytest.raises(SystemExit, match=r"m\.onnx: expected a name ending in \.tflite"):
        main(export_argv(weights, tmp_path / "m.onnx"))
    link = tmp_path / "link.tflite"                  # the weights under another name: never written over
    os.link(weights, link)
    with pytest.raises(SystemExit, match="is or holds the input"):
        main(export_argv(weights, link, "--force"))
    with pytest.raises(SystemExit, match="--quantization and --calibration apply to --format tflite only"):
        main(["export", "--weights", weights, "--arch", "mbf", "--out", str(tmp_path / "m.onnx"),
              "--quantization", "int8"])
    existing = tmp_path / "m.tflite"
    existing.write_bytes(b"mine")
    with pytest.raises(SystemExit, match="already exists; pass --force"):
        main(export_argv(weights, existing))
    assert existing.read_bytes() == b"mine"
    with pytest.raises(SystemExit, match="tflite export takes TF weights, got torch; convert torch weights first"):
        main(export_argv(str(tmp_path / "mbf.pth"), tmp_path / "t.tflite"))


def test_cli_round_trip_embed_and_eval(weights, data, tmp_path, capsys):
    out = tmp_path / "mbf.tflite"
    main(export_argv(weights, out, "--quantization", "fp16", "--calibration", os.path.join(data, "train.rec")))
    assert "wrote" in capsys.readouterr().out and out.is_file()
    folder = tmp_path / "faces"
    folder.mkdir()
    for i, image in enumerate(face_images(data, 3)):
        cv2.imwrite(str(folder / f"{i}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    main(["embed", "--weights", str(out), "--images", str(folder), "--out", str(tmp_path / "lite.npy")])
    main(["embed", "--weights", weights, "--arch", "mbf", "--input-size", str(SIZE), "--num-features", str(FEATURES),
          "--images", str(folder), "--out", str(tmp_path / "keras.npy")])
    lite, keras = np.load(tmp_path / "lite.npy"), np.load(tmp_path / "keras.npy")
    assert lite.shape == keras.shape == (3, FEATURES)
    assert cosines(lite, keras).min() >= tflite.MIN_COSINE["fp16"]
    capsys.readouterr()
    main(["eval", "--weights", str(out), "--bin", os.path.join(data, "val.bin")])
    assert "[val.bin]Accuracy-Flip" in capsys.readouterr().out


def test_files_the_embedder_cannot_run_are_refused_in_one_line(data, tmp_path):
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, 3, 8, 8], tf.float32)])
    def nchw(x):
        return tf.reduce_mean(x, axis=[2, 3])

    other = tmp_path / "nchw.tflite"
    other.write_bytes(tf.lite.TFLiteConverter.from_concrete_functions([nchw.get_concrete_function()]).convert())
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"junk")
    val = os.path.join(data, "val.bin")
    with pytest.raises(SystemExit, match=r"nchw\.tflite: input .* is float32 \[-1, 3, 8, 8\]; expected float32 "
                                         r"\[batch, S, S, 3\]"):
        main(["eval", "--weights", str(other), "--bin", val])
    with pytest.raises(SystemExit, match=r"junk\.tflite: "):
        main(["eval", "--weights", str(junk), "--bin", val])


def test_a_file_with_a_fixed_batch_of_one_runs_image_by_image(tmp_path):
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([1, 8, 8, 3], tf.float32)])
    def mean_colour(x):
        return tf.reduce_mean(x, axis=[1, 2])

    path = tmp_path / "fixed.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_concrete_functions([mean_colour.get_concrete_function()]).convert())
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    np.testing.assert_allclose(tflite.TFLiteEmbedder(str(path))(images),
                               to_model_input(images, "NHWC").mean(axis=(1, 2)), atol=1e-6)


def test_photos_of_a_tflite_model_are_detected_by_the_tf_mtcnn(monkeypatch):
    """embed / verify --detect run the detector in the model's framework: TensorFlow for a .tflite file."""
    import argparse

    from twinface import cli
    from twinface.detect import faces
    used = []
    monkeypatch.setattr(faces, "load_detector_nets", lambda framework: used.append(framework))
    monkeypatch.setattr(faces, "FaceAligner", lambda *args, **kwargs: None)
    cli._aligner(argparse.Namespace(weights="model.tflite", min_size=20.0, min_score=0.95))
    assert used == ["tf"]
