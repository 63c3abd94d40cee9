"""`dit4dit demo`: collect, train, evaluate and report, end to end on CPU (offline)."""

from __future__ import annotations

import argparse
from typing import Any

from .common import Subparsers
from .output import emit


def register(sub: Subparsers) -> None:
    p = sub.add_parser("demo", help="collect, train, evaluate and report, end to end on CPU (offline)")
    p.add_argument("--env", default="metaworld", choices=["metaworld", "toy"],
                   help="task suite: MetaWorld button-press-topdown / drawer-open / push (needs the metaworld "
                        "extra), or the built-in toy_reach task")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--episodes", type=_count_or_spec, default=None,
                   help="expert episodes to collect (default: the suite's): for metaworld per task, N or "
                        "per task, e.g. 80,push=200 (see `collect metaworld --episodes`); for toy in all")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the suite's)")
    p.add_argument("--minutes", type=float, default=None,
                   help="time budget of the whole demo: training gets what collection leaves, less a "
                        "reserve for evaluation (default: the suite's, 30 for metaworld)")
    p.add_argument("--train-minutes", type=float, default=None,
                   help="training time limit instead of the one --minutes leaves; 0 = no limit")
    p.add_argument("--eval-episodes", type=int, default=None, help="evaluation episodes per task")
    p.add_argument("--eval-max-steps", type=int, default=None,
                   help="steps per evaluation episode (MetaWorld; default its 500-step limit)")
    p.add_argument("--replan-every", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="processes for collection and evaluation "
                                                             "(default: the CPU cores, at most 4)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for training (default: all cores; training reads frames from a cache "
                        "in the main process, so no data worker competes for them)")
    p.add_argument("--camera", default=None,
                   help="MetaWorld camera for collection and evaluation (default: the suite's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_demo)


def _count_or_spec(text: str) -> int | str:
    """``--episodes`` of `demo`: a number, or a per-task spec such as ``80,push=200``."""
    return int(text) if text.strip().isdigit() else text


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    from ..demo import run_demo

    r = run_demo(args.out, env=args.env, episodes=args.episodes, steps=args.steps, eval_episodes=args.eval_episodes,
                 replan_every=args.replan_every, seed=args.seed, overrides=args.overrides, threads=args.threads,
                 minutes=args.minutes, train_minutes=args.train_minutes, workers=args.workers, eval_max_steps=args.eval_max_steps,
                 camera=args.camera)
    emit(args, r, lambda r: f"success {r['eval']['success_rate']:.0%} "
                            f"(95% CI {r['eval']['ci95'][0]:.2f}-{r['eval']['ci95'][1]:.2f}); "
                            f"report in {args.out}/report.md; total {r['timings']['total_s']:.0f} s")
    return r

