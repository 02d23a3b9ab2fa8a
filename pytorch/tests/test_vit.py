"""The torch ViT against arcface_torch's backbones/vit.py, fact by fact (names, shapes, counts, numerics)."""
import io
import math

import pytest
import torch
from torch import nn

from twinface.registry import BACKBONES
from twinface.testing import VIT_REFUSED, run_tiny, seeded_noise, tiny_dataset
from twinface_torch.backbones import get_model
from twinface_torch.backbones.vit import Attention, DropPath, set_noise
from twinface_torch.embed import freeze_for_inference
from twinface_torch.train import TorchTwin

VITS = [name for name, spec in BACKBONES.items() if spec.family == "vit"]
# arcface_torch's vit_* entries: (embed_dim, depth), all with 8 heads, patch 9, mlp_ratio 4
PUBLISHED = {"vit_t": (256, 12), "vit_s": (512, 12), "vit_b": (512, 24)}


def vit_state_shapes(dim, depth, tokens=144, num_features=512):
    """arcface_torch's ViT backbone.pth: key -> shape, written out from its module tree."""
    shapes = {"pos_embed": (1, tokens, dim), "mask_token": (1, 1, dim), "patch_embed.proj.weight": (dim, 3, 9, 9),
              "patch_embed.proj.bias": (dim,), "norm.weight": (dim,), "norm.bias": (dim,),
              "feature.0.weight": (dim, dim * tokens), "feature.2.weight": (num_features, dim)}
    for bn, width in (("feature.1", dim), ("feature.3", num_features)):
        shapes.update({f"{bn}.{k}": (width,) for k in ("weight", "bias", "running_mean", "running_var")})
        shapes[f"{bn}.num_batches_tracked"] = ()
    for i in range(depth):
        b = f"blocks.{i}"
        shapes.update({f"{b}.norm1.weight": (dim,), f"{b}.norm1.bias": (dim,), f"{b}.norm2.weight": (dim,),
                       f"{b}.norm2.bias": (dim,), f"{b}.attn.qkv.weight": (3 * dim, dim),    # qkv_bias=False
                       f"{b}.attn.proj.weight": (dim, dim), f"{b}.attn.proj.bias": (dim,),
                       f"{b}.mlp.fc1.weight": (4 * dim, dim), f"{b}.mlp.fc1.bias": (4 * dim,),
                       f"{b}.mlp.fc2.weight": (dim, 4 * dim), f"{b}.mlp.fc2.bias": (dim,)})
    return shapes


@pytest.mark.parametrize("name", VITS)
def test_state_dict_is_arcface_torchs(name):
    assert set(VITS) == set(PUBLISHED)
    with torch.device("meta"):
        model = get_model(name)
    expected = vit_state_shapes(*PUBLISHED[name])
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    params = sum(math.prod(s) for k, s in expected.items() if "running" not in k and "batches" not in k)
    assert sum(p.numel() for p in model.parameters()) == params


def test_arcface_torch_weights_load_strictly_and_embed():
    shapes = vit_state_shapes(256, 12, tokens=9, num_features=64)
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.rand(s, generator=generator) if s else torch.tensor(3) for k, s in shapes.items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    model = get_model("vit_t", num_features=64, input_size=32)
    model.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(model.eval()(x), model(x))           # inference: no masking, no stochastic depth


def test_arcface_torch_numerics():
    model = get_model("vit_t", input_size=32)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * 12 + 1 and all(m.eps == 1e-5 for m in norms)      # nn.LayerNorm(dim) default
    assert all(isinstance(b.mlp.act, nn.ReLU6) for b in model.blocks)          # Mlp's act_layer default
    assert all(b.attn.scale == 32 ** -0.5 and b.attn.qkv.bias is None for b in model.blocks)
    assert model.feature[1].eps == model.feature[3].eps == 2e-5
    assert [b.drop_path.p for b in model.blocks] == pytest.approx(torch.linspace(0, 0.1, 12).tolist())
    assert model.mask_ratio == 0.1


def test_init_follows_arcface_torch():
    torch.manual_seed(0)
    model = get_model("vit_s", input_size=32)
    assert abs(model.pos_embed.std().item() - 0.02) < 0.002 and abs(model.mask_token.std().item() - 0.02) < 0.005
    assert abs(model.blocks[3].mlp.fc1.weight.std().item() - 0.02) < 0.001
    assert torch.equal(model.blocks[3].mlp.fc1.bias, torch.zeros(2048))
    assert torch.equal(model.norm.weight, torch.ones(512))


