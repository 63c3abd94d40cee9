"""The training loop: `train(cfg, dataset_path | samples, out_dir, ...) -> summary`.

One call builds (or resumes) everything:

1. checks the config (and, when resuming, that the checkpoint's config matches it apart from
   ``train.steps``, logging and checkpoint cadence) and the data (schema, sample shapes) — every
   such error is raised before the first step;
2. builds the model (``DiT4DiT.from_config``; fp32 master weights, bf16 autocast on CUDA), the
   data (:mod:`dit4dit.data.training_data`: samples, processor with the normalisation
   statistics, collate), the per-rank batch streams (:mod:`dit4dit.data.streams`), AdamW with
   per-part learning rates, the warm-up + cosine schedule and the EMA;
3. runs ``train.steps`` optimiser steps of ``train.grad_accum`` micro-batches each
   (:class:`~dit4dit.train.step.StepRunner`), logging every ``log_every`` steps, calling the
   image / evaluation hooks and following the time budget (:mod:`dit4dit.train.hooks`), saving
   every ``save_every`` steps and at the end (see ``checkpoint.py`` for the folder layout).

Exact resume: the data order is a pure function of ``(seed, epoch)``, every sample is produced
under RNG states seeded by ``(seed, epoch, index)``, and the checkpoint holds the weights, the
optimiser moments, the EMA, the schedule position, the data position and every RNG state (the
loss-noise generator, torch CPU/CUDA, numpy, python) of every rank. On CPU a run stopped at step
k and resumed reproduces the per-step losses of the uninterrupted run bit for bit.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from ..config import ConfigError, DiT4DiTConfig
from ..data.samples import collate as default_collate
from ..data.streams import BatchStream, MixedBatchStream
from ..data.training_data import (DatasetFolder, TrainingData, action_free_training_data,
                                  as_folder, build_training_data, check_processor, check_samples,
                                  is_labelled_dataset, resolve_auto_cameras, with_action_free_video)
from ..jsonio import write_json
from . import checkpoint as ckpt
from . import init_from, train_state
from .codec_fit import codec_latent_rms, fit_codec
from .distributed import (DistInfo, ShardedBatchSampler, Wrapped, all_reduce_mean, barrier, broadcast_flag,
                          choose_strategy, gather_tensors, init_distributed, is_dtensor, seed_for, shutdown, wrap)
from .hooks import EvalFn, ImageFn, MetricsWindow, TimeBudget, image_strip, run_eval_hook, run_image_hook
from .logging import RunLogger, progress_bar
from .optim import EMA, WarmupCosine, build_optimizer
from .step import VIDEO_PARTS, LossFn, LossModule, StepRunner, check_train_config, freeze_frozen_parts, \
    resolve_precision

_log = logging.getLogger("dit4dit.train")


def _device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def batch_stream(samples: Dataset, collate: Callable, batch_size: int, info: DistInfo, seed: int, num_workers: int,
                 pin_memory: bool) -> BatchStream:
    """This rank's stream of ``batch_size`` micro-batches: the epoch order a pure function of
    ``(seed, epoch)``, each sample produced under RNG states seeded by ``(seed, epoch, index)``."""
    sampler = ShardedBatchSampler(len(samples), batch_size, info.rank, info.world_size, seed)  # type: ignore[arg-type]
    return BatchStream(samples, collate, sampler, seed=seed, sample_seed=functools.partial(seed_for, seed, 3),
                       num_workers=num_workers, pin_memory=pin_memory)


@dataclass
class _Run:
    """One run's state, built by :meth:`Trainer._set_up` and advanced by :meth:`Trainer._loop`."""

    cfg: DiT4DiTConfig
    info: DistInfo
    precision: str
    strategy: str
    data: TrainingData
    model: Any
    optimizer: torch.optim.Optimizer
    scheduler: WarmupCosine
    ema: EMA | None
    generator: torch.Generator
    stream: BatchStream | MixedBatchStream
    runner: StepRunner
    logger: RunLogger
    counts: dict[str, int]
    t_start: float
    start_step: int
    step: int
    target: int
    image_fn: ImageFn | None
    budget: TimeBudget = field(default_factory=lambda: TimeBudget(None, 0, 0))
    bar: Any = None
    last_saved: int = -1
    last_ckpt: Path | None = None
    losses: list[float] = field(default_factory=list)
    window: MetricsWindow = field(default_factory=MetricsWindow)
    last_metrics: dict[str, float] = field(default_factory=dict)
    run_time: float = 0.0
    interrupted: bool = False

    @property
    def device(self) -> torch.device:
        return self.info.device

    @property
    def global_batch(self) -> int:
        tc = self.cfg.train
        return tc.batch_size * tc.grad_accum * self.info.world_size


