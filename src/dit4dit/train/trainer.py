"""The training loop: `train(cfg, dataset_path | samples, out_dir, ...) -> summary`.

One call builds (or resumes) everything:

1. checks the config (and, when resuming, that the checkpoint's config matches it apart from
   ``train.steps``, logging and checkpoint cadence) and the data (schema, sample shapes) — every
   such error is raised before the first step;
2. builds the model (``DiT4DiT.from_config``; fp32 master weights, bf16 autocast on CUDA), the
   processor (normalisation statistics computed by ``dit4dit.data``), a deterministic per-rank
   loader, AdamW with per-part learning rates, the warm-up + cosine schedule and the EMA;
3. runs ``train.steps`` optimiser steps of ``train.grad_accum`` micro-batches each, logging every
   ``log_every`` steps, calling the image / evaluation hooks, saving every ``save_every`` steps
   and at the end (see ``checkpoint.py`` for the folder layout).

Exact resume: the data order is a pure function of ``(seed, epoch)``, every sample is produced
under RNG states seeded by ``(seed, epoch, index)``, and the checkpoint holds the weights, the
optimiser moments, the EMA, the schedule position, the data position and every RNG state (the
loss-noise generator, torch CPU/CUDA, numpy, python) of every rank. On CPU a run stopped at step
k and resumed reproduces the per-step losses of the uninterrupted run bit for bit.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..config import ConfigError, DiT4DiTConfig
from ..data.loader import fork_safe_iter
from . import checkpoint as ckpt
from .distributed import (DistInfo, ShardedBatchSampler, Wrapped, all_reduce_mean, barrier, broadcast_flag,
                          choose_strategy, gather_tensors, init_distributed, is_dtensor, seed_for, shutdown, wrap)
from .logging import RunLogger, progress_bar
from .optim import EMA, WarmupCosine, build_optimizer, clip_gradients, group_of

LossFn = Callable[[nn.Module, dict, torch.Generator], "tuple[torch.Tensor, dict[str, float]]"]
ImageFn = Callable[[nn.Module, dict, int], Any]
EvalFn = Callable[[nn.Module, int], "Mapping[str, float] | None"]

_log = logging.getLogger("dit4dit.train")

REQUIRED_SAMPLE_KEYS = ("video", "state", "state_mask", "actions", "action_mask", "instruction")


# --------------------------------------------------------------------------------------------
# Synthetic data (benchmarks and tests)
# --------------------------------------------------------------------------------------------


class SyntheticSamples(Dataset):
    """Random samples shaped for ``cfg`` (deterministic per index): for benchmarks and tests.

    The first ``real_state_dims`` state dimensions and ``real_action_dims`` action dimensions are
    "real" (mask True), the rest padding, as with a real embodiment; actions depend on the
    state so that there is something to learn.
    """

    INSTRUCTIONS = ("push the block", "open the drawer", "press the button", "close the window")

    def __init__(self, cfg: DiT4DiTConfig, num_samples: int = 64, seed: int = 0, real_state_dims: int = 4,
                 real_action_dims: int = 4):
        self.cfg = cfg
        self.n = int(num_samples)
        self.seed = int(seed)
        self.real_state = min(real_state_dims, cfg.action.state_dim)
        self.real_action = min(real_action_dims, cfg.action.action_dim)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        if not 0 <= i < self.n:
            raise IndexError(i)
        g = torch.Generator().manual_seed(seed_for(self.seed, i))
        c = self.cfg
        t = c.inputs.num_frames
        h, w = c.inputs.image_size
        a = c.action
        video = torch.rand((3, t, h, w), generator=g) * 2 - 1
        state = torch.zeros(a.state_dim)
        state[: self.real_state] = torch.rand(self.real_state, generator=g) * 2 - 1
        state_mask = torch.zeros(a.state_dim, dtype=torch.bool)
        state_mask[: self.real_state] = True
        steps = torch.linspace(0, 1, a.action_horizon)[:, None]
        actions = torch.zeros(a.action_horizon, a.action_dim)
        base = state[: self.real_action] if self.real_action <= self.real_state else torch.rand(self.real_action, generator=g)
        actions[:, : self.real_action] = (base[None, :] * (1 - steps) + 0.1 * torch.randn((a.action_horizon, self.real_action),
                                                                                          generator=g)).clamp(-1, 1)
        action_mask = torch.zeros(a.action_horizon, a.action_dim, dtype=torch.bool)
        action_mask[:, : self.real_action] = True
        return {
            "video": video,
            "future_mask": torch.ones(c.inputs.num_future_frames, dtype=torch.bool),
            "state": state,
            "state_mask": state_mask,
            "actions": actions,
            "action_mask": action_mask,
            "instruction": self.INSTRUCTIONS[i % len(self.INSTRUCTIONS)],
        }


def default_collate(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The data layer's ``collate`` (tensors stacked, strings listed, ints as int64 tensors)."""
    try:
        from ..data.samples import collate
    except ImportError:  # pragma: no cover - the data layer is part of the package
        collate = None
    if collate is not None:
        return collate(items)
    out: dict[str, Any] = {}
    for k, v in items[0].items():
        vals = [it[k] for it in items]
        if isinstance(v, torch.Tensor):
            out[k] = torch.stack(vals)
        elif isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            out[k] = torch.tensor([int(x) for x in vals], dtype=torch.long)
        else:
            out[k] = list(vals)
    return out


# --------------------------------------------------------------------------------------------
# Data plumbing: keyed samples (exact resume with any number of workers)
# --------------------------------------------------------------------------------------------


class KeyedSamples(Dataset):
    """``dataset[(epoch, i)] -> (i, samples[i])``, produced under RNG states seeded by
    ``(seed, epoch, i)`` so any randomness of the samples (augmentation) is reproducible whatever
    the worker that produced it. In the main process the caller's RNG states are restored."""

    def __init__(self, samples: Dataset, seed: int):
        self.samples = samples
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.samples)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, Any]:
        epoch, i = key
        s = seed_for(self.seed, 3, epoch, i)
        in_worker = torch.utils.data.get_worker_info() is not None
        if in_worker:
            self._seed_all(s)
            return i, self.samples[i]
        torch_state = torch.get_rng_state()
        np_state = np.random.get_state()
        py_state = random.getstate()
        try:
            self._seed_all(s)
            return i, self.samples[i]
        finally:
            torch.set_rng_state(torch_state)
            np.random.set_state(np_state)
            random.setstate(py_state)

    @staticmethod
    def _seed_all(s: int) -> None:
        torch.default_generator.manual_seed(s)  # CPU only: never touches the CUDA generators
        np.random.seed(s % (2**32))
        random.seed(s)


