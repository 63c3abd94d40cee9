"""`dit4dit serve`: the websocket policy server (msgpack + numpy, openpi-client compatible)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .common import Subparsers, serve_token, set_threads_if_given
from .output import log


def register(sub: Subparsers) -> None:
    from ..serve.server import (DEFAULT_EVICT_IDLE_AFTER, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CLIENTS_PER_HOST,
                                DEFAULT_MAX_INFLIGHT_BYTES, INFLIGHT_BYTES_PER_MESSAGE_BYTE)

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
    p.add_argument("--max-inflight-mb", type=float, default=DEFAULT_MAX_INFLIGHT_BYTES / 2**20,
                   help="bound on the requests between receipt and reply over all connections, each counted as "
                        f"{INFLIGHT_BYTES_PER_MESSAGE_BYTE} x its message size (message + decoded copy); a request "
                        "that does not fit waits, its connection unread (default %(default)s; 0 = no bound)")
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
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> Any:
    import logging

    from ..config import ConfigError
    from ..data.processor import ProcessorError
    from ..policy import TINY_RANDOM_OVERRIDES, Policy
    from ..serve.server import PolicyServer, load_served_policy
    from ..train.checkpoint import CheckpointError

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    set_threads_if_given(args.threads)
    token = serve_token(args)
    try:
        if args.checkpoint:
            import torch

            dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, None: None}[args.dtype]
            log(f"loading {args.checkpoint} on {args.device} ...")
            policy, extra = load_served_policy(args.checkpoint, backbone=args.backbone, device=args.device,
                                               video_dtype=dtype, seed=args.seed,
                                               verify_hashes=not args.skip_weight_hash)
        else:
            overrides = args.overrides or list(TINY_RANDOM_OVERRIDES)
            log(f"building a random-weight {args.preset} model for {args.random_weights} ...")
            policy = Policy.random(args.random_weights, preset=args.preset, overrides=overrides, seed=args.seed,
                                   device=args.device)
            extra = {"model_version": f"random-weights/{args.preset}/{args.random_weights}", "device": args.device}
        server = PolicyServer(policy, args.host, args.port, token=token, max_size=int(args.max_message_mb * 2**20),
                              max_clients=args.max_clients, metadata=extra,
                              max_inflight_bytes=int(args.max_inflight_mb * 2**20) or None,
                              max_clients_per_host=args.max_clients_per_host or None,
                              idle_timeout=args.idle_timeout or None, evict_idle_after=args.evict_idle_after or None)
    except (CheckpointError, ProcessorError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from e
    server.serve_forever(port_file=args.port_file)
    return server.stats

