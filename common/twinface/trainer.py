"""The training loop both twins run. Framework work goes through a twin adapter; everything else is here.

The loop owns what must be identical in both frameworks: data order and flips (EpochSampler), the learning
rate of every step, freezing for finetuning, NaN guard rails, progress lines, TensorBoard, evaluation on the
verification sets, checkpoint cadence, resume and the closing summary. A twin adapter
(`twinface_torch.train.TorchTwin`, `twinface_tf.train.TFTwin`) provides:

    framework, rank, world_size, backbone_filename, state_filename
    build(cfg, num_classes)                 backbone + head + optimizer
    load_backbone(path)                     finetune start (backbone weights of this twin)
    set_backbone_frozen(frozen)
    batches(dataset, sampler, epoch, start_step) -> iter of (images uint8 NHWC, labels int64)
    train_step(images, labels, lr_backbone, lr_head) -> float loss; applies no update when the loss is not finite
    embed(images uint8 NHWC) -> float32 [N, D]        (eval mode)
    save_backbone(path), save_state(path, meta), load_state(path) -> meta      (atomic writes)
    export_onnx(path) -> max abs diff vs onnxruntime
"""
import json
import logging
import math
import os
import time


from . import config as config_mod
from . import schedule
from .data import dataset as dataset_mod
from .data.memory import InMemoryDataset, maybe_in_memory
from .data.sampler import EpochSampler


class TrainingDiverged(RuntimeError):
    pass


def _setup_logging(out_dir: str, rank: int) -> logging.Logger:
    log = logging.getLogger("twinface.train")
    log.setLevel(logging.INFO)
    log.handlers.clear()
    log.propagate = False
    if rank == 0:
        fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
        for handler in (logging.StreamHandler(), logging.FileHandler(os.path.join(out_dir, "train.log"))):
            handler.setFormatter(fmt)
            log.addHandler(handler)
    return log


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def prepare_data(cfg):
    """Open the training set (generating the synthetic one on first use); returns (dataset, val .bin paths)."""
    bins = list(cfg.val.bins)
    if cfg.data.source == "synthetic":
        from .data import synth
        synth.ensure_dataset(cfg.data.path, num_identities=cfg.data.synth_identities,
                                        images_per_identity=cfg.data.synth_images_per_identity,
                                        val_identities=cfg.data.synth_val_identities,
                                        val_pairs=cfg.data.synth_val_pairs, seed=cfg.seed, formats=("rec",))
        bins.insert(0, os.path.join(cfg.data.path, "val.bin"))
        dataset = dataset_mod.open_dataset(os.path.join(cfg.data.path, "train.rec"))
    else:
        dataset = dataset_mod.open_dataset(cfg.data.path)
    if cfg.data.num_classes and cfg.data.num_classes != dataset.num_classes:
        raise ValueError(f"config key 'data.num_classes' is {cfg.data.num_classes} but {cfg.data.path} holds "
                         f"{dataset.num_classes} identities (set 0 to read it from the data)")
    return dataset, bins


