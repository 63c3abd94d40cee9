"""`dit4dit demo`: the whole pipeline end to end, offline, on CPU.

collect expert demonstrations -> train the tiny preset -> closed-loop evaluation on held-out
layouts -> a Markdown report with the success table, training curves, rollout animations and the
video DiT's predicted future frames beside the real ones.

Two suites (`--env`):
- `metaworld` (default, needs the `metaworld` extra): button-press-topdown-v3, drawer-open-v3 and
  push-v3 from the scripted experts, every episode on a training layout of its own, evaluated on
  held-out layouts (40..49 and 90..99 for 20 episodes a task).
- `toy`: the built-in `toy_reach` task (pixels + instruction, no simulator).

A time budget for the whole demo (`--minutes`, 30 for MetaWorld) keeps it inside its budget on any
machine: training gets what is left after collection, less a reserve for evaluation, plans as many
steps as fit in it, and the report says how many ran (`--train-minutes` sets the training limit
directly).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .progress import progress_bar
from .config import get_preset
from .envs.toy import TASKS as TOY_TASKS


def _log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Suites
# --------------------------------------------------------------------------------------------

METAWORLD_TASKS = ("button-press-topdown-v3", "drawer-open-v3", "push-v3")


@dataclasses.dataclass(frozen=True)
class Suite:
    """What `run_demo` needs to know about one task suite."""

    name: str
    title: str
    tasks: int  # tasks evaluated
    episodes_per_task: bool  # whether `episodes` counts per task (else in total)
    episodes: int | str  # default demonstrations (MetaWorld: per task, e.g. "80,push=200")
    steps: int  # default training steps
    eval_episodes: int  # default evaluation episodes per task
    minutes: float  # default time budget of the whole demo
    eval_minutes: float  # of which kept for evaluation and the report (training gets the rest)
    overrides: tuple[str, ...]  # on top of the tiny preset
    collect: Callable[..., dict[str, Any]]
    evaluate: Callable[..., dict[str, Any]]
    camera: str | None = None  # default camera (simulated suites with a choice of cameras)
    count: Callable[[int | str], int] = int  # total episodes that `episodes` asks for


def _count_metaworld(episodes: int | str) -> int:
    from .envs.metaworld import episode_counts

    return sum(episode_counts(METAWORLD_TASKS, episodes).values())


def _collect_metaworld(data_dir: Path, episodes: int | str, seed: int, workers: int, progress,
                       camera: str | None = None) -> dict[str, Any]:
    from .envs.metaworld import DEFAULT_CAMERA, collect

    return collect(list(METAWORLD_TASKS), episodes, data_dir, image_size=64, seed=seed, workers=workers,
                   progress=progress, camera=camera or DEFAULT_CAMERA)


def _evaluate_metaworld(run_dir: Path, episodes: int, replan_every: int, seed: int, media: Path, workers: int,
                        progress, max_steps: int | None = None) -> dict[str, Any]:
    from .envs.metaworld import MAX_PATH_LENGTH
    from .eval.metaworld import evaluate

    r = evaluate(str(run_dir), list(METAWORLD_TASKS), episodes, replan_every=replan_every, seed=seed,
                 workers=workers, record_videos=2, out=media / "eval", progress=progress,
                 max_steps=max_steps or MAX_PATH_LENGTH)  # the camera view the checkpoint was trained on
    r["videos"] = [str(Path(v).relative_to(media)) for v in r["videos"]]
    r["replan_every"] = r["protocol"]["replan_every"]
    return r


def _collect_toy(data_dir: Path, episodes: int, seed: int, workers: int, progress,  # noqa: ARG001
                 camera: str | None = None) -> dict[str, Any]:  # noqa: ARG001
    from .envs.toy import collect

    return collect(str(data_dir), episodes, seed=seed, progress=progress)


def _evaluate_toy(run_dir: Path, episodes: int, replan_every: int, seed: int, media: Path, workers: int,  # noqa: ARG001
                  progress, max_steps: int | None = None) -> dict[str, Any]:  # noqa: ARG001
    from .eval.report import save_gif
    from .eval.toy import evaluate
    from .policy import Policy

    policy = Policy.from_checkpoint(run_dir, device="cpu")
    r = evaluate(policy, episodes, replan_every=replan_every, seed=seed, record=4, progress=progress)
    r["videos"] = [save_gif(v, media / f"rollout_{i}.gif").name for i, v in enumerate(r.pop("videos"))]
    return r


# The MetaWorld recipe (docs/demo.md has the measurements behind it). Demonstrations follow the
# tasks' difficulty: 200 of push, each on a layout of its own, and 80 of each other task
# (`--episodes` takes the same per-task form). Two future frames with the video loss on half of
# each batch; the 500-step warm-up keeps learning rate 3e-3 from stalling the fit with them.
METAWORLD_EPISODES: int | str = "80,push=200"
METAWORLD_OVERRIDES = (
    "schema=metaworld_sawyer", "inputs.image_size=[64,64]", "inputs.fps=80.0", "inputs.num_future_frames=2",
    "train.batch_size=16", "repeated_diffusion_steps=2", "video_loss_fraction=0.5", "train.warmup_steps=500",
    "train.lr_video=3e-3", "train.lr_action=3e-3", "train.lr_other=3e-3", 'train.task_repeats=["push=3","button=3"]',
)

SUITES: dict[str, Suite] = {
    "metaworld": Suite("metaworld", "MetaWorld " + ", ".join(METAWORLD_TASKS), tasks=len(METAWORLD_TASKS),
                       episodes_per_task=True, episodes=METAWORLD_EPISODES, steps=12000,
                       eval_episodes=20, minutes=30.0, eval_minutes=3.0, overrides=METAWORLD_OVERRIDES,
                       collect=_collect_metaworld, evaluate=_evaluate_metaworld, camera="corner4_close",
                       count=_count_metaworld),
    "toy": Suite("toy", "built-in toy_reach (pixels + instruction)", tasks=len(TOY_TASKS), episodes_per_task=False,
                 episodes=120, steps=400, eval_episodes=10,
                 minutes=25.0, eval_minutes=3.0,
                 overrides=("schema=toy_reach", "inputs.cameras=[\"image\"]", "inputs.image_size=[64,64]",
                            "inputs.fps=10.0"),
                 collect=_collect_toy, evaluate=_evaluate_toy),
}


def demo_config(suite: str, steps: int, overrides: list[str] | tuple[str, ...] = ()):
    s = SUITES[suite]
    return get_preset("tiny", [*s.overrides, f"train.steps={steps}", "train.save_every=1000000",
                               "train.log_every=20", "train.num_workers=0", *overrides])


def toy_config(steps: int, overrides: list[str] | tuple[str, ...] = ()):
    return demo_config("toy", steps, overrides)


# --------------------------------------------------------------------------------------------
# The demo
# --------------------------------------------------------------------------------------------


def run_demo(out: str | Path, *, env: str = "metaworld", episodes: int | str | None = None, steps: int | None = None,
             eval_episodes: int | None = None, replan_every: int = 4, seed: int = 0,
             overrides: list[str] | tuple[str, ...] = (), threads: int | None = None,
             minutes: float | None = None, train_minutes: float | None = None, workers: int | None = None,
             eval_max_steps: int | None = None, camera: str | None = None) -> dict[str, Any]:
    """Collect, train, evaluate and report; returns the report dict (also in OUT/results.json).

    ``minutes``: time budget of the whole demo (default: the suite's); training gets what is left
    after collection less the suite's evaluation reserve, unless ``train_minutes`` sets its limit
    directly (0 = no limit). Re-running with the same OUT reuses the dataset and resumes (or
    reuses) the training run. ``eval_max_steps`` shortens evaluation episodes (MetaWorld; default
    its 500-step limit)."""
    from .eval.report import plot_curves
    from .policy import Policy
    from .train.trainer import Trainer

    if env not in SUITES:
        raise ValueError(f"unknown demo suite {env!r}; available: {sorted(SUITES)}")
    suite = SUITES[env]
    episodes = suite.episodes if episodes is None else episodes
    if not suite.episodes_per_task and not str(episodes).strip().isdigit():
        raise ValueError(f"--episodes {episodes!r}: the {env} suite takes one number of episodes in all")
    if not suite.episodes_per_task:
        episodes = int(episodes)
    total = suite.count(episodes)  # a spec that names no suite task, or a count < 1, fails before any work
    steps = suite.steps if steps is None else steps
    eval_episodes = suite.eval_episodes if eval_episodes is None else eval_episodes
    minutes = suite.minutes if minutes is None else minutes
    camera = camera or suite.camera
    cores = os.cpu_count() or 1
    workers = max(1, min(cores, 4)) if workers is None else workers
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    media = out / "media"
    media.mkdir(exist_ok=True)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    # 1. collect
    data_dir = out / "data"
    if (data_dir / "meta" / "info.json").is_file():
        captured = _captured_cameras(data_dir)
        if camera and captured and camera not in captured:
            raise ValueError(f"{data_dir} was collected with camera {sorted(captured)}, not {camera!r}: "
                             f"choose another --out (or drop --camera to reuse it)")
        _log(f"reusing the dataset at {data_dir}")
        collected = json.loads((out / "collect.json").read_text()) if (out / "collect.json").is_file() else {}
    else:
        each = " per task" if suite.episodes_per_task else ""
        _log(f"collecting {total} expert episodes ({episodes}{each}) of {suite.title} ...")
        collected = suite.collect(data_dir, episodes, seed, workers, progress_bar(total, "collect"), camera=camera)
        (out / "collect.json").write_text(json.dumps(collected, indent=2, default=str))
    timings["collect_s"] = time.perf_counter() - t_start
    if train_minutes is None:  # what the budget leaves after collection and the evaluation reserve
        train_minutes = max(1.0, minutes - suite.eval_minutes - timings["collect_s"] / 60.0)

    # 2. train: the run plans as many steps as fit in 95% of the time limit (so that its learning
    # rate is annealed by then); the limit itself stops it, with a checkpoint, if that plan slips
    budget = [f"train.time_budget_minutes={0.95 * train_minutes:.4g}"] if train_minutes > 0 else []
    cfg = demo_config(env, steps, [f"train.seed={seed}", *budget, *overrides])
    run_dir = out / "run"
    t0 = time.perf_counter()
    limit = f"at most {train_minutes:.1f} min" if train_minutes > 0 else "no time limit"
    _log(f"training the tiny preset for up to {steps} steps on {torch.get_num_threads()} CPU thread(s), {limit} ...")
    trainer = Trainer(cfg, str(data_dir), str(run_dir), resume=(run_dir / "checkpoints").exists(), progress=True,
                      frame_cache=True)
    timer = threading.Timer(train_minutes * 60.0, trainer.request_stop) if train_minutes > 0 else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        summary = trainer.run()
    finally:
        if timer is not None:
            timer.cancel()
    if summary.get("interrupted"):
        _log(f"time limit reached: stopped at step {summary['step']} of {steps}")
    timings["train_s"] = time.perf_counter() - t0

    # 3. evaluate closed loop on held-out layouts
    t0 = time.perf_counter()
    _log(f"evaluating {eval_episodes} episodes per task, executing {replan_every} actions per chunk ...")
    results = suite.evaluate(run_dir, eval_episodes, replan_every, seed, media, workers,
                             progress_bar(eval_episodes * suite.tasks, "evaluate"), max_steps=eval_max_steps)
    timings["eval_s"] = time.perf_counter() - t0

    # 4. pictures
    policy = Policy.from_checkpoint(run_dir, device="cpu")
    curves = plot_curves(run_dir / "metrics.jsonl", media / "training_curves.png")
    strip = _prediction_strip(policy.model, policy.processor, data_dir, media / "predicted_vs_real.png", seed)
    timings["total_s"] = time.perf_counter() - t_start

    gifs = results.pop("videos", [])
    results.pop("episodes_detail", None)
    report = {"task_suite": env, "title": suite.title, "collect": collected, "train": _summary_view(summary),
              "eval": results, "timings": timings, "seed": seed, "config": cfg.name,
              "overrides": [*suite.overrides, *overrides], "steps": steps, "minutes": minutes,
              "train_minutes": train_minutes,
              "threads": torch.get_num_threads(), "cpu_count": cores,
              "camera": results.get("protocol", {}).get("camera")}
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str))
    _write_markdown(out / "report.md", report, gifs, curves, strip)
    _log(f"report: {out / 'report.md'}")
    return report


def _captured_cameras(data_dir: Path) -> set[str]:
    """The camera views a demo dataset was collected with (its meta/capture.json; empty if none)."""
    from .data.lerobot import CAPTURE_FILE

    path = data_dir / "meta" / CAPTURE_FILE
    if not path.is_file():
        return set()
    return set((json.loads(path.read_text()).get("cameras") or {}).values())


def _summary_view(summary: dict[str, Any]) -> dict[str, Any]:
    keep = ("step", "steps_run", "final_loss", "samples_per_s", "wall_time_s", "interrupted", "time_budget",
            "checkpoint", "device", "precision")
    return {k: summary[k] for k in keep if k in summary} or summary


@torch.no_grad()
def _prediction_strip(model, processor, data_dir: Path, out_png: Path, seed: int) -> str | None:
    """Real future frames (top) and the video DiT's predicted ones (bottom) for a few samples."""
    from .data.lerobot import LeRobotDataset
    from .data.samples import TrainingSamples, collate
    from .eval.report import frame_strip, to_uint8

    ds = LeRobotDataset(data_dir)
    samples = TrainingSamples(ds, processor=processor, action_horizon=model.cfg.action.action_horizon)
    n_cond = model.cfg.inputs.num_cond_frames
    rows = []
    picks = np.linspace(0, len(samples) - 1, 3).astype(int)
    batch = collate([samples[int(i)] for i in picks])
    g = torch.Generator().manual_seed(seed)
    pred = model.eval().predict_video(batch["video"][:, :, :n_cond], batch["instruction"], generator=g)
    for k in range(len(picks)):
        real = to_uint8(batch["video"][k])
        fake = np.concatenate([real[:n_cond], to_uint8(pred[k])])
        rows += [real, fake]
    frame_strip(rows, scale=2).save(out_png)
    ds.close()
    return out_png.name


def _write_markdown(path: Path, r: dict[str, Any], gifs: list[str], curves, strip) -> None:
    ev = r["eval"]
    tr = r["train"]
    lines = ["# dit4dit demo report", "",
             f"Task suite: {r['title']}. Preset: `{r['config']}` with `{' '.join(r['overrides'])}`. "
             f"Seed {r['seed']}. CPU threads: {r['threads']} of {r['cpu_count']} cores.", "",
             "## Closed-loop success (held-out layouts)", "",
             "| task | success | 95% CI | mean steps to success |", "|---|---|---|---|"]
    for task, t in ev["per_task"].items():
        steps = "-" if t["mean_steps_to_success"] is None else f"{t['mean_steps_to_success']:.1f}"
        lines.append(f"| {task} | {t['successes']}/{t['episodes']} ({t['success_rate']:.0%}) | "
                     f"[{t['ci95'][0]:.2f}, {t['ci95'][1]:.2f}] | {steps} |")
    lines += [f"| **all** | **{ev['success_rate']:.0%}** | [{ev['ci95'][0]:.2f}, {ev['ci95'][1]:.2f}] | |", "",
              f"Executed {ev['replan_every']} actions of each chunk before replanning.", ""]
    trained = f"Trained {tr.get('step')} of {r['steps']} steps"
    planned = (tr.get("time_budget") or {}).get("planned_steps")
    if not tr.get("interrupted") and planned is not None and planned < r["steps"]:
        trained += f" (as many as fit in the {r['train_minutes']:g}-minute training limit)"
    if tr.get("interrupted"):
        trained += f" (stopped by the {r['train_minutes']:g}-minute training limit)"
    if tr.get("final_loss") is not None:
        trained += f"; final loss {tr['final_loss']:.4f}"
    lines += [trained + ".", ""]
    c = r.get("collect") or {}
    if c.get("tasks"):
        lines += ["Expert demonstrations (training layouts):", "", "| task | kept | expert success | frames |",
                  "|---|---|---|---|"]
        for task, t in c["tasks"].items():
            lines.append(f"| {task} | {t['kept']} | {t['successes']}/{t['attempts']} | {t['frames']} |")
        lines += [""]
    elif c:
        lines += [f"Data: {c.get('episodes')} expert episodes, {c.get('frames')} frames; "
                  f"expert success {c.get('expert_success_rate', 0):.0%}.", ""]
    tm = r["timings"]
    lines += ["## Wall time", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k[:-2]} | {v:.0f} |" for k, v in tm.items()]
    lines += [""]
    if curves:
        lines += ["## Training curves", "", f"![training curves](media/{curves.name})", ""]
    if strip:
        lines += ["## Predicted future frames", "",
                  "Rows in pairs: real clip (conditioning frame, then the future frames), then the same "
                  "conditioning frame followed by the video DiT's predicted future frames.", "",
                  f"![predicted vs real](media/{strip})", ""]
    if gifs:
        lines += ["## Rollouts", "", " ".join(f"![rollout](media/{g})" for g in gifs), ""]
    path.write_text("\n".join(lines))
