"""Photos straight to a verdict with TF weights: detect (TF MTCNN), align, embed, compare."""
from twinface.testing import check_verify_photos
from twinface_tf.backbones import get_model
from twinface_tf.checkpoint import save_backbone


def test_verify_photos_with_tf_weights(tmp_path, capsys, monkeypatch):
    check_verify_photos(tmp_path, capsys, monkeypatch, "tf", get_model, save_backbone)
