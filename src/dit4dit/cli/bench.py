"""`dit4dit bench inference | data | train | serve`: benchmarks that print (and with --out write) JSON.

The measuring code is in :mod:`dit4dit.bench`; each benchmark here adds its parser to the `bench`
table (`BENCHMARKS`, in help order) and turns its flags into a call.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

from .common import Subparsers, add_preset_args, set_threads, set_threads_if_given, subcommand_table
from .output import emit, log, write_result


def get_bench_subparsers(sub: Subparsers) -> Subparsers:
    """The `dit4dit bench` table, created on first use; each benchmark adds its parser to it."""
    return subcommand_table(sub, "bench", help="benchmarks that write JSON", dest="bench_command")


def _report(args: argparse.Namespace, result: dict[str, Any],
            human: Callable[[dict[str, Any]], str] | None = None) -> dict[str, Any]:
    """Write ``result`` to ``--out`` (when given), print it (JSON, or ``human``'s text) and return it."""
    write_result(args.out, result)
    emit(args, result, human)
    return result


# ------------------------------------------------------------------------------------------ inference
def register_inference(bsub: Subparsers) -> None:
    p = bsub.add_parser("inference", help="policy-step latency: ours vs the naive path, side by side")
    add_preset_args(p)
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


def cmd_bench_inference(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from ..bench.inference import bench_inference
    from ..config import get_preset
    from ..models.dit4dit import DiT4DiT

    set_threads(args.threads)
    cfg = get_preset(args.preset, args.overrides)
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    log(f"building {cfg.name} (random weights) on {device} in {args.dtype} ...")
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
        from ..bench.inference import plain_copy

        plain, plain_autocast = plain_copy(model), dtype
    if args.compile:
        # Only our path is compiled; the naive path stays eager (the warm-up absorbs compilation).
        model.compile_for_inference(mode=None if args.compile == "default" else args.compile)
    result = bench_inference(model, batch=args.batch, warmup=args.warmup, iters=args.iters, seed=args.seed,
                             progress=log, plain_model=plain, plain_autocast=plain_autocast)
    result["compiled"] = args.compile or "no"

    def human(r):
        naive = (f", naive {r['naive']['median_ms']:.1f} ms, speed-up x{r['speedup_median']:.2f}" if r["naive"]
                 else f" ({r['encoder']}: no naive path)")
        return (f"{r['preset']} on {r['device']} ({r['precision']}): ours {r['ours']['median_ms']:.1f} ms "
                f"({r['ours']['hz']:.1f} Hz){naive}; breakdown {r['breakdown_ms']}")

    return _report(args, result, human)


# ------------------------------------------------------------------------------------------ data
def register_data(bsub: Subparsers) -> None:
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
    p.set_defaults(func=cmd_bench_data)


def cmd_bench_data(args: argparse.Namespace) -> dict[str, Any]:
    from ..bench.data import bench_data

    size = args.image_size[0] if len(args.image_size) == 1 else tuple(args.image_size)
    cache = True if args.frame_cache == "auto" else args.frame_cache
    r = bench_data(args.path, args.schema, size, args.batch, args.workers, args.batches, frame_cache=cache)
    return _report(args, r)


# ------------------------------------------------------------------------------------------ train
def register_train(bsub: Subparsers) -> None:
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
    q.set_defaults(func=cmd_bench_train)


def cmd_bench_train(args: argparse.Namespace) -> dict[str, Any]:
    from ..bench.train import bench_train
    from ..config import get_preset

    set_threads_if_given(args.threads)
    cfg = get_preset(args.preset, args.overrides)
    r = bench_train(cfg, device=args.device, steps=args.steps, batch=args.batch, backbone=args.backbone,
                    plain=not args.no_plain, peak=args.peak_tflops)
    return _report(args, r)


# ------------------------------------------------------------------------------------------ serve
def register_serve(bsub: Subparsers) -> None:
    p = bsub.add_parser("serve", help="policy-server round trip p50/p99 and throughput, "
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
    p.set_defaults(func=cmd_bench_serve)


def cmd_bench_serve(args: argparse.Namespace) -> dict[str, Any]:
    from ..bench.serve import bench_serve

    r = bench_serve(checkpoint=args.checkpoint, backbone=args.backbone, device=args.device, clients=args.clients,
                    requests=args.requests, warmup=args.warmup, in_process=args.in_process, schema=args.schema,
                    preset=args.preset, overrides=args.overrides, threads=args.threads, fuzz=args.fuzz,
                    fuzz_seed=args.fuzz_seed, progress=log)

    def human(r):
        if "fuzz" in r:
            return "\n".join(f"{k}: {v}" for k, v in r["summary"].items())
        return "\n".join(f"{x['clients']} client(s): p50 {x['latency_ms']['p50']:.1f} ms, p99 {x['latency_ms']['p99']:.1f} ms,"
                         f" {x['throughput_rps']:.1f} replies/s, server inference p50 {x['server_infer_ms_p50']:.1f} ms,"
                         f" errors {x['errors']}" for x in r["runs"])

    return _report(args, r, human)


BENCHMARKS: tuple[Callable[[Subparsers], None], ...] = (register_inference, register_data, register_train,
                                                         register_serve)
"""The benchmarks of `dit4dit bench`, in help order; each adds its parser to the `bench` table."""


def register(sub: Subparsers) -> None:
    bsub = get_bench_subparsers(sub)
    for register_benchmark in BENCHMARKS:
        register_benchmark(bsub)
