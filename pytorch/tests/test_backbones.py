import io

import pytest
import torch
from torch import nn

from twinface.registry import BACKBONES
from twinface.testing import (TORCHVISION_RESNEXT50_PARAMS, densenet_param_count, resnext_blocks,
                              resnext_conv_weights, resnext_param_count)
from twinface_torch.backbones import get_model
from twinface_torch.backbones.iresnet import iresnet18, iresnet50
from twinface_torch.backbones.mobilefacenet import get_mbf, get_mbf_large
from twinface_torch.backbones.resnext import resnext50, resnext101

BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def iresnet_param_count(layers, input_size=112, num_features=512):
    """Parameters of an IResNet from its architecture alone (weights + biases, BN gamma/beta, PReLU slopes)."""
    total = 3 * 64 * 9 + 2 * 64 + 64                      # stem conv, bn1, prelu
    inplanes = 64
    for planes, blocks in zip((64, 128, 256, 512), layers):
        for index in range(blocks):
            cin = inplanes if index == 0 else planes
            total += 2 * cin + cin * planes * 9 + 2 * planes + planes + planes * planes * 9 + 2 * planes
            if index == 0:                                  # stride 2: conv1x1 + BN shortcut
                total += cin * planes + 2 * planes
        inplanes = planes
    fc_in = 512 * (input_size // 16) ** 2
    return total + 2 * 512 + fc_in * num_features + num_features + 2 * num_features


def iresnet_state_keys(layers):
    """arcface_torch's backbone.pth key names, written out from its naming rules."""
    keys = ["conv1.weight", "prelu.weight", "fc.weight", "fc.bias"]
    keys += [f"{bn}.{k}" for bn in ("bn1", "bn2", "features") for k in BN_KEYS]
    for stage, blocks in enumerate(layers, start=1):
        for index in range(blocks):
            block = f"layer{stage}.{index}"
            keys += [f"{block}.conv1.weight", f"{block}.conv2.weight", f"{block}.prelu.weight"]
            keys += [f"{block}.{bn}.{k}" for bn in ("bn1", "bn2", "bn3") for k in BN_KEYS]
            if index == 0:
                keys += [f"{block}.downsample.0.weight"] + [f"{block}.downsample.1.{k}" for k in BN_KEYS]
    return set(keys)


def num_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_registry_name_builds(name):
    with torch.device("meta"):                              # structure only: no memory, no init cost
        model = get_model(name)
    assert model.arch == name
    if BACKBONES[name].family == "iresnet":
        layers = BACKBONES[name].kwargs["layers"]
        assert num_params(model) == iresnet_param_count(layers)
        assert set(model.state_dict()) == iresnet_state_keys(layers)
    elif BACKBONES[name].family == "resnext":
        assert num_params(model) == resnext_param_count(BACKBONES[name].kwargs["layers"])
    elif BACKBONES[name].family == "densenet":
        assert num_params(model) == densenet_param_count(**BACKBONES[name].kwargs)
    elif BACKBONES[name].family == "mobilefacenet":
        assert "features.layers.3.running_var" in model.state_dict()
    else:                                                   # vit: pytorch/tests/test_vit.py
        assert "feature.3.running_var" in model.state_dict()


def test_r50_param_count_matches_insightface():
    with torch.device("meta"):
        count = num_params(get_model("r50"))
    assert count == iresnet_param_count((3, 4, 14, 3)) == 43_590_848
    assert 43.5e6 < count < 43.7e6


def test_named_builders_match_registry():
    with torch.device("meta"):
        pairs = [(iresnet50(), get_model("r50")), (get_mbf(), get_model("mbf")),
                 (get_mbf_large(), get_model("mbf_large")), (resnext50(), get_model("resnext50")),
                 (resnext101(), get_model("resnext101"))]
    for built, looked_up in pairs:
        assert {k: v.shape for k, v in built.state_dict().items()} == \
               {k: v.shape for k, v in looked_up.state_dict().items()}


def test_r50_forward_two_images():
    torch.manual_seed(0)
    model = get_model("r50").eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 112, 112) * 2 - 1)
    assert out.shape == (2, 512) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("input_size", [96, 128])
