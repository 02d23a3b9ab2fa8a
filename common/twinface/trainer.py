"""The training loop both twins run. Framework work goes through a twin adapter; everything else is here.

The loop owns what must be identical in both frameworks: data order and flips (the samplers), the learning
rate of every step, freezing for finetuning, NaN guard rails, progress lines, TensorBoard, evaluation on the
verification sets, checkpoint cadence, resume and the closing summary. A twin adapter
(`twinface_torch.train.TorchTwin`, `twinface_tf.train.TFTwin`) provides:

    framework, rank, world_size, backbone_filename, state_filename
    build(cfg, num_classes)                 backbone + head + optimizer
    load_backbone(path)                     finetune start (backbone weights of this twin)
    set_backbone_frozen(frozen)
    batches(dataset, sampler, epoch, start_step) -> iter of (images uint8 NHWC, labels int64)
    train_step(images, labels, lr_backbone, lr_head) -> float loss; applies no update when the loss is not finite
    overflow, no_triplets                   whether the last step was skipped for an fp16 overflow / no triplet
    triplets, loss_scale                    valid triplets of the last batch, fp16 loss scale (None when n/a)
    embed(images uint8 NHWC) -> float32 [N, D]        (eval mode)
    save_backbone(path), save_state(path, meta), load_state(path) -> meta      (atomic writes)
    save_shard(path, meta), load_shard(path) -> meta     this rank's head shard (several ranks only)
    barrier()                                            wait for every rank (a no-op in one process)
    export_onnx(path) -> max abs diff vs onnxruntime
    export_aot(path, weights) -> max abs diff         torch only: the AOTInductor package (train.aot_package)

Several processes (torchrun, or TF_CONFIG workers) run this same loop, each on its shard of every batch: rank 0
alone logs, evaluates and writes the backbone, every rank writes its head shard (docs/distributed.md).
"""
import contextlib
import dataclasses
import json
import logging
import math
import os
import time

from . import config as config_mod
from . import run_dir
from . import schedule
from . import atomic
from .data import dataset as dataset_mod
from .data.memory import InMemoryDataset, maybe_in_memory
from .data.sampler import IdentitySampler, StreamSampler, sampler_for


class TrainingDiverged(RuntimeError):
    pass


class CheckpointWriteError(RuntimeError):
    pass


def _setup_logging(out_dir: str, rank: int) -> logging.Logger:
    log = logging.getLogger("twinface.train")
    log.setLevel(logging.INFO)
    log.handlers.clear()
    log.propagate = False
    if rank == 0:
        fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
        for handler in (logging.StreamHandler(), logging.FileHandler(os.path.join(out_dir, "train.log"), delay=True)):
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
        dataset = dataset_mod.open_dataset(cfg.data.path, cfg.data.damaged_records)
        if cfg.data.source == "tfrecord" and not isinstance(dataset, dataset_mod.TFRecordDataset):
            raise ValueError(f"config key 'data.source' is tfrecord, but {cfg.data.path} holds no .tfrecord shards "
                             f"(it reads as {type(dataset).__name__})")
    if cfg.data.num_classes and cfg.data.num_classes != dataset.num_classes:
        raise ValueError(f"config key 'data.num_classes' is {cfg.data.num_classes} but {cfg.data.path} holds "
                         f"{dataset.num_classes} identities (set 0 to read it from the data)")
    return dataset, bins


@dataclasses.dataclass
class Progress:
    """Where the run stands; a checkpoint stores it as its `meta`. The image and second counts cover every
    session of the run, so the closing img/s stays honest after a resume."""
    step: int = 0
    bad_steps: int = 0                  # non-finite losses (a real divergence; train.max_bad_steps stops the run)
    overflow_steps: int = 0             # fp16 loss-scale overflows: skipped by design, the scale backs off
    no_triplet_steps: int = 0           # triplet loss: batches without a valid triplet (skipped, nothing to learn)
    train_images: int = 0
    train_seconds: float = 0.0

    @classmethod
    def from_meta(cls, meta: dict) -> "Progress":
        return cls(**{f.name: meta[f.name] for f in dataclasses.fields(cls) if f.name in meta})