class KeyedCollate:
    """Collate ``(index, sample)`` pairs with ``inner`` and add ``sample_index`` (int64)."""

    def __init__(self, inner: Callable[[list], dict]):
        self.inner = inner

    def __call__(self, items: list[tuple[int, Any]]) -> dict[str, Any]:
        batch = self.inner([s for _, s in items])
        batch["sample_index"] = torch.tensor([i for i, _ in items], dtype=torch.long)
        return batch


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)  # workers decode; one intra-op thread each avoids oversubscription


class BatchStream:
    """Endless per-rank micro-batches across epochs with a saveable position."""

    def __init__(self, samples: Dataset, collate: Callable, batch_size: int, info: DistInfo, seed: int,
                 num_workers: int, pin_memory: bool = False):
        self.sampler = ShardedBatchSampler(len(samples), batch_size, info.rank, info.world_size, seed)  # type: ignore[arg-type]
        kwargs: dict[str, Any] = {}
        if num_workers > 0:
            kwargs.update(persistent_workers=True, prefetch_factor=2, worker_init_fn=_worker_init)
        self.loader = DataLoader(KeyedSamples(samples, seed), batch_sampler=self.sampler, num_workers=num_workers,
                                 collate_fn=KeyedCollate(collate), pin_memory=pin_memory,
                                 generator=torch.Generator().manual_seed(seed), **kwargs)
        self.epoch = 0
        self.batch = 0  # micro-batches of the current epoch already delivered
        self._it = None

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    def set_position(self, epoch: int, batch: int) -> None:
        if batch >= self.batches_per_epoch:
            epoch, batch = epoch + 1, 0
        self.epoch, self.batch = int(epoch), int(batch)
        self._it = None

    def next(self) -> dict[str, Any]:
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
            self._it = None
        if self._it is None:
            self.sampler.set_position(self.epoch, self.batch)
            self._it = fork_safe_iter(self.loader)
        batch = next(self._it)
        self.batch += 1
        if self.batch >= self.batches_per_epoch:
            # Drain the iterator so a persistent-worker loader is ready for the next epoch.
            for _ in self._it:
                pass
            self._it = None
        return batch

    def close(self) -> None:
        it = getattr(self.loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.loader._iterator = None
        self._it = None


def concat_batches(labelled: dict[str, Any], free: dict[str, Any]) -> dict[str, Any]:
    """One batch of ``labelled`` rows followed by ``free`` (action-free video) rows, with
    ``has_actions`` telling them apart."""
    out: dict[str, Any] = {}
    for k, v in labelled.items():
        w = free[k]
        out[k] = torch.cat([v, w]) if isinstance(v, torch.Tensor) else list(v) + list(w)
    n, m = len(labelled["instruction"]), len(free["instruction"])
    out["has_actions"] = torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(m, dtype=torch.bool)])
    return out


class MixedBatchStream:
    """Co-training batches: a labelled stream's micro-batch followed by an action-free one's
    (``train.video_data_fraction`` of the rows). Epochs, the saved position and the resume check
    follow the labelled stream; the action-free stream's position is saved beside it."""

    def __init__(self, labelled: BatchStream, free: BatchStream):
        self.labelled = labelled
        self.free = free

    @property
    def loader(self) -> DataLoader:
        return self.labelled.loader

    @property
    def epoch(self) -> int:
        return self.labelled.epoch

    @property
    def batch(self) -> int:
        return self.labelled.batch

    @property
    def batches_per_epoch(self) -> int:
        return self.labelled.batches_per_epoch

    def set_position(self, epoch: int, batch: int) -> None:
        self.labelled.set_position(epoch, batch)

    def next(self) -> dict[str, Any]:
        return concat_batches(self.labelled.next(), self.free.next())

    def close(self) -> None:
        self.labelled.close()
        self.free.close()


# --------------------------------------------------------------------------------------------
# Checks before training
# --------------------------------------------------------------------------------------------


def check_train_config(cfg: DiT4DiTConfig) -> DiT4DiTConfig:
    """``cfg.validate()`` plus the training fields it does not cover (raises ``ConfigError``)."""
    cfg.validate()
    t = cfg.train
    errs = []
    b1, b2 = t.betas
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        errs.append(f"train.betas={t.betas} must be in [0, 1)")
    if t.weight_decay < 0:
        errs.append(f"train.weight_decay={t.weight_decay} must be >= 0")
    if not math.isfinite(t.grad_clip) or t.grad_clip < 0:
        errs.append(f"train.grad_clip={t.grad_clip} must be >= 0 (0 = no clipping)")
    if t.image_every < 0 or t.eval_every < 0:
        errs.append("train.image_every and train.eval_every must be >= 0 (0 = off)")
    if t.num_workers < 0:
        errs.append(f"train.num_workers={t.num_workers} must be >= 0")
    for name in ("lr_video", "lr_action", "lr_other", "min_lr"):
        if not math.isfinite(getattr(t, name)):
            errs.append(f"train.{name} must be finite")
    if errs:
        raise ConfigError(f"invalid training config {cfg.name!r}:\n  - " + "\n  - ".join(errs))
    return cfg


