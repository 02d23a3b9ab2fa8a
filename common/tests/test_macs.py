import pytest

from twinface.macs import count_macs
from twinface.registry import BACKBONES, backbone_spec

# arcface_torch's published cost at 112x112, in G (one decimal; MobileFaceNet two).
PUBLISHED = {"r18": 2.6, "r50": 6.3, "r100": 12.1, "r200": 23.5, "mbf": 0.45}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_counted_macs_reproduce_the_published_figures(name):
    digits = 2 if PUBLISHED[name] < 1 else 1
    assert round(backbone_spec(name).gmacs, digits) == PUBLISHED[name]


def test_every_backbone_has_a_cost_that_grows_with_the_input_and_the_depth():
    assert all(spec.gmacs > 0.1 for spec in BACKBONES.values())
    ordered = [backbone_spec(n).gmacs for n in ("r18", "r34", "r50", "r100", "r200")]
    assert ordered == sorted(ordered)
    assert backbone_spec("mbf").gmacs < backbone_spec("mbf_large").gmacs < backbone_spec("r18").gmacs
    assert backbone_spec("r18").gmacs < backbone_spec("resnext50").gmacs < backbone_spec("resnext101").gmacs
    spec = backbone_spec("r50")
    assert count_macs(spec.family, spec.kwargs, input_size=224) > 3.9 * count_macs(spec.family, spec.kwargs)
    with pytest.raises(ValueError, match="unknown backbone family 'swin'"):
        count_macs("swin", {})