class Trainer:
    """See :func:`train`. ``Trainer(...).run()`` is the same as ``train(...)``."""

    def __init__(self, cfg: DiT4DiTConfig, data: str | os.PathLike | Dataset, out_dir: str | os.PathLike,
                 backbone: str | None = None, resume: bool | str | os.PathLike = False, progress: bool = True, *,
                 processor: Any = None, collate_fn: Callable | None = None, loss_fn: LossFn | None = None,
                 image_fn: ImageFn | None = None, eval_fn: EvalFn | None = None, device: str | None = None,
                 stop_at_step: int | None = None, text_cache_dir: str | None = None, handle_signals: bool = True,
                 frame_cache: str | os.PathLike | bool | None = None, latent_cache: str | os.PathLike | None = None):
        self.cfg = cfg
        self.frame_cache = frame_cache
        self.latent_cache = latent_cache
        self._backbone_record: dict[str, Any] | None = None
        self.data = data
        self._folder: DatasetFolder | None = None  # ``data`` as a dataset folder (opened once), when a path
        self.run_dir = Path(out_dir).expanduser()
        self.backbone = backbone
        self.resume = resume
        self.progress = progress
        self.processor = processor
        self.collate_fn = collate_fn
        self.loss_fn = loss_fn
        self.image_fn = image_fn
        self.eval_fn = eval_fn
        self.device_request = device
        self.stop_at_step = stop_at_step
        self.text_cache_dir = text_cache_dir
        self.handle_signals = handle_signals
        self._stop_requested = False
        self.codec_fit: dict[str, Any] | None = None
        self.init_report: dict[str, Any] | None = None

    # ------------------------------------------------------------------ main entry
    def run(self) -> dict[str, Any]:
        self._folder = as_folder(self.data)
        self.cfg = resolve_auto_cameras(self.cfg, self._folder)
        cfg = check_train_config(self.cfg)
        info = init_distributed(self.device_request)
        self.info = info
        old_handlers = {}
        try:
            if self.handle_signals and threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGTERM,):
                    old_handlers[sig] = signal.signal(sig, self._on_signal)
            summary = self._run(cfg, info)
        finally:
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
        shutdown(info)  # on success only: a rank that failed must not wait for the others
        return summary

    def request_stop(self) -> None:
        """Finish the current step, save a checkpoint and return (thread-safe; e.g. a time limit)."""
        self._stop_requested = True

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        self.request_stop()

    def _run(self, cfg: DiT4DiTConfig, info: DistInfo) -> dict[str, Any]:
        r = self._set_up(cfg, info)
        try:
            self._loop(r)
        except BaseException:
            r.logger.close()
            raise
        finally:
            if r.bar is not None:
                r.bar.close()
            r.stream.close()
        return self._finish(r)

    # ------------------------------------------------------------------ set-up
    def _set_up(self, cfg: DiT4DiTConfig, info: DistInfo) -> _Run:
        """Everything before the first step, in an order that every resume reproduces: data,
        model, optimisation, RNG streams, batch streams, the checkpoint's state, the run's logger."""
        tc = cfg.train
        t_start = time.time()
        device = info.device
        precision = resolve_precision(tc.precision, device)
        if self.backbone is not None:  # validated (and hashed: a few MiB read) before anything else
            from ..models.backbone import Backbone

            self._backbone_record = Backbone.open(self.backbone).record()
        resume_from = self._resume_checkpoint()
        data = self._build_data(resume_from, info)
        self.processor = data.processor  # hooks (e.g. closed-loop evaluation) read it from here
        n_free = self._free_rows(data, info)
        load_text = self._text_encoder_needed(cfg, data.samples, data.free)
        from .memory import check_training_memory

        # On a GPU: refuse before loading anything when the estimated memory does not fit.
        check_training_memory(cfg, device, backbone=self.backbone, text_encoder_loaded=load_text,
                              latents_cached=self.latent_cache is not None, precision=precision,
                              world_size=info.world_size, strategy="auto")

        model, counts = self._build_model(cfg, data, resume_from, load_text, info)
        model.to(device)
        model.train()
        n_trainable = sum(v for k, v in counts.items() if k != "frozen")
        strategy = choose_strategy(tc.distributed, info.world_size, n_trainable)
        wrapped, optimizer, scheduler, ema = self._optimisation(model, cfg, strategy, info, precision)
        generator = self._seed_rank_streams(cfg, info)
        stream = self._batch_streams(data, n_free, info)
        step = 0
        if resume_from is not None:
            step = self._restore(resume_from, model, optimizer, scheduler, ema, stream, generator, info)
        runner = StepRunner(wrapped, optimizer, scheduler, ema, generator, device, precision, tc.grad_clip,
                            tc.grad_accum)

        target = tc.steps if self.stop_at_step is None else min(tc.steps, int(self.stop_at_step))
        # resume_step: metrics rows logged after the checkpoint (or by an abandoned start) are dropped.
        logger = RunLogger(self.run_dir, enabled=info.is_main, tensorboard=tc.tensorboard, wandb=tc.wandb,
                           wandb_project=tc.wandb_project, config=cfg.to_dict(), resume=resume_from is not None,
                           resume_step=step)
        r = _Run(cfg=cfg, info=info, precision=precision, strategy=strategy, data=data, model=model,
                 optimizer=optimizer, scheduler=scheduler, ema=ema, generator=generator, stream=stream, runner=runner,
                 logger=logger, counts=counts, t_start=t_start, start_step=step, step=step, target=target,
                 image_fn=self.image_fn,
                 last_saved=step if resume_from is not None else -1,
                 last_ckpt=resume_from.path if resume_from is not None else None)
        self._write_run_files(r)
        self._log_start(r, resume_from is not None)
        if tc.image_every > 0 and r.image_fn is None:
            r.image_fn = image_strip
        r.bar = progress_bar(tc.steps, step, self.progress and info.is_main)
        r.budget = TimeBudget(tc.time_budget_minutes, step, target)  # its clock starts right before the loop
        return r

    def _resume_checkpoint(self) -> ckpt.Checkpoint | None:
        if self.resume is False or self.resume is None:
            existing = ckpt.list_checkpoints(self.run_dir)
            if existing:
                raise FileExistsError(f"{self.run_dir} already holds checkpoints (newest: {existing[-1][1].name}); "
                                      f"resume it (--resume) or choose another output folder")
            return None
        source = self.run_dir if self.resume is True else Path(self.resume)
        try:  # a run folder: its newest intact checkpoint (a damaged newer one is skipped with a warning)
            found = ckpt.load_latest_intact(source) if self.resume is True or (source / ckpt.CHECKPOINTS_DIR).is_dir() \
                else ckpt.load_checkpoint(source)
        except ckpt.CheckpointError as e:
            raise ckpt.CheckpointError(f"cannot resume: {e}") from e
        ckpt.check_resume_config(found, self.cfg)
        if self.backbone is not None or ckpt.recorded_backbone(found.state):
            ckpt.check_backbone(found, self.backbone)  # the same backbone (content hash) as the checkpoint
        return found

    def _build_data(self, resume_from: ckpt.Checkpoint | None, info: DistInfo) -> TrainingData:
        """Samples, processor, collate and (co-training) action-free samples. In mode=video_only
        (and image_only, the static encoder's pretraining) a ``data`` folder that is not a
        labelled dataset of the schema is read as action-free video."""
        cfg, tc = self.cfg, self.cfg.train
        processor = self.processor
        if tc.video_datasets and self.latent_cache is not None:
            raise ConfigError("a latent cache holds the labelled clips only: train with action-free video "
                              "(train.video_datasets) without --latent-cache")
        if processor is None and resume_from is not None and resume_from.has_processor:
            processor = resume_from.processor()
        folder = self._folder
        if not cfg.losses().action and folder is not None and not is_labelled_dataset(cfg, folder):
            return action_free_training_data(cfg, folder, processor, self.collate_fn)
        samples, processor = self._labelled_samples(processor, info)
        check_processor(processor, cfg)
        check_samples(samples, cfg)
        return with_action_free_video(cfg, TrainingData(samples, processor, self.collate_fn or default_collate))

    def _labelled_samples(self, processor: Any, info: DistInfo) -> tuple[Dataset, Any]:
        folder = self._folder
        if folder is not None:
            if not info.distributed:
                samples, processor = build_training_data(self.cfg, folder, processor, self.progress, self.frame_cache)
            else:
                # Rank 0 first: the statistics (and a frame cache) are built once and shared through
                # RUN/processor.json; the other ranks then reuse them (or compute their own where
                # the run folder is not shared).
                shared = self.run_dir / ckpt.PROCESSOR_FILE
                if info.is_main:
                    samples, processor = build_training_data(self.cfg, folder, processor, self.progress,
                                                             self.frame_cache)
                    processor.save(self.run_dir)
                barrier(info)
                if not info.is_main:
                    if processor is None and shared.is_file():
                        from ..data.processor import Processor

                        processor = Processor.load(shared)
                    samples, processor = build_training_data(self.cfg, folder, processor, False, self.frame_cache)
        else:
            samples = self.data
            if processor is None:
                processor = getattr(samples, "processor", None)
        if self.latent_cache is not None:
            from ..data.latent_cache import LatentSamples, open_latent_cache
            from ..models.backbone import codec_identity

            cache = open_latent_cache(self.latent_cache, samples, codec_identity(self.cfg, self.backbone))
            samples = LatentSamples(samples, cache)
        return samples, processor

    def _free_rows(self, data: TrainingData, info: DistInfo) -> int:
        """Rows of each micro-batch from the action-free video (co-training: a fixed share of
        every batch, ``train.video_data_fraction``); both streams must fill a global batch."""
        tc = self.cfg.train
        n_free = round(tc.video_data_fraction * tc.batch_size) if data.free is not None else 0
        for what, samples, rows in (("dataset", data.samples, tc.batch_size - n_free),
                                    ("action-free video", data.free, n_free)):
            if samples is not None and len(samples) < rows * info.world_size:  # type: ignore[arg-type]
                raise ValueError(f"the {what} has {len(samples)} samples, fewer than one global batch of "  # type: ignore[arg-type]
                                 f"{rows} x {info.world_size} rank(s)")
        return n_free

    def _text_encoder_needed(self, cfg: DiT4DiTConfig, samples: Dataset, free: Dataset | None = None) -> bool:
        """A frozen text encoder stays out of memory when every instruction of the data (labelled
        and action-free) is in the text cache (``dit4dit embed-text``); otherwise it is loaded and
        fills the cache."""
        if cfg.text.kind == "tiny" or not self.text_cache_dir:
            return True
        tasks = getattr(getattr(samples, "dataset", None), "tasks", None) or getattr(samples, "tasks", None)
        if not tasks:
            return True
        if free is not None:
            tasks = [*tasks, *getattr(free, "tasks", [])]
        from ..models.backbone import uncached_prompts

        missing = uncached_prompts(cfg, self.backbone, self.text_cache_dir, tasks)
        if missing:
            _log.warning("%d of %d instructions are not in the text cache %s (e.g. %r): loading the text encoder "
                         "(run `dit4dit embed-text` to train without it)", len(missing), len(set(tasks)),
                         self.text_cache_dir, missing[0])
        return bool(missing)

    def _build_model(self, cfg: DiT4DiTConfig, data: TrainingData, resume_from: ckpt.Checkpoint | None,
                     load_text: bool, info: DistInfo) -> tuple[Any, dict[str, int]]:
        """The model (identical initialisation on every rank) with its frozen parts frozen, the
        weights of ``train.init_from`` and a codec fitted on the data; returns it and its
        parameter counts."""
        from ..models.dit4dit import DiT4DiT

        tc = cfg.train
        torch.manual_seed(tc.seed)
        # Resuming overwrites every trainable weight: the video DiT is not read from the backbone then.
        model = DiT4DiT.from_config(cfg, self.backbone, text_cache_dir=self.text_cache_dir,
                                    load_text_encoder=load_text, video_dtype=torch.float32,
                                    load_video_weights=resume_from is None)
        counts = freeze_frozen_parts(model, tc.freeze_video)
        self.init_report = None
        if tc.init_from and resume_from is None:  # start from another run's weights (--init)
            self._init_from(model, cfg, info)
        if resume_from is None:  # a codec fitted on the data (pca); resuming (or --init) loads the saved one
            every = data.samples if data.free is None else ConcatDataset([data.samples, data.free])
            self.codec_fit = fit_codec(model, every, tc.seed)
            if self.init_report is not None and self.init_report.get("codec"):
                self.init_report["codec_latent_rms"] = codec_latent_rms(model, every, tc.seed)
        return model, counts

    def _init_from(self, model: Any, cfg: DiT4DiTConfig, info: DistInfo) -> None:
        """``train.init_from``: another run's weights (``init.json`` in the run folder says which)."""
        tc = cfg.train
        self.init_report = init_from.init_weights_from(model, tc.init_from, config=cfg, parts=tc.init_parts)
        fresh = [n for n in self.init_report["missing"] + [m["name"] for m in self.init_report["mismatched"]]
                 if n.split(".", 1)[0] in VIDEO_PARTS]
        if tc.freeze_video and fresh:
            raise ckpt.CheckpointError(f"train.freeze_video trains on the video DiT of --init "
                                       f"{self.init_report['checkpoint']} as it is, but {len(fresh)} of its "
                                       f"tensors do not match this model (e.g. {fresh[0]})")
        if info.is_main:
            write_json(self.run_dir / "init.json", self.init_report, indent=2)

    def _optimisation(self, model: Any, cfg: DiT4DiTConfig, strategy: str, info: DistInfo, precision: str
                      ) -> tuple[Wrapped, torch.optim.Optimizer, WarmupCosine, EMA | None]:
        """The loss wrapped for ``strategy``, AdamW with per-part learning rates, the warm-up +
        cosine schedule and the EMA of the trainable weights (``train.ema_decay``)."""
        tc = cfg.train
        # DDP must be told when a trainable part gets no gradient: unless both the action loss and
        # the encoder's own loss run, one part (action DiT, video DiT head or image head) sits idle
        losses = cfg.losses()
        find_unused = not (losses.action and losses.generative)
        wrapped = wrap(LossModule(model, self.loss_fn), model, strategy, info, find_unused_parameters=find_unused,
                       bf16=precision == "bfloat16")
        optimizer = build_optimizer(model, tc, info.device)
        scheduler = WarmupCosine.from_config(optimizer, tc)
        ema = None
        if tc.ema_decay is not None:
            named = [(n, p) for g in optimizer.param_groups for n, p in zip(g["param_names"], g["params"])]
            ema = EMA(named, tc.ema_decay)
        return wrapped, optimizer, scheduler, ema

    @staticmethod
    def _seed_rank_streams(cfg: DiT4DiTConfig, info: DistInfo) -> torch.Generator:
        """The loss-noise generator of this rank, and per-rank torch / numpy / python streams for
        dropout & co (the model's initialisation used the shared seed)."""
        seed = cfg.train.seed
        generator = torch.Generator(device=info.device)
        generator.manual_seed(seed_for(seed, 1, info.rank))
        torch.manual_seed(seed_for(seed, 2, info.rank))
        np.random.seed(seed_for(seed, 4, info.rank) % (2**32))
        random.seed(seed_for(seed, 5, info.rank))
        return generator

    def _batch_streams(self, data: TrainingData, n_free: int, info: DistInfo) -> BatchStream | MixedBatchStream:
        tc = self.cfg.train
        pin = info.device.type == "cuda"
        stream = batch_stream(data.samples, data.collate, tc.batch_size - n_free, info, tc.seed, tc.num_workers, pin)
        if data.free is None:
            return stream
        free = batch_stream(data.free, data.collate, n_free, info, seed_for(tc.seed, 7), tc.num_workers, pin)
        return MixedBatchStream(stream, free)

    def _write_run_files(self, r: _Run) -> None:
        """``config.json`` and ``processor.json`` in the run folder (rank 0)."""
        if not r.info.is_main:
            return
        (self.run_dir / "config.json").write_text(r.cfg.to_json() + "\n")
        processor = r.data.processor
        if processor is not None and hasattr(processor, "save"):
            processor.save(self.run_dir)

    def _log_start(self, r: _Run, resuming: bool) -> None:
        """What the run is about to do: its set-up, its data, the weights and codec it starts from."""
        logger = r.logger
        logger.info("%s run %s: %s, strategy %s, world %d, device %s, precision %s, trainable params %s, steps %d..%d",
                    "resuming" if resuming else "starting", self.run_dir, r.cfg.name, r.strategy,
                    r.info.world_size, r.device, r.precision, r.counts, r.step, r.target)
        for data in (r.data.samples, r.data.free):
            for line in getattr(data, "describe", lambda: [])():
                logger.info("%s", line)
        if self.init_report is not None:
            for line in init_from.describe_init(self.init_report):
                logger.info("%s", line)
            rms = self.init_report.get("codec_latent_rms")
            if rms is not None and not 1 / 3 <= rms <= 3:
                logger.warning("the codec taken from --init gives latents of RMS %.3g on this run's frames (about 1 "
                               "on the frames it was fitted on): they look unlike its training video", rms)
        if self.codec_fit is not None:
            logger.info("fitted the %s codec on %d frames: %d channels keep %.1f%% of the patch variance",
                        self.codec_fit["kind"], self.codec_fit["frames"], self.codec_fit["channels"],
                        100 * self.codec_fit["explained_variance"])
        if r.cfg.train.eval_every > 0 and self.eval_fn is None:
            logger.info("train.eval_every=%d but no evaluation hook was given: no evaluation", r.cfg.train.eval_every)

    # ------------------------------------------------------------------ the loop
    def _loop(self, r: _Run) -> None:
        tc = r.cfg.train
        while r.step < r.target:
            t0 = time.perf_counter()
            parts, grad_norm, batch = r.runner.step(r.step + 1, r.stream.next)
            r.step += 1
            parts = self._mean_over_ranks(parts, grad_norm, r)
            loss = parts["loss"]
            r.losses.append(loss)
            dt = time.perf_counter() - t0
            r.run_time += dt
            r.window.add(parts, grad_norm, dt)
            self._follow_time_budget(r)
            if r.bar is not None:
                r.bar.update(1)
                r.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{max(r.scheduler.lrs().values()):.2e}", refresh=False)
            if r.step % tc.log_every == 0 or r.step == r.target:
                self._log_metrics(r)
            self._run_hooks(r, batch)
            stop = broadcast_flag(self._stop_requested, r.info) if r.info.distributed else self._stop_requested
            if r.step % tc.save_every == 0 or r.step == r.target or stop:
                self._checkpoint(r)
            if stop:
                r.interrupted = True
                r.logger.info("stop requested: saved step %d, exiting", r.step)
                break
        if r.last_saved != r.step and r.step > 0:
            self._checkpoint(r)

    @staticmethod
    def _mean_over_ranks(parts: dict[str, float], grad_norm: float, r: _Run) -> dict[str, float]:
        """The loss parts averaged over the ranks; a non-finite loss ends the run."""
        keys = sorted(parts)
        reduced = all_reduce_mean(torch.tensor([parts[k] for k in keys] + [grad_norm], dtype=torch.float64), r.info)
        parts = {k: float(reduced[i]) for i, k in enumerate(keys)}
        loss = parts.get("loss", float("nan"))
        if not math.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss} at step {r.step} (parts {parts}); lower the "
                                     f"learning rate or check the data")
        return parts

    @staticmethod
    def _follow_time_budget(r: _Run) -> None:
        """``train.time_budget_minutes``: the run and the cosine decay end at the planned step."""
        planned = r.budget.plan(r.step)
        if planned is not None and planned != r.target:
            r.target = planned
            r.scheduler.total_steps = r.target
            if r.bar is not None:
                r.bar.total = r.target

    @staticmethod
    def _log_metrics(r: _Run) -> None:
        r.last_metrics = r.window.metrics(r.scheduler, r.global_batch, r.stream, r.device)
        r.logger.log(r.step, r.last_metrics)

    def _run_hooks(self, r: _Run, batch: dict) -> None:
        """The image and evaluation hooks due at this step: on rank 0 (every rank under FSDP2, whose
        shards are gathered collectively)."""
        tc = r.cfg.train
        if r.strategy != "fsdp" and not r.info.is_main:
            return
        if r.image_fn is not None and tc.image_every > 0 and r.step % tc.image_every == 0:
            run_image_hook(r.image_fn, r.model, batch, r.step, r.ema, r.logger)
        if self.eval_fn is not None and tc.eval_every > 0 and r.step % tc.eval_every == 0:
            run_eval_hook(self.eval_fn, r.model, r.step, r.ema, r.logger)

    def _finish(self, r: _Run) -> dict[str, Any]:
        """The run's summary (``summary.json`` without the per-step losses), after the last checkpoint."""
        summary = {
            "run_dir": str(self.run_dir),
            "checkpoint": str(r.last_ckpt) if r.last_ckpt is not None else None,
            "start_step": r.start_step,
            "step": r.step,
            "steps_run": r.step - r.start_step,
            "losses": r.losses,
            "final_loss": r.losses[-1] if r.losses else None,
            "last_metrics": r.last_metrics,
            "samples_per_s": (r.global_batch * (r.step - r.start_step) / r.run_time) if r.run_time > 0 else None,
            "wall_time_s": time.time() - r.t_start,
            "strategy": r.strategy,
            "world_size": r.info.world_size,
            "device": _device_label(r.device),
            "precision": r.precision,
            "params": r.counts,
            "codec_fit": self.codec_fit,
            "init": self.init_report,
            "interrupted": r.interrupted,
            "time_budget": r.budget.summary(),
            "logging": r.logger.backends,
        }
        if r.info.is_main:
            write_json(self.run_dir / "summary.json", {k: v for k, v in summary.items() if k != "losses"}, indent=2)
        r.logger.info("done: step %d, final loss %s, %.1f s", r.step, summary["final_loss"], summary["wall_time_s"])
        r.logger.close()
        barrier(r.info)
        return summary

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self, r: _Run) -> None:
        r.last_ckpt = self._save(r)
        r.last_saved = r.step

    def _save(self, r: _Run) -> Path | None:
        cfg, info, ema, stream = r.cfg, r.info, r.ema, r.stream
        gather_all = r.strategy == "fsdp"  # shards must be gathered collectively
        main = info.is_main

        def full(t: torch.Tensor) -> torch.Tensor:
            if is_dtensor(t):
                t = t.full_tensor()
            if not main:
                return torch.empty(0)
            return t.detach().to("cpu", copy=True)

        model_state = ema_state = opt_state = None
        if main or gather_all:
            model_state = ckpt.trainable_state_dict(r.model, full)
            if ema is not None:
                ema_state = {n: full(s) for n, s in ema.named_shadows()}
                # Frozen weights (train.freeze_video) have no shadow: their average is themselves.
                for n, t in model_state.items():
                    ema_state.setdefault(n, t)
            opt_state = train_state.optimizer_state_tensors(r.optimizer, full)
        rng = gather_tensors(train_state.capture_rng(r.generator), info)
        path = None
        if main:
            data = self.data if isinstance(self.data, (str, os.PathLike)) else type(self.data).__name__
            trainer_state = {
                "epoch": stream.epoch,
                "batch_in_epoch": stream.batch,
                "batches_per_epoch": stream.batches_per_epoch,
                "num_samples": len(r.data.samples),  # type: ignore[arg-type]
                "batch_size": cfg.train.batch_size,
                "grad_accum": cfg.train.grad_accum,
                "world_size": info.world_size,
                "samples_seen": r.step * cfg.train.batch_size * cfg.train.grad_accum * info.world_size,
                "scheduler": r.scheduler.state_dict(),
                "ema_updates": ema.num_updates if ema is not None else 0,
                "seed": cfg.train.seed,
                "strategy": r.strategy,
                "backbone": self._backbone_record,
                "text_cache": str(Path(self.text_cache_dir).resolve()) if self.text_cache_dir else None,
                "dataset": str(data),
                "rng_ranks": info.world_size,
                "elapsed_s": round(time.time() - r.t_start, 3),
            }
            if isinstance(stream, MixedBatchStream):
                trainer_state["video_stream"] = {"epoch": stream.free.epoch, "batch_in_epoch": stream.free.batch,
                                                 "batches_per_epoch": stream.free.batches_per_epoch,
                                                 "num_samples": stream.free.num_samples}
            path = ckpt.save_checkpoint(self.run_dir, r.step, config=cfg, model_state=model_state,
                                        trainer_state=trainer_state, ema_state=ema_state, optimizer_state=opt_state,
                                        rng_state=rng, processor=r.data.processor, keep_last=cfg.train.keep_last,
                                        backbone=self._backbone_record)
        barrier(info)
        return path

    def _restore(self, found: ckpt.Checkpoint, model, optimizer, scheduler, ema, stream: BatchStream | MixedBatchStream,
                 generator: torch.Generator, info: DistInfo) -> int:
        st = found.state
        ckpt.load_weights(model, found.model_state(lazy=True), str(found.path / ckpt.MODEL_FILE))
        if found.has_optimizer:
            tensors, meta = found.optimizer_state(lazy=True)
            train_state.load_optimizer_state(optimizer, tensors, meta, str(found.path / ckpt.OPTIMIZER_FILE))
        else:
            raise ckpt.CheckpointError(f"{found.path}: no optimiser state, cannot resume training exactly "
                                       f"(load the weights with load_policy to fine-tune instead)")
        if ema is not None:
            saved = found.ema_state(lazy=True)
            if saved is None:
                raise ckpt.CheckpointError(f"{found.path}: train.ema_decay is set but the checkpoint has no "
                                           f"{ckpt.EMA_FILE}")
            from .distributed import place_like

            ema.load(saved, place_like)
            ema.num_updates = int(st.get("ema_updates", 0))
        scheduler.load_state_dict(st.get("scheduler", {"last_step": found.step}))
        # Data position (converted when the world size or batch size changed).
        epoch, batch = int(st.get("epoch", 0)), int(st.get("batch_in_epoch", 0))
        old_world, old_bs = int(st.get("world_size", 1)), int(st.get("batch_size", self.cfg.train.batch_size))
        if (old_world, old_bs) != (info.world_size, self.cfg.train.batch_size):
            consumed = batch * old_bs * old_world
            batch = consumed // (self.cfg.train.batch_size * info.world_size)
            if info.is_main:
                _log.warning(
                    "resuming with world size %d (was %d): the data position is converted, the run will not "
                    "reproduce the uninterrupted one exactly", info.world_size, old_world)
        if int(st.get("num_samples", stream.num_samples)) != stream.num_samples:
            raise ValueError(f"cannot resume: the checkpoint was trained on {st.get('num_samples')} samples, the "
                             f"dataset now has {stream.num_samples}")
        stream.set_position(epoch, min(batch, stream.batches_per_epoch))
        video = st.get("video_stream")
        if isinstance(stream, MixedBatchStream) != (video is not None):
            raise ValueError("cannot resume: the checkpoint was trained " + ("with" if video else "without")
                             + " action-free video (train.video_datasets), this run " + ("is not" if video else "is"))
        if video is not None:
            if int(video.get("num_samples", -1)) != stream.free.num_samples:
                raise ValueError(f"cannot resume: the checkpoint was trained on {video.get('num_samples')} action-free "
                                 f"samples, the action-free video now has {stream.free.num_samples}")
            stream.free.set_position(int(video["epoch"]), min(int(video["batch_in_epoch"]),
                                                              stream.free.batches_per_epoch))
        # RNG last, right before the loop.
        rng = found.rng_state()
        mine = train_state.rank_rng(rng, info.rank) if rng is not None else None
        if mine is not None:
            train_state.restore_rng(mine, generator)
        else:
            generator.manual_seed(seed_for(self.cfg.train.seed, 1, info.rank, found.step))
            torch.manual_seed(seed_for(self.cfg.train.seed, 2, info.rank, found.step))
        return found.step


