"""The torch twin's adapter for the shared training loop (twinface.trainer)."""
import math
import os

import numpy as np
import torch
import torch.distributed as dist

from twinface.data.transforms import to_model_input

from . import checkpoint, data, export
from .backbones import get_model
from .embed import embed_images
from .heads import get_head
from .losses import get_loss
from .optim import build_optimizer


STATE_KEYS = ("backbone", "head", "optimizer", "rng", "meta")     # and "scaler" (fp16 loss scale) since #13


class TorchTwin:
    framework = "torch"
    backbone_filename = "backbone.pth"
    state_filename = "state.pt"

    def __init__(self):
        # torchrun sets these; a plain process is the world-size-1 case of the same code.
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
            else torch.device("cpu")
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    def build(self, cfg, num_classes: int):
        self.cfg = cfg
        torch.manual_seed(cfg.seed)                               # same config, same initial weights
        b = cfg.backbone
        # channels_last: oneDNN's NHWC convolutions train MobileFaceNet ~1.6x faster on CPU than NCHW (and
        # suit tensor cores on GPU); parameters keep their names and shapes, only the memory layout changes.
        self.backbone = get_model(b.name, num_features=b.num_features, dropout=b.dropout, input_size=b.input_size,
                                  precision=cfg.train.precision, checkpointing=b.checkpointing
                                  ).to(self.device, memory_format=torch.channels_last)
        self.head = get_head(cfg.head.type, b.num_features, num_classes, **cfg.head_params()).to(self.device)
        self.loss_fn = get_loss(cfg.loss.type, **({"gamma": cfg.loss.gamma} if cfg.loss.type == "focal" else {}))
        o = cfg.optimizer
        groups = [{"params": [p for p in self.backbone.parameters() if p.requires_grad]},
                  {"params": list(self.head.parameters())}]
        self.optimizer = build_optimizer(o.type, groups, o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                                         betas=tuple(o.betas), eps=o.eps)
        t = cfg.train
        # fp16 only: dynamic loss scaling with arcface_torch's settings (bf16 has fp32's range and needs none)
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=t.loss_scale,
                                           growth_interval=t.loss_scale_growth_interval,
                                           enabled=t.precision == "fp16")
        self.overflow = False                     # the last step was skipped for a loss-scale overflow
        self.model = self.backbone
        if self.world_size > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(self.backbone)
        self.frozen = False
        self.backbone.train()

    def load_backbone(self, path: str):
        checkpoint.load_into(self.backbone, checkpoint.read_state_dict(path), path)

    def set_backbone_frozen(self, frozen: bool):
        self.frozen = frozen

    def batches(self, dataset, sampler, epoch, start_step):
        return data.batches(dataset, sampler, epoch, start_step, num_workers=self.cfg.data.num_workers,
                            size=self.cfg.backbone.input_size)

    def _buffers(self):
        return [b for b in self.backbone.buffers()]

    def train_step(self, images: np.ndarray, labels: np.ndarray, lr_backbone: float, lr_head: float) -> float:
        self.optimizer.param_groups[0]["lr"] = lr_backbone
        self.optimizer.param_groups[1]["lr"] = lr_head
        x = torch.from_numpy(to_model_input(images, "NCHW")).to(self.device, memory_format=torch.channels_last)
        y = torch.from_numpy(labels).to(self.device)
        saved = [b.clone() for b in self._buffers()]              # BN statistics, restored on a bad step
        if self.frozen:
            self.backbone.eval()
            with torch.no_grad():
                emb = self.backbone(x)
        else:
            self.backbone.train()
            emb = self.model(x)
        loss = self.loss_fn(self.head(emb.float(), y), y)
        self.optimizer.zero_grad(set_to_none=True)
        value, self.overflow = loss.item(), False
        if math.isfinite(value):
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)           # clipping and the finiteness check see true gradients
            if self.scaler.is_enabled() and not all(torch.isfinite(p.grad).all() for group in
                                                    self.optimizer.param_groups for p in group["params"]
                                                    if p.grad is not None):
                self.overflow = True                        # fp16 range exceeded: back off, skip the step
            elif not self.frozen and self.cfg.train.clip_grad_norm > 0:
                norm = torch.nn.utils.clip_grad_norm_(self.backbone.parameters(), self.cfg.train.clip_grad_norm)
                if not torch.isfinite(norm):
                    value = float("nan")
        if not math.isfinite(value) or self.overflow:
            for buf, old in zip(self._buffers(), saved):
                buf.copy_(old)
            if self.overflow:
                self.scaler.update()                        # halves the scale (unscale_ recorded the inf)
            self.optimizer.zero_grad(set_to_none=True)
            return value
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return value

    @property
    def loss_scale(self):
        """The fp16 loss scale now (None when not training in fp16)."""
        return self.scaler.get_scale() if self.scaler.is_enabled() else None

    def embed(self, images: np.ndarray) -> np.ndarray:
        self.backbone.eval()
        try:
            return embed_images(self.backbone, images)
        finally:
            self.backbone.train()

    def save_backbone(self, path: str):
        checkpoint.save_backbone(self.backbone, path)

    def save_state(self, path: str, meta: dict):
        state = dict(zip(STATE_KEYS, (self.backbone.state_dict(), self.head.state_dict(),
                                      self.optimizer.state_dict(), torch.get_rng_state(), meta)),
                     scaler=self.scaler.state_dict())
        checkpoint.save_file(state, path)

    def load_state(self, path: str) -> dict:
        state = checkpoint.load_file(path, self.device)
        missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
        if missing:
            raise ValueError(f"{path}: not a twinface training state (no '{missing[0]}' entry)")
        checkpoint.load_into(self.backbone, state["backbone"], path)
        try:
            self.head.load_state_dict(state["head"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state.get("scaler", {}))
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"{path}: the saved head or optimizer does not fit this config "
                             f"({str(e).strip().splitlines()[0]})") from None
        torch.set_rng_state(state["rng"].cpu())
        return state["meta"]

    def export_onnx(self, path: str) -> float:
        b = self.cfg.backbone
        model = get_model(b.name, num_features=b.num_features, input_size=b.input_size)
        model.load_state_dict(self.backbone.state_dict())
        return export.export_onnx(model.eval(), path, b.name, input_size=b.input_size)
