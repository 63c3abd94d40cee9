"""`dit4dit analyze`: the baselines and ablations of the paper from the command line.

The flags become a :class:`dit4dit.analyze.runner.Study` (`study_from_args`); the study itself
(cells, runs, aggregation, report) is :mod:`dit4dit.analyze`. `python -m dit4dit.analyze` runs this
same command.
"""

from __future__ import annotations

import argparse
from typing import Any

from .common import Subparsers
from .output import emit

HELP = "train and evaluate the paper's baselines and ablations (cells x seeds, resumable); write results.md"

EPILOG = """\
variants: joint, joint_detached, action_only, decoupled, static_image (default: all five; 'none' for none)
ablations: feature_blocks, feature_denoise_steps, tau_f, demos ('all' for every one);
  --ablation NAME=V1,V2 replaces the default values, e.g. --ablation tau_f=0.5,0.995,buckets:10,
  --ablation feature_blocks=1,3,mean, --ablation demos=5,10,25,50

examples:
  dit4dit collect toy --episodes 100 --out data/toy
  dit4dit analyze --dataset data/toy --out studies/toy --set schema=toy_reach --steps 2000 --seeds 0,1,2
  dit4dit analyze --dataset data/mw3 --out studies/mw3 --variants joint,decoupled,static_image \\
      --ablation demos --ablation tau_f --steps 4000 --episodes 20 --replan-every 4 --threads 2

the video-prior study (--study prior; docs/analysis.md): one pretraining run per objective on
--pretrain-dataset (video: the video DiT predicts the future; static: the image encoder denoises the
current frame), shared by every cell and seed, then the arms video_prior (a), scratch (b),
static_prior (c) at --demos demonstrations per task, decoupled (d) and cotrain (e) at --demos-de:
  dit4dit analyze --study prior --dataset data/mw_targets --pretrain-dataset data/mw_pretrain \
      --out studies/prior --seeds 0,1,2,3,4 --steps 4000 --pretrain-steps 4000 --episodes 20 \
      --replan-every 4 --jobs 2 --threads 1
Rerunning the same command skips finished runs and resumes interrupted ones; --report-only
re-aggregates what OUT holds.
"""


def register(subparsers: Subparsers) -> argparse.ArgumentParser:
    """Add the `analyze` subcommand to the `dit4dit` subparsers."""
    from ..config import preset_names

    p = subparsers.add_parser("analyze", help=HELP, description=HELP, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="local LeRobot dataset folder (toy_reach or MetaWorld)")
    p.add_argument("--out", required=True, help="study folder (runs/, results.md, results.json, plots/)")
    p.add_argument("--preset", default="tiny", help=f"base config: {', '.join(preset_names())}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the base config of every cell (repeatable), e.g. --set schema=toy_reach")
    p.add_argument("--variants", default=None,
                   help="comma-separated variants, 'all' or 'none' (default all; none with --study prior)")
    p.add_argument("--ablation", action="append", default=[], metavar="NAME[=V1,V2,...]",
                   help="an ablation grid (repeatable; comma-separated names or 'all'); NAME=values sets its cells")
    p.add_argument("--study", default="grid", choices=["grid", "prior"],
                   help="grid: the variants and ablations; prior: the video-prior study (adds its pretraining "
                        "runs and arms; see the epilog)")
    p.add_argument("--pretrain-dataset", default=None,
                   help="--study prior: the action-free pretraining video (LeRobot dataset or folder of videos)")
    p.add_argument("--pretrain-steps", type=int, default=None,
                   help="--study prior: steps of each pretraining run (default: --steps)")
    p.add_argument("--arms", default="all",
                   help="--study prior: comma-separated arms video_prior,scratch,static_prior,decoupled,cotrain "
                        "(default all)")
    p.add_argument("--demos", default=None, help="--study prior: demonstrations per task of arms a, b, c "
                                                 "(default 5,10,20)")
    p.add_argument("--demos-de", default=None, help="--study prior: demonstrations per task of arms d, e (default 10)")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds (default 0)")
    p.add_argument("--steps", type=int, default=None, help="training steps per stage (default: the preset's)")
    p.add_argument("--episodes", type=int, default=10, help="closed-loop evaluation episodes per task (default 10)")
    p.add_argument("--replan-every", type=int, default=None,
                   help="actions executed per chunk in evaluation (default: the whole chunk)")
    p.add_argument("--tasks", default=None, help="MetaWorld tasks to evaluate (default: the dataset's)")
    p.add_argument("--eval-seed", type=int, default=0, help="evaluation seed (the same layouts for every cell)")
    p.add_argument("--features", default="variants", choices=["variants", "all", "none"],
                   help="which cells get the feature analysis (t-SNE, phase silhouette); default the variants")
    p.add_argument("--feature-samples", type=int, default=512, help="dataset frames in the feature analysis")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: a GPU when present)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (per run with --jobs; default 1 there)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at once, each in its own process (e.g. --jobs 2 --threads 1 on 2 cores)")
    p.add_argument("--frame-cache", action="store_true",
                   help="train from the dataset's frame cache (decoded once at the training resolution)")
    p.add_argument("--results-copy", default=None, metavar="DIR",
                   help="also keep each finished run's result.json and the report in DIR (e.g. a folder of "
                        "the repository), and take from DIR the finished runs OUT lacks: a long study resumes "
                        "on another machine (a run taken counts only while its data and prior are the same)")
    p.add_argument("--report-only", action="store_true", help="aggregate the runs OUT holds; train nothing")
    p.add_argument("--dry-run", action="store_true", help="list the cells and their overrides; train nothing")
    p.add_argument("--no-progress", action="store_true", help="no training progress bars")
    p.add_argument("--json", action="store_true", help="print the aggregate as JSON on stdout")
    p.set_defaults(func=cmd_analyze)
    return p


