import os
import subprocess
import sys

from twinface import cpu


def test_isa_reads_the_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("model name\t: Some CPU\nflags\t\t: fpu sse avx avx2 fma avx512f avx512_vnni\n")
    assert cpu.isa(str(info)) == ["AVX2", "AVX-512", "AVX-512 VNNI"]
    info.write_text("flags\t\t: fpu sse avx avx2 fma\n")                  # an AVX2-only EPYC
    assert cpu.isa(str(info)) == ["AVX2"]
    assert cpu.isa(str(tmp_path / "absent")) == []


def _setting_after_import(env):
    probe = "import os, twinface; print(os.environ.get('TF_ENABLE_ONEDNN_OPTS'))"
    return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True).stdout.strip()


def test_twinface_turns_onednn_on_unless_the_user_chose():
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    assert _setting_after_import(env) == "1"
    assert _setting_after_import({**env, "TF_ENABLE_ONEDNN_OPTS": "0"}) == "0"
    assert cpu.tensorflow_kernels({**env, "TF_ENABLE_ONEDNN_OPTS": "0"}) == "Eigen"
    assert cpu.tensorflow_kernels({**env, "TF_ENABLE_ONEDNN_OPTS": "1"}) == "oneDNN"


def test_model_name_reads_the_cpuinfo_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2\n")
    assert cpu.model_name(str(info)) == "AMD EPYC 7B13"
    assert cpu.model_name(str(tmp_path / "absent"))                  # platform's answer, never empty


def test_torch_kernels_follow_the_aten_cap():
    assert cpu.torch_kernels({**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}) == "AVX2 oneDNN"
    assert cpu.torch_kernels({**os.environ, "ATEN_CPU_CAPABILITY": "default"}) == "DEFAULT oneDNN"
