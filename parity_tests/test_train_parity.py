"""The twins train alike: same start, the shared sampler's batches, the shared schedule -> the same loss curve."""
import numpy as np
import pytest

from twinface import schedule
from twinface.data import dataset as dataset_mod
from twinface.data.sampler import EpochSampler
from twinface.testing import CURVE_CAP, curve_tolerance, loss_curves, run_tiny, tiny_config, tiny_dataset

STEPS = 20
NUDGE_CAP = 2e-2       # torch vs torch nudged by 1e-7: beyond this the regime is too chaotic to compare
# 10 identities x 26 images, batch 64: 4 steps per epoch, 5 epochs
CURVE_DATA = {"synth_identities": 10, "synth_images_per_identity": 26, "synth_val_identities": 4,
              "synth_val_pairs": 20}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="module")
def curve_data(tmp_path_factory):
    from twinface.data import synth
    path = str(tmp_path_factory.mktemp("curve_synth"))
    synth.ensure_dataset(path, num_identities=10, images_per_identity=26, val_identities=4, val_pairs=20, seed=0,
                         formats=("rec",), workers=1, progress=False)
    return path


def _three_curves(curve_data, tmp_path, precision, nudge=True, head="cosface"):
    """Loss curves of torch, TF and (nudge) torch with weights nudged by 1e-7 (about one fp32 ulp), same start,
    same batches: r18 + CosFace (or `head`), lr 0.01, batch 64, 20 steps."""
    import os
    import torch
    from twinface_convert.mapping import torch_to_keras
    from twinface_tf.train import TFTwin
    from twinface_torch.train import TorchTwin
    cfg = tiny_config(curve_data, tmp_path, backbone={"name": "r18"}, head={"type": head},
                      optimizer={"lr": 0.01}, train={"epochs": 5, "batch_size": 64, "precision": precision},
                      data=CURVE_DATA)
    dataset = dataset_mod.open_dataset(os.path.join(curve_data, "train.rec"))
    sampler = EpochSampler(len(dataset), cfg.train.batch_size, seed=cfg.seed, flip=True)
    assert sampler.steps_per_epoch() * cfg.train.epochs == STEPS
    lr_of = schedule.from_config(cfg, STEPS, sampler.steps_per_epoch())
    tt, kt, nudged = TorchTwin(), TFTwin(), TorchTwin()
    for twin in (tt, kt, nudged)[:3 if nudge else 2]:
        twin.build(cfg, dataset.num_classes)
    torch_to_keras(tt.backbone.state_dict(), kt.backbone, source="torch backbone")
    torch_to_keras(tt.head.state_dict(), kt.head, source="torch head")
    if not nudge:
        return (*loss_curves((tt, kt), cfg, dataset, sampler, lr_of), None)
    nudged.backbone.load_state_dict(tt.backbone.state_dict())
    nudged.head.load_state_dict(tt.head.state_dict())
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in nudged.backbone.parameters():
            p.mul_(1 + 1e-7 * torch.randn(p.shape, generator=g))
    return loss_curves((tt, kt, nudged), cfg, dataset, sampler, lr_of)


def test_twenty_steps_give_the_same_loss_curve(curve_data, tmp_path, parity):
    """Training from scratch amplifies fp32 rounding: a torch run whose weights are nudged by 1e-7 (about one
    ulp) drifts from the unnudged one within 20 steps (r18 + CosFace, lr 0.01, batch 64). A fixed 1e-4 at step 20
    is below what fp32 can promise, so the curve is held to 10x torch's own drift under a one-ulp nudge, measured
    in the same test, floored at 1e-4 and capped at CURVE_CAP = 2e-2 relative: the cap holds whatever the drift,
    so a real bug (a wrong margin or lr moves the loss by far more) cannot pass on a noisy run. The nudged run
    itself must stay within NUDGE_CAP = 2e-2. Measured here (2-core Xeon with AVX-512): nudge drift 5.9e-3,
    torch vs TF 7.6e-3 (2.6x below the cap). The first three steps (momentum, weight decay and the schedule
    already in play) keep 1e-4 before the drift grows."""
    _check_curves(parity, "cosface", *_three_curves(curve_data, tmp_path, "fp32"))


def test_twenty_adaface_steps_give_the_same_loss_curve(curve_data, tmp_path, parity):
    """The same curve with the AdaFace head, whose margin follows the norm EMA that both twins update every step
    (and carry over from the same start: the converter copies batch_mean/batch_std with the centres)."""
    _check_curves(parity, "adaface", *_three_curves(curve_data, tmp_path, "fp32", head="adaface"))


