"""Aggregate the runs of a study: ``results.json``, ``results.md`` and ``plots/``.

Per cell: the success rate of each seed, their mean (and standard deviation), and a 95% Wilson
interval over all evaluation episodes of all seeds pooled (``dit4dit.stats``). Plots: one
bar chart per group (the baselines, each ablation), the sample-efficiency curve of the `demos`
ablation, and the t-SNE of the feature analysis coloured by episode phase.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..stats import wilson_interval
from ..eval.report import pyplot
from .common import read_record, run_dir, write_record
from .grid import Cell

PHASE_COLOURS = ("#3b6fd6", "#e8b90c", "#d63b3b")  # early blue, middle yellow, late red (as the paper)

GROUP_TITLES = {
    "variants": "Baselines",
    "feature_blocks": "Ablation: feature extraction block (`feature_blocks`, `feature_pool`)",
    "feature_denoise_steps": "Ablation: denoising steps before the feature pass (`feature_denoise_steps`)",
    "tau_f": "Ablation: feature flow time (`tau_f`, `tau_f_buckets`)",
    "demos": "Ablation: demonstrations per task (`train.episodes_per_task`)",
    "prior": "Video-prior study: arms x demonstrations per task",
}


def _mean_feature_score(runs: Sequence[dict[str, Any]], key: str) -> float | None:
    """Mean over the runs of one feature-analysis score (runs without it are skipped)."""
    values = [r["features"][key] for r in runs if r.get("features") and r["features"].get(key) is not None]
    return float(np.mean(values)) if values else None


def aggregate(out: Path, cells: Sequence[Cell], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """One row per cell from the runs' ``result.json`` files (cells without results included)."""
    rows = []
    for cell in cells:
        runs = [r for s in seeds if (r := read_record(run_dir(out, cell, s) / "result.json")) is not None]
        rates = [float(r["eval"]["success_rate"]) for r in runs]
        succ = sum(int(r["eval"]["successes"]) for r in runs)
        eps = sum(int(r["eval"]["episodes"]) for r in runs)
        per_task: dict[str, list[int]] = {}
        for r in runs:
            for t, v in r["eval"]["per_task"].items():
                acc = per_task.setdefault(t, [0, 0])
                acc[0] += int(v["successes"])
                acc[1] += int(v["episodes"])
        rows.append({
            "group": cell.group, "cell": cell.name, "label": cell.label, "x": cell.x, "arm": cell.arm,
            "overrides": [list(s) for s in cell.stages],
            "seeds": [r["seed"] for r in runs], "success_per_seed": rates,
            "success_mean": float(np.mean(rates)) if rates else None,
            "success_std": float(np.std(rates, ddof=1)) if len(rates) > 1 else None,
            "successes": succ, "episodes": eps,
            "ci95": list(wilson_interval(succ, eps)) if eps else None,
            "per_task": {t: {"successes": a, "episodes": b, "success_rate": a / b if b else None}
                         for t, (a, b) in per_task.items()},
            **{key: _mean_feature_score(runs, key)
               for key in ("silhouette_phase", "silhouette_phase_within_task", "silhouette_phase_tsne")},
            "train_s_mean": float(np.mean([r["timing"]["train_s"] for r in runs])) if runs else None,
            "train_episodes": runs[0].get("train_episodes") if runs else None,
            "params": runs[0].get("params") if runs else None,
            "same_as": runs[0].get("same_as") if runs and all(r.get("same_as") for r in runs) else None,
        })
    return rows


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _num(v: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def command_line(plan: dict[str, Any]) -> str:
    """The `dit4dit analyze` command that reproduces the study."""
    args = ["dit4dit", "analyze", "--dataset", plan["dataset"], "--out", plan["out"], "--preset", plan["preset"],
            "--variants", ",".join(plan["variants"]) or "none"]
    if plan.get("study", "grid") == "prior":
        from .prior import ARMS, DEMOS, DEMOS_DE

        args += ["--study", "prior", "--pretrain-dataset", plan["pretrain_dataset"]]
        if plan.get("pretrain_steps") is not None:
            args += ["--pretrain-steps", str(plan["pretrain_steps"])]
        if list(plan.get("arms", ARMS)) != list(ARMS):
            args += ["--arms", ",".join(plan["arms"])]
        if list(plan.get("demos", DEMOS)) != list(DEMOS):
            args += ["--demos", ",".join(str(n) for n in plan["demos"])]
        if list(plan.get("demos_de", DEMOS_DE)) != list(DEMOS_DE):
            args += ["--demos-de", ",".join(str(n) for n in plan["demos_de"])]
    for a in plan["ablations"]:
        args += ["--ablation", a]
        if plan["values"].get(a):
            args[-1] = f"{a}={','.join(plan['values'][a])}"
    args += ["--seeds", ",".join(str(s) for s in plan["seeds"])]
    if plan.get("steps") is not None:
        args += ["--steps", str(plan["steps"])]
    args += ["--episodes", str(plan["eval_episodes"])]
    if plan.get("replan_every") is not None:
        args += ["--replan-every", str(plan["replan_every"])]
    if plan.get("tasks"):
        args += ["--tasks", ",".join(plan["tasks"])]
    if plan.get("eval_seed", 0) != 0:
        args += ["--eval-seed", str(plan["eval_seed"])]
    if plan.get("features", "variants") != "variants":
        args += ["--features", plan["features"]]
    if plan.get("feature_points", 512) != 512:
        args += ["--feature-samples", str(plan["feature_points"])]
    if plan.get("frame_cache"):
        args.append("--frame-cache")
    if plan.get("results_copy"):
        args += ["--results-copy", plan["results_copy"]]
    for o in plan["overrides"]:
        args += ["--set", o]
    return " ".join(shlex.quote(a) for a in args)


def _per_task_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Success per evaluation task of each cell, pooled over its seeds (successes / episodes)."""
    tasks = list(dict.fromkeys(t for r in rows for t in r["per_task"]))
    if not tasks:
        return []
    lines = ["Per task, pooled over seeds (successes / episodes):", "",
             "| cell | " + " | ".join(t.removesuffix("-v3") for t in tasks) + " |",
             "|---|" + "---:|" * len(tasks)]
    for r in rows:
        cells = []
        for t in tasks:
            v = r["per_task"].get(t)
            cells.append(f"{v['successes']}/{v['episodes']} ({_pct(v['success_rate'])})" if v and v["episodes"] else "-")
        lines.append(f"| `{r['cell']}` | " + " | ".join(cells) + " |")
    return lines + [""]


def markdown(plan: dict[str, Any], rows: list[dict[str, Any]], plots: dict[str, str],
             full_demos: int | None = None, extra: Sequence[str] = ()) -> str:
    """results.md; `extra`: lines of a study's own section (the prior study's differences), placed
    after the tables."""
    steps = plan.get("train_steps", plan.get("steps"))
    prior = plan.get("study") == "prior"
    lines = [
        "# DiT4DiT video-prior study" if prior else "# DiT4DiT baselines and ablations",
        "",
        f"Dataset `{plan['dataset']}`; preset `{plan['preset']}`"
        + (f" with `{' '.join(plan['overrides'])}`" if plan["overrides"] else "")
        + f"; {steps} training steps per stage; seeds {', '.join(str(s) for s in plan['seeds'])}.",
        f"Closed-loop evaluation: {plan['eval_episodes']} episodes per task"
        + (f" ({', '.join(plan['eval_tasks'])})" if plan.get("eval_tasks") else "")
        + f" on held-out layouts, evaluation seed {plan['eval_seed']}, "
        + (f"{plan['replan_every']} actions executed per chunk." if plan.get("replan_every") else
           "the whole action chunk executed before replanning."),
        "",
        "Success: mean (± standard deviation) over seeds of each seed's success rate. 95% CI: Wilson "
        "interval over the evaluation episodes of all seeds pooled."
        + ("" if prior else " Every ablation cell is the `joint` variant with the cell's overrides."),
        "",
    ]
    groups = list(dict.fromkeys(r["group"] for r in rows))
    for g in groups:
        rs = [r for r in rows if r["group"] == g]
        lines += [f"## {GROUP_TITLES.get(g, g)}", ""]
        feats = any(r["silhouette_phase"] is not None for r in rs)
        head = "| cell | overrides | seeds | success | per seed | pooled | 95% CI |"
        sep = "|---|---|---:|---:|---|---:|---|"
        if g in ("demos", "prior"):
            head += " training episodes |"
            sep += "---:|"
        if feats:
            head += " phase silhouette |"
            sep += "---:|"
        head += " params (encoder) | train time |"
        sep += "---:|---:|"
        lines += [head, sep]
        for r in rs:
            over = " → ".join(" ".join(f"`{o}`" for o in stage) for stage in r["overrides"])
            sd = f" ± {100 * r['success_std']:.1f}" if r["success_std"] is not None else ""
            mean = _pct(r["success_mean"]) + sd
            seeds = ", ".join(_pct(v) for v in r["success_per_seed"]) or "-"
            ci = f"[{_pct(r['ci95'][0])}, {_pct(r['ci95'][1])}]" if r["ci95"] else "-"
            same = f" = `{r['same_as']}`" if r["same_as"] else ""
            line = (f"| {r['label']} (`{r['cell']}`{same}) | {over} | {len(r['seeds'])} | {mean} | {seeds} | "
                    f"{r['successes']}/{r['episodes']} | {ci} |")
            if g in ("demos", "prior"):
                line += f" {r['train_episodes'] if r['train_episodes'] is not None else '-'} |"
            if feats:
                line += f" {_num(r['silhouette_phase'])} |"
            enc = r["params"]["feature_encoder"] if r["params"] else None
            line += f" {_num(enc / 1e6 if enc else None, '{:.2f} M')} | {_num(r['train_s_mean'], '{:.0f} s')} |"
            lines.append(line)
        lines.append("")
        lines += _per_task_table(rs)
        if g in plots:
            lines += [f"![{g}]({plots[g]})", ""]
        if g == "demos" and full_demos is not None:
            lines += [f"The whole dataset ({full_demos} demonstrations per task) is the `joint` variant; the "
                      "curve shows it as its last point.", ""]
        if g == "demos" and "sample_efficiency" in plots:
            lines += [f"![sample efficiency]({plots['sample_efficiency']})", ""]
    lines += list(extra)
    with_feats = [r for r in rows if r["silhouette_phase"] is not None]
    if with_feats:
        lines += ["## Feature analysis (episode phase)", "",
                  "The features the action DiT receives (inference path, mean-pooled over tokens) for frames spread "
                  "over every episode of the dataset, labelled by the third of the episode they come from "
                  "(early / middle / late). Silhouette score of those labels (Euclidean; -1..1, higher = phases "
                  "better separated): on the features, within each task (mean over tasks), and on the 2-D t-SNE "
                  "embedding. The paper reports 0.09 (decoupled) vs 0.17 (joint).", "",
                  "| cell | silhouette (features) | within task | t-SNE |", "|---|---:|---:|---:|"]
        for r in with_feats:
            lines.append(f"| {r['label']} (`{r['group']}/{r['cell']}`) | {_num(r['silhouette_phase'])} | "
                         f"{_num(r['silhouette_phase_within_task'])} | {_num(r['silhouette_phase_tsne'])} |")
        lines.append("")
        if "tsne" in plots:
            lines += [f"![t-SNE of the features by episode phase]({plots['tsne']})", ""]
    lines += ["## Reproduce", "", "```bash", command_line(plan), "```", "",
              "Per-run results: `runs/<group>/<cell>/seed_<s>/result.json` (training summaries, evaluation per "
              "task, feature scores); aggregate: `results.json`.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------


def bar_plot(rows: list[dict[str, Any]], title: str, path: Path) -> Path | None:
    rows = [r for r in rows if r["success_mean"] is not None]
    if not rows:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(rows) + 1.5), 3.4), dpi=120)
    xs = np.arange(len(rows))
    means = np.array([r["success_mean"] for r in rows]) * 100
    lo = np.array([r["ci95"][0] for r in rows]) * 100
    hi = np.array([r["ci95"][1] for r in rows]) * 100
    ax.bar(xs, means, color="#6a8fd0", width=0.6, zorder=2)
    ax.errorbar(xs, means, yerr=[np.maximum(means - lo, 0), np.maximum(hi - means, 0)], fmt="none", ecolor="k",
                capsize=4, lw=1, zorder=3)
    for x, r in zip(xs, rows):
        if len(r["success_per_seed"]) > 1:
            ax.scatter([x] * len(r["success_per_seed"]), np.array(r["success_per_seed"]) * 100, s=12, c="k",
                       zorder=4)
    ax.set_xticks(xs)
    ax.set_xticklabels([r["cell"] if r["group"] == "variants" else r["label"] for r in rows], rotation=20,
                       ha="right", fontsize=8)
    ax.set_ylabel("success rate (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3, zorder=0)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def curve_plot(rows: list[dict[str, Any]], path: Path, xlabel: str = "demonstrations per task") -> Path | None:
    rows = sorted([r for r in rows if r["success_mean"] is not None and r["x"] is not None], key=lambda r: r["x"])
    if len(rows) < 2:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=120)
    x = np.array([r["x"] for r in rows], dtype=float)
    y = np.array([r["success_mean"] for r in rows]) * 100
    lo = np.array([r["ci95"][0] for r in rows]) * 100
    hi = np.array([r["ci95"][1] for r in rows]) * 100
    ax.fill_between(x, lo, hi, alpha=0.25, color="#6a8fd0", label="95% CI (pooled)")
    ax.plot(x, y, "o-", color="#2b4f9e", label="mean over seeds")
    ax.set_xscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels([f"{v:g}" for v in x])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("success rate (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Sample efficiency (joint DiT4DiT)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def tsne_plot(panels: list[tuple[str, dict[str, Any]]], path: Path) -> Path | None:
    """One panel per (title, features result with "tsne"), points coloured by episode phase."""
    panels = [(t, f) for t, f in panels if f and f.get("tsne")]
    if not panels:
        return None
    from .features import PHASES

    plt = pyplot()
    n = len(panels)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.4 * rows), dpi=120, squeeze=False)
    markers = ("o", "^", "s", "D", "v", "P", "X", "*")
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (title, f) in zip(axes.flat, panels):
        t = f["tsne"]
        x, y, ph, task = np.array(t["x"]), np.array(t["y"]), np.array(t["phase"]), np.array(t["task"])
        tasks = list(dict.fromkeys(task.tolist()))
        for p in range(3):
            for k, name in enumerate(tasks):
                sel = (ph == p) & (task == name)
                if sel.any():
                    ax.scatter(x[sel], y[sel], s=7, c=PHASE_COLOURS[p], marker=markers[k % len(markers)],
                               label=PHASES[p] if k == 0 else None, alpha=0.8, linewidths=0)
        s = f.get("silhouette_phase")
        ax.set_title(f"{title}\nsilhouette {s:.3f}" if s is not None else title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes.flat[0].legend(fontsize=7, markerscale=2, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------


def demos_per_task(dataset: str | None) -> int | None:
    """The `train.episodes_per_task` value that keeps the whole dataset (the largest number of
    episodes of one task), or None when the dataset cannot be read."""
    try:
        from ..data.lerobot import LeRobotDataset

        counts: dict[str, int] = {}
        for ep in LeRobotDataset(dataset, check_videos=False).episodes:
            task = ep.tasks[0] if ep.tasks else ""
            counts[task] = counts.get(task, 0) + 1
    except Exception:  # noqa: BLE001 - the point is optional (the dataset may have moved)
        return None
    return max(counts.values()) if counts else None


def full_data_point(rows: list[dict[str, Any]], dataset: str | None) -> dict[str, Any] | None:
    """The `joint` variant's row as the whole-dataset point of the demonstrations curve."""
    joint = next((r for r in rows if r["group"] == "variants" and r["cell"] == "joint"
                  and r["success_mean"] is not None), None)
    n = demos_per_task(dataset) if joint is not None else None
    return None if n is None else {**joint, "x": n, "label": f"{n} (all, = joint)"}


