import pytest

from twinface.precision import check_checkpointing, resolve_precision


def test_precision_defaults_to_the_fp16_flag():
    assert resolve_precision("r18") == "fp32"
    assert resolve_precision("r18", fp16=True) == "fp16"
    assert resolve_precision("r18", "bf16") == "bf16"
    assert resolve_precision("r18", "fp16", fp16=True) == "fp16"


def test_bad_precisions_are_refused_by_name():
    with pytest.raises(ValueError, match="r18: fp16=True contradicts precision='bf16'; set only one of them"):
        resolve_precision("r18", "bf16", fp16=True)
    with pytest.raises(ValueError, match="r18: fp16=True contradicts precision='fp32'"):
        resolve_precision("r18", "fp32", fp16=True)
    with pytest.raises(ValueError, match="mbf: precision must be one of fp32, fp16, bf16, got 'float16'"):
        resolve_precision("mbf", "float16")


def test_checkpointing_is_for_iresnet_only():
    check_checkpointing("r100", True)
    check_checkpointing("mbf", False)
    with pytest.raises(ValueError,
                       match="mbf: gradient checkpointing .* IResNet and ResNeXt only, not for mobilefacenet"):
        check_checkpointing("mbf", True)
