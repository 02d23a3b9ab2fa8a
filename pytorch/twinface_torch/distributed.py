"""torch.distributed as the training loop uses it: the process group torchrun describes, and the three
collectives Partial FC differentiates through. Every function is the identity when no group is running, so a
single process is the world-size-1 case of the same code."""
import atexit
import datetime
import os

import torch
import torch.distributed as dist


def world() -> tuple:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) for a plain process."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def init(world_size: int, device: torch.device, timeout_s: float):
    """gloo on CPU, nccl on GPU. `timeout_s` bounds every collective: a rank that died on another node makes
    the survivors fail after it instead of hanging (torchrun stops the local ones at once)."""
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
        # an undestroyed group aborts the interpreter's exit ("terminate called without an active exception")
        atexit.register(dist.destroy_process_group)


def running() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier():
    if running():
        dist.barrier()


def all_agree(flag: bool, device) -> bool:
    """True only if `flag` is True on every rank: guard-rail decisions (skip a step) are taken together."""
    if not running():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def all_max(x: torch.Tensor) -> torch.Tensor:
    """Elementwise max over ranks, no gradient (a shift that cancels out of the log-softmax)."""
    x = x.detach().clone()
    if running():
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


class _SumOverRanks(torch.autograd.Function):
    """Forward: the sum over ranks. Backward: the incoming gradient, unchanged. Every rank computes the same
    loss from the sum, so d loss / d (this rank's part) is d loss / d sum; no rank needs the others' gradient."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    return _SumOverRanks.apply(x) if running() else x


class _Gather(torch.autograd.Function):
    """Forward: every rank's rows, concatenated in rank order. Backward: this rank's rows of the gradient summed
    over ranks, since each rank's loss term reaches every gathered row (through its own shard of centres)."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        rank = dist.get_rank()
        return grad[rank * ctx.rows:(rank + 1) * ctx.rows]


def gather(x: torch.Tensor) -> torch.Tensor:
    """[n, ...] per rank -> [world * n, ...]; differentiable (equal batch sizes on every rank)."""
    return _Gather.apply(x) if running() else x


def gather_labels(labels: torch.Tensor) -> torch.Tensor:
    if not running():
        return labels
    parts = [torch.empty_like(labels) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, labels.contiguous())
    return torch.cat(parts)


def sum_gradients_hook(process_group, bucket):
    """DDP comm hook: sum the ranks' backbone gradients instead of averaging them. With Partial FC every rank's
    loss is the global batch's loss and its gradients cover only its own samples, so their sum is the gradient
    of that loss; DDP's default mean would divide it by the world size."""
    group = process_group if process_group is not None else dist.group.WORLD
    return dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future().then(
        lambda fut: fut.value()[0])


def average_buffers(module: torch.nn.Module):
    """BatchNorm running statistics: the mean of every rank's update (as tf.distribute aggregates them), so all
    ranks hold the same statistics and rank 0's checkpoint stands for the run."""
    if not running():
        return
    for name, buf in module.named_buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf.div_(dist.get_world_size())
