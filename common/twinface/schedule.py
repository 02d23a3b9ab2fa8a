"""Learning-rate schedules as pure functions of the global step, so both twins set the same lr every step."""
import bisect
import math


def lr_at(step: int, base_lr: float, total_steps: int, steps_per_epoch: int, kind: str = "polynomial",
          warmup_epochs: float = 0.0, power: float = 2.0, milestones=(), gamma: float = 0.1,
          min_lr: float = 0.0) -> float:
    """lr for the update made at `step` (0-based). Linear warm-up, then the decay of `kind`.

    Warm-up and polynomial decay are arcface_torch's PolyScheduler: base * step / W during the W warm-up
    steps (so the very first update has lr 0, as there), then base * (1 - progress)^power.
    """
    warmup = int(round(warmup_epochs * steps_per_epoch))
    if step < warmup:
        return base_lr * step / warmup
    if kind == "step":
        epoch = step / steps_per_epoch
        return base_lr * gamma ** bisect.bisect_right(sorted(milestones), epoch)
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if kind == "polynomial":
        return min_lr + (base_lr - min_lr) * (1.0 - progress) ** power
    if kind == "cosine":
        return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {kind!r}; expected polynomial, cosine or step")


def from_config(cfg, total_steps: int, steps_per_epoch: int):
    """Bind a Config's optimizer.lr and schedule section: returns step -> lr."""
    s = cfg.schedule
    return lambda step: lr_at(step, cfg.optimizer.lr, total_steps, steps_per_epoch, s.type, s.warmup_epochs,
                              s.power, s.milestones, s.gamma, s.min_lr)
