"""What runs around the training steps: the metrics window, the time budget, the image and
evaluation hooks (and the default image hook, :func:`image_strip`)."""

from __future__ import annotations

import collections
import contextlib
import logging
import time
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from .optim import EMA, WarmupCosine, group_of

ImageFn = Callable[[nn.Module, dict, int], Any]
EvalFn = Callable[[nn.Module, int], "Mapping[str, float] | None"]

_log = logging.getLogger("dit4dit.train")


class MetricsWindow:
    """The steps since the last ``log_every`` row: summed loss parts, step time and grad norm.

    :meth:`metrics` turns them into one ``metrics.jsonl`` row (means, learning rates,
    throughput, epoch position, peak GPU memory) and starts a new window."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.parts: dict[str, float] = {}
        self.steps = 0
        self.seconds = 0.0
        self.grad_norm = 0.0

    def add(self, parts: Mapping[str, float], grad_norm: float, seconds: float) -> None:
        self.steps += 1
        self.seconds += seconds
        self.grad_norm += grad_norm
        for k, v in parts.items():
            self.parts[k] = self.parts.get(k, 0.0) + v

    def metrics(self, scheduler: WarmupCosine, global_batch: int, stream: Any, device: torch.device
                ) -> dict[str, float]:
        n, seconds = self.steps, self.seconds
        out = {k: v / max(n, 1) for k, v in self.parts.items()}
        out["grad_norm"] = self.grad_norm / max(n, 1)
        for name, lr in scheduler.lrs().items():
            if not name.endswith(".no_decay"):
                out[f"lr/{group_of(name)}"] = lr
        out["step_time_s"] = seconds / max(n, 1)
        out["samples_per_s"] = global_batch * n / seconds if seconds > 0 else 0.0
        out["epoch"] = stream.epoch + stream.batch / max(stream.batches_per_epoch, 1)
        if device.type == "cuda":
            out["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        self.reset()
        return out


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


def _ema_weights(ema: EMA | None):
    return ema.swapped_in() if ema is not None else contextlib.nullcontext()


def run_image_hook(fn: ImageFn, model: nn.Module, batch: dict, step: int, ema: EMA | None, logger: Any) -> None:
    """``fn(model, batch, step)`` in eval mode with the EMA weights; its image(s) go to the run's
    logger. A failing hook is logged and training goes on."""
    model.eval()
    try:
        with torch.no_grad(), _ema_weights(ema):
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


def run_eval_hook(fn: EvalFn, model: nn.Module, step: int, ema: EMA | None, logger: Any) -> None:
    """``fn(model, step)`` in eval mode with the EMA weights; its metrics are logged as an
    ``eval`` row. A failing evaluation is logged and training goes on."""
    model.eval()
    try:
        with _ema_weights(ema):
            out = fn(model, step)
    except Exception:  # noqa: BLE001 - a broken evaluation must not end a long run
        _log.exception("evaluation hook failed at step %d (training goes on)", step)
        return
    finally:
        model.train()
    if out:
        logger.log(step, dict(out), kind="eval")


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
