"""One rank of a torch scale-out check, started by torchrun (or alone, as the single-process reference).

    python torch_worker.py head SAMPLE_RATE OUT_DIR      Partial FC on fixed embeddings: loss and gradients
    python torch_worker.py step OUT_DIR [GHOST]          one TorchTwin training step on a fixed global batch
    python torch_worker.py train CONFIG.json [nan|die]   the training loop; rank 1 poisons one step or dies

Each rank writes OUT_DIR/rank{r}.npz. The global batch is fixed by seeds; rank r takes rows [r*B, (r+1)*B).
"""
import json
import os
import sys

import numpy as np
import torch

from twinface import config
from twinface.partial_fc import init_centres
from twinface_torch import distributed as dist
from twinface_torch.partial_fc import PartialFC
from twinface_torch.train import TorchTwin

from inputs import ARCFACE, CLASSES, D, HEAD_CLASSES, embeddings, global_batch, mine, step_config


def head(sample_rate, out):
    rank, world, _ = dist.world()
    dist.init(world, torch.device("cpu"), timeout_s=300)
    pfc = PartialFC(D, HEAD_CLASSES, sample_rate, rank, world, seed=0, **ARCFACE)
    emb = torch.from_numpy(mine(embeddings(), rank, world)).requires_grad_()
    labels = torch.from_numpy(mine(global_batch(classes=HEAD_CLASSES)[1], rank, world))
    loss = pfc(emb, labels)
    loss.backward()
    np.savez(os.path.join(out, f"rank{rank}.npz"), loss=loss.item(), emb_grad=emb.grad.numpy(),
             weight_grad=pfc.weight.grad.numpy(), index=pfc.last_index, class_start=pfc.class_start)
    dist.barrier()                                         # leave together


def step(out, ghost=1):
    """One step. ghost=N (one process only): the backbone sees the batch as N separate parts, as N ranks'
    BatchNorm layers do, and the head starts from Partial FC's centres; everything else is TorchTwin's step."""
    twin = TorchTwin()
    images, labels = global_batch()
    cfg = step_config(twin.world_size)
    twin.build(cfg, CLASSES)
    if ghost > 1:
        with torch.no_grad():
            twin.head.weight.copy_(torch.from_numpy(init_centres(cfg.seed, 0, CLASSES, D)))
        twin.model = lambda x: torch.cat([twin.backbone(part) for part in x.chunk(ghost)])
    start = backbone_state(twin, "start")
    loss = twin.train_step(mine(images, twin.rank, twin.world_size), mine(labels, twin.rank, twin.world_size),
                           0.1, 0.1)
    np.savez(os.path.join(out, f"rank{twin.rank}.npz"), loss=loss, head=twin.head.weight.detach().numpy(),
             class_start=getattr(twin.head, "class_start", 0), **start, **backbone_state(twin, "backbone"))


def backbone_state(twin, prefix):
    """The backbone's parameters and BN statistics under torch names (the TF worker starts from "start/")."""
    return {f"{prefix}/{k}": v.detach().numpy().copy() for k, v in twin.backbone.state_dict().items()
            if not k.endswith("num_batches_tracked")}


class Poisoned(TorchTwin):
    """Rank 1 makes the loss of its 3rd step non-finite (nan), or dies at its 3rd step (die)."""

    fault = None

    def train_step(self, images, labels, lr_backbone, lr_head):
        self.calls = getattr(self, "calls", 0) + 1
        if self.rank == 1 and self.calls == 3:
            if self.fault == "die":
                os._exit(3)
            criterion = self.criterion
            self.criterion = lambda emb, y: criterion(emb, y) * float("nan")
            try:
                return super().train_step(images, labels, lr_backbone, lr_head)
            finally:
                self.criterion = criterion
        return super().train_step(images, labels, lr_backbone, lr_head)


def train(config_json, fault=None):
    from twinface.trainer import Trainer
    with open(config_json) as f:
        cfg = config.from_dict(json.load(f))
    Poisoned.fault = fault
    twin = Poisoned()
    Trainer(cfg, twin, progress=False).run()
    np.savez(os.path.join(cfg.output, f"final.rank{twin.rank}.npz"),
             **{k: v.detach().numpy() for k, v in twin.backbone.state_dict().items()})


if __name__ == "__main__":
    verb, args = sys.argv[1], sys.argv[2:]
    if verb == "head":
        head(float(args[0]), args[1])
    elif verb == "step":
        step(args[0], *map(int, args[1:]))
    else:
        train(*args)
