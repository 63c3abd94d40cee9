"""Open-loop (offline) evaluation of a checkpoint on a LeRobot dataset: no simulator, no robot.

For held-out demonstrations, or recordings from the robot the policy will drive, this measures
how well the policy reproduces what was recorded, at steps spread evenly over the chosen
episodes (the training samples' frame plan, ``dit4dit.data.samples``):

- **Action error** (checkpoints that predict actions): the chunk the policy predicts by the
  serving path (one feature pass at ``tau_f``, the Euler steps of the action DiT, a fixed seed;
  unnormalised, binary grippers snapped, as when serving) against the actions the dataset
  records (read from its columns, not through the normaliser), in robot units, over the steps of
  each chunk inside the episode: mean absolute and squared error
  per action dimension, per step of the chunk and per task, and the error of the first action
  (the one a robot executes first). ``center_baseline`` is the same error for a constant chunk at
  the normaliser's centre (the action the policy outputs for a normalised 0): a scale to read
  the policy's error against.
- **Validation losses**: the training losses (the checkpoint's mode: video, image and/or action
  flow matching) on those samples at fixed draws of flow time and noise, with the video loss on
  every sample (``video_loss_fraction`` = 1), so checkpoints that share a latent codec are
  compared on the same draws. Video losses are in the codec's latent space: compare them only
  between checkpoints whose codec is the same (a run and the runs initialised from it).

- **Traces** (``plot_episodes``): for the first episodes chosen, one figure per episode with,
  for each action dimension, the recorded actions over the episode and the chunks the policy
  predicts every ``horizon // 2`` steps drawn from where they start.

Open-loop error is not closed-loop success: it does not see the compounding of errors or the
recovery from them. It is what can be measured without the robot, and it tells a policy that
has not learnt the data from one that has.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

__all__ = ["evaluate_offline", "parse_episodes", "plot_episode_trace", "OfflineEvalError"]


class OfflineEvalError(ValueError):
    """A request the dataset or checkpoint cannot answer (the message names what and where)."""


def parse_episodes(text: str | None) -> list[int] | None:
    """``"0,3,10-19"`` -> ``[0, 3, 10, ..., 19]``; None or empty -> None (every episode)."""
    if not text:
        return None
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi if sep else lo)
        except ValueError:
            raise OfflineEvalError(f"episodes: {part!r} is not an index or a range like 10-19") from None
        if b < a:
            raise OfflineEvalError(f"episodes: the range {part!r} runs backwards")
        out.extend(range(a, b + 1))
    return sorted(set(out))


def _predicted_chunks(model: Any, processor: Any, batch: dict[str, Any], generator: torch.Generator,
                      num_steps: int | None) -> np.ndarray:
    """The chunks the serving path predicts for a batch of samples, in robot units (B, H, A)."""
    nc = model.cfg.inputs.num_cond_frames
    pred = model.predict_action(batch["video"][:, :, :nc], batch["state"], list(batch["instruction"]),
                                generator=generator, num_steps=num_steps)
    return processor.unnormalize_actions(pred)


@contextmanager
def _video_loss_on_every_sample(model: Any) -> Iterator[None]:
    """The model's loss with ``video_loss_fraction`` = 1 (training puts it on a share of each batch)."""
    cfg = model.cfg
    model.cfg = replace(cfg, video_loss_fraction=1.0)
    try:
        yield
    finally:
        model.cfg = cfg


def _select(n_items: int, samples: int) -> np.ndarray:
    """``samples`` indices spread evenly over ``range(n_items)`` (all of them when there are fewer)."""
    if samples <= 0 or samples >= n_items:
        return np.arange(n_items)
    return np.unique(np.linspace(0, n_items - 1, samples).round().astype(np.int64))