def check_samples(samples: Dataset, cfg: DiT4DiTConfig) -> None:
    """Check the first sample against the config's input protocol (clear error on mismatch)."""
    try:
        n = len(samples)  # type: ignore[arg-type]
    except TypeError as e:
        raise ValueError("the training samples must be a map-style Dataset with a length") from e
    if n < 1:
        raise ValueError("the training dataset is empty")
    s = samples[0]
    if not isinstance(s, Mapping):
        raise ValueError(f"a training sample must be a dict, got {type(s).__name__}")
    missing = [k for k in REQUIRED_SAMPLE_KEYS if k not in s]
    if missing:
        raise ValueError(f"training samples lack {missing} (they hold {sorted(s)})")
    i, a = cfg.inputs, cfg.action
    want = {
        "video": (3, i.num_frames, *i.image_size),
        "state": (a.state_dim,),
        "state_mask": (a.state_dim,),
        "actions": (a.action_horizon, a.action_dim),
        "action_mask": (a.action_horizon, a.action_dim),
    }
    errs = []
    for k, shape in want.items():
        have = tuple(getattr(s[k], "shape", ()))
        if have != tuple(shape):
            errs.append(f"{k}: sample shape {have}, config {cfg.name!r} expects {tuple(shape)}")
    if "future_mask" in s and tuple(s["future_mask"].shape) != (i.num_future_frames,):
        errs.append(f"future_mask: sample shape {tuple(s['future_mask'].shape)}, expected ({i.num_future_frames},)")
    if not isinstance(s["instruction"], str):
        errs.append(f"instruction: expected a string, got {type(s['instruction']).__name__}")
    if errs:
        raise ValueError("the training samples do not fit the config (inputs.*, action.*):\n  - " + "\n  - ".join(errs))


def check_processor(processor: Any, cfg: DiT4DiTConfig) -> None:
    if processor is None:
        return
    errs = []
    if getattr(processor, "inputs", cfg.inputs) != cfg.inputs:
        errs.append(f"processor inputs {processor.inputs} differ from the config's {cfg.inputs}")
    for attr, want in (("action_dim", cfg.action.action_dim), ("state_dim", cfg.action.state_dim),
                       ("action_horizon", cfg.action.action_horizon)):
        have = getattr(processor, attr, want)
        if have is not None and have != want:
            errs.append(f"processor {attr}={have}, config expects {want}")
    schema = getattr(getattr(processor, "schema", None), "name", None)
    from ..data.schema import schema_name

    if schema is not None and schema != schema_name(cfg.schema):
        errs.append(f"processor schema {schema!r}, config schema {cfg.schema!r}")
    if errs:
        raise ValueError("the processor does not fit the config:\n  - " + "\n  - ".join(errs))


def build_training_data(cfg: DiT4DiTConfig, dataset_path: str | os.PathLike, processor: Any = None,
                        progress: bool = True, frame_cache: str | os.PathLike | bool | None = None
                        ) -> tuple[Dataset, Any]:
    """``(TrainingSamples, Processor)`` for a LeRobot dataset folder (statistics computed unless a
    processor is given, e.g. the one saved in the checkpoint being resumed). ``frame_cache``: see
    ``TrainingSamples`` (None = decode the videos, True = build or reuse the default cache, a
    path = that cache). ``train.episodes_per_task``: the samples (and the statistics) come from
    the first N episodes of each task only, ``train.task_episodes`` per task
    (:func:`~dit4dit.data.samples.episodes_per_task`);
    ``train.task_repeats`` then repeats some tasks' episodes (:func:`~dit4dit.data.samples.repeat_tasks`)."""
    from ..data.lerobot import LeRobotDataset
    from ..data.normalize import compute_dataset_stats
    from ..data.processor import Processor
    from ..data.samples import TrainingSamples, episodes_per_task, repeat_tasks
    from ..data.schema import SchemaError, resolve_schema

    path = Path(dataset_path).expanduser()
    ds = LeRobotDataset(path)
    try:
        episodes = None
        if cfg.train.episodes_per_task is not None or cfg.train.task_episodes:
            episodes = episodes_per_task(ds, cfg.train.episodes_per_task, cfg.train.task_episodes)
        if processor is None:
            schema = resolve_schema(cfg.schema, ds)
            stats = None if episodes is None else compute_dataset_stats(ds, schema, keys=(), episodes=episodes,
                                                                       progress=progress)
            processor = Processor.for_dataset(ds, schema, cfg.inputs, stats=stats, mode=cfg.normalization,
                                              action_dim=cfg.action.action_dim, state_dim=cfg.action.state_dim,
                                              action_horizon=cfg.action.action_horizon, progress=progress)
        kwargs = {"frame_cache": frame_cache} if frame_cache not in (None, False) else {}
        samples = TrainingSamples(ds, processor=processor, episodes=repeat_tasks(ds, episodes, cfg.train.task_repeats),
                                  **kwargs)
    except SchemaError as e:
        raise SchemaError(f"dataset {path} does not fit schema {cfg.schema!r} of config {cfg.name!r}: {e}\n"
                          f"To train on it anyway: --set schema=auto (state, action and cameras read from its "
                          f"meta/info.json) or --set schema=PATH.json (a schema file; docs/adding-a-robot.md)") from e
    return samples, processor


# --------------------------------------------------------------------------------------------
# One optimiser step (shared by the trainer and the benchmark)
# --------------------------------------------------------------------------------------------


class _LossModule(nn.Module):
    """``forward(batch, generator)`` = the model's loss, so DDP's forward hooks run."""

    def __init__(self, model: nn.Module, loss_fn: LossFn | None = None):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        if self.loss_fn is not None:
            return self.loss_fn(self.model, batch, generator)
        return self.model.loss(batch, generator)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    if precision not in ("float32", "bfloat16"):
        raise ConfigError(f"train.precision={precision!r} must be auto | float32 | bfloat16")
    return precision


def _autocast(device: torch.device, precision: str):
    if precision == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# Parts frozen by ``train.freeze_video``: the video DiT and the trainable text encoder that only conditions it.
VIDEO_PARTS = ("video_dit", "text_encoder")


def freeze_frozen_parts(model: nn.Module, freeze_video: bool = False) -> dict[str, int]:
    """``requires_grad`` on for the trainable parts only; returns parameter counts per part.

    ``freeze_video`` (``train.freeze_video``, the decoupled baseline's second stage): the
    :data:`VIDEO_PARTS` are frozen as well, so they get no gradient and no optimiser state; they
    stay in ``trainable_modules()``, so checkpoints still hold their weights."""
    trainable = {k: m for k, m in model.trainable_modules().items() if not (freeze_video and k in VIDEO_PARTS)}
    ids = {id(p) for m in trainable.values() for p in m.parameters()}
    frozen = 0
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
        if id(p) not in ids:
            frozen += p.numel()
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in trainable.items()}
    counts["frozen"] = frozen
    return counts


