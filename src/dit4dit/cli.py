"""The `dit4dit` command. Each subcommand prints `--help`, shows progress on long work on stderr,
and with `--json` prints one machine-readable JSON document on stdout."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable

COMMANDS: dict[str, Callable[[argparse.Namespace], Any]] = {}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _emit(args: argparse.Namespace, result: Any, human: Callable[[Any], str] | None = None) -> None:
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2, default=str))
    elif human is not None:
        print(human(result))
    else:
        print(json.dumps(result, indent=2, default=str))


def _set_threads(n: int | None) -> None:
    import torch

    if n is None:
        # Few cores: one thread per core, and tiny matmuls are far faster on fewer threads.
        n = max(1, min(os.cpu_count() or 1, torch.get_num_threads()))
    torch.set_num_threads(n)


def _common(p: argparse.ArgumentParser, preset: bool = True) -> None:
    if preset:
        from .config import preset_names

        p.add_argument("--preset", default="tiny", help=f"named config: {', '.join(preset_names())}")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set action.num_layers=8 (repeatable)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")


# --------------------------------------------------------------------------------------------- info
def cmd_info(args: argparse.Namespace) -> dict[str, Any]:
    from .config import get_preset
    from .models.dit4dit import parameter_counts

    cfg = get_preset(args.preset, args.overrides)
    backbone = None
    if getattr(args, "backbone", None):
        from .models.backbone import Backbone

        backbone = Backbone.open(args.backbone)
        backbone.check_config(cfg, ["transformer"])
    counts = parameter_counts(cfg)
    result = {"preset": cfg.name, "parameters": counts, "config": cfg.to_dict()}
    if backbone is not None:
        result["backbone"] = backbone.describe()
    if getattr(args, "train", False):
        from .train.memory import estimate_training_memory

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
            from .train.memory import format_estimate

            lines.append(format_estimate(r["memory"]))
        return "\n".join(lines)

    _emit(args, result, human)
    return result


# --------------------------------------------------------------------------------------------- bench
def cmd_bench_inference(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from .bench.inference import bench_inference
    from .config import get_preset
    from .models.dit4dit import DiT4DiT

    _set_threads(args.threads)
    cfg = get_preset(args.preset, args.overrides)
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    _log(f"building {cfg.name} (random weights) on {device} in {args.dtype} ...")
    torch.manual_seed(args.seed)
    model = DiT4DiT.from_config(cfg, backbone=args.backbone, video_dtype=dtype, random_weights=args.backbone is None,
                                load_text_encoder=cfg.text.kind == "tiny" or args.backbone is not None)
    if model.text_encoder is None:
        # No text-encoder weights available: both paths take one fixed embedding, so the naive
        # path's extra text-encoder cost is not counted (the reported speed-up is a lower bound).
        emb = torch.randn(1, cfg.text.max_length, cfg.video.text_input_dim)
        model.remember_text_embedding("pick up the red block and place it in the bowl", emb[0])
    model.to(device)
    plain, plain_autocast = None, None
    if dtype != torch.float32 and args.plain_weights == "float32" and model.video_dit is not None:
        # The plain path as the reference runs it: float32 weights under bf16 autocast.
        from .bench.inference import plain_copy

        plain, plain_autocast = plain_copy(model), dtype
    if args.compile:
        # Only our path is compiled; the naive path stays eager (the warm-up absorbs compilation).
        model.compile_for_inference(mode=None if args.compile == "default" else args.compile)
    result = bench_inference(model, batch=args.batch, warmup=args.warmup, iters=args.iters, seed=args.seed,
                             progress=_log, plain_model=plain, plain_autocast=plain_autocast)
    result["compiled"] = args.compile or "no"
    from .commands import write_result

    write_result(args.out, result)

    def human(r):
        naive = (f", naive {r['naive']['median_ms']:.1f} ms, speed-up x{r['speedup_median']:.2f}" if r["naive"]
                 else f" ({r['encoder']}: no naive path)")
        return (f"{r['preset']} on {r['device']} ({r['precision']}): ours {r['ours']['median_ms']:.1f} ms "
                f"({r['ours']['hz']:.1f} Hz){naive}; breakdown {r['breakdown_ms']}")

    _emit(args, result, human)
    return result


# --------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dit4dit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="parameter counts of a preset (meta device, nothing allocated); with "
                                    "--train, the estimated training memory")
    _common(p)
    p.add_argument("--backbone", default=None, help="local Cosmos-Predict2.5 folder: validated, hashed, configs "
                                                    "compared with the preset (no weight is loaded)")
    p.add_argument("--train", action="store_true", help="estimate the GPU memory of training (docs/memory.md)")
    p.add_argument("--batch", type=int, default=None, help="per-GPU batch for --train (default train.batch_size)")
    p.add_argument("--gpu-memory", type=float, default=80.0, metavar="GB", help="GPU memory to compare with (GiB)")
    p.add_argument("--text-encoder", default="cached", choices=["cached", "loaded"],
                   help="count the frozen text encoder's weights (loaded) or not (embeddings cached)")
    p.add_argument("--latents-cached", action="store_true", help="the VAE latents come from a latent cache")
    p.set_defaults(func=cmd_info)

    bench = sub.add_parser("bench", help="benchmarks that write JSON")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    p = bsub.add_parser("inference", help="policy-step latency: ours vs the naive path, side by side")
    _common(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--backbone", default=None, help="local Cosmos-Predict2.5 diffusers folder (optional)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", nargs="?", const="default", default=None,
                   choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile our feature pass and action DiT (reduce-overhead: CUDA graphs on GPU)")
    p.add_argument("--plain-weights", default="float32", choices=["float32", "same"],
                   help="with --dtype bfloat16: the naive path runs a float32-weight copy under bf16 autocast "
                        "(float32, as the reference) or the same bf16 model (same)")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    p.set_defaults(func=cmd_bench_inference)

    for register in _extra_registrations():
        register(sub)
    return parser


def _extra_registrations() -> list[Callable[[argparse._SubParsersAction], None]]:
    from . import commands

    return commands.REGISTRATIONS


def _user_errors() -> tuple[type[BaseException], ...]:
    from .config import ConfigError
    from .data.frame_cache import FrameCacheError
    from .data.normalize import NormalizationError
    from .data.processor import ProcessorError
    from .data.schema import SchemaError
    from .data.video import DatasetError
    from .train.checkpoint import CheckpointError

    return (ConfigError, DatasetError, SchemaError, ProcessorError, NormalizationError, FrameCacheError,
            CheckpointError, FileNotFoundError, FileExistsError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except _user_errors() as e:
        # Bad input (config, dataset, schema, checkpoint, backbone, ...): the message names what is
        # wrong and where; a traceback adds nothing. DIT4DIT_DEBUG=1 shows it anyway.
        if os.environ.get("DIT4DIT_DEBUG"):
            raise
        _log(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        _log("interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