def evaluate_offline(checkpoint: str | os.PathLike, dataset: str | os.PathLike, *,
                     episodes: Sequence[int] | None = None, samples: int = 256, batch_size: int = 16, seed: int = 0,
                     num_steps: int | None = None, device: str = "cpu", backbone: str | None = None,
                     plot_episodes: int = 0, plot_dir: str | os.PathLike | None = None,
                     progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Open-loop evaluation of ``checkpoint`` on the LeRobot dataset at ``dataset`` (see the module
    docstring). ``episodes``: the episode indices to use (default: all); ``samples``: how many
    (episode, step) samples, spread evenly over them (0 = all); ``seed``: the draws of the losses
    and of the sampler's noise; ``num_steps``: the action sampler's Euler steps (default: the
    checkpoint's). ``plot_episodes``: trace figures (:func:`plot_episode_trace`) of that many of the
    chosen episodes, written to ``plot_dir`` (listed under ``"plots"``). ``progress(done, total)``
    is called with the samples done after each batch."""
    from ..data.lerobot import LeRobotDataset
    from ..data.samples import TrainingSamples, collate
    from ..policy import Policy

    if plot_episodes > 0 and plot_dir is None:
        raise OfflineEvalError("plot_episodes needs plot_dir (where the figures go)")
    t_start = time.perf_counter()
    policy = Policy.from_checkpoint(checkpoint, device=device, backbone=backbone)
    model, processor, cfg = policy.model, policy.processor, policy.model.cfg
    ds = LeRobotDataset(dataset)
    known = {int(e.index) for e in ds.episodes}
    if episodes is not None:
        missing = sorted(set(episodes) - known)
        if missing:
            raise OfflineEvalError(f"{ds.root}: no episode {missing[:10]}{' ...' if len(missing) > 10 else ''} "
                                   f"(the dataset has {len(known)} episodes, indices {min(known)}-{max(known)})")
    items = TrainingSamples(ds, processor=processor, episodes=episodes)
    if len(items) == 0:
        raise OfflineEvalError(f"{ds.root}: the chosen episodes hold no sample")
    chosen = _select(len(items), samples)
    which = cfg.losses()
    names = processor.schema.action_names
    a_dim = len(names)
    gen = torch.Generator(device=model.device)
    gen.manual_seed(int(seed))
    sample_gen = torch.Generator(device=model.device)
    sample_gen.manual_seed(int(seed) + 1)

    loss_sums: dict[str, float] = {}
    n_loss = 0
    abs_err: list[np.ndarray] = []  # (B, H, A) robot units, NaN where the step is padding
    sq_err: list[np.ndarray] = []
    base_abs: list[np.ndarray] = []
    tasks: list[str] = []
    center = processor.unnormalize_actions(np.zeros((1, 1, processor.action_dim), np.float32))[0, 0]
    horizon = cfg.action.action_horizon
    recorded: dict[int, np.ndarray] = {}

    def recorded_chunk(ep: int, t: int) -> np.ndarray:
        """Actions t .. t + horizon - 1 of episode ``ep`` in robot units, NaN past its end."""
        if ep not in recorded:
            recorded[ep] = processor.schema.extract(ds.episode_data(ep), "action").astype(np.float64)
        out = np.full((horizon, a_dim), np.nan)
        rows = recorded[ep][t:t + horizon]
        out[: len(rows)] = rows
        return out

    done = 0
    model.eval()
    with torch.no_grad(), _video_loss_on_every_sample(model):
        for start in range(0, len(chosen), batch_size):
            batch = collate([items[int(i)] for i in chosen[start:start + batch_size]])
            b = len(batch["instruction"])
            _, logs = model.loss(batch, gen)
            for k, v in logs.items():
                loss_sums[k] = loss_sums.get(k, 0.0) + float(v) * b
            n_loss += b
            if which.action:
                pred = _predicted_chunks(model, processor, batch, sample_gen, num_steps).astype(np.float64)
                true = np.stack([recorded_chunk(int(e), int(t))
                                 for e, t in zip(batch["episode_index"], batch["frame_index"])])
                err = pred - true  # NaN past the episode end
                abs_err.append(np.abs(err))
                sq_err.append(err ** 2)
                base_abs.append(np.abs(center - true))
                tasks += list(batch["instruction"])
            done += b
            if progress is not None:
                progress(done, len(chosen))

    result: dict[str, Any] = {
        "checkpoint": str(policy.source.path) if policy.source else str(checkpoint),
        "step": policy.source.step if policy.source else None,
        "dataset": str(ds.root),
        "episodes": sorted(int(e) for e in (episodes if episodes is not None else known)),
        "samples": int(len(chosen)),
        "seed": int(seed),
        "mode": cfg.mode,
        "losses": {k: v / n_loss for k, v in sorted(loss_sums.items())},
    }
    if which.action:
        ae = np.concatenate(abs_err)
        se = np.concatenate(sq_err)
        be = np.concatenate(base_abs)
        steps = num_steps or cfg.num_action_steps

        def by_dim(x: np.ndarray) -> dict[str, float]:
            return {n: _nanmean(x[..., i]) for i, n in enumerate(names)}

        per_task = {}
        arr_tasks = np.asarray(tasks)
        for t in sorted(set(tasks)):
            rows = arr_tasks == t
            per_task[t] = {"samples": int(rows.sum()), "mae": _nanmean(ae[rows]),
                           "first_action_mae": _nanmean(ae[rows, 0]), "center_baseline_mae": _nanmean(be[rows])}
        result["actions"] = {
            "sampler_steps": int(steps),
            "mae": _nanmean(ae),
            "rmse": _sqrt(_nanmean(se)),
            "first_action_mae": _nanmean(ae[:, 0]),
            "center_baseline_mae": _nanmean(be),
            "mae_per_dim": by_dim(ae),
            "rmse_per_dim": {k: _sqrt(v) for k, v in by_dim(se).items()},
            "center_baseline_mae_per_dim": by_dim(be),
            "mae_per_chunk_step": [_nanmean(ae[:, h]) for h in range(ae.shape[1])],
            "per_task": per_task,
        }
    if plot_episodes > 0 and which.action:
        pick = sorted(episodes if episodes is not None else known)[:plot_episodes]
        result["plots"] = [str(plot_episode_trace(model, processor, ds, ep, os.path.join(plot_dir, f"episode_{ep}.png"),
                                                  names=names, seed=seed, num_steps=num_steps,
                                                  batch_size=batch_size)) for ep in pick]
    result["seconds"] = round(time.perf_counter() - t_start, 2)
    return result


def plot_episode_trace(model: Any, processor: Any, ds: Any, episode: int, path: str | os.PathLike, *,
                       names: Sequence[str] | None = None, seed: int = 0, num_steps: int | None = None,
                       every: int | None = None, batch_size: int = 16) -> str:
    """One figure for one episode: per action dimension, the recorded actions against time and the
    chunks the policy predicts at every ``every``-th step (default: half the horizon), each drawn
    from the step it starts at. Returns the path written."""
    from .report import pyplot
    from ..data.samples import TrainingSamples, collate

    horizon = model.cfg.action.action_horizon
    every = every or max(1, horizon // 2)
    items = TrainingSamples(ds, processor=processor, episodes=[episode])
    starts = list(range(0, len(items), every))
    gen = torch.Generator(device=model.device)
    gen.manual_seed(int(seed) + 2)
    chunks = []
    with torch.no_grad():
        for i in range(0, len(starts), batch_size):
            batch = collate([items[t] for t in starts[i:i + batch_size]])
            chunks.append(_predicted_chunks(model, processor, batch, gen, num_steps))
    pred = np.concatenate(chunks)  # (len(starts), H, A)
    recorded = processor.schema.extract(ds.episode_data(episode), "action")
    names = list(names or [f"a{i}" for i in range(recorded.shape[1])])
    plt = pyplot()
    fig, axes = plt.subplots(len(names), 1, figsize=(7.0, 1.6 * len(names) + 0.6), sharex=True, squeeze=False)
    t = np.arange(len(recorded))
    for d, ax in enumerate(axes[:, 0]):
        ax.plot(t, recorded[:, d], color="black", lw=1.2, label="recorded")
        for k, t0 in enumerate(starts):
            steps = np.arange(t0, min(t0 + horizon, len(recorded)))
            ax.plot(steps, pred[k, : len(steps), d], color="#d6603b", lw=0.9, alpha=0.8,
                    label="predicted chunks" if k == 0 else None)
            ax.plot(steps[:1], pred[k, :1, d], "o", color="#d6603b", ms=2)
        ax.set_ylabel(names[d], fontsize=8)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7, loc="best")
    axes[-1, 0].set_xlabel("step")
    task = ds.task(episode)
    fig.suptitle(f"episode {episode} ({task}): recorded actions and the chunks predicted every {every} steps",
                 fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def _nanmean(x: np.ndarray) -> float | None:
    """The mean over the valid (non-NaN) entries; None when there is none (JSON has no NaN)."""
    x = np.asarray(x, dtype=np.float64)
    ok = ~np.isnan(x)
    return float(x[ok].mean()) if ok.any() else None


def _sqrt(x: float | None) -> float | None:
    return None if x is None else math.sqrt(x)
