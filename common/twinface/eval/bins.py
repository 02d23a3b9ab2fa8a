"""Score an embedding function on verification .bin sets with insightface's protocol."""
import numpy as np

from ..data.transforms import resize
from ..data.verification_bin import decode_bin, load_bin
from .verification import evaluate_embeddings


def embed_all(embed, images: np.ndarray, batch_size: int = 64, progress: bool = True, desc: str = "embed"):
    """Run `embed` over uint8 NHWC images in batches, with a progress bar."""
    from tqdm import tqdm
    chunks = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, unit="batch"):
        chunks.append(np.asarray(embed(images[start:start + batch_size]), np.float32))
    return np.concatenate(chunks)


def load_bin_images(path: str, size: int = None):
    """(decoded uint8 images [2N, S, S, 3], issame [N]); shrunk once to `size` when given (training evaluates
    the same set every epoch: decode and resize it once)."""
    bins, issame = load_bin(path)
    images = decode_bin(bins, path)
    if size and images.shape[1] != size:
        images = np.stack([resize(image, size) for image in images])
    return images, issame


def evaluate_images(embed, images, issame, flip: bool = True, batch_size: int = 64, progress: bool = True,
                    nrof_folds: int = 10, name: str = "set"):
    emb = embed_all(embed, images, batch_size, progress, desc=f"embed {name}")
    emb_flip = embed_all(embed, np.ascontiguousarray(images[:, :, ::-1]), batch_size, progress,
                         desc=f"flip {name}") if flip else None
    return evaluate_embeddings(emb, emb_flip, issame, nrof_folds=nrof_folds)


def evaluate_bin(embed, path: str, flip: bool = True, batch_size: int = 64, progress: bool = True, nrof_folds=10):
    images, issame = load_bin_images(path)
    return evaluate_images(embed, images, issame, flip, batch_size, progress, nrof_folds, name=path)
