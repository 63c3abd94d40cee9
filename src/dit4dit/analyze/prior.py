"""The video-prior study: does a video model pretrained to predict the future give the policy
priors that a static encoder pretrained on the same frames lacks?

The study (``dit4dit analyze --study prior``; docs/analysis.md) has two parts:

1. **Pretraining**, once per objective, shared by every cell and seed (a stage whose run folder
   later cells ``--init`` from): on scripted-expert video of :data:`PRETRAIN_TASKS` with the
   actions dropped,
   - ``video``: the video DiT trained by the video loss alone (``mode=video_only``: predict the
     future frames from the current one);
   - ``static``: the static image encoder trained by denoising the current frame
     (``encoder=static_image``, ``mode=image_only``: flow matching on the conditioning frame's own
     latents; the future is never read), with the same steps and batch size.
2. **Fine-tuning** on :data:`TARGET_TASKS` demonstrations, the same recipe and steps for every
   arm:

   | arm | what | initialised from |
   |---|---|---|
   | `video_prior` (a) | `joint` (video + action loss, end to end) | the video prior |
   | `scratch` (b) | `joint` | nothing |
   | `static_prior` (c) | the static-image baseline (`encoder=static_image`, action loss) | the static prior |
   | `decoupled` (d) | the action DiT alone on the frozen video prior (`train.freeze_video`) | the video prior |
   | `cotrain` (e) | `joint` with the pretraining video in every batch (`train.video_datasets`) | nothing |

   at :data:`DEMOS` demonstrations per task for (a), (b), (c) and :data:`DEMOS_DE` for (d), (e).

This module holds the study's task lists (data: which MetaWorld v3 tasks, and why some are left
out) and the probe that measured which scripted experts succeed (:func:`probe_experts`,
``benchmarks/results/prior_expert_probe_cpu.json``). The cells are built in ``grid.py``
(:func:`dit4dit.analyze.grid.prior_cells`), run by ``runner.py`` and compared by ``report.py``
(paired bootstrap of the differences (a) - (c) and (a) - (b)).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    import numpy as np

    from .grid import Cell

# The demo's three tasks, and two more whose experts succeed on every layout (docs/metaworld.md).
TARGET_TASKS: tuple[str, ...] = ("button-press-topdown-v3", "drawer-open-v3", "push-v3", "faucet-open-v3",
                                 "window-open-v3")

# Tasks left out of the pretraining video because they are too close to a target task: the same
# object model driven by the same kind of motion, so their video would show the target's own
# scene dynamics (a prior for those tasks could then be a memory of the target, not a transferable one).
SIMILAR_TO_TARGETS: dict[str, tuple[str, str]] = {
    "button-press-topdown-wall-v3": ("button-press-topdown-v3", "the same button pressed from the top, a wall added"),
    "button-press-v3": ("button-press-topdown-v3", "the same button box, pressed from the front"),
    "button-press-wall-v3": ("button-press-topdown-v3", "the same button box, pressed from the front past a wall"),
    "coffee-button-v3": ("button-press-topdown-v3", "a button press (the coffee machine's) by the same reach-and-poke"),
    "drawer-close-v3": ("drawer-open-v3", "the same drawer, moved the other way"),
    "push-wall-v3": ("push-v3", "the same puck pushed to a goal, around a wall"),
    "push-back-v3": ("push-v3", "the same puck pushed to a goal, backwards"),
    "sweep-into-v3": ("push-v3", "the same puck pushed across the table into a hole"),
    "sweep-v3": ("push-v3", "the same puck pushed across the table off its edge"),
    "faucet-close-v3": ("faucet-open-v3", "the same faucet, turned the other way"),
    "window-close-v3": ("window-open-v3", "the same window, slid the other way"),
}

# Every other MetaWorld v3 task (docs/metaworld.md lists all 50) is a candidate for the pretraining
# video; PRETRAIN_TASKS keeps those whose scripted expert succeeded on every probe episode.
CANDIDATE_TASKS: tuple[str, ...] = (
    "assembly-v3", "basketball-v3", "bin-picking-v3", "box-close-v3", "coffee-pull-v3", "coffee-push-v3",
    "dial-turn-v3", "disassemble-v3", "door-close-v3", "door-lock-v3", "door-open-v3", "door-unlock-v3",
    "hand-insert-v3", "hammer-v3", "handle-press-side-v3", "handle-press-v3", "handle-pull-side-v3",
    "handle-pull-v3", "lever-pull-v3", "pick-place-wall-v3", "pick-out-of-hole-v3", "pick-place-v3",
    "plate-slide-v3", "plate-slide-side-v3", "plate-slide-back-v3", "plate-slide-back-side-v3",
    "peg-insert-side-v3", "peg-unplug-side-v3", "soccer-v3", "stick-push-v3", "stick-pull-v3", "reach-v3",
    "reach-wall-v3", "shelf-place-v3",
)

# From the probe (benchmarks/results/prior_expert_probe_cpu.json, 3 episodes per task on training
# layouts 0-2): the 30 candidates whose expert succeeded every time with the grip effort the
# pretraining collection uses (`dit4dit collect metaworld --gripper continuous`: the actions are
# dropped, only the video counts). Left out: basketball-v3, box-close-v3, door-open-v3 and
# peg-unplug-side-v3 (2 of 3 each).
PRETRAIN_TASKS: tuple[str, ...] = (
    "assembly-v3", "bin-picking-v3", "coffee-pull-v3", "coffee-push-v3", "dial-turn-v3", "disassemble-v3",
    "door-close-v3", "door-lock-v3", "door-unlock-v3", "hand-insert-v3", "hammer-v3", "handle-press-side-v3",
    "handle-press-v3", "handle-pull-side-v3", "handle-pull-v3", "lever-pull-v3", "pick-place-wall-v3",
    "pick-out-of-hole-v3", "pick-place-v3", "plate-slide-v3", "plate-slide-side-v3", "plate-slide-back-v3",
    "plate-slide-back-side-v3", "peg-insert-side-v3", "soccer-v3", "stick-push-v3", "stick-pull-v3", "reach-v3",
    "reach-wall-v3", "shelf-place-v3",
)

PRETRAIN_CAMERA = "corner4_close"  # the demo's camera (dit4dit.demo.SUITES["metaworld"]), 64 x 64 px
PRETRAIN_IMAGE_SIZE = 64
PRETRAIN_EPISODES = 20  # per pretraining task (at least)
DEMOS: tuple[int, ...] = (5, 10, 20)  # demonstrations per target task, arms a, b, c
DEMOS_DE: tuple[int, ...] = (10,)  # arms d, e
SEEDS: tuple[int, ...] = (0, 1, 2, 3, 4)
EVAL_EPISODES = 20  # per task per seed, held-out layouts


# --------------------------------------------------------------------------------------------
# the cells
# --------------------------------------------------------------------------------------------

# The shared pretraining runs: (label, overrides on top of the study's base config). Every
# pretraining run trains on the whole pretraining dataset (no per-task subsets or repeats).
PRETRAIN: dict[str, tuple[str, tuple[str, ...]]] = {
    "video": ("video prior: the video DiT, video loss only (predict the future frames)", ("mode=video_only",)),
    "static": ("static prior: the static image encoder, denoising the current frame (never the future)",
               ("encoder=static_image", "mode=image_only")),
}
PRETRAIN_COMMON: tuple[str, ...] = ("train.episodes_per_task=null", "train.task_repeats=[]", "train.task_episodes=[]",
                                    "train.video_datasets=[]", "train.init_from=null", "train.seed=0")

JOINT = ("mode=joint", "feature_grad=end_to_end")
STATIC = ("encoder=static_image", "mode=action_only", "feature_grad=end_to_end")
DECOUPLED = ("mode=action_only", "feature_grad=detached", "train.freeze_video=true")
# What a fine-tuning run takes from its pretraining run: the encoder and the text encoder that
# conditions it (and a fitted codec, always); the action DiT, never trained there, starts fresh
# with the cell's seed as in the scratch arm.
TAKE_VIDEO = ('train.init_parts=["video_dit","text_encoder"]',)
TAKE_STATIC = ('train.init_parts=["image_encoder","text_encoder"]',)

# arm: (letter, label, overrides, pretraining run its first stage starts from, co-trains on the video)
ARMS: dict[str, tuple[str, str, tuple[str, ...], str | None, bool]] = {
    "video_prior": ("a", "joint, from the video prior", JOINT + TAKE_VIDEO, "video", False),
    "scratch": ("b", "joint, from scratch", JOINT, None, False),
    "static_prior": ("c", "static image encoder, from the static prior", STATIC + TAKE_STATIC, "static", False),
    "decoupled": ("d", "action DiT on the frozen video prior", DECOUPLED + TAKE_VIDEO, "video", False),
    "cotrain": ("e", "joint, co-trained with the pretraining video", JOINT, None, True),
}
CURVE_ARMS = ("video_prior", "scratch", "static_prior")  # at every DEMOS value; the others at DEMOS_DE
FEATURE_ARMS = ("video_prior", "scratch", "static_prior")  # the phase-silhouette feature analysis
# Paired differences A - B: (arm A, its demonstrations, arm B, its demonstrations); None = at every
# demonstration count both arms have; "min" / "max" = the arm's fewest / most
COMPARISONS = (
    ("video_prior", None, "static_prior", None),  # (a) - (c): a video prior against a static one
    ("video_prior", None, "scratch", None),  # (a) - (b): a video prior against none
    ("video_prior", None, "decoupled", None),  # (a) - (d): joint fine-tuning against frozen features
    ("video_prior", None, "cotrain", None),  # (a) - (e): pretraining then fine-tuning against co-training
    ("video_prior", "min", "static_prior", "max"),  # sample efficiency: the fewest against the most
    ("video_prior", "min", "scratch", "max"),
)
# The paper's claims and the differences that test them (A better than B: the claim holds); the
# last field: whether differences at unequal demonstration counts count too
CLAIMS = (
    ("a video prior raises success", ("video_prior", "scratch"), "(a) − (b) at each count", False),
    ("a video prior is more sample-efficient than a static one (paper: more than 10x)",
     ("video_prior", "static_prior"), "(a) − (c) at each count, and (a) at its fewest against (c) at its most", True),
    ("joint fine-tuning beats frozen features", ("video_prior", "decoupled"), "(a) − (d)", False),
)


def prior_cells(pretrain_dataset: str, arms: Sequence[str] = tuple(ARMS), demos: Sequence[int] = DEMOS,
                demos_de: Sequence[int] = DEMOS_DE, video_data_fraction: float | None = None) -> list["Cell"]:
    """The study's cells (group ``prior``): each arm at each of its demonstration counts. A cell
    with ``init`` starts from that shared pretraining run (the runner fills in its folder)."""
    from .grid import AnalysisError, Cell

    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise AnalysisError(f"unknown arm(s) {unknown}; available: {', '.join(ARMS)}")
    bad = [n for n in (*demos, *demos_de) if not isinstance(n, int) or n < 1]
    if bad:
        raise AnalysisError(f"demonstrations per task must be integers >= 1, got {bad}")
    pretrain_dataset = str(Path(pretrain_dataset).expanduser().resolve())
    cells = []
    for arm in dict.fromkeys(arms):
        letter, label, overrides, init, cotrain = ARMS[arm]
        extra: tuple[str, ...] = ()
        if cotrain:
            extra = (f"train.video_datasets={json.dumps([str(pretrain_dataset)])}",)
            if video_data_fraction is not None:
                extra += (f"train.video_data_fraction={video_data_fraction!r}",)
        for n in (demos if arm in CURVE_ARMS else demos_de):
            cells.append(Cell("prior", f"{arm}_{n}", f"({letter}) {label}, {n} demo{'s' if n != 1 else ''}", (
                overrides + extra + (f"train.episodes_per_task={n}",),), x=n, arm=arm, init=init))
    if not cells:
        raise AnalysisError("the prior study has no cells: no arms or no demonstration counts")
    return cells


# --------------------------------------------------------------------------------------------
# paired comparison
# --------------------------------------------------------------------------------------------


def episode_outcomes(evaluation: dict[str, Any]) -> dict[str, list[int]] | None:
    """{task: [1/0 per evaluation episode, in episode order]} of a normalised evaluation result,
    or None when it does not keep them (results written before outcomes were stored)."""
    per_task = evaluation.get("per_task") or {}
    out = {t: [int(x) for x in v["outcomes"]] for t, v in per_task.items() if v.get("outcomes") is not None}
    return out if out and len(out) == len(per_task) else None


def paired_differences(a: dict[int, dict[str, list[int]]], b: dict[int, dict[str, list[int]]]
                       ) -> dict[int, "np.ndarray"]:
    """Per seed, the differences a - b of the outcomes of the same evaluation episodes (same seed,
    task and episode index, hence the same held-out layout). Seeds and tasks that only one side
    has are left out; episode lists of unequal length are cut to the shorter."""
    import numpy as np

    out = {}
    for seed in sorted(set(a) & set(b)):
        diffs = []
        for task in sorted(set(a[seed]) & set(b[seed])):
            n = min(len(a[seed][task]), len(b[seed][task]))
            diffs.append(np.asarray(a[seed][task][:n], float) - np.asarray(b[seed][task][:n], float))
        if diffs and sum(len(d) for d in diffs):
            out[seed] = np.concatenate(diffs)
    return out


def paired_bootstrap(diffs: dict[int, "np.ndarray"], resamples: int = 10_000, level: float = 0.95,
                     seed: int = 0) -> dict[str, Any] | None:
    """Percentile bootstrap interval of the mean paired difference (success of A minus success of B
    on the same evaluation episodes), resampling at two levels: the training seeds with
    replacement, then the paired episodes within each drawn seed with replacement (the seed is
    the unit that varies the trained policy; the episodes, its evaluation). With one seed only
    the episodes are resampled. None when there are no pairs."""
    import numpy as np

    groups = [np.asarray(d, float) for _, d in sorted(diffs.items()) if len(d)]
    if not groups:
        return None
    rng = np.random.default_rng(seed)
    k = len(groups)
    stats = np.empty(resamples)
    for i in range(resamples):
        picks = rng.integers(0, k, size=k) if k > 1 else np.zeros(1, dtype=int)
        total = count = 0.0
        for j in picks:
            g = groups[j]
            sample = g[rng.integers(0, len(g), size=len(g))]
            total += sample.sum()
            count += len(g)
        stats[i] = total / count
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(stats, [alpha, 1 - alpha])
    every = np.concatenate(groups)
    return {"difference": float(every.mean()), "ci": [float(lo), float(hi)], "level": level,
            "pairs": int(len(every)), "seeds": k, "resamples": resamples,
            "excludes_zero": bool(lo > 0 or hi < 0)}


def compare_arms(out: "Path", cells: Sequence["Cell"], seeds: Sequence[int], resamples: int = 10_000
                 ) -> list[dict[str, Any]]:
    """The paired differences of :data:`COMPARISONS` that the study's cells allow. Any two cells
    pair up: every cell is evaluated on the same episodes (seed, task, held-out layout)."""
    from .common import read_record, run_dir

    by_key = {(c.arm, c.x): c for c in cells if c.group == "prior"}
    counts = {arm: sorted(x for a, x in by_key if a == arm) for arm, _ in by_key}

    def pick(arm: str, which: Any) -> list[Any]:
        have = counts.get(arm, [])
        return have if which is None else ([have[0]] if which == "min" else [have[-1]]) if have else []

    rows, seen = [], set()
    for a, xa, b, xb in COMPARISONS:
        if xa is None and xb is None:
            pairs = [(x, x) for x in pick(a, None) if x in counts.get(b, [])]
        else:
            pairs = [(na, nb) for na in pick(a, xa) for nb in pick(b, xb) if na != nb]
        for na, nb in pairs:
            if (a, na, b, nb) in seen:
                continue
            seen.add((a, na, b, nb))
            outcomes: dict[str, dict[int, dict[str, list[int]]]] = {"a": {}, "b": {}}
            for side, arm, x in (("a", a, na), ("b", b, nb)):
                for s in seeds:
                    r = read_record(run_dir(out, by_key[(arm, x)], s) / "result.json")
                    o = episode_outcomes(r["eval"]) if r else None
                    if o is not None:
                        outcomes[side][s] = o
            boot = paired_bootstrap(paired_differences(outcomes["a"], outcomes["b"]), resamples=resamples)
            rows.append({"a": a, "b": b, "demos": na if na == nb else None, "demos_a": na, "demos_b": nb,
                         "cells": [by_key[(a, na)].key, by_key[(b, nb)].key],
                         **(boot or {"difference": None, "ci": None, "pairs": 0, "seeds": 0})})
    return rows


def claim_verdicts(comparisons: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One verdict per claim of :data:`CLAIMS` from its paired differences, by a fixed rule: a
    difference counts for the claim when its 95% interval lies above zero and against it when it
    lies below. "supported": some count for it and none against; "contradicted": the reverse;
    "mixed": both; "not shown": every interval holds zero; "not measured": no pairs yet."""
    out = []
    for claim, (a, b), tested_by, unequal in CLAIMS:
        rows = [c for c in comparisons if c["a"] == a and c["b"] == b and c["difference"] is not None
                and (unequal or c["demos_a"] == c["demos_b"])]
        above = [c for c in rows if c["ci"][0] > 0]
        below = [c for c in rows if c["ci"][1] < 0]
        verdict = ("not measured" if not rows else "mixed" if above and below else "supported" if above
                   else "contradicted" if below else "not shown")
        out.append({"claim": claim, "tested_by": tested_by, "verdict": verdict,
                    "differences": [{"demos_a": c["demos_a"], "demos_b": c["demos_b"], "difference": c["difference"],
                                     "ci": c["ci"], "seeds": c["seeds"]} for c in rows]})
    return out


