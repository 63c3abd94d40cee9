"""`dit4dit cache-frames`: decode every frame once into a frame cache at the training resolution."""

from __future__ import annotations

import argparse
from typing import Any

from .common import Subparsers
from .output import emit


def register(sub: Subparsers) -> None:
    p = sub.add_parser("cache-frames", help="decode every frame once into a frame cache at the training resolution")
    p.add_argument("dataset")
    p.add_argument("--schema", required=True)
    p.add_argument("--image-size", type=int, nargs="+", default=[224], metavar=("H", "W"),
                   help="H W of the combined image, or N for an N x N cell per camera (default 224)")
    p.add_argument("--out", default=None, help="cache directory (default <dataset>/.dit4dit_cache/frames-<fp>)")
    p.add_argument("--force", action="store_true", help="rebuild even when an up-to-date cache exists")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cache_frames)


def cmd_cache_frames(args: argparse.Namespace) -> dict[str, Any]:
    from ..data.inspect import cache_frames

    if len(args.image_size) not in (1, 2):
        raise SystemExit("--image-size takes H W (or one N)")
    size = args.image_size[0] if len(args.image_size) == 1 else tuple(args.image_size)
    r = cache_frames(args.dataset, args.schema, size, out_dir=args.out, force=args.force)
    emit(args, r, lambda r: f"{r['frames']} frames at {r['image_size'][0]}x{r['image_size'][1]} "
                            f"({r['bytes'] / 2**30:.2f} GiB) in {r['cache']}")
    return r

