"""`dit4dit demo`: the whole pipeline end to end, offline, on CPU.

collect expert demonstrations -> train the tiny preset -> closed-loop evaluation on held-out
layouts -> a Markdown report with the success table, training curves, rollout animations and the
video DiT's predicted future frames beside the real ones.

The built-in task is `toy_reach` (pixels + instruction, no simulator needed); `--env metaworld`
runs the MetaWorld suite when its extra is installed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .commands import progress_bar
from .config import get_preset


def _log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def toy_config(steps: int, overrides: list[str] | tuple[str, ...] = ()):
    return get_preset("tiny", ["schema=toy_reach", "inputs.cameras=[\"image\"]", "inputs.image_size=[64,64]",
                               "inputs.fps=10.0", f"train.steps={steps}", "train.save_every=1000000",
                               "train.log_every=20", *overrides])


def run_demo(out: str | Path, *, episodes: int = 120, steps: int = 400, eval_episodes: int = 10,
             replan_every: int = 4, seed: int = 0, overrides: list[str] | tuple[str, ...] = (),
             threads: int | None = None) -> dict[str, Any]:
    from .envs.toy import collect
    from .eval.report import plot_curves, save_gif
    from .eval.toy import evaluate
    from .policy import Policy
    from .train.checkpoint import load_policy
    from .train.trainer import train

    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    # 1. collect
    data_dir = out / "data"
    if (data_dir / "meta" / "info.json").is_file():
        _log(f"reusing the dataset at {data_dir}")
        collected = json.loads((out / "collect.json").read_text()) if (out / "collect.json").is_file() else {}
    else:
        _log(f"collecting {episodes} expert episodes of toy_reach ...")
        collected = collect(str(data_dir), episodes, seed=seed, progress=progress_bar(episodes, "collect"))
        (out / "collect.json").write_text(json.dumps(collected, indent=2))
    timings["collect_s"] = time.perf_counter() - t_start

    # 2. train
    cfg = toy_config(steps, [f"train.seed={seed}", *overrides])
    run_dir = out / "run"
    t0 = time.perf_counter()
    _log(f"training the tiny preset for {steps} steps on {torch.get_num_threads()} CPU thread(s) ...")
    summary = train(cfg, str(data_dir), str(run_dir), resume=(run_dir / "checkpoints").exists(), progress=True)
    timings["train_s"] = time.perf_counter() - t0

    # 3. evaluate closed loop on held-out layouts
    t0 = time.perf_counter()
    model, processor, _ = load_policy(run_dir, "cpu")
    policy = Policy(model, processor)
    _log(f"evaluating {eval_episodes} episodes per task, executing {replan_every} actions per chunk ...")
    results = evaluate(policy, eval_episodes, replan_every=replan_every, seed=seed, record=4,
                       progress=progress_bar(eval_episodes * 2, "evaluate"))
    timings["eval_s"] = time.perf_counter() - t0

    # 4. pictures
    media = out / "media"
    media.mkdir(exist_ok=True)
    gifs = [save_gif(v, media / f"rollout_{i}.gif").name for i, v in enumerate(results.pop("videos"))]
    curves = plot_curves(run_dir / "metrics.jsonl", media / "training_curves.png")
    strip = _prediction_strip(model, processor, data_dir, media / "predicted_vs_real.png", seed)
    timings["total_s"] = time.perf_counter() - t_start

    report = {"task_suite": "toy_reach", "collect": collected, "train": _summary_view(summary),
              "eval": results, "timings": timings, "seed": seed, "config": cfg.name,
              "threads": torch.get_num_threads()}
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str))
    _write_markdown(out / "report.md", report, gifs, curves, strip)
    _log(f"report: {out / 'report.md'}")
    return report


def _summary_view(summary: dict[str, Any]) -> dict[str, Any]:
    keep = ("steps", "final_step", "final_loss", "samples_per_s", "wall_s", "checkpoint", "device", "precision")
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
    lines = ["# dit4dit demo report", "",
             f"Task suite: `{r['task_suite']}` (built-in, pixels + instruction). Preset: `{r['config']}`. "
             f"Seed {r['seed']}. CPU threads: {r['threads']}.", "",
             "## Closed-loop success (held-out layouts)", "",
             "| task | success | 95% CI | mean steps to success |", "|---|---|---|---|"]
    for task, t in ev["per_task"].items():
        steps = "-" if t["mean_steps_to_success"] is None else f"{t['mean_steps_to_success']:.1f}"
        lines.append(f"| {task} | {t['successes']}/{t['episodes']} ({t['success_rate']:.0%}) | "
                     f"[{t['ci95'][0]:.2f}, {t['ci95'][1]:.2f}] | {steps} |")
    lines += [f"| **all** | **{ev['success_rate']:.0%}** | [{ev['ci95'][0]:.2f}, {ev['ci95'][1]:.2f}] | |", "",
              f"Executed {ev['replan_every']} actions of each chunk before replanning.", ""]
    c = r.get("collect") or {}
    if c:
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
