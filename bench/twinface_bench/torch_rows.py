"""The torch twin's rows: its inference runtimes and its training step, on the bench's shared weights."""
import os

import numpy as np
import torch

from twinface.data.transforms import to_model_input
from twinface_torch.backbones import get_model
from twinface_torch.calibrate import calibrate_batchnorm
from twinface_torch.embed import embed_images, freeze_for_inference
from twinface_torch.export import export_onnx
from twinface_torch.train import TorchTwin

from .shared import onnx_path, train_config, weights_path


def prepare(spec, images):
    """Seeded weights with BatchNorm statistics of one batch (saved for every other row, TF's included) and the
    torch export for onnxruntime. Returns facts the plan needs (is there a CUDA device?)."""
    torch.manual_seed(0)
    model = get_model(spec["model"], num_features=spec["num_features"], input_size=spec["input_size"])
    calibrate_batchnorm(model, torch.from_numpy(to_model_input(images[:8], "NCHW")), randomize=False)
    np.savez(weights_path(spec["work_dir"], spec["model"]),
             **{k: v.numpy() for k, v in model.state_dict().items()})
    export_onnx(model, onnx_path(spec["work_dir"], spec["model"], "torch"), spec["model"], input_size=spec["input_size"])
    return {"cuda": torch.cuda.is_available(),
            "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "threads": torch.get_num_threads()}


def load_model(spec, **kwargs):
    model = get_model(spec["model"], num_features=spec["num_features"], input_size=spec["input_size"], **kwargs)
    with np.load(weights_path(spec["work_dir"], spec["model"])) as saved:
        model.load_state_dict({k: torch.from_numpy(saved[k]) for k in saved.files})
    return model.eval()


def inference(runtime, spec):
    """(build, call): build() prepares the runtime once (its time is reported); call(images) -> a function
    that runs one batch, inputs converted beforehand except for the torch-embed rows, which are the user's path
    (uint8 in, embeddings out)."""
    if runtime.startswith("torch-cuda-"):                   # run.CUDA_RUNTIMES
        return _cuda(runtime, spec)
    model = load_model(spec, precision="bf16" if runtime.endswith("-bf16") else None)
    channels_last = runtime not in ("torch-eager", "torch-aot")     # the package is compiled for contiguous NCHW
    state = {}

    def build():
        if runtime in ("torch-channels-last", "torch-compile"):
            model.to(memory_format=torch.channels_last)
        if runtime.startswith("torch-jit"):
            state["forward"] = freeze_for_inference(model, onednn_layout=runtime == "torch-jit-onednn")
        elif runtime == "torch-compile":
            from torch._inductor import config as inductor_config
            inductor_config.freezing = True                    # weights become constants: BN folded, oneDNN prepacked
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(spec["work_dir"], "inductor")   # cold: what a user waits
            state["forward"] = torch.compile(model, dynamic=False)
        elif runtime == "torch-aot":                           # what embed runs beside a backbone.pt2 (aot.py)
            from twinface_torch import aot
            path = os.path.join(spec["work_dir"], f"{spec['model']}.pt2")
            spec_id = aot.identity(spec["model"], spec["input_size"], spec["num_features"], "bench weights")
            aot.compile_package(model, path, spec_id)             # build time = the compile a package saves embed
            state["forward"] = torch._inductor.aoti_load_package(path)
        else:
            state["forward"] = model

    def call(images):
        if runtime.startswith("torch-embed"):
            return lambda: embed_images(model, images)
        x = torch.from_numpy(to_model_input(images, "NCHW"))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)

        def run():
            with torch.inference_mode():
                return state["forward"](x)
        return run

    return build, call


def _cuda(runtime, spec):
    """GPU rows: fp32; bf16 weights and inputs; fp16 autocast of the conv trunk (the model's own fp16 mode,
    as arcface_torch trains); the latter in channels_last, the layout tensor cores prefer."""
    fp16 = "fp16" in runtime
    model = load_model(spec, fp16=fp16).cuda()
    dtype = torch.bfloat16 if runtime == "torch-cuda-bf16" else torch.float32
    memory_format = torch.channels_last if "channels-last" in runtime else torch.contiguous_format

    def build():
        model.to(dtype=dtype, memory_format=memory_format)

    def call(images):
        x = torch.from_numpy(to_model_input(images, "NCHW")).cuda().to(dtype=dtype, memory_format=memory_format)
        torch.cuda.reset_peak_memory_stats()

        def run():
            with torch.inference_mode():
                out = model(x)
            torch.cuda.synchronize()
            return out
        return run

    return build, call


def cuda_peak_mb():
    return torch.cuda.max_memory_allocated() / 2 ** 20 if torch.cuda.is_available() else None


def training(spec, images, labels):
    """One call = one step of the real adapter (TorchTwin.train_step): what training gets, minus data loading.
    The torch-train-backbone rows (run.MEMORY_RUNTIMES) time the backbone alone instead."""
    if spec["runtime"].startswith("torch-train-backbone"):
        return _backbone_step(spec, images, checkpointing=spec["runtime"].endswith("-checkpointing"))
    twin = TorchTwin()
    twin.build(train_config(spec), spec["classes"])
    return lambda: twin.train_step(images, labels, 0.01, 0.01)


def _backbone_step(spec, images, checkpointing):
    """Forward and backward of the backbone alone (no head, no optimizer): its peak RSS with and without gradient
    checkpointing is the memory checkpointing saves."""
    torch.manual_seed(0)
    model = get_model(spec["model"], num_features=spec["num_features"], input_size=spec["input_size"],
                      checkpointing=checkpointing).train()
    x = torch.from_numpy(to_model_input(images, "NCHW"))

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(x).square().mean()
        loss.backward()
        return loss.item()
    return step
