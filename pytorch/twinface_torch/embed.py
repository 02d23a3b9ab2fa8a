"""Embeddings from a torch backbone file: uint8 RGB NHWC images in, float32 [N, D] out."""
import numpy as np
import torch

from twinface.data.transforms import to_model_input

from .checkpoint import load_backbone


def embed_images(model, images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(to_model_input(images, "NCHW", model.input_size))
    device = next(model.parameters()).device
    with torch.inference_mode():
        return model(x.to(device)).float().cpu().numpy()


class Embedder:
    def __init__(self, weights: str, arch: str = None, **kwargs):
        if not arch:
            raise ValueError(f"{weights}: a torch state_dict does not record its architecture; pass --arch (e.g. r50)")
        self.model = load_backbone(weights, arch, **kwargs)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return embed_images(self.model, images)
