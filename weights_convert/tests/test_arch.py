"""Architecture inference from tensor shapes, and the misfit errors (cheap: meta-device templates only)."""
import pytest

from twinface.registry import BACKBONES
from twinface_convert.arch import Backbone, infer_named, infer_unnamed, template_shapes


@pytest.mark.parametrize("arch", list(BACKBONES))
def test_every_backbone_is_inferred_from_its_names_and_from_its_shapes_alone(arch):
    for backbone in (Backbone(arch), Backbone(arch, num_features=128, input_size=32)):
        shapes = dict(template_shapes(backbone))
        assert infer_named(shapes, "ckpt") == backbone
        weights = [s for s in shapes.values() if len(s) >= 2]
        assert infer_unnamed(weights[::-1], "ckpt")[0] == backbone        # order does not matter


def test_given_arch_that_does_not_fit_names_the_first_misfit_with_both_shapes():
    shapes = dict(template_shapes(Backbone("r18")))
    with pytest.raises(ValueError, match=r"tensor 'layer1\.2\.bn1\.weight' \(shape \(64,\)\) of r34 .* is missing"):
        infer_named(shapes, "ckpt", arch="r34")
    shapes["layer2.0.conv1.weight"] = (128, 32, 3, 3)
    with pytest.raises(ValueError, match=r"ckpt: tensor 'layer2\.0\.conv1\.weight' has shape \(128, 32, 3, 3\), "
                                         r"r18 .* expects \(128, 64, 3, 3\)"):
        infer_named(shapes, "ckpt", arch="r18")


def test_no_match_names_the_nearest_backbone_and_its_first_misfit():
    shapes = dict(template_shapes(Backbone("r50")))
    del shapes["layer3.13.prelu.weight"]
    with pytest.raises(ValueError, match=r"match no known backbone .* nearest r50: .*'layer3\.13\.prelu\.weight'"):
        infer_named(shapes, "ckpt")


def test_foreign_tensors_and_foreign_shapes_are_refused_clearly():
    with pytest.raises(ValueError, match="not a twinface/arcface_torch backbone"):
        infer_named({"encoder.weight": (10, 10, 3, 3)}, "ckpt")
    with pytest.raises(ValueError, match=r"its 2 convolution / linear weights match no known backbone"):
        infer_unnamed([(64, 3, 3, 3), (512, 2048)], "model.onnx")