class Trainer:
    def __init__(self, cfg: config_mod.Config, twin, resume: bool = False, progress: bool = True,
                 overwrite: bool = False):
        self.cfg, self.twin, self.progress = cfg, twin, progress
        self.resume, self.overwrite = resume or cfg.train.resume, overwrite
        self.out = cfg.output
        os.makedirs(self.out, exist_ok=True)
        self.log = _setup_logging(self.out, twin.rank)
        self.is_main = twin.rank == 0
        self.backbone_path = os.path.join(self.out, twin.backbone_filename)
        self.state_path = os.path.join(self.out, twin.state_filename)
        self.summary_path = os.path.join(self.out, run_dir.SUMMARY_NAME)
        self.history, self.val_sets, self.results, self.evaluated_at = [], {}, {}, None
        self.tb, self.tb_dir = None, os.path.join(self.out, "tensorboard")

    # Files this run writes: a fresh start refuses to replace them without --overwrite.
    def _outputs(self):
        return [run_dir.CONFIG_NAME, self.twin.state_filename, self.twin.backbone_filename, run_dir.SUMMARY_NAME,
                "backbone.onnx", "backbone.pt2", "roc.png", "finetune_init.pth", "finetune_init.weights.h5"]

    # -- the run, step by step ----------------------------------------------------------------------------
    def run(self) -> dict:
        """Claim the directory, open the data, build (or restore) the model, train epoch by epoch (checkpoint
        first, then evaluate), export and summarise."""
        self.t_start = time.time()
        with self._claim_directory():
            if not self.is_main:
                self.twin.barrier()                # rank 0 first: it checks the directory and makes the data
            dataset, bins = self._open_data()
            if self.is_main:
                self.twin.barrier()
            sampler = sampler_for(self.cfg, dataset, self.twin.rank, self.twin.world_size)
            self.steps_per_epoch = sampler.steps_per_epoch()
            self.total_steps = self.steps_per_epoch * self.cfg.train.epochs
            self.lr_of = schedule.from_config(self.cfg, self.total_steps, self.steps_per_epoch)
            # train.max_steps ends the run early (smoke runs of a recipe); the schedule stays the full run's
            self.last_step = min(self.total_steps, self.cfg.train.max_steps or self.total_steps)
            self.twin.build(self.cfg, dataset.num_classes)
            progress = self._restore() if self.resume else self._start_weights(dataset.num_classes)
            finished = self._finished_summary(progress)
            if finished:
                return finished
            self._open_val_sets(bins)
            self._announce(dataset, sampler)
            if self.is_main:
                config_mod.save_resolved(self.cfg, self.out)   # only now: a start that fails leaves the run as it was
                from .tb import TensorBoard
                self.tb = TensorBoard(self.tb_dir, purge_from=progress.step + 1 if self.resume else None)
                self._measure_loader(dataset, sampler)
            try:
                while progress.step < self.last_step:
                    self._train_epoch(dataset, sampler, progress)
                    self._end_epoch(progress)
                summary = self._finish(progress)
                self.twin.barrier()            # the others wait for rank 0's export: nobody leaves a collective early
                return summary
            finally:
                if self.tb:
                    self.tb.close()

    @contextlib.contextmanager
    def _claim_directory(self):
        """One training per directory (a lock naming its pid), no silent restart over a previous run, no resume
        under a config that would break it; then remove what killed writers left half-written."""
        if not self.is_main:                      # other ranks write nothing
            yield
            return
        with run_dir.RunLock(self.out):
            if self.resume:
                self._check_resumable()
            else:
                self._check_fresh()
            atomic.clean_stale(self.out)           # what killed writers (of this run or others) left
            yield

    def _check_fresh(self):
        found = (run_dir.existing_outputs(self.out, self._outputs()) + run_dir.tensorboard_events(self.tb_dir)
                 + run_dir.shard_files(self.state_path))
        if found and not self.overwrite:
            raise FileExistsError(f"{self.out} already holds a training run ({', '.join(found)}); pass --resume "
                                  f"to continue it or --overwrite to start it over")
        for name in found:                         # --overwrite: the previous run's files, nothing else
            os.remove(os.path.join(self.out, name))
        if found:
            self.log.info(f"--overwrite: removed the previous run's {', '.join(found)}")

    def _check_resumable(self):
        if not os.path.exists(self.state_path):
            raise FileNotFoundError(f"--resume: no training state at {self.state_path}")
        breaking, safe = run_dir.config_changes(self.out, self.cfg)
        if breaking:
            raise ValueError(f"--resume: the config differs from {os.path.join(self.out, run_dir.CONFIG_NAME)} in "
                             f"keys a resumed run cannot change: {'; '.join(breaking)}. Restore them, or train into "
                             f"a new --output")
        for change in safe:
            self.log.info(f"resume with a changed config: {change}")

    def _open_data(self):
        dataset, bins = prepare_data(self.cfg)
        t0 = time.time()
        dataset = maybe_in_memory(dataset, self.cfg.backbone.input_size, self.cfg.data.memory_cache_gb,
                                  workers=max(1, self.cfg.data.num_workers), progress=self.progress and self.is_main)
        if isinstance(dataset, InMemoryDataset):
            self.log.info(f"decoded {len(dataset)} images into memory at {self.cfg.backbone.input_size}x"
                          f"{self.cfg.backbone.input_size} in {time.time() - t0:.1f}s")
        return dataset, bins

    def _open_val_sets(self, bins):
        """Decode (and shrink) every verification set now: a bad .bin fails the start, not the end of epoch 1."""
        from .eval.bins import load_bin_images
        if self.is_main:
            self.val_sets = {os.path.splitext(os.path.basename(p))[0]:
                             load_bin_images(p, self.cfg.backbone.input_size) for p in bins}

    def _start_weights(self, num_classes: int) -> Progress:
        finetune = self.cfg.finetune
        if finetune.weights:
            weights = self._native_weights(finetune.weights)
            self.twin.load_backbone(weights)
            head = ("no head (triplet loss)" if self.cfg.head.type == "none"
                    else f"new head for {num_classes} identities")
            self.log.info(f"finetune: backbone from {weights}, {head}, backbone frozen for {finetune.freeze_epochs} "
                          f"epoch(s), then lr x {finetune.backbone_lr_scale}")
        return Progress()

    def _restore(self) -> Progress:
        progress = Progress.from_meta(self.twin.load_state(self.state_path))
        if self.twin.world_size > 1:
            self.twin.load_shard(run_dir.shard_path(self.state_path, self.twin.rank, progress.step))
        self.history = [h for h in self._saved_summary().get("history", []) if h["step"] <= progress.step]
        self.log.info(f"resumed from {self.state_path} at step {progress.step} "
                      f"(epoch {progress.step // self.steps_per_epoch})")
        return progress

    def _saved_summary(self) -> dict:
        try:
            with open(self.summary_path) as f:
                return json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def _finished_summary(self, progress: Progress):
        """A resumed run that already reached its end keeps its outputs as they are."""
        saved = self._saved_summary()
        if progress.step < self.last_step or not saved.get("finished") or saved.get("steps") != progress.step:
            return None
        self.log.info(f"{self.out}: the run is finished (step {progress.step} of {self.last_step}); nothing "
                      f"changed. Raise train.epochs to train on.")
        return saved

    def _native_weights(self, path: str) -> str:
        """Finetuning from the other framework's weights (or any ONNX file): convert them first, verified."""
        suffix = ".pth" if self.twin.framework == "torch" else ".weights.h5"
        if path.endswith(suffix) or (self.twin.framework == "torch" and path.endswith(".pt")):
            return path
        from twinface_convert.convert import convert
        converted = os.path.join(self.out, "finetune_init" + suffix)
        convert(path, converted, arch=self.cfg.backbone.name, force=True, log=self.log.info)
        return converted

    def _announce(self, dataset, sampler):
        cfg = self.cfg
        self.log.info(f"{self.twin.framework}: {cfg.backbone.name}, {len(dataset)} images, {dataset.num_classes} "
                      f"identities, {self.steps_per_epoch} steps/epoch x {cfg.train.epochs} epochs, batch "
                      f"{cfg.train.batch_size} x {self.twin.world_size} rank(s)")
        if isinstance(sampler, IdentitySampler):
            draws = sampler.steps_per_epoch() * sampler.per_batch
            self.log.info(f"identity sampler: {sampler.per_batch} identities x {sampler.k} images per batch; "
                          f"{sampler.short_identities} of {sampler.num_identities} identities have fewer than "
                          f"{sampler.k} images and are drawn with replacement: {sampler.short_draws(0)} of {draws} "
                          f"identity draws in epoch 1")
        if isinstance(sampler, StreamSampler):
            read = sum(len(sampler.records[s]) for s in sampler.shards)
            self.log.info(f"stream sampler: rank {self.twin.rank} reads shards {sampler.shards} ({read} records, "
                          f"{sampler.steps_per_epoch() * sampler.batch_size} used per epoch), windows of "
                          f"{sampler.window} records permuted")

    def _measure_loader(self, dataset, sampler, batches: int = 8):
        """The data pipeline alone, once: it should outrun the training step by a wide margin."""
        t0, n = time.time(), 0
        for i, (images, _) in enumerate(self.twin.batches(dataset, sampler, 0, 0)):
            n += len(images)
            if i + 1 == batches:
                break
        self.log.info(f"data loader alone: {n / max(time.time() - t0, 1e-9):.0f} img/s "
                      f"({self.cfg.data.num_workers} workers, {n} images)")

    # -- one epoch --------------------------------------------------------------------------------------
    def _train_epoch(self, dataset, sampler, progress: Progress):
        epoch, start_step = divmod(progress.step, self.steps_per_epoch)
        t_window, n_window = time.time(), 0
        for images, labels in self.twin.batches(dataset, sampler, epoch, start_step):
            frozen = progress.step / self.steps_per_epoch < self.cfg.finetune.freeze_epochs
            lr = self.lr_of(progress.step)
            loss = self._train_step(images, labels, lr, frozen, progress)
            if not math.isfinite(loss):
                self._guard(loss, labels, progress)
            elif self.twin.overflow:
                progress.overflow_steps += 1
            elif self.twin.no_triplets:
                progress.no_triplet_steps += 1
                if progress.no_triplet_steps == 1:
                    self.log.warning(f"step {progress.step + 1}: no valid triplet in the batch (labels "
                                     f"{labels[:16].tolist()}...), update skipped; the count shows in the progress "
                                     f"lines and summary.json")
            progress.step += 1
            n_window += len(images)
            if self.tb and math.isfinite(loss):
                self.tb.scalar("train/loss", loss, progress.step)
                self.tb.scalar("train/lr", lr, progress.step)
                if self.twin.loss_scale is not None:
                    self.tb.scalar("train/loss_scale", self.twin.loss_scale, progress.step)
                if self.twin.triplets is not None:
                    self.tb.scalar("train/valid_triplets", self.twin.triplets, progress.step)
            if self.is_main and (progress.step % self.cfg.train.log_every == 0 or progress.step == self.last_step):
                self._log_progress(progress, loss, lr, frozen, n_window / max(1e-9, time.time() - t_window))
                t_window, n_window = time.time(), 0
            if progress.step == self.last_step:
                break

    def _train_step(self, images, labels, lr, frozen, progress: Progress) -> float:
        """Finetuning: the backbone frozen (lr 0) for freeze_epochs, then at lr x backbone_lr_scale."""
        finetune = self.cfg.finetune
        self.twin.set_backbone_frozen(frozen)
        lr_backbone = 0.0 if frozen else lr * (finetune.backbone_lr_scale if finetune.weights else 1.0)
        t0 = time.time()
        loss = self.twin.train_step(images, labels, lr_backbone, lr)
        progress.train_seconds += time.time() - t0
        progress.train_images += len(images)
        return loss

    def _guard(self, loss, labels, progress: Progress):
        """A non-finite loss: the twin skipped the update; stop after train.max_bad_steps of them."""
        progress.bad_steps += 1
        last = self.state_path if os.path.exists(self.state_path) else "none yet"
        epoch = progress.step // self.steps_per_epoch
        self.log.warning(f"non-finite loss {loss} at step {progress.step} (epoch {epoch}); update skipped; labels of "
                         f"the batch: {labels[:16].tolist()}...; last good checkpoint: {last}")
        if progress.bad_steps >= self.cfg.train.max_bad_steps:
            raise TrainingDiverged(
                f"{progress.bad_steps} steps with a non-finite loss (train.max_bad_steps={self.cfg.train.max_bad_steps}"
                f"); stopped without writing the diverged weights. Last good checkpoint: {last}. "
                f"Try a lower optimizer.lr, head.gradient=straight_through, or check the data.")

    def _log_progress(self, progress: Progress, loss, lr, frozen, rate):
        step = progress.step
        eta = (self.last_step - step) * self.cfg.train.batch_size / max(rate, 1e-9)
        scale = self.twin.loss_scale
        skipped = "".join(f" {n} {what}" for n, what in ((progress.overflow_steps, "overflow"),
                                                         (progress.bad_steps, "non-finite"),
                                                         (progress.no_triplet_steps, "no triplet")) if n)
        self.log.info(f"epoch {(step - 1) // self.steps_per_epoch + 1}/{self.cfg.train.epochs} step {step}/"
                      f"{self.last_step} loss {loss:.4f} lr {lr:.5f}{' (backbone frozen)' if frozen else ''}"
                      f"{f' loss scale {scale:g}' if scale is not None else ''}"
                      f"{f' (skipped steps:{skipped})' if skipped else ''} {rate:.1f} img/s ETA {_fmt_time(eta)}")

    def _end_epoch(self, progress: Progress):
        """Checkpoint first, so a failing evaluation (or a kill during it) costs nothing; then evaluate."""
        if self.is_main:
            self._write(self.twin.save_backbone, self.backbone_path)
        if (progress.step // self.steps_per_epoch) % self.cfg.train.checkpoint_every == 0 \
                or progress.step == self.last_step:
            self._checkpoint(progress)
        if not self.is_main:
            return
        self._evaluate(progress.step)
        self._write_summary(progress, finished=False)
        self.tb.flush()

    def _checkpoint(self, progress: Progress):
        """The training state; over several ranks their head shards first, then rank 0's state file (which commits
        the step), then the older shards go (run_dir: a kill at any point leaves a complete checkpoint)."""
        meta = {**dataclasses.asdict(progress), "world_size": self.twin.world_size}
        several = self.twin.world_size > 1
        if several:
            shard = run_dir.shard_path(self.state_path, self.twin.rank, progress.step)
            self._write(lambda path: self.twin.save_shard(path, meta), shard)
            self.twin.barrier()
        if self.is_main:
            self._write(lambda path: self.twin.save_state(path, meta), self.state_path)
            self.log.info(f"checkpoint: {self.state_path} (step {progress.step})")
        if several:
            self.twin.barrier()
            run_dir.remove_older_shards(self.state_path, self.twin.rank, progress.step)

    def _write(self, save, path: str):
        """save(path) through the twin; a failure (disk full, ...) names the file and keeps the previous one."""
        try:
            save(path)
        except Exception as e:
            raise CheckpointWriteError(f"{path}: writing failed ({_os_reason(e)}); the previous "
                                       f"version of the file, if any, is unchanged") from e

    # -- evaluation -------------------------------------------------------------------------------------
    def _evaluate(self, step: int):
        """Score every verification set; a failure (NaN embeddings, ...) is logged and recorded, and the run goes on."""
        from .eval.bins import evaluate_images
        from .eval.verification import format_result
        self.results, scored = {}, {}
        for name, (images, issame) in self.val_sets.items():
            try:
                result = evaluate_images(self.twin.embed, images, issame, flip=self.cfg.val.flip,
                                         batch_size=self.cfg.val.batch_size, progress=False, name=name)
            except Exception as e:             # evaluation only reports: it must never end a run
                self.results[name] = {"error": f"{type(e).__name__}: {e}"}
                self.log.warning(f"evaluation of {name} failed at step {step}: {type(e).__name__}: {e}; "
                                 f"training goes on")
                continue
            scored[name] = result
            self.results[name] = result.summary()
            for line in format_result(name, result).splitlines():
                self.log.info(line)
            self.tb.scalar(f"val/{name}/accuracy", result.acc_mean, step)
            self.tb.scalar(f"val/{name}/val_at_far1e-3", result.val, step)
            self.tb.scalar(f"val/{name}/xnorm", result.xnorm, step)
        if scored:
            self._log_roc(scored, step)
        scores = {k: r if "error" in r else {"acc": r["acc_mean"], "val": r["val"]} for k, r in self.results.items()}
        self.history = [h for h in self.history if h["step"] != step] + [
            {"epoch": step // self.steps_per_epoch, "step": step, **scores}]
        self.evaluated_at = step

    def _log_roc(self, results, step):
        import cv2
        from .eval.roc_plot import save_roc_plot
        png = os.path.join(self.out, "roc.png")
        save_roc_plot(results, png, title=f"ROC after step {step}")
        image = cv2.imread(png)
        self.tb.image_png("val/roc", open(png, "rb").read(), image.shape[0], image.shape[1], step)

    # -- the end ----------------------------------------------------------------------------------------
    def _finish(self, progress: Progress) -> dict:
        """Export ONNX and write the closing summary (evaluating first if a kill came between the last checkpoint
        and the summary)."""
        if not self.is_main:
            return self._summary(progress, finished=True)
        if self.evaluated_at != progress.step:
            self._evaluate(progress.step)
        onnx_path = os.path.join(self.out, "backbone.onnx")
        diff = self.twin.export_onnx(onnx_path)
        summary = self._write_summary(progress, finished=True, onnx=onnx_path, onnx_max_abs_diff=diff,
                                      **self._aot_package())
        self._print_summary(summary)
        return summary

    def _aot_package(self) -> dict:
        """train.aot_package: the torch twin compiles backbone.pt2 for embed; a failure (no C++ compiler) is
        reported, never fatal: embed then runs the default path."""
        if not (self.cfg.train.aot_package and hasattr(self.twin, "export_aot")):
            return {}
        path = os.path.join(self.out, "backbone.pt2")
        self.log.info(f"compiling {path} (AOTInductor, about a minute) ...")
        try:
            diff = self.twin.export_aot(path, self.backbone_path)
        except Exception as e:                  # compiler, codegen, disk: the run's own outputs are all written
            reason = str(e) if str(e).startswith(path) else f"{path}: {e}"
            self.log.warning(f"{reason}; embed runs the default path")
            return {"aot_package": None, "aot_package_error": reason}
        self.log.info(f"wrote {path} (vs the module: max abs diff {diff:.3g}, L2-normalised)")
        return {"aot_package": path, "aot_package_max_abs_diff": diff}

    def _summary(self, progress: Progress, finished: bool, **extra) -> dict:
        rate = round(progress.train_images / progress.train_seconds, 1) if progress.train_seconds else None
        return {"framework": self.twin.framework, "arch": self.cfg.backbone.name, "steps": progress.step,
                "finished": finished, "wall_time_s": round(time.time() - self.t_start, 1),
                "train_images_per_s": rate, "precision": self.cfg.train.precision,
                "skipped_steps": {"non_finite_loss": progress.bad_steps, "loss_scale_overflow": progress.overflow_steps,
                                  "no_valid_triplet": progress.no_triplet_steps},
                "backbone": self.backbone_path, "state": self.state_path,
                "tensorboard": os.path.join(self.out, "tensorboard"), "log": os.path.join(self.out, "train.log"),
                **extra, "results": self.results, "history": self.history}

    def _write_summary(self, progress: Progress, finished: bool, **extra) -> dict:
        summary = self._summary(progress, finished, **extra)
        self._write(lambda path: _dump_json(summary, path), self.summary_path)
        return summary

    def _print_summary(self, summary):
        log = self.log
        log.info("=" * 72)
        log.info(f"done: {summary['framework']} {self.cfg.backbone.name}, {summary['steps']} steps in "
                 f"{_fmt_time(summary['wall_time_s'])} ({summary['train_images_per_s']} train img/s)")
        for name, r in summary["results"].items():
            log.info(f"  {name}: evaluation failed: {r['error']}" if "error" in r else
                     f"  {name}: accuracy {r['acc_mean'] * 100:.2f}% +- {r['acc_std'] * 100:.2f}, "
                     f"VAL@FAR=1e-3 {r['val'] * 100:.2f}%")
        for key in ("backbone", "state", "onnx", "tensorboard", "log"):
            log.info(f"  {key}: {summary[key]}")


def _os_reason(e: BaseException) -> str:
    """The OS's words for a failed write, whichever framework wrapped them (torch in a RuntimeError, h5py in an
    OSError whose text is its own): a full disk reads 'No space left on device' and a file-size limit 'File too
    large' in both twins. Other errors as they are."""
    cause = e
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno:
            return f"[Errno {cause.errno}] {os.strerror(cause.errno)}"
        cause = cause.__cause__ or cause.__context__
    return f"{type(e).__name__}: {e}"


def _dump_json(obj, path: str):
    with atomic.atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=float)
