import os
import re

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from twinface.registry import BACKBONES  # noqa: E402
from twinface.testing import densenet_param_count, resnext_param_count  # noqa: E402
from twinface_tf.backbones import get_model  # noqa: E402
from twinface_tf.backbones.iresnet import iresnet18  # noqa: E402
from twinface_tf.backbones.mobilefacenet import get_mbf  # noqa: E402
from twinface_tf.backbones.resnext import resnext101  # noqa: E402
from twinface_tf.layers import GroupedConv2D, TorchBatchNorm, conv  # noqa: E402

SMALL = 32      # forward tests run at 32x32: same graph as 112, 12x fewer pixels


# ---- torch architecture, written out independently of the code under test ----

def iresnet_param_count(layers, num_features=512, input_size=112):
    """torch parameters of arcface_torch's IResNet (BN weight + bias, PReLU per channel; no running stats)."""
    total = 3 * 64 * 9 + 2 * 64 + 64                                  # conv1, bn1, prelu
    inplanes = 64
    for planes, blocks in zip((64, 128, 256, 512), layers):
        for i in range(blocks):
            total += 2 * inplanes + 9 * inplanes * planes + 2 * planes + planes + 9 * planes * planes + 2 * planes
            if i == 0:                                                 # every stage starts with stride 2
                total += inplanes * planes + 2 * planes
            inplanes = planes
    fc_in = 512 * (input_size // 16) ** 2
    return total + 2 * 512 + fc_in * num_features + num_features + 2 * num_features


def mbf_param_count(blocks, scale, num_features=512, input_size=112):
    def conv_block(cin, cout, k, groups=1, prelu=True):
        return cout * (cin // groups) * k * k + 2 * cout + (cout if prelu else 0)

    def depthwise(cin, cout, groups):
        return conv_block(cin, groups, 1) + conv_block(groups, groups, 3, groups) + \
            conv_block(groups, cout, 1, prelu=False)

    c1, c2 = 64 * scale, 128 * scale
    total = conv_block(3, c1, 3)
    total += conv_block(c1, c1, 3, 64) if blocks[0] == 1 else blocks[0] * depthwise(c1, c1, 128)
    total += depthwise(c1, c1, 128) + blocks[1] * depthwise(c1, c1, 128)
    total += depthwise(c1, c2, 256) + blocks[2] * depthwise(c2, c2, 256)
    total += depthwise(c2, c2, 512) + blocks[3] * depthwise(c2, c2, 256)
    total += conv_block(c2, 512, 1) + conv_block(512, 512, input_size // 16, 512, prelu=False)
    return total + 512 * num_features + 2 * num_features


def vit_param_count(dim, depth, tokens=144, num_features=512):
    """arcface_torch's ViT: per block 2 LayerNorms, qkv (no bias), proj, fc1 / fc2 (MLP ratio 4)."""
    block = 4 * dim + 3 * dim * dim + dim * dim + dim + 8 * dim * dim + 4 * dim + dim
    stem = dim * 3 * 9 * 9 + dim + tokens * dim + dim                  # patch_embed.proj, pos_embed, mask_token
    head = 2 * dim + tokens * dim * dim + 2 * dim + dim * num_features + 2 * num_features
    return stem + depth * block + head


def torch_param_count(name):
    spec = BACKBONES[name]
    if spec.family == "iresnet":
        return iresnet_param_count(spec.kwargs["layers"])
    if spec.family == "resnext":
        return resnext_param_count(spec.kwargs["layers"])
    if spec.family == "vit":
        return vit_param_count(spec.kwargs["dim"], spec.kwargs["depth"])
    if spec.family == "densenet":
        return densenet_param_count(**spec.kwargs)
    return mbf_param_count(spec.kwargs["blocks"], spec.kwargs["scale"])


def keras_param_count(model):
    """Trainable + non-trainable, without BatchNorm running statistics (torch buffers, not parameters)."""
    return sum(int(np.prod(v.shape)) for v in model.weights if "moving_" not in v.path)


def torch_conv2d(x, w, stride, padding, groups):
    """torch.nn.functional.conv2d in numpy: x NCHW, w OIHW, symmetric zero padding."""
    x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    out_c, in_per_group, kh, kw = w.shape
    out_h, out_w = (x.shape[2] - kh) // stride + 1, (x.shape[3] - kw) // stride + 1
    out_per_group = out_c // groups
    out = np.zeros((x.shape[0], out_c, out_h, out_w))
    for g in range(groups):
        xs = x[:, g * in_per_group:(g + 1) * in_per_group]
        ws = w[g * out_per_group:(g + 1) * out_per_group]
        for i in range(out_h):
            for j in range(out_w):
                patch = xs[:, :, i * stride:i * stride + kh, j * stride:j * stride + kw]
                out[:, g * out_per_group:(g + 1) * out_per_group, i, j] = np.einsum("nckl,ockl->no", patch, ws)
    return out


@pytest.fixture(scope="module")
def r18():
    return get_model("r18", num_features=16, input_size=SMALL)


@pytest.fixture(scope="module")
def mbf():
    return get_model("mbf", num_features=16, input_size=SMALL)


# ---- registry, parameter counts, shapes ----

def test_r50_parameter_count_is_the_published_one():
    assert abs(iresnet_param_count(BACKBONES["r50"].kwargs["layers"]) - 43.6e6) < 0.05e6   # arcface_torch: about 43.6 M


# r200 takes ~8 s to build on these CPUs; it shares every line of code with r100 except its block counts.
@pytest.mark.parametrize("name", sorted(set(BACKBONES) - {"r200"}))
def test_registry_names_build_with_the_torch_parameter_count(name):
    model = get_model(name)
    assert model.name == name
    assert model.output_shape == (None, 512)
    assert keras_param_count(model) == torch_param_count(name)


def test_named_builders_match_registry():
    assert keras_param_count(iresnet18(num_features=128)) == iresnet_param_count((2, 2, 2, 2), 128)
    assert keras_param_count(get_mbf(num_features=128)) == mbf_param_count((1, 4, 6, 2), 2, 128)
    assert keras_param_count(resnext101(num_features=128, input_size=SMALL)) == \
        resnext_param_count((3, 4, 23, 3), 128, SMALL)


@pytest.mark.parametrize("name", ["r18", "mbf", "mbf_large", "densenet121"])
def test_forward_shapes_train_and_inference(name):
    model = get_model(name, num_features=16, input_size=SMALL)
    x = np.random.default_rng(0).uniform(-1, 1, (2, SMALL, SMALL, 3)).astype(np.float32)
    for training in (False, True):
        y = model(x, training=training)
        assert y.shape == (2, 16) and y.dtype == "float32"
        assert np.isfinite(y.numpy()).all()


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown backbone 'r51'.*mbf.*r50"):
        get_model("r51")


@pytest.mark.parametrize("shape", [(2, 3, SMALL, SMALL), (2, SMALL, SMALL, 1), (SMALL, SMALL, 3), (2, 16, 16, 3)])
def test_wrong_input_shape_names_the_model_and_the_expected_layout(r18, shape):
    with pytest.raises(ValueError, match=r"r18: expected input \[N, H, W, 3\].*got shape " + re.escape(repr(shape))):
        r18(np.zeros(shape, np.float32))


def test_input_size_must_be_a_multiple_of_16():
    with pytest.raises(ValueError, match=r"multiple of 16 \(four stride-2 stages\), got 100"):
        get_model("r18", input_size=100)
    with pytest.raises(ValueError, match="mbf: MobileFaceNet has no dropout"):
        get_model("mbf", dropout=0.2)


# ---- names and weight layouts (the converter relies on them) ----

def iresnet_module_paths(layers):
    paths = {"conv1", "bn1", "prelu", "bn2", "fc", "features"}
    for stage, blocks in enumerate(layers, start=1):
        for i in range(blocks):
            paths |= {f"layer{stage}.{i}.{m}" for m in ("bn1", "conv1", "bn2", "prelu", "conv2", "bn3")}
        paths |= {f"layer{stage}.0.downsample.0", f"layer{stage}.0.downsample.1"}
    return paths


def test_iresnet_weighted_layers_are_exactly_the_torch_modules(r18):
    assert {layer.name for layer in r18.layers if layer.weights} == iresnet_module_paths((2, 2, 2, 2))


def test_iresnet_weight_layouts(r18):
    assert r18.get_layer("conv1").kernel.shape == (3, 3, 3, 64)                 # torch (64, 3, 3, 3)
    assert r18.get_layer("layer2.0.conv1").kernel.shape == (3, 3, 64, 128)
    assert r18.get_layer("layer2.0.conv2").strides == (2, 2)
    assert r18.get_layer("layer2.0.conv1").strides == (1, 1)
    assert r18.get_layer("layer2.0.downsample.0").kernel.shape == (1, 1, 64, 128)
    assert r18.get_layer("layer2.0.downsample.0").strides == (2, 2)
    assert r18.get_layer("layer1.1.prelu").alpha.shape == (1, 1, 64)            # torch (64,)
    assert r18.get_layer("fc").kernel.shape == (512 * (SMALL // 16) ** 2, 16)    # torch (16, 2048)
    assert r18.get_layer("fc").bias.shape == (16,)
    bn = r18.get_layer("layer3.1.bn3")
    assert [v.path.split("/")[-1] for v in bn.weights] == ["gamma", "beta", "moving_mean", "moving_variance"]
    with pytest.raises(ValueError):
        r18.get_layer("layer1.1.downsample.0")                                  # only block 0 downsamples


def test_mobilefacenet_weight_layouts(mbf):
    assert mbf.get_layer("layers.0.layers.0").kernel.shape == (3, 3, 3, 128)
    grouped = mbf.get_layer("layers.1.layers.0")                                # groups=64 on 128 channels
    assert isinstance(grouped, GroupedConv2D) and grouped.groups == 64
    assert grouped.kernel.shape == (3, 3, 2, 128)                               # torch (128, 2, 3, 3)
    depthwise = mbf.get_layer("layers.2.layers.1.layers.0")
    assert isinstance(depthwise, keras.layers.DepthwiseConv2D)
    assert depthwise.kernel.shape == (3, 3, 128, 1) and depthwise.strides == (2, 2)  # torch (128, 1, 3, 3)
    assert mbf.get_layer("layers.3.layers.3.layers.2.layers.0").kernel.shape == (1, 1, 128, 128)
    assert isinstance(mbf.get_layer("layers.3.layers.3.layers.2.layers.1"), TorchBatchNorm)
    assert mbf.get_layer("layers.5.layers.0.layers.0.layers.2").alpha.shape == (1, 1, 256)
    assert mbf.get_layer("conv_sep.layers.0").kernel.shape == (1, 1, 256, 512)
    assert mbf.get_layer("features.layers.0.layers.0").kernel.shape == (SMALL // 16, SMALL // 16, 512, 1)
    head = mbf.get_layer("features.layers.2")
    assert head.kernel.shape == (512, 16) and not head.use_bias
    assert mbf.get_layer("features.layers.3").gamma.trainable                   # trainable in MobileFaceNet


def test_resnext_weight_layouts_and_policies():
    model = get_model("resnext50", num_features=16, input_size=SMALL, dropout=0.3, precision="bf16")
    grouped = model.get_layer("layer2.0.conv2")                                 # 32 groups of 8 channels
    assert isinstance(grouped, GroupedConv2D) and grouped.groups == 32 and grouped.strides == (2, 2)
    assert grouped.kernel.shape == (3, 3, 8, 256)                               # torch (256, 8, 3, 3)
    assert model.get_layer("layer2.0.conv1").strides == (1, 1)
    assert model.get_layer("layer2.0.conv3").kernel.shape == (1, 1, 256, 512)
    assert model.get_layer("layer2.0.downsample.0").kernel.shape == (1, 1, 256, 512)
    assert model.get_layer("layer2.1.prelu2").alpha.shape == (1, 1, 256)
    assert model.get_layer("fc").kernel.shape == (2048 * (SMALL // 16) ** 2, 16)
    assert model.get_layer("dropout").rate == 0.3
    assert model.get_layer("layer4.2.bn4").dtype_policy.name == "mixed_bfloat16"
    assert model.get_layer("fc").dtype_policy.name == model.get_layer("features").dtype_policy.name == "float32"
    assert not model.get_layer("features").gamma.trainable
    with pytest.raises(ValueError):
        model.get_layer("layer2.1.downsample.0")                                # only block 0 downsamples
    y = model(np.zeros((2, SMALL, SMALL, 3), np.float32), training=True)
    assert y.shape == (2, 16) and y.dtype == "float32"


def test_mobilefacenet_large_has_residual_layers_1():
    model = get_model("mbf_large", num_features=8, input_size=SMALL)
    assert model.get_layer("layers.1.layers.1.layers.1.layers.0").kernel.shape == (3, 3, 128, 1)
    assert model.get_layer("layers.0.layers.0").kernel.shape == (3, 3, 3, 256)


def test_batchnorm_prelu_and_padding_conventions(r18, mbf):
    for model in (r18, mbf):
        bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
        assert bns and all(isinstance(b, TorchBatchNorm) for b in bns)
        assert all(b.epsilon == 1e-5 and b.momentum == 0.9 for b in bns)
        prelus = [layer for layer in model.layers if isinstance(layer, keras.layers.PReLU)]
        assert prelus and all(np.all(p.alpha.numpy() == 0.25) for p in prelus)
        convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]  # depthwise included
        assert all(c.padding == "valid" for c in convs)
        for c in convs:
            k = c.kernel_size[0]
            if k == 3:
                assert model.get_layer(f"{c.name}.pad").padding == ((1, 1), (1, 1))


def test_features_gamma_is_fixed_at_one_and_not_trainable(r18):
    features = r18.get_layer("features")
    assert np.all(features.gamma.numpy() == 1.0)
    trainable = {id(v) for v in r18.trainable_variables}
    assert id(features.gamma) not in trainable
    assert id(features.beta) in trainable


def test_initialisation_follows_arcface_torch(r18, mbf):
    conv_kernel = r18.get_layer("layer4.1.conv1").kernel.numpy()                # N(0, 0.1), 2.4 M values
    assert abs(conv_kernel.std() - 0.1) < 0.002 and abs(conv_kernel.mean()) < 0.001
    fc = r18.get_layer("fc")
    bound = 1 / np.sqrt(fc.kernel.shape[0])                                    # torch Linear: U(+-1/sqrt(fan_in))
    for values in (fc.kernel.numpy(), fc.bias.numpy()):
        assert np.abs(values).max() <= bound
    assert np.abs(fc.kernel.numpy()).max() > 0.99 * bound
    bn = r18.get_layer("layer1.0.bn2")
    assert np.all(bn.gamma.numpy() == 1) and np.all(bn.beta.numpy() == 0)
    # kaiming_normal(fan_out, relu): std sqrt(2 / (out_channels * kh * kw)), for depthwise too
    depthwise = mbf.get_layer("layers.2.layers.1.layers.0").kernel.numpy()
    assert abs(depthwise.std() / np.sqrt(2 / (128 * 9)) - 1) < 0.1
    pointwise = mbf.get_layer("conv_sep.layers.0").kernel.numpy()
    assert abs(pointwise.std() / np.sqrt(2 / 512) - 1) < 0.02


def test_dropout_and_fp16_policies():
    model = get_model("r18", dropout=0.3, fp16=True, num_features=8, input_size=SMALL)
    assert model.get_layer("dropout").rate == 0.3
    assert model.get_layer("layer1.0.conv1").dtype_policy.name == "mixed_float16"
    assert model.get_layer("bn2").dtype_policy.name == "mixed_float16"
    assert model.get_layer("fc").dtype_policy.name == "float32"
    assert model.get_layer("features").dtype_policy.name == "float32"
    assert model(np.zeros((2, SMALL, SMALL, 3), np.float32), training=True).dtype == "float32"
    mbf16 = get_model("mbf", fp16=True, num_features=8, input_size=SMALL)
    assert mbf16.get_layer("layers.7.layers.0.layers.0.layers.0").dtype_policy.name == "mixed_float16"
    assert mbf16.get_layer("conv_sep.layers.0").dtype_policy.name == "float32"


def test_densenet_layers_names_policies_and_refusals():
    model = get_model("densenet121", fp16=True, dropout=0.2, num_features=8, input_size=SMALL)
    torch_paths = {"conv0", "norm0", "bn2", "fc", "features"}
    for i, layers in enumerate((6, 12, 24, 16), start=1):
        torch_paths |= {f"denseblock{i}.denselayer{j}.{m}" for j in range(1, layers + 1)
                        for m in ("norm1", "relu1", "conv1", "norm2", "relu2", "conv2")}
        torch_paths |= {f"transition{i}.{m}" for m in ("norm", "relu", "conv")} if i < 4 else set()
    assert {layer.name for layer in model.layers if layer.weights} == torch_paths
    assert model.get_layer("transition2.conv").kernel.shape == (1, 1, 512, 256)   # torch (256, 512, 1, 1)
    kernel = model.get_layer("transition2.conv").kernel.numpy()                  # kaiming uniform, fan_in 512
    assert 0.99 < np.abs(kernel).max() / np.sqrt(6 / 512) <= 1
    assert model.get_layer("denseblock4.denselayer1.norm1").dtype_policy.name == "mixed_float16"
    assert model.get_layer("fc").dtype_policy.name == "float32" and model.get_layer("dropout").rate == 0.2
    assert not model.get_layer("features").gamma.trainable
    with pytest.raises(ValueError, match=r"densenet121: input_size must be a positive multiple of 16 .*got 24"):
        get_model("densenet121", input_size=24)


# ---- layers against numpy ----

@pytest.mark.parametrize("in_c, out_c, k, stride, groups", [
    (4, 6, 3, 2, 1),      # strided 3x3 on an even map: "same" would pad bottom/right only
    (8, 8, 3, 1, 4),      # grouped
    (8, 8, 3, 2, 8),      # depthwise
    (4, 6, 1, 2, 1),      # 1x1 downsample
])
def test_conv_matches_torch_conv2d(in_c, out_c, k, stride, groups):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, in_c, 8, 8)).astype(np.float32)
    w = rng.normal(size=(out_c, in_c // groups, k, k)).astype(np.float32)       # torch OIHW
    inputs = keras.Input((8, 8, in_c))
    model = keras.Model(inputs, conv(inputs, out_c, k, "c", stride=stride, padding=k // 2, groups=groups))
    layer = model.get_layer("c")
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        layer.kernel.assign(w.transpose(2, 3, 0, 1))                            # (kh, kw, C, 1)
    else:
        layer.kernel.assign(w.transpose(2, 3, 1, 0))                            # (kh, kw, in / groups, out)
    got = model(x.transpose(0, 2, 3, 1)).numpy().transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, torch_conv2d(x.astype(np.float64), w, stride, k // 2, groups), atol=1e-4)


@pytest.mark.parametrize("shape", [(4, 3, 3, 5), (6, 5)])
def test_torch_batchnorm_training_and_inference(shape):
    rng = np.random.default_rng(2)
    x = (rng.normal(size=shape) * 3 + 1).astype(np.float32)
    bn = TorchBatchNorm()
    bn.build(shape)
    gamma, beta = rng.uniform(0.5, 1.5, 5), rng.normal(size=5)
    bn.gamma.assign(gamma)
    bn.beta.assign(beta)
    axes = tuple(range(len(shape) - 1))
    n = np.prod([shape[a] for a in axes])
    mean, biased = x.mean(axis=axes, dtype=np.float64), x.var(axis=axes, dtype=np.float64)
    y = bn(x, training=True).numpy()
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(biased + 1e-5) * gamma + beta, atol=1e-5)
    np.testing.assert_allclose(bn.moving_mean.numpy(), 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), 0.9 + 0.1 * biased * n / (n - 1), rtol=1e-5)
    running_mean, running_var = bn.moving_mean.numpy(), bn.moving_variance.numpy()
    y = bn(x, training=False).numpy()
    np.testing.assert_allclose(y, (x - running_mean) / np.sqrt(running_var + 1e-5) * gamma + beta, atol=1e-5)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), running_mean)       # inference leaves stats alone


def test_torch_batchnorm_refuses_one_value_per_channel():
    bn = TorchBatchNorm(name="features")
    with pytest.raises(ValueError, match="features: training BatchNorm needs more than 1 value per channel"):
        bn(np.ones((1, 4), np.float32), training=True)