def test_iresnet_other_input_sizes_and_num_features(input_size):
    model = get_model("r18", num_features=128, input_size=input_size).eval()
    assert model.fc.in_features == 512 * (input_size // 16) ** 2
    with torch.no_grad():
        assert model(torch.zeros(2, 3, input_size, input_size)).shape == (2, 128)


@pytest.mark.parametrize("name", ["mbf", "mbf_large"])
def test_mobilefacenet_output_shapes(name):
    model = get_model(name, num_features=128, input_size=32).eval()
    with torch.no_grad():
        assert model(torch.zeros(3, 3, 32, 32)).shape == (3, 128)
    assert get_model("mbf").features.layers[0].layers[0].kernel_size == (7, 7)


@pytest.mark.parametrize("name", ["r18", "mbf", "resnext50"])
def test_input_size_must_be_multiple_of_16(name):
    with pytest.raises(ValueError, match=f"{name}: input_size must be a positive multiple of 16, got 100"):
        get_model(name, input_size=100)


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="r51") as error:
        get_model("r51")
    for known in BACKBONES:
        assert known in str(error.value)


@pytest.mark.parametrize("name", ["r18", "mbf"])
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 1, 32, 32), (1, 32, 32, 3), (1, 3, 64, 64)])
def test_wrong_input_shape_is_named(name, shape):
    model = get_model(name, input_size=32)
    with pytest.raises(ValueError, match=rf"{name}: expected input \[N, 3, H, W\].*got shape \({shape[0]}, "):
        model(torch.zeros(shape))


def test_integer_input_is_rejected():
    with pytest.raises(ValueError, match="r18: expected a float tensor"):
        get_model("r18", input_size=32)(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_iresnet_key_names_and_shapes_spot_check():
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in get_model("r50").state_dict().items()}
    assert shapes["conv1.weight"] == (64, 3, 3, 3)
    assert shapes["prelu.weight"] == (64,)
    assert shapes["layer1.0.downsample.0.weight"] == (64, 64, 1, 1)
    assert shapes["layer2.0.conv1.weight"] == (128, 64, 3, 3)
    assert shapes["layer2.0.conv2.weight"] == (128, 128, 3, 3)
    assert shapes["layer3.13.bn3.running_var"] == (256,)
    assert shapes["layer4.0.downsample.1.weight"] == (512,)
    assert shapes["bn2.running_mean"] == (512,)
    assert shapes["fc.weight"] == (512, 512 * 7 * 7) and shapes["fc.bias"] == (512,)
    assert shapes["features.bias"] == (512,)
    assert "layer2.1.downsample.0.weight" not in shapes


def test_resnext_stage_convolutions_are_torchvisions():
    # torchvision's resnext50_32x4d = its 7x7 stem conv + BN, these stage convolutions, three BNs per block (+ the
    # downsample's), fc 2048 -> 1000: the published total checks the 32x4d widths written out in resnext_blocks.
    norms = sum(2 * (2 * width + out) + (2 * out if down else 0)
                for _, width, out, down in resnext_blocks((3, 4, 6, 3)))
    assert 3 * 64 * 49 + 2 * 64 + resnext_conv_weights((3, 4, 6, 3)) + norms + 2049 * 1000 == \
        TORCHVISION_RESNEXT50_PARAMS
    with torch.device("meta"):
        model = get_model("resnext50")
    stage_convs = sum(m.weight.numel() for n, m in model.named_modules()
                      if isinstance(m, nn.Conv2d) and n.startswith("layer"))
    assert stage_convs == resnext_conv_weights((3, 4, 6, 3))
    assert num_params(model) == 74_399_488 and 51_380_224 == model.fc.weight.numel()