class Trainer:
    def __init__(self, cfg: config_mod.Config, twin, resume: bool = False, progress: bool = True):
        self.cfg, self.twin, self.resume, self.progress = cfg, twin, resume or cfg.train.resume, progress
        self.out = cfg.output
        os.makedirs(self.out, exist_ok=True)
        self.log = _setup_logging(self.out, twin.rank)
        self.is_main = twin.rank == 0
        self.backbone_path = os.path.join(self.out, twin.backbone_filename)
        self.state_path = os.path.join(self.out, twin.state_filename)
        self.history = []
        self._val_sets = None

    def _native_weights(self, path: str) -> str:
        """Finetuning from the other framework's weights (or any ONNX file): convert them first, verified."""
        suffix = ".pth" if self.twin.framework == "torch" else ".weights.h5"
        if path.endswith(suffix) or (self.twin.framework == "torch" and path.endswith(".pt")):
            return path
        from twinface_convert.convert import convert
        converted = os.path.join(self.out, "finetune_init" + suffix)
        convert(path, converted, arch=self.cfg.backbone.name, force=True, log=self.log.info)
        return converted

    # -- evaluation -------------------------------------------------------------------------------------
    def evaluate(self, bins, step, tb):
        from .eval.bins import evaluate_images, load_bin_images
        from .eval.verification import format_result
        if self._val_sets is None:                  # decoded (and shrunk) once, scored every epoch
            self._val_sets = {os.path.splitext(os.path.basename(p))[0]:
                              load_bin_images(p, self.cfg.backbone.input_size) for p in bins}
        results = {}
        for name, (images, issame) in self._val_sets.items():
            result = evaluate_images(self.twin.embed, images, issame, flip=self.cfg.val.flip,
                                     batch_size=self.cfg.val.batch_size, progress=False, name=name)
            results[name] = result
            for line in format_result(name, result).splitlines():
                self.log.info(line)
            if tb:
                tb.scalar(f"val/{name}/accuracy", result.acc_mean, step)
                tb.scalar(f"val/{name}/val_at_far1e-3", result.val, step)
                tb.scalar(f"val/{name}/xnorm", result.xnorm, step)
        if tb and results:
            self._log_roc(results, step, tb)
        return results

    def _log_roc(self, results, step, tb):
        import cv2
        from .eval.roc_plot import save_roc_plot
        png = os.path.join(self.out, "roc.png")
        save_roc_plot(results, png, title=f"ROC after step {step}")
        image = cv2.imread(png)
        tb.image_png("val/roc", open(png, "rb").read(), image.shape[0], image.shape[1], step)

    def _measure_loader(self, dataset, sampler, batches: int = 8):
        """The data pipeline alone, once: it should outrun the training step by a wide margin."""
        t0, n = time.time(), 0
        for i, (images, _) in enumerate(self.twin.batches(dataset, sampler, 0, 0)):
            n += len(images)
            if i + 1 == batches:
                break
        self.log.info(f"data loader alone: {n / max(time.time() - t0, 1e-9):.0f} img/s "
                      f"({self.cfg.data.num_workers} workers, {n} images)")

    # -- the loop ---------------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, twin, log = self.cfg, self.twin, self.log
        t_start = time.time()
        if self.is_main:
            config_mod.save_resolved(cfg, self.out)
        dataset, bins = prepare_data(cfg)
        t0 = time.time()
        dataset = maybe_in_memory(dataset, cfg.backbone.input_size, cfg.data.memory_cache_gb,
                                  workers=max(1, cfg.data.num_workers), progress=self.progress and self.is_main)
        if isinstance(dataset, InMemoryDataset):
            log.info(f"decoded {len(dataset)} images into memory at {cfg.backbone.input_size}x"
                     f"{cfg.backbone.input_size} in {time.time() - t0:.1f}s")
        sampler = EpochSampler(len(dataset), cfg.train.batch_size, seed=cfg.seed, rank=twin.rank,
                               world_size=twin.world_size, flip=cfg.data.flip)
        steps_per_epoch = sampler.steps_per_epoch()
        total_steps = steps_per_epoch * cfg.train.epochs
        lr_of = schedule.from_config(cfg, total_steps, steps_per_epoch)
        twin.build(cfg, dataset.num_classes)
        if cfg.finetune.weights and not self.resume:
            weights = self._native_weights(cfg.finetune.weights)
            twin.load_backbone(weights)
            log.info(f"finetune: backbone from {weights}, new head for {dataset.num_classes} identities, "
                     f"backbone frozen for {cfg.finetune.freeze_epochs} epoch(s), then lr x "
                     f"{cfg.finetune.backbone_lr_scale}")
        step, bad_steps = 0, 0
        if self.resume:
            if not os.path.exists(self.state_path):
                raise FileNotFoundError(f"--resume: no training state at {self.state_path}")
            meta = twin.load_state(self.state_path)
            step, bad_steps, self.history = meta["step"], meta.get("bad_steps", 0), meta.get("history", [])
            log.info(f"resumed from {self.state_path} at step {step} (epoch {step // steps_per_epoch})")
        tb = None
        if self.is_main:
            from .tb import TensorBoard
            tb = TensorBoard(os.path.join(self.out, "tensorboard"))
        log.info(f"{twin.framework}: {cfg.backbone.name}, {len(dataset)} images, {dataset.num_classes} identities, "
                 f"{steps_per_epoch} steps/epoch x {cfg.train.epochs} epochs, batch {cfg.train.batch_size} "
                 f"x {twin.world_size} rank(s)")
        if self.is_main:
            self._measure_loader(dataset, sampler)
        images_seen, t_train = 0, 0.0
        results = {}
        while step < total_steps:
            epoch, start_step = divmod(step, steps_per_epoch)
            t_window, n_window = time.time(), 0
            for images, labels in twin.batches(dataset, sampler, epoch, start_step):
                progress = step / steps_per_epoch
                frozen = progress < cfg.finetune.freeze_epochs
                twin.set_backbone_frozen(frozen)
                lr = lr_of(step)
                lr_backbone = 0.0 if frozen else lr * (cfg.finetune.backbone_lr_scale if cfg.finetune.weights else 1.0)
                t0 = time.time()
                loss = twin.train_step(images, labels, lr_backbone, lr)
                t_train += time.time() - t0
                if not math.isfinite(loss):
                    bad_steps += 1
                    last = self.state_path if os.path.exists(self.state_path) else "none yet"
                    log.warning(f"non-finite loss {loss} at step {step} (epoch {epoch}); update skipped; "
                                f"labels of the batch: {labels[:16].tolist()}...; last good checkpoint: {last}")
                    if bad_steps >= cfg.train.max_bad_steps:
                        raise TrainingDiverged(
                            f"{bad_steps} steps with a non-finite loss (train.max_bad_steps={cfg.train.max_bad_steps}); "
                            f"stopped without writing the diverged weights. Last good checkpoint: {last}. "
                            f"Try a lower optimizer.lr, head.gradient=straight_through, or check the data.")
                step += 1
                images_seen += len(images)
                n_window += len(images)
                if tb and math.isfinite(loss):
                    tb.scalar("train/loss", loss, step)
                    tb.scalar("train/lr", lr, step)
                if self.is_main and (step % cfg.train.log_every == 0 or step == total_steps):
                    rate = n_window / max(1e-9, time.time() - t_window)
                    eta = (total_steps - step) * cfg.train.batch_size / max(rate, 1e-9)
                    log.info(f"epoch {epoch + 1}/{cfg.train.epochs} step {step}/{total_steps} loss {loss:.4f} "
                             f"lr {lr:.5f}{' (backbone frozen)' if frozen else ''} {rate:.1f} img/s ETA {_fmt_time(eta)}")
                    t_window, n_window = time.time(), 0
            epoch_done = step // steps_per_epoch
            if self.is_main:
                results = self.evaluate(bins, step, tb)
                self.history.append({"epoch": epoch_done, "step": step,
                                     **{k: {"acc": r.acc_mean, "val": r.val} for k, r in results.items()}})
                twin.save_backbone(self.backbone_path)
                if epoch_done % cfg.train.checkpoint_every == 0 or step == total_steps:
                    twin.save_state(self.state_path, {"step": step, "bad_steps": bad_steps, "history": self.history})
                    log.info(f"checkpoint: {self.state_path} (step {step})")
                tb.flush()
        summary = {"framework": twin.framework, "arch": cfg.backbone.name, "steps": step,
                   "wall_time_s": round(time.time() - t_start, 1),
                   "train_images_per_s": round(images_seen / max(t_train, 1e-9), 1),
                   "backbone": self.backbone_path, "state": self.state_path,
                   "tensorboard": os.path.join(self.out, "tensorboard"), "log": os.path.join(self.out, "train.log"),
                   "results": {k: r.summary() for k, r in results.items()}}
        if self.is_main:
            onnx_path = os.path.join(self.out, "backbone.onnx")
            diff = twin.export_onnx(onnx_path)
            summary["onnx"], summary["onnx_max_abs_diff"] = onnx_path, diff
            with open(os.path.join(self.out, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2, default=float)
            self._print_summary(summary, results)
            tb.close()
        return summary

    def _print_summary(self, summary, results):
        log = self.log
        log.info("=" * 72)
        log.info(f"done: {summary['framework']} {self.cfg.backbone.name}, {summary['steps']} steps in "
                 f"{_fmt_time(summary['wall_time_s'])} ({summary['train_images_per_s']} train img/s)")
        for name, r in results.items():
            log.info(f"  {name}: accuracy {r.acc_mean * 100:.2f}% +- {r.acc_std * 100:.2f}, "
                     f"VAL@FAR=1e-3 {r.val * 100:.2f}%")
        for key in ("backbone", "state", "onnx", "tensorboard", "log"):
            log.info(f"  {key}: {summary[key]}")
