"""Ahead-of-time compiled backbones: an AOTInductor package (`backbone.pt2`) beside `backbone.pth`.

torch.compile's code is the fastest torch path on CPU for some backbones (docs/bench.md) but costs about a
minute of compiling in every new process. The package holds that machine code, compiled once (at export, or at
the end of a training with `train.aot_package: true`), for inputs of any batch size; `Embedder` runs it instead
of the default path when it finds one beside the weights that fits.

Compiled code fits only what it was compiled for, so the package records, in `twinface.json` inside its zip:
the sha256 of the weights file, arch, input and embedding size, the torch version, and the CPU's instruction
sets and ATen kernel level. A package that does not fit this machine, these weights or this torch is not used,
and `Embedder` says why and runs the default path. Without a working C++ compiler nothing is written, with the
reason (inductor's own message names the compiler it tried; `CXX` picks another).
"""
import json
import zipfile

import numpy as np
import torch

from twinface import cpu
from twinface.atomic import atomic_path
from twinface.data.transforms import to_model_input
from twinface.embedders import package_path  # noqa: F401  (aot.package_path: where embed looks for a package)
from twinface.eval.embeddings import l2_normalize

META = "twinface.json"
TOLERANCE = 1e-5                      # L2-normalised embeddings, package vs eager module
MAX_BATCH = 4096


def identity(arch: str, input_size: int, num_features: int, weights_sha256: str) -> dict:
    """What a package is compiled for: these weights of this backbone, this torch, this CPU."""
    return {"weights_sha256": weights_sha256, "arch": arch, "input_size": input_size, "num_features": num_features,
            "torch": torch.__version__, "isa": cpu.isa(), "aten": torch.backends.cpu.get_cpu_capability()}


def compile_package(model, path: str, spec: dict) -> float:
    """Compile the eval-mode CPU `model` into the package `path` (dynamic batch), check it against the module on
    seeded images and write it atomically with `spec` (identity()); returns the max abs diff of the L2-normalised
    embeddings. Raises RuntimeError with inductor's reason when it cannot compile (no C++ compiler, ...) and
    ValueError past TOLERANCE; either way `path` is left as it was."""
    model = model.eval()
    size = model.input_size
    images = np.random.default_rng(0).integers(0, 256, (4, 112, 112, 3), dtype=np.uint8)
    x = torch.from_numpy(to_model_input(images, "NCHW", size))
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with atomic_path(path, ".pt2") as tmp:
        try:
            with torch.no_grad():
                program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
                torch._inductor.aoti_compile_and_package(program, package_path=tmp)
        except Exception as e:                          # inductor wraps compiler and codegen failures alike
            reason = str(e).strip().splitlines()[-1]
            raise RuntimeError(f"{path}: AOTInductor could not compile {spec['arch']}: {reason}") from e
        with zipfile.ZipFile(tmp, "a") as z:              # inside the package's own folder, where its loader looks
            top = z.namelist()[0].split("/")[0]
            z.writestr(f"{top}/{META}", json.dumps(spec, indent=1))
        runner = torch._inductor.aoti_load_package(tmp)
        with torch.inference_mode():
            diff = max(float(np.abs(l2_normalize(model(x[:n]).numpy()) - l2_normalize(runner(x[:n]).numpy())).max())
                       for n in (4, 1))
        if not diff <= TOLERANCE:
            raise ValueError(f"{path}: the compiled package differs from the module by {diff:.3g} (L2-normalised "
                             f"embeddings, tolerance {TOLERANCE:g}); not written")
    return diff


def read_identity(path: str) -> dict:
    with zipfile.ZipFile(path) as z:
        name = next((n for n in z.namelist() if n.endswith("/" + META)), None)
        if name is None:
            raise ValueError(f"{path}: not a twinface package (no {META}); write one with twinface export --format pt2")
        return json.loads(z.read(name))


def mismatch(found: dict, here: dict):
    """Why a package compiled for `found` cannot serve `here` (both identity()), or None when it can."""
    for key, what in (("weights_sha256", "compiled from other weights (sha256 differs)"),
                      ("arch", "compiled for another backbone"), ("input_size", "compiled for another input size"),
                      ("num_features", "compiled for another embedding size"),
                      ("torch", "compiled by another torch version")):
        if found.get(key) != here[key]:
            return f"{what}: {found.get(key)} vs {here[key]}"
    if found.get("isa") != here["isa"] or found.get("aten") != here["aten"]:
        return (f"compiled for another CPU: instruction sets {', '.join(found.get('isa') or [])} / ATen "
                f"{found.get('aten')}, this one has {', '.join(here['isa'])} / ATen {here['aten']}")
    return None


def load_package(path: str, spec: dict):
    """(runner, None) when the package at `path` was compiled for `spec` (identity()), else (None, the reason)."""
    try:
        found = read_identity(path)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        return None, f"{path}: {e}" if str(path) not in str(e) else str(e)
    reason = mismatch(found, spec)
    if reason:
        return None, f"{path}: {reason}"
    try:
        return torch._inductor.aoti_load_package(path), None
    except Exception as e:                              # a damaged library inside: the default path still works
        return None, f"{path}: does not load ({str(e).strip().splitlines()[-1]})"