def test_resnext_key_names_shapes_and_strides_spot_check():
    with torch.device("meta"):
        model = get_model("resnext101")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["conv1.weight"] == (64, 3, 3, 3) and shapes["prelu.weight"] == (64,)
    assert shapes["layer1.0.bn1.running_mean"] == (64,)
    assert shapes["layer1.0.conv1.weight"] == (128, 64, 1, 1)
    assert shapes["layer1.0.conv2.weight"] == (128, 4, 3, 3)           # 32 groups of 4 channels
    assert shapes["layer1.0.prelu1.weight"] == shapes["layer1.0.prelu2.weight"] == (128,)
    assert shapes["layer1.0.conv3.weight"] == (256, 128, 1, 1) and shapes["layer1.0.bn4.weight"] == (256,)
    assert shapes["layer1.0.downsample.0.weight"] == (256, 64, 1, 1)
    assert shapes["layer3.22.conv2.weight"] == (512, 16, 3, 3) and "layer3.23.bn1.weight" not in shapes
    assert shapes["layer4.2.conv3.weight"] == (2048, 1024, 1, 1) and shapes["bn2.running_var"] == (2048,)
    assert shapes["fc.weight"] == (512, 2048 * 7 * 7) and shapes["features.bias"] == (512,)
    assert "layer2.1.downsample.0.weight" not in shapes
    assert {n: (m.stride, m.groups) for n, m in model.named_modules() if n.endswith("conv2")} == \
        {f"layer{s}.{i}.conv2": ((2, 2) if i == 0 else (1, 1), 32)
         for s, blocks in enumerate((3, 4, 23, 3), start=1) for i in range(blocks)}