def parse_ablations(items: list[str]) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]]:
    """`--ablation` arguments -> (names, {name: values}); see the epilog."""
    from ..analyze.grid import ABLATIONS, AnalysisError

    names: list[str] = []
    values: dict[str, tuple[str, ...]] = {}
    for item in items:
        item = item.strip()
        if "=" in item:
            name, text = item.split("=", 1)
            name = name.strip()
            vals = tuple(v.strip() for v in text.split(",") if v.strip())
            if not vals:
                raise AnalysisError(f"--ablation {item!r}: no values after '='")
            names.append(name)
            values[name] = vals
        else:
            for name in (n.strip() for n in item.split(",") if n.strip()):
                names.extend(ABLATIONS if name == "all" else [name])
    unknown = [n for n in names if n not in ABLATIONS]
    if unknown:
        raise AnalysisError(f"unknown ablation(s) {unknown}; available: {', '.join(ABLATIONS)}")
    return tuple(dict.fromkeys(names)), values


def parse_variants(text: str) -> tuple[str, ...]:
    from ..analyze.grid import VARIANTS, AnalysisError

    text = text.strip()
    if text == "all":
        return tuple(VARIANTS)
    if text in ("none", ""):
        return ()
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise AnalysisError(f"unknown variant(s) {unknown}; available: {', '.join(VARIANTS)} (or all, none)")
    return names


def parse_seeds(text: str) -> tuple[int, ...]:
    from ..analyze.grid import AnalysisError

    try:
        seeds = tuple(dict.fromkeys(int(s) for s in text.split(",") if s.strip()))
    except ValueError:
        raise AnalysisError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds:
        raise AnalysisError("--seeds: at least one seed")
    return seeds


def parse_counts(text: str | None, default: tuple[int, ...], flag: str) -> tuple[int, ...]:
    from ..analyze.grid import AnalysisError

    if text is None:
        return default
    try:
        counts = tuple(dict.fromkeys(int(s) for s in text.split(",") if s.strip()))
    except ValueError:
        raise AnalysisError(f"{flag} {text!r}: expected comma-separated integers, e.g. 5,10,20") from None
    if not counts or min(counts) < 1:
        raise AnalysisError(f"{flag} {text!r}: at least one count, each >= 1")
    return counts


def parse_arms(text: str) -> tuple[str, ...]:
    from ..analyze.grid import AnalysisError
    from ..analyze.prior import ARMS

    if text.strip() == "all":
        return tuple(ARMS)
    arms = tuple(dict.fromkeys(a.strip() for a in text.split(",") if a.strip()))
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise AnalysisError(f"--arms {text!r}: unknown arm(s) {unknown}; available: {', '.join(ARMS)} (or all)")
    return arms


def study_from_args(args: argparse.Namespace):
    from ..analyze.grid import AnalysisError
    from ..analyze.prior import DEMOS, DEMOS_DE
    from ..analyze.runner import Study

    ablations, values = parse_ablations(args.ablation)
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip()) if args.tasks else ()
    study = getattr(args, "study", "grid")
    variants = args.variants if args.variants is not None else ("none" if study == "prior" else "all")
    prior = {}
    if study == "prior":
        if not args.pretrain_dataset:
            raise AnalysisError("--study prior needs --pretrain-dataset PATH (the action-free pretraining video)")
        prior = dict(study="prior", pretrain_dataset=args.pretrain_dataset, pretrain_steps=args.pretrain_steps,
                     arms=parse_arms(args.arms), demos=parse_counts(args.demos, DEMOS, "--demos"),
                     demos_de=parse_counts(args.demos_de, DEMOS_DE, "--demos-de"))
    elif args.pretrain_dataset or args.pretrain_steps is not None:
        raise AnalysisError("--pretrain-dataset and --pretrain-steps belong to --study prior")
    return Study(dataset=args.dataset, out=args.out, preset=args.preset, overrides=tuple(args.overrides),
                 variants=parse_variants(variants), ablations=ablations, values=values, **prior,
                 seeds=parse_seeds(args.seeds), steps=args.steps, eval_episodes=args.episodes,
                 replan_every=args.replan_every, eval_seed=args.eval_seed, tasks=tasks, features=args.features,
                 feature_points=args.feature_samples, device=args.device, frame_cache=args.frame_cache,
                 results_copy=args.results_copy)


def cmd_analyze(args: argparse.Namespace) -> dict[str, Any]:
    from ..analyze.runner import run_analysis
    from ..analyze.summary import format_plan, study_plan, summary_table

    study = study_from_args(args)
    if args.dry_run:
        plan = study_plan(study)
        emit(args, plan, format_plan)
        return plan
    report = run_analysis(study, progress=not args.no_progress and not args.json, threads=args.threads,
                          train=not args.report_only, jobs=args.jobs)
    emit(args, report, summary_table)
    return report