def test_random_masking_keeps_the_lowest_noise_and_restores_grid_order():
    model = get_model("vit_t", num_features=16, input_size=27).train()     # 3x3 grid: int(9 * 0.9) = 8 kept
    x = torch.arange(2 * 9 * 256, dtype=torch.float32).reshape(2, 9, 256)
    noise = torch.tensor([[.5, .1, .9, .2, .3, .4, .6, .7, .8], [.9, .8, .7, .6, .5, .4, .3, .2, .1]])
    set_noise(model, lambda shape: noise)
    kept, restore = model.random_masking(x)
    assert torch.equal(kept[0], x[0, [1, 3, 4, 5, 0, 6, 7, 8]]) and torch.equal(kept[1], x[1, [8, 7, 6, 5, 4, 3, 2, 1]])
    assert torch.equal(torch.gather(noise.argsort(1), 1, restore), torch.arange(9).expand(2, 9))


def test_drop_path_drops_whole_samples_and_rescales_the_rest():
    drop = DropPath(0.25).train()
    drop.noise = lambda shape: torch.tensor([0.1, 0.9, 0.76]).reshape(shape)    # keep iff u >= 0.25
    x = torch.ones(3, 2, 4)
    assert torch.equal(drop(x)[:, 0, 0], torch.tensor([0.0, 4 / 3, 4 / 3]))
    assert torch.equal(drop.eval()(x), x)


def test_training_draws_are_the_noise_hooks_in_forward_order():
    model = get_model("vit_t", num_features=16, input_size=32).train()
    shapes = []
    noise = seeded_noise(0)
    set_noise(model, lambda shape: shapes.append(tuple(shape)) or noise(shape))
    model(torch.rand(4, 3, 32, 32))
    assert shapes == [(4, 9)] + [(4, 1, 1)] * 22         # masking, then 2 per block but block 0 (rate 0)


@pytest.mark.parametrize("kwargs, message", VIT_REFUSED)
def test_refused_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_model("vit_t", **kwargs)


def test_any_input_size_from_the_patch_size_up():
    for size, tokens in ((112, 144), (116, 144), (108, 144), (32, 9), (9, 1)):
        assert get_model("vit_t", input_size=size, num_features=8).num_patches == tokens
    with pytest.raises(ValueError, match="expected input .* H = W = 32"):
        get_model("vit_t", input_size=32)(torch.rand(1, 3, 36, 36))


def test_bf16_keeps_attention_norm_and_feature_in_fp32():
    model = get_model("vit_t", input_size=32, num_features=16, precision="bf16").eval()
    seen = {}
    for name in ("blocks.0.attn.qkv", "blocks.0.mlp.fc2", "norm", "feature.0"):
        model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: seen.update({name: o.dtype}))
    assert model(torch.rand(2, 3, 32, 32)).dtype == torch.float32
    assert seen == {"blocks.0.attn.qkv": torch.bfloat16, "blocks.0.mlp.fc2": torch.bfloat16,
                    "norm": torch.float32, "feature.0": torch.float32}


def test_trains_tiny(tmp_path):
    data = tiny_dataset(tmp_path / "synth")
    summary, _ = run_tiny(TorchTwin, data, tmp_path / "run", backbone={"name": "vit_t", "num_features": 32},
                          train={"epochs": 1})
    assert summary["finished"] and summary["steps"] == 4 and summary["onnx_max_abs_diff"] < 1e-4
    model = get_model("vit_t", num_features=32, input_size=32)
    model.load_state_dict(torch.load(summary["backbone"], weights_only=True), strict=True)


def test_inference_copy_fuses_attention_and_the_module_keeps_the_exportable_path():
    """The frozen copy that `embed` runs calls torch's fused attention kernel and agrees with eager at 1e-5; the
    module itself (what ONNX export traces at opset 11) keeps the decomposed softmax(q k^T) v afterwards."""
    model = get_model("vit_t", input_size=18, num_features=16).eval()
    x = torch.rand(3, 3, 18, 18).contiguous(memory_format=torch.channels_last)
    frozen = freeze_for_inference(model)
    assert "aten::scaled_dot_product_attention" in str(frozen.graph)
    assert not any(m.fused for m in model.modules() if isinstance(m, Attention))
    with torch.no_grad():
        eager = model(x)
        traced = torch.jit.trace(model, x, check_trace=False)
        assert "scaled_dot_product_attention" not in str(traced.inlined_graph)
        torch.testing.assert_close(frozen(x), eager, rtol=0, atol=1e-5 * eager.abs().max().item())
