"""Overviews of a study: the plan a dry run prints (what would be trained, with which overrides) and
the summary table of an aggregated report (one line per cell, then the paired arm differences)."""

from __future__ import annotations

from typing import Any

from .prior import PRETRAIN, PRETRAIN_COMMON
from .runner import Study, pretrain_dir, pretrain_names, run_dir, stage_configs


def pretrain_overrides(name: str) -> tuple[str, ...]:
    """The config overrides of the shared pretraining run `name` of the video-prior study."""
    return PRETRAIN_COMMON + PRETRAIN[name][1]


def study_plan(study: Study) -> dict[str, Any]:
    """The runs `study` consists of, without training anything: the shared pretraining runs, then
    each cell's stages (override lists), initialisation and training steps, the seeds and the run count."""
    cells = study.cells()
    pretrain = [{"pretrain": n, "folder": str(pretrain_dir(study.out, n) / "train"),
                 "overrides": list(pretrain_overrides(n)), "train_steps": study.pretrain_config(n).train.steps}
                for n in pretrain_names(cells)]
    homes = [study.out] + ([study.results_copy] if study.results_copy else [])

    def stored(cell: Any) -> list[int]:  # seeds with a result.json in OUT or the results copy
        return [s for s in study.seeds if any((run_dir(h, cell, s) / "result.json").is_file() for h in homes)]

    rows = [{"cell": c.key, "label": c.label, "stages": [list(s) for s in c.stages], "init": c.init,
             "init_from": stage_configs(study, c, study.seeds[0])[0].train.init_from,
             "train_steps": [cfg.train.steps for cfg in stage_configs(study, c, study.seeds[0])],
             "features": study.wants_features(c), "stored_seeds": stored(c)} for c in cells]
    return {"pretrain": pretrain, "cells": rows, "seeds": list(study.seeds), "runs": len(cells) * len(study.seeds),
            "stored_runs": sum(len(r["stored_seeds"]) for r in rows)}


def format_plan(plan: dict[str, Any]) -> str:
    """The text form of `study_plan`: one line per pretraining run and per cell, then the run count."""
    pretrain = plan["pretrain"]
    lines = [f"{'pretrain/' + p['pretrain']:<36} {' '.join(p['overrides'])}  ({p['train_steps']} steps, once)"
             for p in pretrain]
    for c in plan["cells"]:
        init = f"--init pretrain/{c['init']} -> " if c["init"] else ""
        done = f"  [stored: seed {', '.join(str(s) for s in c['stored_seeds'])}]" if c.get("stored_seeds") else ""
        lines.append(f"{c['cell']:<36} {init}{' -> '.join(' '.join(s) for s in c['stages'])}{done}")
    lines.append(f"{plan['runs']} runs ({len(plan['cells'])} cells x {len(plan['seeds'])} seeds)"
                 + (f" after {len(pretrain)} pretraining run(s)" if pretrain else ""))
    if plan.get("stored_runs"):
        lines.append(f"{plan['stored_runs']} with a stored result (reused when the study runs if their data and prior "
                     f"are the same), {plan['runs'] - plan['stored_runs']} without")
    return "\n".join(lines)


def summary_table(report: dict[str, Any]) -> str:
    """One line per cell of an aggregated report (success, 95% CI, episodes, seeds, silhouette),
    the paired differences between arms, and where results.md is."""
    lines = []
    for r in report["cells"]:
        if r["success_mean"] is None:
            lines.append(f"{r['group'] + '/' + r['cell']:<40} not run")
            continue
        ci = r["ci95"]
        sil = f"  silhouette {r['silhouette_phase']:.3f}" if r["silhouette_phase"] is not None else ""
        lines.append(f"{r['group'] + '/' + r['cell']:<40} {100 * r['success_mean']:5.1f}%  "
                     f"[{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]  {r['successes']}/{r['episodes']}  "
                     f"seeds {len(r['seeds'])}{sil}")
    for c in report.get("comparisons") or []:
        if c["difference"] is not None:
            demos = f"{c['demos_a']:g}" if c["demos_a"] == c["demos_b"] else f"{c['demos_a']:g} vs {c['demos_b']:g}"
            lines.append(f"{c['a']} - {c['b']} at {demos} demos: {100 * c['difference']:+.1f} points "
                         f"[{100 * c['ci'][0]:+.1f}, {100 * c['ci'][1]:+.1f}] ({c['pairs']} paired episodes)")
    lines.append(f"report: {report['plan']['out']}/results.md")
    return "\n".join(lines)
