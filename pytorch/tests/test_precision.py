"""Backbone precision (fp32 / fp16 / bf16 trunk, fp32 embedding) and IResNet / ResNeXt gradient checkpointing."""
import pytest
import torch

from twinface_torch.backbones import get_model

SIZE = 32


def images(n=4, seed=0):
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("name, trunk, head", [("r18", "layer4", "fc"), ("mbf", "layers", "conv_sep")])
@pytest.mark.parametrize("precision, reduced", [("fp32", torch.float32), ("fp16", torch.float16),
                                                ("bf16", torch.bfloat16)])
def test_trunk_runs_reduced_embedding_and_variables_stay_fp32(name, trunk, head, precision, reduced):
    torch.manual_seed(0)
    model = get_model(name, num_features=16, input_size=SIZE, precision=precision).train()
    dtypes = {}
    last = getattr(model, trunk)[-1]
    last.register_forward_hook(lambda m, i, o: dtypes.__setitem__("trunk", o.dtype))
    getattr(model, head).register_forward_hook(lambda m, i, o: dtypes.__setitem__("head_in", i[0].dtype))
    out = model(images(2))
    out.square().sum().backward()
    assert dtypes == {"trunk": reduced, "head_in": torch.float32} and out.dtype == torch.float32
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {b.dtype for b in model.buffers() if b.is_floating_point()} == {torch.float32}
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", ["r18", "mbf"])
def test_fp16_flag_is_an_alias(name):
    assert get_model(name, input_size=SIZE, fp16=True).precision == "fp16"
    assert get_model(name, input_size=SIZE, fp16=True, precision="fp16").precision == "fp16"
    assert get_model(name, input_size=SIZE).precision == "fp32"


def test_get_model_refuses_bad_combinations():       # every message: common/tests/test_precision.py
    with pytest.raises(ValueError, match="r18: fp16=True contradicts precision='bf16'"):
        get_model("r18", input_size=SIZE, fp16=True, precision="bf16")
    with pytest.raises(ValueError, match="mbf: gradient checkpointing"):
        get_model("mbf", input_size=SIZE, checkpointing=True)


def train_step(checkpointing, precision, name="r18"):
    """(loss, gradients, BatchNorm statistics, forward calls of one block) after one training step of `name`."""
    torch.manual_seed(0)
    model = get_model(name, num_features=16, input_size=SIZE, precision=precision, checkpointing=checkpointing)
    calls = []
    model.layer2[1].register_forward_pre_hook(lambda m, i: calls.append(1))
    loss = model.train()(images()).square().mean()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    stats = {n: b for n, b in model.named_buffers()}
    return loss.detach(), grads, stats, len(calls)


@pytest.mark.parametrize("name, precision", [("r18", "fp32"), ("r18", "bf16"), ("resnext50", "fp32")])
def test_checkpointing_recomputes_with_identical_numbers(name, precision):
    loss, grads, stats, calls = train_step(False, precision, name)
    loss_c, grads_c, stats_c, calls_c = train_step(True, precision, name)
    assert (calls, calls_c) == (1, 2)                       # each block really runs again in backprop
    # Same ops on the same inputs: measured bitwise equal, so held bitwise.
    assert torch.equal(loss, loss_c)
    assert grads.keys() == grads_c.keys() and all(torch.equal(grads[n], grads_c[n]) for n in grads)
    # The recomputation must not apply the momentum update (or count the batch) a second time.
    assert stats.keys() == stats_c.keys() and all(torch.equal(stats[n], stats_c[n]) for n in stats)


def test_checkpointing_is_off_in_eval_and_without_gradients():
    model = get_model("r18", num_features=16, input_size=SIZE, checkpointing=True)
    calls = []
    model.layer1[0].register_forward_pre_hook(lambda m, i: calls.append(1))
    with torch.no_grad():
        model.train()(images())
    model.eval()(images()).sum().backward()
    assert len(calls) == 2
