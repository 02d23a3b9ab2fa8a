"""The torch twin's adapter for the shared training loop (twinface.trainer)."""
import math

import numpy as np
import torch

from twinface import partial_fc as pfc_plan
from twinface import run_dir
from twinface.atomic import file_sha256
from twinface.data.transforms import to_model_input

from . import aot, checkpoint, data, distributed as dist, export
from .backbones import get_model
from .embed import embed_images
from .heads import get_head
from .losses import TripletLoss, get_loss
from .optim import build_optimizer
from .partial_fc import PartialFC


STATE_KEYS = ("backbone", "head", "optimizer", "rng", "meta")     # and "scaler" (fp16 loss scale) since #13


class TorchTwin:
    framework = "torch"
    backbone_filename = "backbone.pth"
    state_filename = "state.pt"

    def __init__(self, timeout_s: float = 1800.0):
        # torchrun sets the environment; a plain process is the world-size-1 case of the same code.
        self.rank, self.world_size, local_rank = dist.world()
        self.device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        dist.init(self.world_size, self.device, timeout_s)

    def build(self, cfg, num_classes: int):
        self.cfg = cfg
        torch.manual_seed(cfg.seed)                               # same config, same initial weights
        b = cfg.backbone
        # channels_last: oneDNN's NHWC convolutions train MobileFaceNet ~1.6x faster on CPU than NCHW (and
        # suit tensor cores on GPU); parameters keep their names and shapes, only the memory layout changes.
        self.backbone = get_model(b.name, num_features=b.num_features, dropout=b.dropout, input_size=b.input_size,
                                  precision=cfg.train.precision, checkpointing=b.checkpointing
                                  ).to(self.device, memory_format=torch.channels_last)
        pfc_plan.check_supported(cfg, self.world_size)
        self.triplets = None                               # valid triplets of the last batch (triplet loss only)
        if pfc_plan.needed(cfg, self.world_size):
            self.head = PartialFC(b.num_features, num_classes, cfg.head.sample_rate, self.rank, self.world_size,
                                  cfg.seed, **cfg.head_params()).to(self.device)
            self.criterion = self.head                     # the loss of the global batch, on every rank
        elif cfg.head.type == "none":
            self.head = TripletLoss(**cfg.triplet_params())    # no parameters: the loss takes the head's slot
            self.criterion = self._triplet_loss
        else:
            self.head = get_head(cfg.head.type, b.num_features, num_classes, **cfg.head_params()).to(self.device)
            self.loss_fn = get_loss(cfg.loss.type, **({"gamma": cfg.loss.gamma} if cfg.loss.type == "focal" else {}))
            self.criterion = lambda emb, labels: self.loss_fn(self.head(emb, labels), labels)
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
        self.no_triplets = False                  # the last step was skipped: no valid triplet on any rank
        self.model = self.backbone
        if self.world_size > 1:
            # BN statistics are averaged after each step (distributed.average_buffers), not broadcast from rank 0
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.backbone, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                forward_sync_buffers=False)
            self.model.register_comm_hook(None, dist.sum_gradients_hook)
        self.frozen = False
        self.backbone.train()

    def _triplet_loss(self, emb, labels):
        loss, self.triplets = self.head(emb, labels)
        return loss

    def load_backbone(self, path: str):
        checkpoint.load_into(self.backbone, checkpoint.read_state_dict(path), path)

    def set_backbone_frozen(self, frozen: bool):
        self.frozen = frozen

    def batches(self, dataset, sampler, epoch, start_step):
        return data.batches(dataset, sampler, epoch, start_step, num_workers=self.cfg.data.num_workers,
                            size=self.cfg.backbone.input_size)

    def _buffers(self):
        return [*self.backbone.buffers(), *self.head.buffers()]       # BN statistics, AdaFace's norm EMA

    def train_step(self, images: np.ndarray, labels: np.ndarray, lr_backbone: float, lr_head: float) -> float:
        self.optimizer.param_groups[0]["lr"] = lr_backbone
        self.optimizer.param_groups[1]["lr"] = lr_head
        x = torch.from_numpy(to_model_input(images, "NCHW")).to(self.device, memory_format=torch.channels_last)
        y = torch.from_numpy(labels).to(self.device)
        saved = [b.clone() for b in self._buffers()]              # restored on a bad step
        if self.frozen:
            self.backbone.eval()
            with torch.no_grad():
                emb = self.backbone(x)
        else:
            self.backbone.train()
            emb = self.model(x)
        loss = self.criterion(emb.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        value, self.overflow, self.no_triplets = loss.item(), False, False
        # Every decision to skip is taken by all ranks together: DDP's gradient all-reduce needs every rank.
        if not dist.all_agree(math.isfinite(value), self.device):
            value = float("nan")
        elif self.triplets is not None and dist.all_agree(self.triplets == 0, self.device):
            self.no_triplets = True
        else:
            if self.triplets is not None:                   # each rank's own batch: its share of the summed gradient
                loss = loss / self.world_size
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)           # clipping and the finiteness check see true gradients
            finite = not self.scaler.is_enabled() or all(torch.isfinite(p.grad).all() for group in
                                                         self.optimizer.param_groups for p in group["params"]
                                                         if p.grad is not None)
            if not dist.all_agree(finite, self.device):
                self.overflow = True                        # fp16 range exceeded: back off, skip the step
            elif not self.frozen and self.cfg.train.clip_grad_norm > 0:
                norm = torch.nn.utils.clip_grad_norm_(self.backbone.parameters(), self.cfg.train.clip_grad_norm)
                if not dist.all_agree(bool(torch.isfinite(norm)), self.device):
                    value = float("nan")
        if not math.isfinite(value) or self.overflow or self.no_triplets:
            for buf, old in zip(self._buffers(), saved):
                buf.copy_(old)
            if self.overflow:
                self._back_off()
            self.optimizer.zero_grad(set_to_none=True)
            return value
        self.scaler.step(self.optimizer)
        self.scaler.update()
        dist.average_buffers(self.backbone)
        return value

    def _back_off(self):
        """GradScaler.update after an inf: halve the scale, restart its growth count. Set explicitly, because with
        sharded heads the inf may have shown on another rank only, and every rank must keep the same scale."""
        saved = self.scaler.state_dict()
        self.scaler.update()                                # consumes this step's inf checks
        self.scaler.load_state_dict({**saved, "scale": saved["scale"] * saved["backoff_factor"], "_growth_tracker": 0})

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
        """The run's state; over several ranks without the head and its optimizer state (each rank's shard file
        holds those: save_shard)."""
        optimizer = self.optimizer.state_dict()
        head = self.head.state_dict()
        if self.world_size > 1:
            head_ids = set(optimizer["param_groups"][1]["params"])
            optimizer = {**optimizer, "state": {i: v for i, v in optimizer["state"].items() if i not in head_ids}}
            head = {}
        state = dict(zip(STATE_KEYS, (self.backbone.state_dict(), head, optimizer, torch.get_rng_state(), meta)),
                     scaler=self.scaler.state_dict())
        checkpoint.save_file(state, path)

    def load_state(self, path: str) -> dict:
        state = checkpoint.load_file(path, self.device)
        missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
        if missing:
            raise ValueError(f"{path}: not a twinface training state (no '{missing[0]}' entry)")
        run_dir.check_world_size(path, state["meta"], self.world_size)
        checkpoint.load_into(self.backbone, state["backbone"], path)
        try:
            if self.world_size == 1:
                self.head.load_state_dict(state["head"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state.get("scaler", {}))
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"{path}: the saved head or optimizer does not fit this config "
                             f"({str(e).strip().splitlines()[0]})") from None
        torch.set_rng_state(state["rng"].cpu())
        if isinstance(self.head, PartialFC):
            self.head.step = state["meta"]["step"]          # the negatives drawn next are those of that step
        return state["meta"]

    def save_shard(self, path: str, meta: dict):
        """This rank's head shard and its optimizer state (several ranks only)."""
        moments = [self.optimizer.state.get(p, {}) for p in self.head.parameters()]
        checkpoint.save_file({"head": self.head.state_dict(), "head_optimizer": moments, "meta": meta}, path)

    def load_shard(self, path: str) -> dict:
        shard = checkpoint.load_file(path, self.device)
        if not isinstance(shard, dict) or not {"head", "head_optimizer", "meta"} <= set(shard):
            raise ValueError(f"{path}: not a twinface head shard (expected 'head', 'head_optimizer', 'meta')")
        for name, tensor in self.head.state_dict().items():
            saved = shard["head"].get(name)
            if saved is None or saved.shape != tensor.shape:
                raise ValueError(f"{path}: head shard '{name}' has shape "
                                 f"{None if saved is None else tuple(saved.shape)}, rank {self.rank} of "
                                 f"{self.world_size} holds {tuple(tensor.shape)}")
        self.head.load_state_dict(shard["head"])
        for p, moments in zip(self.head.parameters(), shard["head_optimizer"]):
            if moments:
                self.optimizer.state[p] = moments
        return shard["meta"]

    def barrier(self):
        dist.barrier()

    def _inference_copy(self):
        b = self.cfg.backbone
        model = get_model(b.name, num_features=b.num_features, input_size=b.input_size)
        model.load_state_dict(self.backbone.state_dict())
        return model.eval()

    def export_onnx(self, path: str) -> float:
        b = self.cfg.backbone
        return export.export_onnx(self._inference_copy(), path, b.name, input_size=b.input_size)

    def export_aot(self, path: str, weights: str) -> float:
        """backbone.pt2 beside `weights` (the backbone file this run wrote), compiled from it (aot.py)."""
        b = self.cfg.backbone
        spec = aot.identity(b.name, b.input_size, b.num_features, file_sha256(weights))
        return aot.compile_package(self._inference_copy(), path, spec)