def test_resnext_forward_init_and_frozen_features_scale():
    torch.manual_seed(0)
    model = get_model("resnext50", num_features=64, input_size=32, dropout=0.2)
    assert model.dropout.p == 0.2 and not model.features.weight.requires_grad
    assert abs(model.layer3[0].conv2.weight.std().item() - 0.1) < 0.002    # IResNet's normal(0, 0.1)
    assert torch.equal(model.layer2[1].bn4.weight, torch.ones(512))
    with torch.no_grad():
        out = model.eval()(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert out.shape == (2, 64) and torch.isfinite(out).all()


def test_mobilefacenet_key_names_and_shapes_spot_check():
    with torch.device("meta"):
        mbf = {k: tuple(v.shape) for k, v in get_model("mbf").state_dict().items()}
        large = {k: tuple(v.shape) for k, v in get_model("mbf_large").state_dict().items()}
    assert mbf["layers.0.layers.0.weight"] == (128, 3, 3, 3)
    assert mbf["layers.0.layers.1.running_var"] == (128,)
    assert mbf["layers.0.layers.2.weight"] == (128,)
    assert mbf["layers.1.layers.0.weight"] == (128, 2, 3, 3)          # groups=64 on 128 channels
    assert mbf["layers.2.layers.0.layers.0.weight"] == (128, 128, 1, 1)
    assert mbf["layers.2.layers.1.layers.0.weight"] == (128, 1, 3, 3)   # depthwise, 128 wide
    assert mbf["layers.2.layers.2.layers.0.weight"] == (128, 128, 1, 1)
    assert mbf["layers.5.layers.5.layers.1.layers.0.weight"] == (256, 1, 3, 3)
    assert "layers.5.layers.6.layers.0.layers.0.weight" not in mbf      # blocks[2] == 6
    assert mbf["layers.6.layers.1.layers.0.weight"] == (512, 1, 3, 3)
    assert mbf["conv_sep.layers.0.weight"] == (512, 256, 1, 1)
    assert {f"conv_sep.layers.{i}.weight" for i in range(3)} <= set(mbf)
    assert mbf["features.layers.0.layers.0.weight"] == (512, 1, 7, 7)
    assert mbf["features.layers.0.layers.1.running_mean"] == (512,)
    assert mbf["features.layers.2.weight"] == (512, 512)
    assert "features.layers.2.bias" not in mbf
    assert mbf["features.layers.3.weight"] == (512,)
    assert large["layers.0.layers.0.weight"] == (256, 3, 3, 3)
    assert large["layers.1.layers.1.layers.0.layers.0.weight"] == (128, 256, 1, 1)  # Residual when blocks[0]==2
    assert large["conv_sep.layers.0.weight"] == (512, 512, 1, 1)


def test_state_dict_round_trip_strict_with_weights_only():
    torch.manual_seed(0)
    source, target = get_model("r18", input_size=32), get_model("r18", input_size=32)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(source.eval()(x), target.eval()(x))


def test_features_bn_scale_frozen_at_one_in_iresnet_only():
    iresnet = get_model("r18", input_size=32)
    assert not iresnet.features.weight.requires_grad
    assert torch.equal(iresnet.features.weight, torch.ones(512))
    assert iresnet.features.bias.requires_grad
    assert get_model("mbf", input_size=32).features.layers[3].weight.requires_grad


@pytest.mark.parametrize("name", ["r18", "mbf_large"])
def test_batchnorm_eps_momentum_and_prelu_init_everywhere(name):
    model = get_model(name, input_size=32)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    prelus = [m for m in model.modules() if isinstance(m, nn.PReLU)]
    assert norms and prelus
    assert all(m.eps == 1e-5 and m.momentum == 0.1 for m in norms)
    assert all(torch.equal(m.weight, torch.full_like(m.weight, 0.25)) and m.weight.numel() > 1 for m in prelus)


def test_iresnet_init():
    torch.manual_seed(0)
    model = iresnet18(input_size=32)
    conv = model.layer3[0].conv2.weight
    assert abs(conv.std().item() - 0.1) < 0.002 and abs(conv.mean().item()) < 0.002
    bound = 1 / (512 * 4) ** 0.5                            # torch Linear default: U(-1/sqrt(fan_in), ..)
    assert model.fc.weight.abs().max() <= bound and model.fc.weight.abs().max() > 0.99 * bound
    assert model.fc.bias.abs().max() <= bound
    assert torch.equal(model.layer1[0].bn2.weight, torch.ones(64))
    assert torch.equal(model.layer1[0].bn2.bias, torch.zeros(64))


def test_mobilefacenet_init_is_kaiming_fan_out():
    torch.manual_seed(0)
    model = get_mbf(input_size=32)
    pointwise = model.layers[4].layers[0].layers[0].weight     # 256 out channels, 1x1: fan_out = 256
    assert abs(pointwise.std().item() - (2 / 256) ** 0.5) < 0.003
    linear = model.features.layers[2].weight                   # fan_out = 512
    assert abs(linear.std().item() - (2 / 512) ** 0.5) < 0.002


def test_dropout_setting():
    assert get_model("r18", dropout=0.4, input_size=32).dropout.p == 0.4
    assert get_model("r18", input_size=32).dropout.inplace is False
    with pytest.raises(ValueError, match="mbf: MobileFaceNet has no dropout"):
        get_model("mbf", dropout=0.4)


@pytest.mark.parametrize("name, trunk, head", [("r18", "layer4", "fc"), ("mbf", "layers", "conv_sep"),
                                               ("densenet121", "denseblock4", "fc")])
def test_fp16_covers_the_trunk_only(name, trunk, head):
    dtypes = {}

    def record(key, dtype):                                 # a hook returning a value would replace the output
        dtypes[key] = dtype

    model = get_model(name, fp16=True, input_size=16).eval()      # fp16 convs are slow on CPU: keep it tiny
    trunk_module = getattr(model, trunk)
    last_trunk = trunk_module[-1] if isinstance(trunk_module, nn.ModuleList) else trunk_module
    last_trunk.register_forward_hook(lambda m, i, o: record("trunk", o.dtype))
    getattr(model, head).register_forward_hook(lambda m, i, o: record("head_in", i[0].dtype))
    with torch.no_grad():
        out = model(torch.rand(1, 3, 16, 16))
    assert dtypes == {"trunk": torch.float16, "head_in": torch.float32}
    assert out.dtype == torch.float32


def test_densenet121_structure_names_and_sizes():
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in get_model("densenet121").state_dict().items()}
    assert shapes["conv0.weight"] == (64, 3, 3, 3)                         # fdensenet's 112x112 stem: 3x3, stride 1
    assert shapes["denseblock1.denselayer1.norm1.running_var"] == (64,)
    assert shapes["denseblock1.denselayer1.relu1.weight"] == (64,)
    assert shapes["denseblock1.denselayer1.conv1.weight"] == (128, 64, 1, 1)     # bn_size 4 x growth 32
    assert shapes["denseblock1.denselayer1.conv2.weight"] == (32, 128, 3, 3)
    assert shapes["denseblock1.denselayer6.norm1.weight"] == (64 + 5 * 32,)
    assert shapes["transition1.conv.weight"] == (128, 256, 1, 1)                # compression 0.5
    assert shapes["transition3.conv.weight"] == (512, 1024, 1, 1)
    assert "transition4.conv.weight" not in shapes and "denseblock4.denselayer17.conv1.weight" not in shapes
    assert shapes["bn2.weight"] == (1024,)
    assert shapes["fc.weight"] == (512, 1024 * 7 * 7)                          # 50176 x 512: 25.7 M of 32.7 M
    assert densenet_param_count((6, 12, 24, 16)) == 32_678_560


