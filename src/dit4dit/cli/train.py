"""`dit4dit train`: train (or resume) a model on a local LeRobot dataset, optionally with action-free video."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from .common import Subparsers, set_threads_if_given
from .output import emit


def register(sub: Subparsers) -> None:
    from ..config import preset_names

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
    p.set_defaults(func=cmd_train)


def train_data_overrides(args: argparse.Namespace) -> list[str]:
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


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from ..config import get_preset
    from ..train.trainer import Trainer

    set_threads_if_given(args.threads)
    cfg = get_preset(args.preset, list(args.overrides) + train_data_overrides(args))
    trainer = Trainer(cfg, args.dataset, args.out, backbone=args.backbone, resume=args.resume, progress=True,
                      device=args.device, text_cache_dir=args.text_cache, frame_cache=args.frame_cache,
                      latent_cache=args.latent_cache)
    if cfg.train.eval_every > 0:
        from ..eval.hooks import closed_loop_eval_fn

        trainer.eval_fn = closed_loop_eval_fn(cfg.schema, lambda: trainer.processor, args.eval_episodes,
                                              args.replan_every, [t for t in args.eval_tasks.split(",") if t])
    r = {k: v for k, v in trainer.run().items() if k != "losses"}
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return r
    emit(args, r, lambda r: f"trained to step {r.get('step')} (final loss {r.get('final_loss')}); "
                            f"checkpoint {r.get('checkpoint')}")
    return r

