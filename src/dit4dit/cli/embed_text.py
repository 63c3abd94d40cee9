"""`dit4dit embed-text`: cache the frozen text encoder's embedding of every instruction."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import Subparsers
from .output import emit, progress_bar


def register(sub: Subparsers) -> None:
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
    p.set_defaults(func=cmd_embed_text)


def cmd_embed_text(args: argparse.Namespace) -> dict[str, Any]:
    from ..config import ConfigError, get_preset
    from ..models.backbone import embed_prompts

    cfg = get_preset(args.preset, args.overrides)
    prompts = list(args.prompt)
    if args.dataset:
        from ..data.lerobot import LeRobotDataset

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
    emit(args, r, lambda r: f"{r['prompts']} instructions: {r['hits']} cached already, {r['misses']} embedded "
                            f"now, in {r['cache']} ({r['seconds']:.1f} s); train/serve with {r['train_flag']}")
    return r

