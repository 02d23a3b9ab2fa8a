"""Photos straight to a verdict with torch weights: detect (torch MTCNN), align, embed, compare."""
from twinface.testing import check_verify_photos
from twinface_torch.backbones import get_model
from twinface_torch.checkpoint import save_backbone


def test_verify_photos_with_torch_weights(tmp_path, capsys, monkeypatch):
    check_verify_photos(tmp_path, capsys, monkeypatch, "torch", get_model, save_backbone)
