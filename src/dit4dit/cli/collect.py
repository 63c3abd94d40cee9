"""`dit4dit collect toy | metaworld | libero`: expert demonstrations into a LeRobot v3.0 dataset."""

from __future__ import annotations

import argparse
from typing import Any, Callable

from .common import Subparsers, subcommand_table
from .output import emit, log, progress_bar, write_result


def get_collect_subparsers(sub: Subparsers) -> Subparsers:
    """The `dit4dit collect` table (one entry per task suite), created on first use."""
    return subcommand_table(sub, "collect", help="collect expert demonstrations into a LeRobot v3.0 dataset",
                            dest="env")


def _collected(r: dict[str, Any], timing: str, task_lines: list[str], incomplete_prefix: str) -> str:
    """The text form of a simulator collection: what was written where and how fast (``timing``), one
    line a task, then the tasks left short of episodes (named after ``incomplete_prefix``)."""
    lines = [f"wrote {r['episodes']} episodes ({r['frames']} frames) to {r['dataset']} in {r['seconds']:.0f} s "
             f"({timing})", *task_lines]
    if r["incomplete_tasks"]:
        lines.append(f"  fewer episodes than asked for: {incomplete_prefix}{r['incomplete_tasks']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ toy
def register_toy(csub: Subparsers) -> None:
    """`dit4dit collect toy`: the built-in toy_reach task."""
    q = csub.add_parser("toy", help="the built-in toy_reach task (pixels + instruction, no simulator)")
    q.add_argument("--episodes", type=int, default=100)
    q.add_argument("--out", required=True)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--size", type=int, default=64)
    q.add_argument("--overwrite", action="store_true")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_collect_toy)


def cmd_collect_toy(args: argparse.Namespace) -> dict[str, Any]:
    from ..envs.toy import collect

    r = collect(args.out, args.episodes, seed=args.seed, size=args.size, overwrite=args.overwrite,
                progress=progress_bar(args.episodes, "collect toy_reach"))
    emit(args, r, lambda r: f"wrote {r['episodes']} episodes ({r['frames']} frames) to {r['dataset']}; "
                            f"expert success {r['expert_success_rate']:.0%}")
    return r


# ------------------------------------------------------------------------------------------ metaworld
def register_metaworld(csub: Subparsers) -> None:
    """`dit4dit collect metaworld` (needs the `metaworld` extra)."""
    q = csub.add_parser("metaworld", help="MetaWorld scripted experts, one training layout an episode "
                                          "(needs `pip install -e '.[metaworld]'`)")
    q.add_argument("--tasks", required=True, help="comma-separated tasks, e.g. button-press-topdown,drawer-open,push")
    q.add_argument("--episodes", required=True,
                   help="successful episodes per task: N, or per task, e.g. push=200,button=80,drawer=80 "
                        "(a bare N counts for the tasks not named: 80,push=200)")
    q.add_argument("--out", required=True, help="dataset folder (LeRobot v3.0)")
    q.add_argument("--image-size", type=int, default=64)
    q.add_argument("--camera", default="corner4",
                   help="a MetaWorld camera (corner, corner2, corner3, corner4, topview, gripperPOV, behindGripper) "
                        "or one of ours (corner4_zoom, corner4_close)")
    q.add_argument("--workers", type=int, default=1, help="parallel collection processes")
    q.add_argument("--seed", type=int, default=0, help="shifts the training layouts and seeds the noise")
    q.add_argument("--max-steps", type=int, default=500)
    q.add_argument("--action-noise", type=float, default=0.0,
                   help="std of noise on the executed dx, dy, dz (labels stay the expert's)")
    q.add_argument("--gripper", default="binary", choices=["binary", "continuous"],
                   help="binary: snap the experts' grip to -1/+1 as the metaworld_sawyer schema does")
    q.add_argument("--overwrite", action="store_true")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_collect_metaworld)


def cmd_collect_metaworld(args: argparse.Namespace) -> dict[str, Any]:
    from ..config import ConfigError
    from ..envs.metaworld import MetaWorldError, collect, episode_counts, parse_tasks

    try:
        n = sum(episode_counts(parse_tasks(args.tasks), args.episodes).values())
        r = collect(args.tasks, args.episodes, args.out, image_size=args.image_size, camera=args.camera,
                    seed=args.seed, workers=args.workers, max_steps=args.max_steps, action_noise=args.action_noise,
                    gripper=args.gripper, overwrite=args.overwrite,
                    progress=progress_bar(n, "collect metaworld"))
    except (MetaWorldError, FileExistsError) as e:
        raise ConfigError(str(e)) from e

    def human(r):
        timing = (f"{r['frames_per_s']:.0f} frames/s; env step {r['ms_per_env_step']:.1f} ms, "
                  f"render {r['ms_per_render']:.1f} ms")
        tasks = [f"  {t:<28} kept {s['kept']:>3}  expert success {s['successes']}/{s['attempts']} "
                 f"= {s['expert_success_rate']:.0%}  mean length {s['mean_length'] or 0:.0f}"
                 for t, s in r["tasks"].items()]
        return _collected(r, timing, tasks, "")

    emit(args, r, human)
    return r


