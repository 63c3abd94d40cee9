"""One optimiser step, shared by the training loop and ``dit4dit bench train``.

- :func:`check_train_config`: ``cfg.validate()`` plus the training fields it does not cover;
- :func:`resolve_precision` / :func:`autocast`: ``train.precision`` on a device;
- :func:`freeze_frozen_parts`: ``requires_grad`` on the trainable parts only (``train.freeze_video``
  freezes the :data:`VIDEO_PARTS` as well);
- :class:`LossModule`: the model's loss as a module, so distributed wrappers' forward hooks run;
- :class:`StepRunner`: forward/backward over the micro-batches of one step, gradient clipping,
  AdamW, the learning-rate schedule and the EMA.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
from torch import nn

from ..config import ConfigError, DiT4DiTConfig
from .distributed import Wrapped
from .optim import EMA, WarmupCosine, clip_gradients

LossFn = Callable[[nn.Module, dict, torch.Generator], "tuple[torch.Tensor, dict[str, float]]"]

# Parts frozen by ``train.freeze_video``: the video DiT and the trainable text encoder that only conditions it.
VIDEO_PARTS = ("video_dit", "text_encoder")


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


def resolve_precision(precision: str, device: torch.device) -> str:
    """``train.precision`` on ``device``: ``auto`` is bfloat16 on CUDA, float32 elsewhere."""
    if precision == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    if precision not in ("float32", "bfloat16"):
        raise ConfigError(f"train.precision={precision!r} must be auto | float32 | bfloat16")
    return precision


def autocast(device: torch.device, precision: str):
    """bf16 autocast for ``precision="bfloat16"``, else nothing (fp32 master weights either way)."""
    if precision == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


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


class LossModule(nn.Module):
    """``forward(batch, generator)`` = the model's loss (or ``loss_fn(model, batch, generator)``),
    so DDP's forward hooks run."""

    def __init__(self, model: nn.Module, loss_fn: LossFn | None = None):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        if self.loss_fn is not None:
            return self.loss_fn(self.model, batch, generator)
        return self.model.loss(batch, generator)


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
                with autocast(self.device, self.precision):
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
