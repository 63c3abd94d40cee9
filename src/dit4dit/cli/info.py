"""`dit4dit info`: parameter counts of a preset; with --train, the estimated training memory."""

from __future__ import annotations

import argparse
from typing import Any

from .common import Subparsers, add_preset_args
from .output import emit


def register(sub: Subparsers) -> None:
    p = sub.add_parser("info", help="parameter counts of a preset (meta device, nothing allocated); with "
                                    "--train, the estimated training memory")
    add_preset_args(p)
    p.add_argument("--backbone", default=None, help="local Cosmos-Predict2.5 folder: validated, hashed, configs "
                                                    "compared with the preset (no weight is loaded)")
    p.add_argument("--train", action="store_true", help="estimate the GPU memory of training (docs/memory.md)")
    p.add_argument("--batch", type=int, default=None, help="per-GPU batch for --train (default train.batch_size)")
    p.add_argument("--gpu-memory", type=float, default=80.0, metavar="GB", help="GPU memory to compare with (GiB)")
    p.add_argument("--text-encoder", default="cached", choices=["cached", "loaded"],
                   help="count the frozen text encoder's weights (loaded) or not (embeddings cached)")
    p.add_argument("--latents-cached", action="store_true", help="the VAE latents come from a latent cache")
    p.set_defaults(func=cmd_info)


def cmd_info(args: argparse.Namespace) -> dict[str, Any]:
    from ..config import get_preset
    from ..models.dit4dit import parameter_counts

    cfg = get_preset(args.preset, args.overrides)
    backbone = None
    if getattr(args, "backbone", None):
        from ..models.backbone import Backbone

        backbone = Backbone.open(args.backbone)
        backbone.check_config(cfg, ["transformer"])
    counts = parameter_counts(cfg)
    result = {"preset": cfg.name, "parameters": counts, "config": cfg.to_dict()}
    if backbone is not None:
        result["backbone"] = backbone.describe()
    if getattr(args, "train", False):
        from ..train.memory import estimate_training_memory

        result["memory"] = estimate_training_memory(
            cfg, args.batch, backbone=backbone, text_encoder_loaded=args.text_encoder == "loaded",
            latents_cached=args.latents_cached, gpu_memory_gb=args.gpu_memory)

    def human(r):
        c = r["parameters"]
        lines = [f"preset {r['preset']}"]
        for k, v in c.items():
            lines.append(f"  {k:<26} {v:>15,d}  ({v / 1e6:,.2f} M)")
        if "backbone" in r:
            lines.append(f"backbone {r['backbone']['path']} (content hash {r['backbone']['hash'][:16]})")
        if "memory" in r:
            from ..train.memory import format_estimate

            lines.append(format_estimate(r["memory"]))
        return "\n".join(lines)

    emit(args, result, human)
    return result
