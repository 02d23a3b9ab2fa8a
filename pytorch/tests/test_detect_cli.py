"""Photos straight to a verdict with torch weights: detect (torch MTCNN), align, embed, compare."""
from twinface.testing import check_verify_photos
from twinface_torch.backbones import get_model
from twinface_torch.checkpoint import save_backbone


def test_verify_photos_with_torch_weights(tmp_path, capsys, monkeypatch):
    def save(path):
        save_backbone(get_model("mbf"), path)
        return path
    check_verify_photos(tmp_path, capsys, monkeypatch, "torch", save)
