"""The twins' default embedding paths (embed_images: torch's frozen TorchScript copy, TF's tf.function) agree with
plain eager torch and with each other, and the torch copy follows weight updates (docs/design.md tolerances)."""
import gc
import weakref

import numpy as np
import pytest

NORMED_ABS = 1e-5


def _l2(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _uint8(n, size, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# IResNet-50 once at full size (docs/design.md's reference case); the small models cover the other block types.
CASES = [("r50", 112, 3), ("r18", 64, 4), ("mbf", 112, 4), ("densenet121", 32, 3), ("resnext50", 32, 2),
         ("vit_t", 32, 3)]


@pytest.mark.parametrize("arch,size,n", CASES, ids=[c[0] for c in CASES])
def test_fast_path_matches_eager_torch_and_tf(arch, size, n, make_twins, parity):
    from twinface_tf.embed import embed_images as tf_embed
    from twinface_torch.embed import embed_images, inference_function
    tm, km = make_twins(arch, input_size=size)
    images = _uint8(n, size, seed=21)
    fast = embed_images(tm, images)
    assert inference_function(tm) is not tm, "the default path did not take the fast path"
    eager = embed_images(tm, images, fast=False)
    parity.check(f"{arch}@{size} torch embed_images fast path vs eager torch (L2-normalised)", _l2(eager), _l2(fast),
                 NORMED_ABS)
    parity.check(f"{arch}@{size} torch embed_images fast path vs TF embed_images (L2-normalised)",
                 _l2(tf_embed(km, images)), _l2(fast), NORMED_ABS)
    parity.check(f"{arch}@{size} TF embed_images tf.function vs TF eager (L2-normalised)",
                 _l2(tf_embed(km, images, fast=False)), _l2(tf_embed(km, images)), NORMED_ABS)


def test_fast_path_follows_weight_updates(make_twins, parity):
    """Training evaluates between steps: the frozen copy must never serve stale weights."""
    import torch
    from twinface_torch.embed import embed_images, inference_function
    tm, _ = make_twins("mbf", input_size=32)
    images = _uint8(4, 32, seed=3)
    before = embed_images(tm, images)
    frozen = inference_function(tm)
    assert inference_function(tm) is frozen, "unchanged weights must reuse the frozen copy"

    optimizer = torch.optim.SGD(tm.parameters(), lr=0.5)      # one real step, in place, as the trainer does
    tm.train()
    tm(torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (4, 3, 32, 32)).astype(np.float32))).sum().backward()
    optimizer.step()
    tm.eval()
    after = embed_images(tm, images)
    assert inference_function(tm) is not frozen
    assert np.abs(_l2(after) - _l2(before)).max() > 1e-3, "the step should have moved the embeddings"
    parity.check("mbf@32 fast path after an SGD step vs eager torch (L2-normalised)",
                 _l2(embed_images(tm, images, fast=False)), _l2(after), NORMED_ABS)

    other, _ = make_twins("mbf", input_size=32, calibrate=False)
    tm.load_state_dict(other.state_dict())
    parity.check("mbf@32 fast path after load_state_dict vs eager torch (L2-normalised)",
                 _l2(embed_images(tm, images, fast=False)), _l2(embed_images(tm, images)), NORMED_ABS)


def test_fast_paths_do_not_keep_models_alive(make_twins):
    from twinface_tf import embed as tf_embed
    from twinface_torch import embed as torch_embed
    tm, km = make_twins("mbf", input_size=32)
    images = _uint8(2, 32, seed=4)
    torch_embed.embed_images(tm, images)
    tf_embed.embed_images(km, images)
    refs = weakref.ref(tm), weakref.ref(km)
    del tm, km
    gc.collect()
    assert [r() is None for r in refs] == [True, True], "a cached fast path keeps its model alive"


def test_fast_path_is_not_taken_where_it_does_not_apply():
    from twinface_torch.backbones import get_model
    from twinface_torch.embed import inference_function
    model = get_model("mbf", input_size=32, num_features=8)
    assert inference_function(model.train()) is model              # BatchNorm on batch statistics
    assert inference_function(model.eval(), fast=False) is model
    half = get_model("mbf", input_size=32, num_features=8, fp16=True).eval()
    assert inference_function(half) is half                         # fp16 autocast stays eager
    assert inference_function(model.eval()) is not model