def _demos(c: dict[str, Any]) -> str:
    return f"{c['demos_a']:g}" if c["demos_a"] == c["demos_b"] else f"{c['demos_a']:g} vs {c['demos_b']:g}"


# --------------------------------------------------------------------------------------------
# report: the curve and the differences
# --------------------------------------------------------------------------------------------


def curve_plot(rows: Sequence[dict[str, Any]], path: "Path") -> "Path | None":
    """Success against demonstrations per task, one line per arm (mean over seeds), with the pooled
    Wilson 95% interval as error bars; arms at a single count are single points."""
    import numpy as np

    from ..eval.report import pyplot

    rows = [r for r in rows if r["group"] == "prior" and r["success_mean"] is not None and r.get("arm")]
    if not rows:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.8), dpi=120)
    colours = {"video_prior": "#2b4f9e", "scratch": "#7f7f7f", "static_prior": "#d6603b", "decoupled": "#3b9e5a",
               "cotrain": "#9e3b8f"}
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    for k, arm in enumerate(arms):
        rs = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["x"])
        x = np.array([r["x"] for r in rs], float) * (1 + 0.03 * (k - (len(arms) - 1) / 2))  # dodge the bars
        y = np.array([r["success_mean"] for r in rs]) * 100
        lo = np.array([r["ci95"][0] for r in rs]) * 100
        hi = np.array([r["ci95"][1] for r in rs]) * 100
        letter, label = ARMS[arm][0], ARMS[arm][1]
        ax.errorbar(x, y, yerr=[np.maximum(y - lo, 0), np.maximum(hi - y, 0)], fmt="o-" if len(rs) > 1 else "s",
                    color=colours.get(arm), capsize=3, lw=1.2, ms=4, label=f"({letter}) {label}")
    xs = sorted({r["x"] for r in rows})
    ax.set_xscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{v:g}" for v in xs])
    ax.minorticks_off()
    ax.set_xlabel("demonstrations per task")
    ax.set_ylabel("success rate (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title("Video prior vs static prior vs scratch (mean over seeds, Wilson 95% CI)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def runs_finished(rows: Sequence[dict[str, Any]], seeds: Sequence[int]) -> dict[str, int]:
    """How many of the study's planned fine-tuning runs (every `prior` cell at every seed) have a
    result: {"finished", "planned"}."""
    prior_rows = [r for r in rows if r.get("group") == "prior"]
    return {"finished": sum(len(r.get("seeds") or []) for r in prior_rows),
            "planned": len(prior_rows) * len(seeds)}


def markdown_section(plan: dict[str, Any], comparisons: Sequence[dict[str, Any]], plots: dict[str, str],
                     runs: dict[str, int]) -> list[str]:
    """The prior study's part of results.md: its pretraining runs, the plot, the differences and a
    verdict per claim (:func:`claim_verdicts`), marked interim while `runs` (:func:`runs_finished`)
    says some planned run has no result yet."""
    lines = ["## Video prior vs static prior", ""]
    pre = plan.get("pretrain") or {}
    if pre:
        lines += [f"Pretraining (once per objective, shared by every cell and seed) on `{plan.get('pretrain_dataset')}`"
                  f", {plan.get('pretrain_steps') or plan.get('train_steps')} steps:", ""]
        for name, p in pre.items():
            lines.append(f"- `{name}`: {p['label']} (`{' '.join(p['overrides'])}`), run folder `{p['folder']}`")
        lines.append("")
    if "prior_curve" in plots:
        lines += [f"![success against demonstrations per arm]({plots['prior_curve']})", ""]
    if comparisons:
        lines += ["Paired differences in success rate (percentage points) on the same evaluation episodes (same "
                  "seed, task and held-out layout); 95% percentile bootstrap interval resampling the seeds, then "
                  "the episodes within each seed.", "",
                  "| difference | demos per task | A − B | 95% CI | pairs | seeds | excludes 0 |",
                  "|---|---:|---:|---|---:|---:|---|"]
        for c in comparisons:
            name = f"({ARMS[c['a']][0]}) − ({ARMS[c['b']][0]}): {c['a']} − {c['b']}"
            if c["difference"] is None:
                lines.append(f"| {name} | {_demos(c)} | - | - | 0 | 0 | - |")
                continue
            lo, hi = c["ci"]
            lines.append(f"| {name} | {_demos(c)} | {100 * c['difference']:+.1f} | [{100 * lo:+.1f}, "
                         f"{100 * hi:+.1f}] | {c['pairs']} | {c['seeds']} | {'yes' if c['excludes_zero'] else 'no'} |")
        lines.append("")
        lines += ["Verdict per claim, by a fixed rule (`dit4dit.analyze.prior.claim_verdicts`): a difference counts "
                  "for the claim when its 95% interval lies above zero, against it when below; supported = some "
                  "for and none against, contradicted = the reverse, mixed = both, not shown = every interval "
                  "holds zero. " + (f"All {runs['planned']} planned runs have finished: these are the study's verdicts."
                                    if runs["finished"] >= runs["planned"] else
                                    f"INTERIM: {runs['finished']} of {runs['planned']} planned runs have finished; "
                                    "with few seeds the intervals are wide, and an interim verdict is not the study's."),
                  "",
                  "| claim | tested by | verdict | differences (points, 95% CI) |", "|---|---|---|---|"]
        for v in claim_verdicts(comparisons):
            diffs = "; ".join(f"{d['demos_a']:g}{'' if d['demos_a'] == d['demos_b'] else ' vs ' + format(d['demos_b'], 'g')}: "
                              f"{100 * d['difference']:+.1f} [{100 * d['ci'][0]:+.1f}, {100 * d['ci'][1]:+.1f}]"
                              for d in v["differences"]) or "-"
            lines.append(f"| {v['claim']} | {v['tested_by']} | {v['verdict']} | {diffs} |")
        lines.append("")
    return lines


def probe_experts(tasks: Sequence[str], episodes: int = 3, *, gripper: str = "continuous", image_size: int = 64,
                  camera: str | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run each task's scripted expert on its first `episodes` training layouts, as
    `dit4dit collect metaworld` would (camera and image size of the demo; `gripper`), and report
    the successes per task. Returns {"settings", "per_task": {task: {successes, episodes,
    lengths, layouts, wall_s}}, "succeeded": [tasks whose expert succeeded every time]}."""
    from ..envs import metaworld as mw

    camera = camera or PRETRAIN_CAMERA
    per_task: dict[str, Any] = {}
    for task in mw.parse_tasks(list(tasks)):
        t0 = time.perf_counter()
        results = []
        for a in range(episodes):
            spec = {"task": task, "attempt": a, "layout": mw.layout_for_attempt(a, 0), "noise": 0.0,
                    "rng_seed": [0, list(mw.INSTRUCTIONS).index(task), a], "camera": camera,
                    "image_size": (image_size, image_size), "max_steps": mw.MAX_PATH_LENGTH, "gripper": gripper}
            r = mw._collect_job(spec)
            results.append(r)
        mw.close_cached_envs()
        per_task[task] = {"successes": sum(r.success for r in results), "episodes": len(results),
                          "lengths": [r.steps for r in results], "layouts": [r.layout for r in results],
                          "wall_s": round(time.perf_counter() - t0, 2)}
        if log:
            log(f"{task}: {per_task[task]['successes']}/{episodes} ({per_task[task]['wall_s']:.1f} s)")
    return {"settings": {"episodes": episodes, "gripper": gripper, "image_size": image_size, "camera": camera,
                         "layouts": "training layouts layout_for_attempt(0..episodes-1, seed 0)"},
            "per_task": per_task,
            "succeeded": [t for t, v in per_task.items() if v["successes"] == v["episodes"]]}


def probe_all(episodes: int = 3, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The probe behind :data:`PRETRAIN_TASKS`: every candidate task with the continuous grip of the
    pretraining collection, and the target tasks with the binary grip of their demonstrations."""
    import platform

    import torch

    candidates = probe_experts(CANDIDATE_TASKS + tuple(SIMILAR_TO_TARGETS), episodes, gripper="continuous",
                               camera=PRETRAIN_CAMERA, log=log)
    targets = probe_experts(TARGET_TASKS, episodes, gripper="binary", camera=PRETRAIN_CAMERA, log=log)
    ok = set(candidates["succeeded"])
    return {"what": "scripted-expert success per MetaWorld v3 task (dit4dit.analyze.prior.probe_all)",
            "machine": f"{_cpu_model() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                       f"{platform.platform()}",
            "candidates": candidates, "targets": targets,
            "pretrain_tasks": [t for t in CANDIDATE_TASKS if t in ok],
            "similar_to_targets_succeeded": [t for t in SIMILAR_TO_TARGETS if t in ok]}


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m dit4dit.analyze.prior probe --out FILE`: run :func:`probe_all`, write its JSON."""
    import argparse
    import sys

    from ..jsonio import write_json

    p = argparse.ArgumentParser(prog="python -m dit4dit.analyze.prior",
                                description="probe which MetaWorld v3 scripted experts succeed (the video-prior "
                                            "study's task lists)")
    p.add_argument("command", choices=["probe"])
    p.add_argument("--episodes", type=int, default=3, help="episodes per task (training layouts; default 3)")
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args(argv)
    result = probe_all(args.episodes, log=lambda m: print(f"[probe] {m}", file=sys.stderr, flush=True))
    write_json(args.out, result)
    print(f"{len(result['pretrain_tasks'])} pretraining tasks: {', '.join(result['pretrain_tasks'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