def _check_curves(parity, head, t, k, n):
    """It learns; steps 1-3 within 1e-4; the curve within curve_tolerance of torch's own drift under the nudge."""
    assert t[-4:].mean() < 0.8 * t[:4].mean()                  # it learns
    parity.check(f"r18 + {head}, loss at steps 1-3, torch vs TF", t[:3], k[:3], 1e-4, relative=True)
    drift = float(np.max(np.abs(t - n) / np.abs(t)))
    parity.check(f"r18 + {head}, loss curve over {STEPS} steps, torch vs torch nudged by 1e-7", [drift], [0.0],
                 NUDGE_CAP)
    parity.check(f"r18 + {head}, loss curve over {STEPS} steps, torch vs TF (tol 10x the nudge drift, cap "
                 f"{CURVE_CAP:g})", [float(np.max(np.abs(t - k) / np.abs(t)))], [0.0], curve_tolerance(drift))


BF16_EPS = 2.0 ** -8     # bf16 keeps 8 significant bits: relative rounding of one value up to 2^-8 (3.9e-3)
BF16_START = 4 * BF16_EPS    # steps 1-3: the loss of a bf16 conv trunk, rounded differently by the two twins
BF16_CURVE_CAP = 5e-2


def test_twenty_bf16_steps_give_the_same_loss_curve(curve_data, tmp_path, parity):
    """The bf16 curve: the conv trunk in bf16 (head, loss and the embedding BatchNorm in fp32). The twins round
    each bf16 op at possibly different points (fusion, accumulation order), so their loss differs from step 1 by
    up to a few bf16 epsilons: steps 1-3 are held to 4 x 2^-8 = 1.6e-2 relative. Over 20 steps bf16 rounding
    itself is the noise: torch against torch with weights nudged by 1e-7 drifted by 2.8e-2 (measured once,
    2-core Xeon with AVX512-BF16/AMX), so the curve gets a fixed BF16_CURVE_CAP = 5e-2 relative rather than a
    per-run measurement (a bf16 torch run on CPU costs ~6x fp32 in convolution backward). Measured: steps 1-3
    1.1e-3, the curve 2.85e-2."""
    t, k, _ = _three_curves(curve_data, tmp_path, "bf16", nudge=False)
    assert t[-4:].mean() < 0.8 * t[:4].mean()                  # it learns in bf16 too
    parity.check("r18 + cosface bf16, loss at steps 1-3, torch vs TF", t[:3], k[:3], BF16_START, relative=True)
    parity.check(f"r18 + cosface bf16, loss curve over {STEPS} steps, torch vs TF",
                 [float(np.max(np.abs(t - k) / np.abs(t)))], [0.0], BF16_CURVE_CAP)


def test_finetune_from_the_other_framework_converts_and_freezes(data, tmp_path):
    """torch finetunes from TF weights: converted with proof, frozen for the first epoch, then trained."""
    import torch
    from twinface_tf.train import TFTwin
    from twinface_torch.train import TorchTwin
    run_tiny(TFTwin, data, tmp_path / "tf", train={"epochs": 1})
    with pytest.raises(KeyboardInterrupt):        # stop right after the frozen first epoch
        run_tiny(TorchTwin, data, tmp_path / "ft", kill_after=4,
                 finetune={"weights": str(tmp_path / "tf" / "backbone.weights.h5"), "freeze_epochs": 1})
    init = torch.load(tmp_path / "ft" / "finetune_init.pth", weights_only=True)
    after_frozen = torch.load(tmp_path / "ft" / "backbone.pth", weights_only=True)
    for name, value in init.items():
        assert torch.equal(value, after_frozen[name]), f"{name} changed while the backbone was frozen"
    log = (tmp_path / "ft" / "train.log").read_text()
    assert "PASS" in log and "backbone frozen" in log
    summary, twin = run_tiny(TorchTwin, data, tmp_path / "ft2", finetune={
        "weights": str(tmp_path / "tf" / "backbone.weights.h5"), "freeze_epochs": 1, "backbone_lr_scale": 0.1})
    trained = twin.backbone.state_dict()
    assert any(not torch.equal(init[n], trained[n]) for n in init if not n.endswith("num_batches_tracked"))


def test_the_curve_tolerance_is_measured_but_capped():
    assert curve_tolerance(1e-3) == pytest.approx(1e-2)        # 10x the measured drift
    assert curve_tolerance(1e-7) == 1e-4                       # floor
    assert curve_tolerance(0.05) == CURVE_CAP == 2e-2          # a noisy run cannot let a 50% difference pass
