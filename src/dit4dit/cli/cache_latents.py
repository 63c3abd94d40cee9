"""`dit4dit cache-latents`: precompute the VAE latents of every training clip."""

from __future__ import annotations

import argparse
from typing import Any

from .common import Subparsers, set_threads_if_given
from .output import emit


def register(sub: Subparsers) -> None:
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
    p.set_defaults(func=cmd_cache_latents)


def cmd_cache_latents(args: argparse.Namespace) -> dict[str, Any]:
    import time

    from ..config import get_preset
    from ..data.latent_cache import build_latent_cache, cache_samples, open_latent_cache
    from ..models.backbone import Backbone, codec_identity
    from ..models.codecs import build_codec

    set_threads_if_given(args.threads)
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
    emit(args, r, lambda r: f"{r['samples']} clip latents {tuple(r['latent_shape'])} ({r['bytes'] / 2**30:.2f} GiB, "
                            f"{r['dtype']}) in {r['cache']} ({r['seconds']:.0f} s); train with {r['train_flag']}")
    return r

