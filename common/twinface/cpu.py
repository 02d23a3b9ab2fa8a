"""What this CPU offers the kernels both twins run: its instruction sets and TensorFlow's kernel choice.

TensorFlow picks oneDNN or Eigen once, at import: TF_ENABLE_ONEDNN_OPTS=1/0 if set, else oneDNN only on CPUs with
AVX-512 VNNI/BF16 or AMX. twinface sets it to 1 when the user has not (twinface/__init__.py).
"""
import os
import subprocess
import sys

ISA_NAMES = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "AVX-512 VNNI", "avx512_bf16": "AVX-512 BF16",
             "amx_tile": "AMX"}


def model_name(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name ("Intel(R) Xeon(R) ...", platform.processor() where /proc/cpuinfo is absent)."""
    try:
        with open(cpuinfo) as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        return platform.processor() or "unknown"


def isa(cpuinfo: str = "/proc/cpuinfo") -> list:
    """The instruction sets of ISA_NAMES this CPU has, by their usual names ([] where /proc/cpuinfo is absent)."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [name for flag, name in ISA_NAMES.items() if flag in flags]


def torch_kernels(env: dict = None) -> str:
    """The ATen kernel level torch dispatches to ("AVX512", "AVX2", ...; ATEN_CPU_CAPABILITY caps it) and whether its
    oneDNN (mkldnn) backend is there, asked of torch in a child process started with `env`."""
    probe = ("import torch; print(torch.backends.cpu.get_cpu_capability(), "
             "'oneDNN' if torch.backends.mkldnn.is_available() else 'no oneDNN')")
    return _ask(probe, env)


def tensorflow_kernels(env: dict = None) -> str:
    """'oneDNN' or 'Eigen': what TensorFlow runs in a process started with `env` (default: this one's), asked of
    TensorFlow itself in a child process so that this one never imports it."""
    probe = ("from tensorflow.python.util import _pywrap_util_port as p; "
             "print('oneDNN' if p.IsMklEnabled() else 'Eigen')")
    return _ask(probe, env)


def _ask(probe: str, env: dict = None) -> str:
    run = subprocess.run([sys.executable, "-c", probe], env={"TF_CPP_MIN_LOG_LEVEL": "3", **(env or os.environ)},
                         capture_output=True, text=True, timeout=300)
    return run.stdout.strip() if run.returncode == 0 else f"unknown ({run.stderr.strip().splitlines()[-1:]})"