def train(cfg: DiT4DiTConfig, data: str | os.PathLike | Dataset, out_dir: str | os.PathLike,
          backbone: str | None = None, resume: bool | str | os.PathLike = False, progress: bool = True, *,
          processor: Any = None, collate_fn: Callable | None = None, loss_fn: LossFn | None = None,
          image_fn: ImageFn | None = None, eval_fn: EvalFn | None = None, device: str | None = None,
          stop_at_step: int | None = None, text_cache_dir: str | None = None,
          handle_signals: bool = True, frame_cache: str | os.PathLike | bool | None = None,
          latent_cache: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train (or resume) a DiT4DiT model; returns a summary dict.

    - ``data``: a LeRobot dataset folder (samples and processor built by ``dit4dit.data``, the
      statistics computed once) or a map-style ``Dataset`` of samples (with ``processor`` to save
      alongside, optional).
    - ``out_dir``: the run folder (checkpoints, metrics.jsonl, train.log, ...). It must not hold
      checkpoints unless ``resume``.
    - ``resume``: ``True`` = continue the newest checkpoint of ``out_dir``; a path = continue from
      that run/checkpoint folder (writing to ``out_dir``). The config must match the
      checkpoint's apart from ``train.steps``, logging and checkpoint cadence.
    - ``loss_fn(model, batch, generator) -> (loss, logs)``: replaces ``model.loss`` (tests).
    - ``image_fn(model, batch, step)`` every ``train.image_every`` steps: returns an (H, W, 3)
      image, a dict of them, or None (default: :func:`image_strip`).
    - ``eval_fn(model, step)`` every ``train.eval_every`` steps: returns a dict of metrics.
      Both hooks run on rank 0 (on every rank under FSDP2), in eval mode, with EMA weights.
    - ``device``: None = the local GPU when available, else CPU.
    - ``stop_at_step``: stop (and save) at this step although the schedule runs to ``train.steps``.
    - ``frame_cache``: with a dataset folder, read frames from a pre-extracted frame cache (True =
      build or reuse the default one, a path = that cache; see ``dit4dit.data.frame_cache``).
    - ``text_cache_dir``: cached text embeddings of a frozen text encoder (``dit4dit embed-text``);
      when it holds every instruction of the dataset the text encoder is not loaded.
    - ``latent_cache``: with a dataset folder, a latent cache (``dit4dit cache-latents``): batches
      carry the precomputed clip latents and the VAE is not run.
    - ``backbone``: a local Cosmos-Predict2.5 folder; its path and content hash are recorded in
      every checkpoint. On CUDA the estimated memory is checked before the model is built
      (``train.memory``; ``$DIT4DIT_SKIP_MEMORY_CHECK=1`` skips the check).

    Summary keys: run_dir, checkpoint, start_step, step, steps_run, losses (the rank-mean total
    loss of every step run by this call), final_loss, last_metrics, samples_per_s, wall_time_s,
    strategy, world_size, device, precision, params, interrupted, logging.
    """
    return Trainer(cfg, data, out_dir, backbone, resume, progress, processor=processor, collate_fn=collate_fn,
                   loss_fn=loss_fn, image_fn=image_fn, eval_fn=eval_fn, device=device, stop_at_step=stop_at_step,
                   text_cache_dir=text_cache_dir, handle_signals=handle_signals, frame_cache=frame_cache,
                   latent_cache=latent_cache).run()