class StepRunner:
    """Forward/backward over the micro-batches of one step, clipping, AdamW, schedule, EMA."""

    def __init__(self, wrapped: Wrapped, optimizer: torch.optim.Optimizer, scheduler: WarmupCosine,
                 ema: EMA | None, generator: torch.Generator, device: torch.device, precision: str,
                 grad_clip: float, grad_accum: int):
        self.wrapped = wrapped
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.ema = ema
        self.generator = generator
        self.device = device
        self.precision = precision
        self.grad_clip = grad_clip
        self.grad_accum = grad_accum
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    def step(self, step: int, next_batch: Callable[[], dict]) -> tuple[dict[str, float], float, dict]:
        """Run update number ``step`` (1-based). Returns (mean loss parts, grad norm, last batch)."""
        self.scheduler.set_step(step)
        sums: dict[str, float] = {}
        batch: dict = {}
        for m in range(self.grad_accum):
            batch = next_batch()
            with self.wrapped.sync(m == self.grad_accum - 1):
                with _autocast(self.device, self.precision):
                    loss, logs = self.wrapped(batch, self.generator)
                (loss / self.grad_accum).backward()
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        grad_norm = clip_gradients(self.params, self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        return {k: v / self.grad_accum for k, v in sums.items()}, grad_norm, batch


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


def _device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


CODEC_FIT_SAMPLES = 256  # training samples whose clips fit a data-fitted codec (pca)


def fit_codec(model, samples: Dataset, seed: int, max_samples: int = CODEC_FIT_SAMPLES) -> dict[str, Any] | None:
    """Fit the model's codec when it learns from the data and is not fitted yet (e.g. loaded by
    ``train.init_from``): on the clips of up to ``max_samples`` samples drawn with ``seed``, the
    same on every rank. Returns what was fitted, or None."""
    codec = getattr(model, "codec", None)
    if codec is None or not codec.learns_from_data or codec.fitted:
        return None
    n = len(samples)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(seed_for(seed, 6, 0))
    idx = torch.randperm(n, generator=g)[:max_samples].sort().values.tolist()
    frames = torch.stack([samples[i]["video"] for i in idx]).float()
    return model.fit_codec(frames)


@torch.no_grad()
def codec_latent_rms(model, samples: Dataset, seed: int, max_samples: int = 32) -> float | None:
    """RMS of the normalised latents of up to ``max_samples`` training clips (about 1 on the data a
    codec was fitted on); None for a codec that learns nothing from the data."""
    codec = getattr(model, "codec", None)
    if codec is None or not codec.learns_from_data or not codec.fitted:
        return None
    g = torch.Generator().manual_seed(seed_for(seed, 6, 1))
    idx = torch.randperm(len(samples), generator=g)[:max_samples].tolist()  # type: ignore[arg-type]
    frames = torch.stack([samples[i]["video"] for i in idx]).float()
    return float(codec.encode(frames.to(codec.mean.device)).float().pow(2).mean().sqrt())


class TimeBudget:
    """``train.time_budget_minutes``: how many steps fit in the time left.

    From ``MIN_STEPS`` timed steps on (and at least 2% of the budget), :meth:`plan` projects the
    last step that ends within the budget at the recent pace (the steps of the last tenth of the
    budget, checkpoints and logging included, so the plan follows a machine whose speed changes)
    and returns it, capped at the configured target; None while unknown or without a budget. The
    trainer ends the learning-rate schedule and the run at the plan."""

    MIN_STEPS = 20
    WINDOW = 0.1  # fraction of the budget over which the pace is measured

    def __init__(self, minutes: float | None, start_step: int, target: int) -> None:
        self.seconds = None if minutes is None else float(minutes) * 60.0
        self.start_step = int(start_step)
        self.target = int(target)
        self.t0 = time.perf_counter()
        self.marks: collections.deque[tuple[int, float]] = collections.deque([(self.start_step, self.t0)])
        self.planned: int | None = None

    def plan(self, step: int) -> int | None:
        if self.seconds is None:
            return None
        now = time.perf_counter()
        self.marks.append((step, now))
        while len(self.marks) > self.MIN_STEPS + 1 and now - self.marks[1][1] >= self.WINDOW * self.seconds:
            self.marks.popleft()  # keep one mark at least a window old
        elapsed = now - self.t0
        if step - self.start_step < self.MIN_STEPS or elapsed < 0.02 * self.seconds:
            return None
        s0, t0 = self.marks[0]
        pace = (now - t0) / max(1, step - s0)  # seconds a step, recently
        fit = step + int(max(0.0, self.seconds - elapsed) / pace)
        self.planned = max(step, min(self.target, fit))
        return self.planned

    def summary(self) -> dict[str, Any] | None:
        if self.seconds is None:
            return None
        return {"seconds": self.seconds, "configured_steps": self.target, "planned_steps": self.planned,
                "elapsed_s": time.perf_counter() - self.t0}


def resolve_auto_cameras(cfg: DiT4DiTConfig, data: Any) -> DiT4DiTConfig:
    """With ``schema=auto``: when none of ``inputs.cameras`` is a camera of the dataset, the
    dataset's camera (one with ``camera_layout=single``, all of them side by side otherwise)."""
    from dataclasses import replace

    from ..data.schema import AUTO, SchemaError, infer_schema

    if cfg.schema != AUTO or not isinstance(data, (str, os.PathLike)):
        return cfg
    if not (Path(data).expanduser() / "meta" / "info.json").is_file():
        raise SchemaError(f"schema=auto reads the state, action and cameras from a LeRobot dataset's "
                          f"meta/info.json; {data} has none (name a schema: --set schema=NAME or PATH.json)")
    from ..data.lerobot import LeRobotDataset

    schema = infer_schema(LeRobotDataset(data, check_videos=False), name=AUTO)
    cams = schema.cameras
    if any(c.matches(n) for n in cfg.inputs.cameras for c in cams):
        return cfg
    if cfg.inputs.camera_layout == "single" and len(cams) != 1:
        raise SchemaError(f"schema=auto: {data} has cameras {[c.key for c in cams]}, none of inputs.cameras "
                          f"{list(cfg.inputs.cameras)}; choose one with --set inputs.cameras=KEY")
    _log.info("schema=auto: the dataset's camera(s) %s replace inputs.cameras %s", [c.key for c in cams],
              list(cfg.inputs.cameras))
    return replace(cfg, inputs=replace(cfg.inputs, cameras=tuple(c.key for c in cams)))


def _is_labelled_dataset(cfg: DiT4DiTConfig, path: str | os.PathLike) -> bool:
    """Whether ``path`` is a LeRobot dataset with the state, action and cameras of ``cfg.schema``."""
    from ..data.lerobot import DatasetError, LeRobotDataset
    from ..data.schema import SchemaError, resolve_schema

    if not (Path(path).expanduser() / "meta" / "info.json").is_file():
        return False
    try:
        ds = LeRobotDataset(path, check_videos=False)
        resolve_schema(cfg.schema, ds).check(ds, cfg.action.state_dim, cfg.action.action_dim)
    except (SchemaError, DatasetError):
        return False
    return True


def _training_rate(cfg: DiT4DiTConfig, path: str | os.PathLike) -> float:
    """Frame rate action-free video is presented at in a video-only run: the fps of a LeRobot
    ``--dataset``, else ``inputs.fps``."""
    info = Path(path).expanduser() / "meta" / "info.json"
    if info.is_file():
        try:
            return float(json.loads(info.read_text())["fps"])
        except (KeyError, TypeError, ValueError, json.JSONDecodeError):
            pass
    return float(cfg.inputs.fps)


def _video_only_processor(cfg: DiT4DiTConfig, path: str | os.PathLike) -> Any:
    from ..data.action_free import placeholder_processor
    from ..data.lerobot import LeRobotDataset
    from ..data.schema import AUTO, resolve_schema

    if cfg.schema == AUTO and (Path(path).expanduser() / "meta" / "info.json").is_file():
        schema = resolve_schema(AUTO, LeRobotDataset(path, check_videos=False))
    else:
        schema = resolve_schema(cfg.schema, None)
    _log.info("video-only run on action-free video (%s): no state or action statistics; the processor's "
              "normaliser is the identity", path)
    return placeholder_processor(schema, cfg.inputs, action_dim=cfg.action.action_dim,
                                 state_dim=cfg.action.state_dim, action_horizon=cfg.action.action_horizon)


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

    # ------------------------------------------------------------------ setup helpers
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

    def _build_data(self, resume_from: ckpt.Checkpoint | None, info: DistInfo
                    ) -> tuple[Dataset, Any, Callable, Dataset | None]:
        """(samples, processor, collate, action-free samples or None). In mode=video_only (and
        image_only, the static encoder's pretraining) a ``data`` folder that is not a labelled
        dataset of the schema is read as action-free video."""
        processor = self.processor
        tc = self.cfg.train
        if tc.video_datasets and self.latent_cache is not None:
            raise ConfigError("a latent cache holds the labelled clips only: train with action-free video "
                              "(train.video_datasets) without --latent-cache")
        if processor is None and resume_from is not None and resume_from.has_processor:
            processor = resume_from.processor()
        if (self.cfg.mode in ("video_only", "image_only") and isinstance(self.data, (str, os.PathLike))
                and not _is_labelled_dataset(self.cfg, self.data)):
            from ..data.action_free import action_free_samples

            processor = processor or _video_only_processor(self.cfg, self.data)
            samples = action_free_samples([self.data, *tc.video_datasets], processor, self.cfg.action.action_horizon,
                                          _training_rate(self.cfg, self.data), default_instruction=tc.default_instruction,
                                          skip_bad=tc.skip_bad_videos)
            check_processor(processor, self.cfg)
            check_samples(samples, self.cfg)
            return samples, processor, self.collate_fn or default_collate, None
        samples, processor, collate = self._build_labelled_data(processor, info)
        if not tc.video_datasets:
            return samples, processor, collate, None
        from ..data.action_free import action_free_samples

        # Normalisation statistics come from the labelled data alone; the action-free video is
        # presented at the labelled dataset's frame rate.
        rate = getattr(getattr(samples, "dataset", None), "fps", None) or self.cfg.inputs.fps
        free = action_free_samples(tc.video_datasets, processor, self.cfg.action.action_horizon, float(rate),
                                   default_instruction=tc.default_instruction, skip_bad=tc.skip_bad_videos)
        check_samples(free, self.cfg)
        if self.cfg.mode in ("video_only", "image_only"):  # every row feeds the (video or image) loss: one stream
            from torch.utils.data import ConcatDataset

            return ConcatDataset([samples, free]), processor, collate, None
        return samples, processor, collate, free

    def _build_labelled_data(self, processor: Any, info: DistInfo) -> tuple[Dataset, Any, Callable]:
        if isinstance(self.data, (str, os.PathLike)):
            if not info.distributed:
                samples, processor = build_training_data(self.cfg, self.data, processor, self.progress,
                                                         self.frame_cache)
            else:
                # Rank 0 first: the statistics (and a frame cache) are built once and shared through
                # RUN/processor.json; the other ranks then reuse them (or compute their own where
                # the run folder is not shared).
                shared = self.run_dir / ckpt.PROCESSOR_FILE
                if info.is_main:
                    samples, processor = build_training_data(self.cfg, self.data, processor, self.progress,
                                                             self.frame_cache)
                    processor.save(self.run_dir)
                barrier(info)
                if not info.is_main:
                    if processor is None and shared.is_file():
                        from ..data.processor import Processor

                        processor = Processor.load(shared)
                    samples, processor = build_training_data(self.cfg, self.data, processor, False,
                                                             self.frame_cache)
        else:
            samples = self.data
            if processor is None:
                processor = getattr(samples, "processor", None)
        if self.latent_cache is not None:
            from ..data.latent_cache import LatentSamples, open_latent_cache
            from ..models.backbone import codec_identity

            cache = open_latent_cache(self.latent_cache, samples, codec_identity(self.cfg, self.backbone))
            samples = LatentSamples(samples, cache)
        check_processor(processor, self.cfg)
        check_samples(samples, self.cfg)
        return samples, processor, self.collate_fn or default_collate

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

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        self.request_stop()

    def request_stop(self) -> None:
        """Finish the current step, save a checkpoint and return (thread-safe; e.g. a time limit)."""
        self._stop_requested = True

    # ------------------------------------------------------------------ main entry
    def run(self) -> dict[str, Any]:
        self.cfg = resolve_auto_cameras(self.cfg, self.data)
        cfg = check_train_config(self.cfg)
        tc = cfg.train
        info = init_distributed(self.device_request)
        self.info = info
        old_handlers = {}
        try:
            if self.handle_signals and threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGTERM,):
                    old_handlers[sig] = signal.signal(sig, self._on_signal)
            summary = self._run(cfg, tc, info)
        finally:
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
        shutdown(info)  # on success only: a rank that failed must not wait for the others
        return summary

    def _run(self, cfg: DiT4DiTConfig, tc, info: DistInfo) -> dict[str, Any]:
        from ..models.dit4dit import DiT4DiT

        t_start = time.time()
        device = info.device
        precision = resolve_precision(tc.precision, device)
        if self.backbone is not None:  # validated (and hashed: a few MiB read) before anything else
            from ..models.backbone import Backbone

            self._backbone_record = Backbone.open(self.backbone).record()
        resume_from = self._resume_checkpoint()
        samples, processor, collate, free = self._build_data(resume_from, info)
        self.processor = processor  # hooks (e.g. closed-loop evaluation) read it from here
        # Co-training: a fixed share of every batch comes from the action-free video.
        n_free = round(tc.video_data_fraction * tc.batch_size) if free is not None else 0
        for what, data, rows in (("dataset", samples, tc.batch_size - n_free), ("action-free video", free, n_free)):
            if data is not None and len(data) < rows * info.world_size:  # type: ignore[arg-type]
                raise ValueError(f"the {what} has {len(data)} samples, fewer than one global batch of "  # type: ignore[arg-type]
                                 f"{rows} x {info.world_size} rank(s)")

        load_text = self._text_encoder_needed(cfg, samples, free)
        from .memory import check_training_memory

        # On a GPU: refuse before loading anything when the estimated memory does not fit.
        check_training_memory(cfg, device, backbone=self.backbone, text_encoder_loaded=load_text,
                              latents_cached=self.latent_cache is not None, precision=precision,
                              world_size=info.world_size, strategy="auto")

        # ---- model (identical initialisation on every rank) ----
        torch.manual_seed(tc.seed)
        # Resuming overwrites every trainable weight: the video DiT is not read from the backbone then.
        model = DiT4DiT.from_config(cfg, self.backbone, text_cache_dir=self.text_cache_dir,
                                    load_text_encoder=load_text, video_dtype=torch.float32,
                                    load_video_weights=resume_from is None)
        counts = freeze_frozen_parts(model, tc.freeze_video)
        self.init_report = None
        if tc.init_from and resume_from is None:  # start from another run's weights (--init)
            self.init_report = ckpt.init_weights_from(model, tc.init_from, config=cfg, parts=tc.init_parts)
            fresh = [n for n in self.init_report["missing"] + [m["name"] for m in self.init_report["mismatched"]]
                     if n.split(".", 1)[0] in VIDEO_PARTS]
            if tc.freeze_video and fresh:
                raise ckpt.CheckpointError(f"train.freeze_video trains on the video DiT of --init "
                                           f"{self.init_report['checkpoint']} as it is, but {len(fresh)} of its "
                                           f"tensors do not match this model (e.g. {fresh[0]})")
            if info.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                with open(self.run_dir / "init.json", "w", encoding="utf-8") as f:
                    json.dump(self.init_report, f, indent=2)
        if resume_from is None:  # a codec fitted on the data (pca); resuming (or --init) loads the saved one
            from torch.utils.data import ConcatDataset

            every = samples if free is None else ConcatDataset([samples, free])
            self.codec_fit = fit_codec(model, every, tc.seed)
            if self.init_report is not None and self.init_report.get("codec"):
                self.init_report["codec_latent_rms"] = codec_latent_rms(model, every, tc.seed)
        model.to(device)
        model.train()
        n_trainable = sum(v for k, v in counts.items() if k != "frozen")
        strategy = choose_strategy(tc.distributed, info.world_size, n_trainable)
        find_unused = cfg.mode != "joint" or cfg.lambda_video <= 0
        loss_module = _LossModule(model, self.loss_fn)
        wrapped = wrap(loss_module, model, strategy, info, find_unused_parameters=find_unused,
                       bf16=precision == "bfloat16")
        optimizer = build_optimizer(model, tc, device)
        scheduler = WarmupCosine.from_config(optimizer, tc)
        ema = None
        if tc.ema_decay is not None:
            named = [(n, p) for g in optimizer.param_groups for n, p in zip(g["param_names"], g["params"])]
            ema = EMA(named, tc.ema_decay)
        generator = torch.Generator(device=device)
        generator.manual_seed(seed_for(tc.seed, 1, info.rank))
        # Per-rank streams for dropout & co (the model init above used the shared seed).
        torch.manual_seed(seed_for(tc.seed, 2, info.rank))
        np.random.seed(seed_for(tc.seed, 4, info.rank) % (2**32))
        random.seed(seed_for(tc.seed, 5, info.rank))

        stream = BatchStream(samples, collate, tc.batch_size - n_free, info, tc.seed, tc.num_workers,
                             pin_memory=device.type == "cuda")
        if free is not None:
            stream = MixedBatchStream(stream, BatchStream(free, collate, n_free, info, seed_for(tc.seed, 7),
                                                          tc.num_workers, pin_memory=device.type == "cuda"))
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
        if info.is_main:
            (self.run_dir / "config.json").write_text(cfg.to_json() + "\n")
            if processor is not None and hasattr(processor, "save"):
                processor.save(self.run_dir)
        start_step = step
        logger.info("%s run %s: %s, strategy %s, world %d, device %s, precision %s, trainable params %s, steps %d..%d",
                    "resuming" if resume_from is not None else "starting", self.run_dir, cfg.name, strategy,
                    info.world_size, device, precision, counts, step, target)
        for data in (samples, free):
            for line in getattr(data, "describe", lambda: [])():
                logger.info("%s", line)
        if self.init_report is not None:
            for line in ckpt.describe_init(self.init_report):
                logger.info("%s", line)
            rms = self.init_report.get("codec_latent_rms")
            if rms is not None and not 1 / 3 <= rms <= 3:
                logger.warning("the codec taken from --init gives latents of RMS %.3g on this run's frames (about 1 "
                               "on the frames it was fitted on): they look unlike its training video", rms)
        if self.codec_fit is not None:
            logger.info("fitted the %s codec on %d frames: %d channels keep %.1f%% of the patch variance",
                        self.codec_fit["kind"], self.codec_fit["frames"], self.codec_fit["channels"],
                        100 * self.codec_fit["explained_variance"])
        image_fn = self.image_fn
        if tc.image_every > 0 and image_fn is None:
            image_fn = image_strip
        if tc.eval_every > 0 and self.eval_fn is None:
            logger.info("train.eval_every=%d but no evaluation hook was given: no evaluation", tc.eval_every)

        bar = progress_bar(tc.steps, step, self.progress and info.is_main)
        global_batch = tc.batch_size * tc.grad_accum * info.world_size
        losses: list[float] = []
        window: dict[str, float] = {}
        window_steps, window_time, window_norm = 0, 0.0, 0.0
        last_saved = step if resume_from is not None else -1
        last_ckpt = resume_from.path if resume_from is not None else None
        last_metrics: dict[str, float] = {}
        interrupted = False
        run_time = 0.0
        budget = TimeBudget(tc.time_budget_minutes, step, target)
        try:
            while step < target:
                t0 = time.perf_counter()
                parts, grad_norm, batch = runner.step(step + 1, stream.next)
                step += 1
                keys = sorted(parts)
                reduced = all_reduce_mean(torch.tensor([parts[k] for k in keys] + [grad_norm],
                                                       dtype=torch.float64), info)
                parts = {k: float(reduced[i]) for i, k in enumerate(keys)}
                loss = parts.get("loss", float("nan"))
                if not math.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss {loss} at step {step} (parts {parts}); lower the "
                                             f"learning rate or check the data")
                losses.append(loss)
                dt = time.perf_counter() - t0
                run_time += dt
                window_steps += 1
                window_time += dt
                window_norm += grad_norm
                for k, v in parts.items():
                    window[k] = window.get(k, 0.0) + v
                planned = budget.plan(step)
                if planned is not None and planned != target:
                    target = planned
                    scheduler.total_steps = target  # the cosine decay ends at the planned step
                    if bar is not None:
                        bar.total = target
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{max(scheduler.lrs().values()):.2e}", refresh=False)
                if step % tc.log_every == 0 or step == target:
                    last_metrics = self._metrics(window, window_steps, window_time, window_norm, scheduler,
                                                 global_batch, stream, device)
                    logger.log(step, last_metrics)
                    window, window_steps, window_time, window_norm = {}, 0, 0.0, 0.0
                if image_fn is not None and tc.image_every > 0 and step % tc.image_every == 0:
                    self._run_image_hook(image_fn, model, batch, step, ema, strategy, info, logger)
                if self.eval_fn is not None and tc.eval_every > 0 and step % tc.eval_every == 0:
                    self._run_eval_hook(model, step, ema, strategy, info, logger)
                stop = broadcast_flag(self._stop_requested, info) if info.distributed else self._stop_requested
                if step % tc.save_every == 0 or step == target or stop:
                    last_ckpt = self._save(step, cfg, model, optimizer, scheduler, ema, stream, generator, processor,
                                           strategy, info, samples, t_start)
                    last_saved = step
                if stop:
                    interrupted = True
                    logger.info("stop requested: saved step %d, exiting", step)
                    break
            if last_saved != step and step > 0:
                last_ckpt = self._save(step, cfg, model, optimizer, scheduler, ema, stream, generator, processor,
                                       strategy, info, samples, t_start)
        except BaseException:
            logger.close()
            raise
        finally:
            if bar is not None:
                bar.close()
            stream.close()
        summary = {
            "run_dir": str(self.run_dir),
            "checkpoint": str(last_ckpt) if last_ckpt is not None else None,
            "start_step": start_step,
            "step": step,
            "steps_run": step - start_step,
            "losses": losses,
            "final_loss": losses[-1] if losses else None,
            "last_metrics": last_metrics,
            "samples_per_s": (global_batch * (step - start_step) / run_time) if run_time > 0 else None,
            "wall_time_s": time.time() - t_start,
            "strategy": strategy,
            "world_size": info.world_size,
            "device": _device_label(device),
            "precision": precision,
            "params": counts,
            "codec_fit": self.codec_fit,
            "init": self.init_report,
            "interrupted": interrupted,
            "time_budget": budget.summary(),
            "logging": logger.backends,
        }
        if info.is_main:
            with open(self.run_dir / "summary.json", "w", encoding="utf-8") as f:
                json.dump({k: v for k, v in summary.items() if k != "losses"}, f, indent=2)
        logger.info("done: step %d, final loss %s, %.1f s", step, summary["final_loss"], summary["wall_time_s"])
        logger.close()
        barrier(info)
        return summary

    # ------------------------------------------------------------------ pieces of the loop
    @staticmethod
    def _metrics(window: dict[str, float], n: int, seconds: float, norm_sum: float, scheduler: WarmupCosine,
                 global_batch: int, stream: BatchStream, device: torch.device) -> dict[str, float]:
        out = {k: v / max(n, 1) for k, v in window.items()}
        out["grad_norm"] = norm_sum / max(n, 1)
        for name, lr in scheduler.lrs().items():
            if not name.endswith(".no_decay"):
                out[f"lr/{group_of(name)}"] = lr
        out["step_time_s"] = seconds / max(n, 1)
        out["samples_per_s"] = global_batch * n / seconds if seconds > 0 else 0.0
        out["epoch"] = stream.epoch + stream.batch / max(stream.batches_per_epoch, 1)
        if device.type == "cuda":
            out["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        return out

    def _run_image_hook(self, fn: ImageFn, model, batch, step, ema, strategy, info, logger) -> None:
        if strategy != "fsdp" and not info.is_main:
            return
        model.eval()
        try:
            with torch.no_grad(), (ema.swapped_in() if ema is not None else contextlib.nullcontext()):
                out = fn(model, batch, step)
        except Exception:  # noqa: BLE001 - a broken hook must not end a long run
            _log.exception("image hook failed at step %d (training goes on)", step)
            return
        finally:
            model.train()
        if out is None:
            return
        images = out if isinstance(out, Mapping) else {"strip": out}
        for tag, img in images.items():
            logger.log_image(step, tag, img)

    def _run_eval_hook(self, model, step, ema, strategy, info, logger) -> None:
        if strategy != "fsdp" and not info.is_main:
            return
        model.eval()
        try:
            with (ema.swapped_in() if ema is not None else contextlib.nullcontext()):
                out = self.eval_fn(model, step)  # type: ignore[misc]
        except Exception:  # noqa: BLE001 - a broken evaluation must not end a long run
            _log.exception("evaluation hook failed at step %d (training goes on)", step)
            return
        finally:
            model.train()
        if out:
            logger.log(step, dict(out), kind="eval")

    def _save(self, step, cfg, model, optimizer, scheduler, ema, stream, generator, processor, strategy, info,
              samples, t_start) -> Path | None:
        gather_all = strategy == "fsdp"  # shards must be gathered collectively
        main = info.is_main

        def full(t: torch.Tensor) -> torch.Tensor:
            if is_dtensor(t):
                t = t.full_tensor()
            if not main:
                return torch.empty(0)
            return t.detach().to("cpu", copy=True)

        model_state = ema_state = opt_state = None
        if main or gather_all:
            model_state = ckpt.trainable_state_dict(model, full)
            if ema is not None:
                ema_state = {n: full(s) for n, s in ema.named_shadows()}
                # Frozen weights (train.freeze_video) have no shadow: their average is themselves.
                for n, t in model_state.items():
                    ema_state.setdefault(n, t)
            opt_state = ckpt.optimizer_state_tensors(optimizer, full)
        rng = gather_tensors(ckpt.capture_rng(generator), info)
        path = None
        if main:
            data = self.data if isinstance(self.data, (str, os.PathLike)) else type(self.data).__name__
            trainer_state = {
                "epoch": stream.epoch,
                "batch_in_epoch": stream.batch,
                "batches_per_epoch": stream.batches_per_epoch,
                "num_samples": len(samples),
                "batch_size": cfg.train.batch_size,
                "grad_accum": cfg.train.grad_accum,
                "world_size": info.world_size,
                "samples_seen": step * cfg.train.batch_size * cfg.train.grad_accum * info.world_size,
                "scheduler": scheduler.state_dict(),
                "ema_updates": ema.num_updates if ema is not None else 0,
                "seed": cfg.train.seed,
                "strategy": strategy,
                "backbone": self._backbone_record,
                "text_cache": str(Path(self.text_cache_dir).resolve()) if self.text_cache_dir else None,
                "dataset": str(data),
                "rng_ranks": info.world_size,
                "elapsed_s": round(time.time() - t_start, 3),
            }
            if isinstance(stream, MixedBatchStream):
                trainer_state["video_stream"] = {"epoch": stream.free.epoch, "batch_in_epoch": stream.free.batch,
                                                 "batches_per_epoch": stream.free.batches_per_epoch,
                                                 "num_samples": len(stream.free.loader.dataset)}
            path = ckpt.save_checkpoint(self.run_dir, step, config=cfg, model_state=model_state,
                                        trainer_state=trainer_state, ema_state=ema_state, optimizer_state=opt_state,
                                        rng_state=rng, processor=processor, keep_last=cfg.train.keep_last,
                                        backbone=self._backbone_record)
        barrier(info)
        return path

    def _restore(self, found: ckpt.Checkpoint, model, optimizer, scheduler, ema, stream: BatchStream,
                 generator: torch.Generator, info: DistInfo) -> int:
        st = found.state
        ckpt.load_weights(model, found.model_state(lazy=True), str(found.path / ckpt.MODEL_FILE))
        if found.has_optimizer:
            tensors, meta = found.optimizer_state(lazy=True)
            ckpt.load_optimizer_state(optimizer, tensors, meta, str(found.path / ckpt.OPTIMIZER_FILE))
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
        if int(st.get("num_samples", len(stream.loader.dataset))) != len(stream.loader.dataset):  # type: ignore[arg-type]
            raise ValueError(f"cannot resume: the checkpoint was trained on {st.get('num_samples')} samples, the "
                             f"dataset now has {len(stream.loader.dataset)}")  # type: ignore[arg-type]
        stream.set_position(epoch, min(batch, stream.batches_per_epoch))
        video = st.get("video_stream")
        if isinstance(stream, MixedBatchStream) != (video is not None):
            raise ValueError("cannot resume: the checkpoint was trained " + ("with" if video else "without")
                             + " action-free video (train.video_datasets), this run " + ("is not" if video else "is"))
        if video is not None:
            if int(video.get("num_samples", -1)) != len(stream.free.loader.dataset):
                raise ValueError(f"cannot resume: the checkpoint was trained on {video.get('num_samples')} action-free "
                                 f"samples, the action-free video now has {len(stream.free.loader.dataset)}")
            stream.free.set_position(int(video["epoch"]), min(int(video["batch_in_epoch"]),
                                                              stream.free.batches_per_epoch))
        # RNG last, right before the loop.
        rng = found.rng_state()
        mine = ckpt.rank_rng(rng, info.rank) if rng is not None else None
        if mine is not None:
            ckpt.restore_rng(mine, generator)
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


# --------------------------------------------------------------------------------------------
# Default image hook
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def image_strip(model: nn.Module, batch: dict, step: int) -> np.ndarray:  # noqa: ARG001
    """Real future frames (top row) above the video DiT's predicted ones (bottom row) for the
    first sample of ``batch``: an (2H, F*W, 3) uint8 image."""
    cfg = model.cfg
    nc = cfg.inputs.num_cond_frames
    video = batch["video"][:1].to(model.device)
    pred = model.predict_video(video[:, :, :nc], list(batch["instruction"][:1]))
    real = video[:, :, nc:nc + pred.shape[2]].float()

    def to_img(x: torch.Tensor) -> torch.Tensor:
        x = x[0]  # (3, F, H, W)
        x = x.permute(2, 1, 3, 0)  # (H, F, W, 3)
        return x.reshape(x.shape[0], -1, 3)

    img = torch.cat([to_img(real), to_img(pred.float())], dim=0)
    return ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