# ------------------------------------------------------------------------------------------ libero
def register_libero(csub: Subparsers) -> None:
    """`dit4dit collect libero` (needs the `libero` extra)."""
    q = csub.add_parser("libero", help="LIBERO scripted experts (privileged object poses) into the public "
                                       "LIBERO LeRobot layout (needs `pip install -e '.[libero]'`)")
    q.add_argument("--suite", required=True, help="libero_object | libero_spatial | libero_goal | ...")
    q.add_argument("--tasks", default=None, help="task ids, e.g. 0,3,5-7 (default: every task of the suite)")
    q.add_argument("--episodes", type=int, required=True, help="successful episodes per task")
    q.add_argument("--out", required=True, help="dataset folder (LeRobot v3.0)")
    q.add_argument("--image-size", type=int, default=128, help="render size of both cameras (public data: 256)")
    q.add_argument("--seed", type=int, default=0, help="seeds the placements and the experts' jitter")
    q.add_argument("--max-steps", type=int, default=None, help="per episode (default: the suite's eval limit)")
    q.add_argument("--max-attempts", type=int, default=None, help="per task (default 2 * episodes + 5)")
    q.add_argument("--action-noise", type=float, default=0.0,
                   help="std of noise on the executed translation (labels stay the expert's)")
    q.add_argument("--measure-only", action="store_true",
                   help="only measure the experts' success per task (no rendering, no dataset; --episodes = "
                        "attempts per task, --out = a JSON file)")
    q.add_argument("--overwrite", action="store_true")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_collect_libero)


def cmd_collect_libero(args: argparse.Namespace) -> dict[str, Any]:
    from ..config import ConfigError
    from ..envs.libero import LiberoError, LiberoNotInstalled, collect, measure_expert

    if args.measure_only:
        try:
            r = measure_expert(args.suite, args.episodes, tasks=args.tasks, seed=args.seed, max_steps=args.max_steps,
                               action_noise=args.action_noise, out=args.out,
                               log=log)
        except (LiberoError, LiberoNotInstalled, ValueError) as e:
            raise ConfigError(str(e)) from e
        write_result(args.out, r)

        def measured(r):
            lines = [f"{r['suite']}: expert success {r['expert_success_rate'] or 0:.1%} "
                     f"[{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] over {len(r['tasks'])} supported tasks"]
            lines += [f"  {t['task_id']:>2} {t['successes']}/{t['attempts']} [{t['ci95'][0]:.2f}, {t['ci95'][1]:.2f}] "
                      f"{t['instruction']}" for t in r["tasks"].values()]
            lines += [f"  {k:>2} unsupported: {v}" for k, v in r["unsupported"].items()]
            return "\n".join(lines)

        emit(args, r, measured)
        return r
    try:
        r = collect(args.suite, args.episodes, args.out, tasks=args.tasks, image_size=args.image_size,
                    seed=args.seed, max_steps=args.max_steps, max_attempts=args.max_attempts,
                    action_noise=args.action_noise, overwrite=args.overwrite,
                    progress=lambda d, n: log(f"collect libero: {d}/{n} episodes"),
                    log=log)
    except (LiberoError, LiberoNotInstalled, FileExistsError, ValueError) as e:
        raise ConfigError(str(e)) from e

    def human(r):
        tasks = [f"  {t['task_id']:>2} kept {t['kept']:>3}  expert success {t['successes']}/{t['attempts']} "
                 f"= {t['expert_success_rate']:.0%} [{t['ci95'][0]:.2f}, {t['ci95'][1]:.2f}]  {t['instruction']}"
                 for t in r["tasks"].values()]
        return _collected(r, f"env step {r['ms_per_env_step']:.0f} ms with rendering", tasks, "tasks ")

    emit(args, r, human)
    return r


SUITES: tuple[Callable[[Subparsers], None], ...] = (register_toy, register_metaworld, register_libero)
"""The task suites of `dit4dit collect`, in help order; each adds its parser to the `collect` table."""


def register(sub: Subparsers) -> None:
    csub = get_collect_subparsers(sub)
    for register_suite in SUITES:
        register_suite(csub)
