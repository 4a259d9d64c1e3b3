"""Single-process training: the job a config describes, run in this process.

Everything that decides the numbers is a function of (config, step): data windows come
from a stateless sampler, the LR from the schedule, dropout from narun's generator whose
state is checkpointed. So a run stopped at step s and resumed gives bit-identical
parameters to one that never stopped.
"""

from __future__ import annotations

import importlib.util
import signal
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

import narun
from narun import checkpoint as ckpt
from narun import optim
from narun.amp import MixedPrecision, at_least_float32, bf16_refusal
from narun.config import JobConfig, _choice_message, check_trainable_device, to_dict
from narun.data import ArrayDataset, ShardedSampler, TextDataset, WindowSampler, class_prompts
from narun.data._arrays import missing_arrays
from narun.data._augment import augment_images
from narun.errors import CheckpointError, ConfigError, DeviceError
from narun.events import Reporter
from narun.models import bert, build_from_config, gpt_config, model_names
from narun.nn import functional as F
from narun.nn.utils import clip_grad_norm_
from narun.runlog import check_tensorboard, record_run
from narun.tensor import _backend

log = structlog.get_logger("narun.train")

EVAL_BATCHES = 8  # validation batches per evaluation: the whole split is too slow per eval


@dataclass
class Job:
    """A model with its data and optimizer, ready to step."""

    config: JobConfig
    model: Any
    optimizer: Any
    scheduler: Any
    train_data: Any
    val_data: Any
    sampler: Any
    device: str = "cpu"  # where loss() puts the batch: the model's device
    # training.precision fp16 / bf16: the model's low-precision compute over float32
    # masters, which the optimizer steps (narun.amp); None in float32
    amp: MixedPrecision | None = None
    # The run's lineage, written into every checkpoint and kept across resumes: pruning and
    # `--resume auto` only consider this run's checkpoints (narun.checkpoint's docstring).
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def text(self) -> bool:
        return self.config.data.kind == "text"

    @property
    def target(self) -> str:
        """The array of an array dataset the model learns from (see target_name)."""
        return target_name(self.model)

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The global batch of `step`: token windows, or rows of an array dataset."""
        if self.text:
            return self.train_data.batch(self.sampler.offsets(step))
        self.sampler.seek(step)  # the batch of `step` whatever ran before (a restart)
        x, y = self.train_data.batch(self.sampler.next_batch())
        d = self.config.data
        if d.augment:  # drawn per (seed, step): the same after a restart, on every trainer
            x = augment_images(x, d.augment, d.max_shift, self.config.training.seed, step)
        return x, y

    def loss(self, x: np.ndarray, y: np.ndarray) -> narun.Tensor:
        if self.text:
            return self.model.loss(narun.tensor(x, device=self.device),
                                   narun.tensor(y, device=self.device))
        if self.target != "y":  # e.g. captions: the model's loss takes them as read
            return self.model.loss(narun.tensor(x, device=self.device), y)
        return F.cross_entropy(at_least_float32(self.model(narun.tensor(x, device=self.device))),
                               narun.tensor(y, device=self.device))

    def _val_batches(self, max_batches: int | None, data: Any = None
                     ) -> Iterable[tuple[np.ndarray, np.ndarray]]:
        """Batches of the validation split (of `data`, another view of it, if given)."""
        bs = self.config.training.batch_size
        if self.text:
            return self.val_data.iter_eval_batches(bs, max_batches=max_batches)
        data = self.val_data if data is None else data
        n = len(data)
        stops = range(0, n, bs)
        if max_batches is not None:
            stops = stops[:max_batches]
        return (data.batch(np.arange(s, min(s + bs, n))) for s in stops)

    @narun.no_grad()
    def evaluate(self, max_batches: int | None = EVAL_BATCHES) -> float:
        """Mean validation loss (nats per token for text)."""
        self.model.eval()
        try:
            losses, weights = [], []
            for x, y in self._val_batches(max_batches):
                losses.append(self.loss(x, y).item())
                weights.append(len(x))
            if not losses:
                raise ConfigError("data.val_fraction: the validation split is empty; "
                                  "raise val_fraction to evaluate")
            return float(np.average(losses, weights=weights))
        finally:
            self.model.train()

    @narun.no_grad()
    def accuracy(self, max_batches: int | None = None) -> float:
        """Fraction of validation rows whose highest-scoring class is the label `y` (array
        data: classifiers); language models are judged by loss, perplexity and bits per byte.
        A model with a `classifier(prompts)` (CLIP) is scored zero-shot against the data's
        texts for each class (narun.data.class_prompts)."""
        if self.text:
            raise ConfigError("data.kind: accuracy is for classifiers (data.kind: arrays); "
                              "a language model reports perplexity")
        self.model.eval()
        try:
            path, labelled, score = self.config.data.path, self.val_data, self.model
            if self.target != "y":
                labelled = ArrayDataset(path, names=("x", "y"), split="val",
                                        val_fraction=self.config.data.val_fraction)
            if hasattr(self.model, "classifier"):
                score = self.model.classifier(class_prompts(path))
            right = total = 0
            for x, y in self._val_batches(max_batches, labelled):
                logits = score(narun.tensor(x, device=self.device)).numpy()
                right += int((logits.argmax(axis=-1) == y).sum())
                total += len(y)
            if not total:
                raise ConfigError("data.val_fraction: the validation split is empty; "
                                  "raise val_fraction to evaluate")
            return right / total
        finally:
            self.model.train()


def check_job(cfg: JobConfig, here: bool = True) -> None:
    """Everything `narun train` refuses about a config, checked before anything is built or
    started; `narun config check`, one-process and distributed training all call this, so
    they refuse the same configs with the same ConfigError. With `here` its trainers run on
    this machine, so the device must be here too (CuPy imports, the GPU index exists);
    `narun launch` runs them on other hosts, whose agents start them."""
    rt, t, data = cfg.runtime, cfg.training, cfg.data
    distributed = rt.mode in ("ps-sync", "ps-async", "pipeline")
    if rt.mode == "local" and rt.workers:
        raise ConfigError(f"runtime.workers: mode local runs one process, got {rt.workers} "
                          f"workers; use mode ps-sync / ps-async with workers >= 1")
    if rt.mode in ("ps-sync", "ps-async") and rt.workers < 1:
        raise ConfigError(f"runtime.workers: expected >= 1 in mode {rt.mode}, got {rt.workers}")
    check_trainable_device(rt.device, rt.mode)
    if here:
        from workers.executor import check_device_here  # the executors know the devices

        try:
            check_device_here(rt.device)
        except DeviceError as err:
            raise ConfigError(f"runtime.device: {err}") from None
    if rt.mode in ("ps-sync", "ps-async") and (t.batch_size // rt.workers) % t.grad_accum:
        raise ConfigError(f"training.grad_accum: {t.grad_accum} does not divide the "
                          f"per-trainer batch {t.batch_size // rt.workers} (batch_size "
                          f"{t.batch_size} / {rt.workers} workers)")
    if cfg.model.name not in model_names():
        raise ConfigError(_choice_message("model.name", cfg.model.name, model_names()))
    if cfg.model.name == "clip":  # its loss compares every image with every caption of a batch
        if distributed:
            raise ConfigError(f"model.name: clip's contrastive loss compares each image with "
                              f"every caption of the whole batch, which mode {rt.mode} splits "
                              f"over processes (each would see only its share); train it in "
                              f"mode local")
        if t.grad_accum != 1:
            raise ConfigError(f"training.grad_accum: clip's contrastive loss compares each "
                              f"image with every caption of the whole batch, so micro-batches "
                              f"would change the loss, not only the memory; set grad_accum 1 "
                              f"(got {t.grad_accum})")
    if rt.mode == "pipeline":
        _check_pipeline_job(cfg)
    if t.precision != "fp32":
        if rt.mode != "local":
            raise ConfigError(f"training.precision: {t.precision} trains in mode local; mode "
                              f"{rt.mode} trains in fp32 (set training.precision: fp32)")
        if t.precision == "bf16" and rt.device not in _backend.MLX_DEVICES:
            raise ConfigError(bf16_refusal())  # cpu, cuda and auto: NumPy or CuPy arrays
        if t.precision == "bf16" and here and importlib.util.find_spec("ml_dtypes") is None:
            raise ConfigError(bf16_refusal(on_mlx=True))
    if data.kind == "text" and cfg.model.name not in ("gpt", "bert"):
        raise ConfigError(f"data.kind: text needs a language model (model.name: gpt or "
                          f"bert), got model.name {cfg.model.name!r}")
    if data.path is not None:
        p = Path(data.path)
        if not p.exists():
            if data.kind == "arrays":
                raise missing_arrays(p)
            raise ConfigError(f"data.path: no such file {data.path!r}")
        if p.is_dir():
            raise ConfigError(f"data.path: {data.path!r} is a directory, expected a file")
    check_tensorboard(t)
    if data.kind == "text":
        block = (int(cfg.model.overrides.get("block_size", bert.BLOCK_SIZE))
                 if cfg.model.name == "bert"
                 else gpt_config(cfg.model.preset, **cfg.model.overrides).block_size)
        if data.seq_len > block:
            raise ConfigError(f"data.seq_len: {data.seq_len} exceeds the model's block_size "
                              f"{block} (the longest context it is built for); set "
                              f"data.seq_len <= {block}, or model.block_size >= "
                              f"{data.seq_len}")


def _check_pipeline_job(cfg: JobConfig) -> None:
    """What mode pipeline needs beyond every job's checks: a schedule that can run for
    runtime.stages and runtime.micro_batches on this model (narun.pipeline.check_pipeline)."""
    from narun.pipeline import check_pipeline
    from narun.pipeline.partition import units

    rt, t = cfg.runtime, cfg.training
    replicas = max(rt.workers, 1)  # workers r: r replicas of each stage
    if t.batch_size % replicas:
        raise ConfigError(f"runtime.workers: {rt.workers} replicas of each stage share each "
                          f"batch, but training.batch_size {t.batch_size} does not divide "
                          f"into {rt.workers} equal parts; use a batch_size that is a "
                          f"multiple of {rt.workers}")
    share = t.batch_size // replicas
    if replicas > 1 and rt.micro_batches >= 1 and share % rt.micro_batches:
        raise ConfigError(f"runtime.micro_batches: each replica's share of the batch "
                          f"(training.batch_size {t.batch_size} / runtime.workers "
                          f"{rt.workers} = {share}) does not split into {rt.micro_batches} "
                          f"micro-batches; make batch_size a multiple of "
                          f"{rt.workers * rt.micro_batches}")
    if rt.workers and rt.ps_shards != 1:
        raise ConfigError(f"runtime.ps_shards: a data-parallel pipeline has one shard per "
                          f"stage ({rt.stages}); leave ps_shards at 1 (got {rt.ps_shards})")
    if t.grad_accum != 1:
        raise ConfigError(f"training.grad_accum: mode pipeline splits each batch into "
                          f"runtime.micro_batches already; set grad_accum 1 (got "
                          f"{t.grad_accum}) and micro_batches to what you want")
    if cfg.model.name == "gpt":  # its config says it; building it could take a while
        blocks = gpt_config(cfg.model.preset, **cfg.model.overrides).n_layer
    else:
        blocks = units(build_from_config(cfg.model))
    check_pipeline(rt.stages, rt.micro_batches, rt.schedule, share, blocks)


def build_job(cfg: JobConfig, device: str = "cpu") -> Job:
    """Model, data, optimizer and schedule from a config (seeded by training.seed), the
    model on `device` ("cpu", "cuda:N", which becomes this thread's current GPU, or an MLX
    device, "mlx:cpu" or "mps", which becomes the process's MLX default device): built
    and initialised on the host, as everywhere, so every device starts from the same
    values, then moved before the optimizer and mixed precision take its parameters."""
    t = cfg.training
    narun.manual_seed(t.seed)
    model = build_from_config(cfg.model)
    if device != "cpu":
        _backend.use_device(device)
        model.to(device)
    if cfg.data.kind == "text":
        train, val = TextDataset.splits(cfg.data.path, cfg.data.seq_len, cfg.data.val_fraction)
        sampler: Any = WindowSampler(len(train), t.batch_size, seed=t.seed)
    else:
        names = ("x", target_name(model))
        train = ArrayDataset(cfg.data.path, names=names,
                             val_fraction=cfg.data.val_fraction, split="train")
        val = ArrayDataset(cfg.data.path, names=names,
                           val_fraction=cfg.data.val_fraction, split="val")
        sampler = ShardedSampler(len(train), t.batch_size, seed=t.seed, drop_last=True)
    amp = MixedPrecision(model, t.precision) if t.precision != "fp32" else None
    opt = make_optimizer(amp.parameters() if amp else model.parameters(), cfg)
    return Job(cfg, model, opt, make_scheduler(opt, cfg), train, val, sampler, device=device,
               amp=amp)


def target_name(model: Any) -> str:
    """The array a model learns from in an array dataset: `y`, the class labels
    cross-entropy scores its logits against, or the one its `targets` attribute names
    (CLIP: `captions`), which its own `loss(inputs, targets)` scores as read."""
    return getattr(model, "targets", "y")


def make_optimizer(params: Iterable[Any], cfg: JobConfig) -> Any:
    """The configured optimizer over `params` (a model's, in model order); weight decay only
    on matrices (not biases, norms), as GPT-2. Only the parameters' shapes decide the groups,
    so a parameter-server shard builds the same groups over shape-only stand-ins."""
    t = cfg.training
    params = list(params)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    classes = {"sgd": optim.SGD, "adam": optim.Adam, "adamw": optim.AdamW, "lion": optim.Lion}
    return classes[t.optimizer](groups, lr=t.lr)


def make_scheduler(optimizer: Any, cfg: JobConfig) -> Any:
    """The configured LR schedule of `optimizer` (sets its groups' lr for step 0)."""
    t = cfg.training
    warmup = t.warmup_steps
    if warmup > t.steps:
        log.warning("warmup_clamped", warmup_steps=warmup, steps=t.steps,
                    reason="training.warmup_steps exceeds training.steps")
        warmup = t.steps
    return optim.lr_scheduler.build_scheduler(t.schedule, optimizer, warmup, t.steps)


class _StopFlag:
    """Set by SIGINT/SIGTERM: the loop finishes its step, checkpoints, and returns."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def checkpoint_dir(cfg: JobConfig) -> Path:
    return Path(cfg.training.out_dir) / "checkpoints"


def save(job: Job, step: int) -> Path:
    cfg = job.config
    extra = {"config": to_dict(cfg), "rng": narun.get_rng_state(),
             "scheduler": job.scheduler.state_dict()}
    if not job.text:
        extra["sampler"] = job.sampler.state_dict()
    model_state = job.model.state_dict()
    if job.amp is not None:  # the float32 masters: an ordinary checkpoint, and the loss scale
        model_state = job.amp.master_state()
        extra["amp"] = job.amp.state_dict()
    return ckpt.save_checkpoint(checkpoint_dir(cfg), step, model_state,
                                job.optimizer.state_dict(), extra,
                                keep=cfg.training.keep_checkpoints, run_id=job.run_id)


def restore(job: Job, path: str | Path) -> int:
    """Load a checkpoint into `job`; returns the step to continue from."""
    c = ckpt.load_checkpoint(path)
    if job.amp is not None:
        job.amp.load_master_state(c.model)
        job.amp.load_state_dict(c.extra.get("amp", {}))  # a float32 run's: a fresh scale
    else:
        job.model.load_state_dict(c.model)
    job.optimizer.load_state_dict(c.optimizer)
    job.scheduler = resume_schedule(job.scheduler, job.optimizer, job.config, c.extra, c.step,
                                    str(path))
    narun.set_rng_state(c.extra["rng"])
    if not job.text:
        job.sampler.load_state_dict(c.extra["sampler"])
    run_id = c.manifest.get("run_id")
    if isinstance(run_id, str):  # else an unlabelled (older) checkpoint: a new lineage
        job.run_id = run_id
    return c.step


def resume_schedule(scheduler: Any, optimizer: Any, cfg: JobConfig, extra: dict[str, Any],
                    step: int, source: str) -> Any:
    """The LR scheduler to continue at `step` with, from a checkpoint's `extra` (its
    scheduler state and config). With the checkpoint's training.steps, the saved schedule
    as it was. With another training.steps (extending or shortening a run), the schedule is
    rebuilt for the new total and continues at `step` (warning `schedule_rebuilt`): the
    saved one would keep its old total, and a finished run's would train on at lr 0.
    A training.steps below `step` is refused (ConfigError)."""
    t = cfg.training
    if step > t.steps:
        raise ConfigError(f"training.steps: {t.steps} is below step {step} of the checkpoint "
                          f"resumed from ({source}); set training.steps above {step} to "
                          f"train on, or resume nothing to start afresh")
    scheduler.load_state_dict(extra["scheduler"])
    saved_steps = extra.get("config", {}).get("training", {}).get("steps")
    if saved_steps == t.steps:
        return scheduler
    rebuilt = make_scheduler(optimizer, cfg)  # laid out for the new total, at step 0
    rebuilt.last_epoch = step - 1
    rebuilt.step()  # every schedule is a closed form of last_epoch: now the lr of `step`
    log.warning("schedule_rebuilt", checkpoint=source, step=step, steps_before=saved_steps,
                steps=t.steps, lr=rebuilt.get_last_lr()[0])
    return rebuilt


def claim_out_dir(cfg: JobConfig, resume: Path | None, overwrite: bool = False) -> None:
    """Check that a run may write checkpoints into its out_dir: one resuming may; a fresh one
    (`resume` None) may only if the directory holds no other run's checkpoints, or with
    `overwrite`, which moves them aside (to checkpoints.old-N/, nothing is deleted).
    ConfigError naming the out_dir and the ways on otherwise."""
    if resume is not None:
        return
    directory = checkpoint_dir(cfg)
    found = ckpt.list_checkpoints(directory)
    if not found:
        return
    if not overwrite:
        raise ConfigError(
            f"training.out_dir {cfg.training.out_dir}: already holds checkpoints of another "
            f"run ({len(found)}, newest written {found[-1].name}); a fresh run would mix "
            f"with them. Continue that run with --resume auto, choose another out_dir "
            f"(--set training.out_dir=...), or pass --overwrite to move them aside")
    n = 1
    while (aside := directory.with_name(f"checkpoints.old-{n}")).exists():
        n += 1
    directory.rename(aside)
    log.warning("checkpoints_moved_aside", out_dir=cfg.training.out_dir, to=str(aside),
                count=len(found))


def resolve_resume(cfg: JobConfig, resume: str | None) -> Path | None:
    """`auto`: the out_dir's newest checkpoint that verifies (None if there is none); else a
    step directory as given, or a run directory's newest good checkpoint, as `narun
    generate` and `narun evaluate` take them (narun.checkpoint.find_checkpoint)."""
    if resume is None:
        return None
    if resume == "auto":
        return ckpt.latest_good(checkpoint_dir(cfg))
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"--resume {resume}: no such checkpoint")
    try:
        return ckpt.find_checkpoint(path)
    except CheckpointError as err:
        raise CheckpointError(f"--resume {err}") from None


def train(cfg: JobConfig, reporter: Reporter, resume: str | None = None,
          stop_at: int | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Run the job to `training.steps` (or until SIGINT/SIGTERM); returns the `done` fields.

    `stop_at` ends the run early at that step with a checkpoint, as a signal would, without
    changing the schedule (which is laid out for `training.steps`). A fresh run refuses an
    out_dir that holds another run's checkpoints unless `overwrite` (see claim_out_dir).
    """
    from workers.executor import training_device  # the executors know the devices

    check_job(cfg)
    job = build_job(cfg, training_device(cfg.runtime.device, cfg.runtime.mode))
    t = cfg.training
    start = 0
    path = resolve_resume(cfg, resume)
    claim_out_dir(cfg, path, overwrite)
    if path is not None:
        start = restore(job, path)
        log.info("resumed", checkpoint=str(path), step=start)
    reporter = record_run(reporter, t, fresh=path is None)
    micro = t.batch_size // t.grad_accum  # the config checked that it divides
    per_step = t.batch_size * (cfg.data.seq_len if job.text else 1)
    speed_key = "tokens_per_s" if job.text else "samples_per_s"
    began = time.perf_counter()
    last_ckpt = None
    val_loss = val_step = None
    step = start
    end = t.steps if stop_at is None else min(stop_at, t.steps)
    reporter.start(t.steps, start)
    if path is not None:
        reporter.emit("resumed", step=start, checkpoint=str(path))
    with _StopFlag() as stop:
        while step < end and stop.signal is None:
            t0 = time.perf_counter()
            x, y = job.batch(step)
            job.optimizer.zero_grad()
            total = 0.0
            for i in range(t.grad_accum):
                loss = job.loss(x[i * micro:(i + 1) * micro], y[i * micro:(i + 1) * micro])
                part = loss / t.grad_accum if t.grad_accum > 1 else loss
                job.amp.backward(part) if job.amp is not None else part.backward()
                total += loss.item() / t.grad_accum
            lr = job.scheduler.get_last_lr()[0]
            fields: dict[str, Any] = {}
            if job.amp is not None:  # a step with an inf or nan gradient is skipped
                fields["skipped"] = not job.amp.step(job.optimizer, t.grad_clip)
                if job.amp.scaler is not None:
                    fields["loss_scale"] = job.amp.scaler.scale
            else:
                if t.grad_clip:
                    clip_grad_norm_(job.model.parameters(), t.grad_clip)
                job.optimizer.step()
            job.scheduler.step()
            # MLX is lazy: BatchNorm statistics would chain every step's update until read
            _backend.settle(b.data for b in job.model.buffers())
            step += 1
            reporter.emit("step", step=step, loss=total, lr=lr,
                          **{speed_key: per_step / (time.perf_counter() - t0)}, **fields)
            if t.eval_every and step % t.eval_every == 0 and step < t.steps:
                val_loss, val_step = job.evaluate(), step
                reporter.emit("eval", step=step, val_loss=val_loss)
            if t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.steps:
                last_ckpt = save(job, step)
                reporter.emit("checkpoint", step=step, path=str(last_ckpt))
    interrupted = step < t.steps
    if last_ckpt is None or not last_ckpt.name.endswith(f"{step:06d}"):
        last_ckpt = save(job, step)
        reporter.emit("checkpoint", step=step, path=str(last_ckpt))
    if not interrupted:
        val_loss, val_step = job.evaluate(max_batches=None), step
    # val_step: the step val_loss is from; after an interrupt, the last periodic eval's (or
    # None), not the stopping step's, whose weights were not evaluated
    done = {"step": step, "val_loss": val_loss, "val_step": val_step,
            "checkpoint": str(last_ckpt),
            "seconds": time.perf_counter() - began, "interrupted": interrupted}
    reporter.emit("done", **done)
    reporter.close()
    done["signal"] = stop.signal
    return done