def write_report(out: Path, plan: dict[str, Any], cells: Sequence[Cell], seeds: Sequence[int]) -> dict[str, Any]:
    """Aggregate, plot, and write ``results.json`` + ``results.md`` in ``out``; returns the aggregate."""
    out = Path(out)
    rows = aggregate(out, cells, seeds)
    plot_dir = out / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    plots: dict[str, str] = {}
    for g in dict.fromkeys(r["group"] for r in rows):
        p = bar_plot([r for r in rows if r["group"] == g], GROUP_TITLES.get(g, g).replace("`", ""),
                     plot_dir / f"{'variants' if g == 'variants' else 'ablation_' + g}.png")
        if p is not None:
            plots[g] = str(p.relative_to(out))
    demos = [r for r in rows if r["group"] == "demos"]
    full = full_data_point(rows, plan.get("dataset"))
    if full is not None and demos and all(r["x"] is None or r["x"] < full["x"] for r in demos):
        demos = demos + [full]  # the whole dataset is the joint variant
    else:
        full = None
    if demos and (p := curve_plot(demos, plot_dir / "sample_efficiency.png")) is not None:
        plots["sample_efficiency"] = str(p.relative_to(out))
    panels = []
    for cell in cells:  # the first seed that has a feature analysis
        for s in seeds:
            f = read_record(run_dir(out, cell, s) / "features.json")
            if f is not None:
                panels.append((f"{cell.key} (seed {s})", f["result"]))
                break
    if panels and (p := tsne_plot(panels, plot_dir / "tsne.png")) is not None:
        plots["tsne"] = str(p.relative_to(out))
    report = {"plan": plan, "cells": rows, "plots": plots}
    extra: list[str] = []
    if any(c.group == "prior" for c in cells):  # the video-prior study: curve per arm, paired differences
        from . import prior

        if (p := prior.curve_plot(rows, plot_dir / "prior_curve.png")) is not None:
            plots["prior_curve"] = str(p.relative_to(out))
        report["comparisons"] = prior.compare_arms(out, cells, seeds)
        report["claims"] = prior.claim_verdicts(report["comparisons"])
        report["runs"] = prior.runs_finished(rows, seeds)
        extra = prior.markdown_section(plan, report["comparisons"], plots, report["runs"])
    write_record(out / "results.json", report)
    (out / "results.md").write_text(markdown(plan, rows, plots, full["x"] if full is not None else None, extra))
    return report
