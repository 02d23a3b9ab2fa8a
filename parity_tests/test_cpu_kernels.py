"""The TF twin trains every backbone under each set of CPU kernels TensorFlow may pick, and agrees with torch.

TensorFlow runs its oneDNN kernels by default only on CPUs with AVX-512 VNNI/BF16 or AMX and its Eigen kernels
elsewhere; twinface switches oneDNN on (twinface/__init__.py), but a user may switch it off, or import
TensorFlow first. So whichever CPU this runs on, each backbone is checked in a fresh process per setting:
Eigen (TF_ENABLE_ONEDNN_OPTS=0, the path with no native grouped-convolution gradient), oneDNN (=1), and, for
two backbones, oneDNN and torch's ATen kernels capped at AVX2, what an AVX2-only CPU runs. The rows and their
tolerances are explained in cpu_kernel_rows.py.
"""
import json
import os
import subprocess
import sys

import pytest

from twinface.registry import BACKBONES

SCRIPT = os.path.join(os.path.dirname(__file__), "cpu_kernel_rows.py")
# The deeper or wider variants of the newer families run the very kernels of the first one (resnext50, vit_t):
# the same ops at other sizes, so CI's budget goes to other checks.
SAME_KERNELS = ("resnext101", "vit_s", "vit_b")
ARCHS = [arch for arch in BACKBONES if arch not in SAME_KERNELS]
SETTINGS = {
    "eigen": ({"TF_ENABLE_ONEDNN_OPTS": "0"}, "TF Eigen", ARCHS),
    "onednn": ({"TF_ENABLE_ONEDNN_OPTS": "1"}, "TF oneDNN", ARCHS),
    "onednn-avx2": ({"TF_ENABLE_ONEDNN_OPTS": "1", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
                    "TF oneDNN, ISA <= AVX2", ["r18", "mbf"]),
}
LARGE = ("r100", "r200")                # `twinface parity --quick` leaves these out
CASES = [pytest.param(setting, arch, part, id=f"{setting}-{arch}-{part}",
                      marks=[pytest.mark.large] if arch in LARGE else [])
         for setting, (_, _, archs) in SETTINGS.items() for arch in archs for part in ("step", "model")]


@pytest.mark.parametrize("setting, arch, part", CASES)
def test_twins_agree_under_each_cpu_kernel_setting(setting, arch, part, parity):
    env, kernels, _ = SETTINGS[setting]
    run = subprocess.run([sys.executable, SCRIPT, arch, part], env={**os.environ, **env}, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["kernels"] == kernels               # the setting took effect: the path under test really ran
    for row in result["rows"]:
        parity.check(f"[{kernels}] {row['what']}", [row["max_diff"]], [0.0], row["tolerance"])