def test_densenet_dense_layer_appends_new_channels_after_the_old():
    model = get_model("densenet121", input_size=32).eval()
    layer = model.denseblock2.denselayer3
    x = torch.randn(2, layer.norm1.num_features, 4, 4)
    with torch.no_grad():
        out = layer(x)
    assert out.shape == (2, x.shape[1] + 32, 4, 4)
    assert torch.equal(out[:, :x.shape[1]], x)


def test_densenet_options_and_refusals():
    model = get_model("densenet121", num_features=64, dropout=0.2, input_size=32)
    assert model.dropout.p == 0.2 and model.fc.weight.shape == (64, 1024 * 2 * 2)
    assert model.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 64)
    with pytest.raises(ValueError, match="densenet121: input_size must be a positive multiple of 16, got 40"):
        get_model("densenet121", input_size=40)
    with pytest.raises(ValueError,
                       match="densenet121: gradient checkpointing .* IResNet and ResNeXt only, not for densenet"):
        get_model("densenet121", checkpointing=True)
    with pytest.raises(ValueError, match=r"densenet121: expected input \[N, 3, H, W\] with H = W = 32"):
        model(torch.rand(2, 3, 112, 112))


def test_densenet_init_follows_fdensenet():
    torch.manual_seed(0)
    model = get_model("densenet121", input_size=32)
    conv1 = model.denseblock3.denselayer1.conv1.weight           # 256 in, 1x1: fan_in 256, U(-b, b), b = sqrt(6/256)
    assert abs(conv1.std().item() - (2 / 256) ** 0.5) < 0.002 and 0.99 < conv1.abs().max() / (6 / 256) ** 0.5 <= 1
    fc = model.fc.weight                                          # fan_in 1024 * 2 * 2
    assert abs(fc.std().item() - (2 / 4096) ** 0.5) < 0.0005 and not model.fc.bias.any()
    prelus = [m for m in model.modules() if isinstance(m, nn.PReLU)]
    assert len(prelus) == 2 * 58 + 3 and all(bool((m.weight == 0.25).all()) for m in prelus)
    assert isinstance(model.relu0, nn.ReLU)                      # fdensenet's stem keeps ReLU
    assert not model.features.weight.requires_grad and torch.equal(model.features.weight, torch.ones(512))
