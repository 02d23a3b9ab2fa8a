"""What the bench's modules share without importing one another: file names, the training config, the
default paths."""
import os

from twinface import config

DEFAULT_PATHS = ("torch-embed", "tf-embed")                 # what `twinface embed` and `twinface eval` run


def weights_path(work_dir, model):
    """The torch twin's seeded weights (numpy state_dict), loaded by every row of that model."""
    return os.path.join(work_dir, f"{model}.weights.npz")


def onnx_path(work_dir, model, framework):
    return os.path.join(work_dir, f"{model}.{framework}.onnx")


def tflite_path(work_dir, model, quantization):
    return os.path.join(work_dir, f"{model}.{quantization}.tflite")


def train_config(spec):
    """ArcFace head, SGD: the default recipe; a small lr keeps every timed step finite (a NaN step skips its
    update and would time faster than training). The -bf16 rows train with train.precision bf16."""
    precision = "bf16" if spec.get("runtime", "").endswith("-bf16") else "fp32"
    return config.from_dict({"seed": 0, "backbone": {"name": spec["model"], "input_size": spec["input_size"],
                                                     "num_features": spec["num_features"]},
                             "head": {"type": "arcface"}, "optimizer": {"type": "sgd", "lr": 0.01},
                             "train": {"batch_size": spec["batch"], "precision": precision}})
