"""The policy server: websocket + msgpack-numpy, wire-compatible with ``openpi-client``.

Protocol (one websocket connection = one client; see docs/serving.md):

1. on connect the server sends one binary message: the metadata dict (embodiment, cameras,
   camera sizes, image size, frames, fps, action horizon/dim/names, model version, limits);
2. then, repeatedly, the client sends one binary message (the observation dict: camera keys ->
   uint8 images, the state key(s), ``prompt``) and the server answers with one binary message:
   ``{"actions": float32 (H, A) in robot units, "policy_timing": {...}, "server_timing": {...}}``.

Errors. A bad request never kills the server nor (when recoverable) the connection: the server
answers with a *text* frame holding JSON ``{"error": {"type", "message", "request"}}`` and keeps
reading. A text frame is what openpi's own server uses for errors, so an unmodified openpi client
raises ``RuntimeError("Error in inference server: ...")`` instead of mistaking the reply for
actions; :class:`dit4dit.serve.client.WebsocketClientPolicy` raises :class:`PolicyServerError`
with the type and message. Error types: ``bad_message`` (text frame, not a map, wrong types),
``malformed_msgpack``, ``bad_observation`` (the processor's validation: missing key, wrong shape
or dtype, NaN, wrong image size or channel order), ``non_finite_actions`` (the model produced
NaN/inf: never sent to a robot), ``inference_failed`` (anything else; the traceback stays in
the server log). A message over ``max_size`` bytes makes websockets close *that* connection
with code 1009 ("message too big", the reason names the limit) before the bytes are buffered.

Inference runs on one worker thread (the model is not re-entrant), so the event loop keeps
answering pings, health checks and other clients while a request is computed; concurrent
requests queue in arrival order. ``GET /healthz`` answers ``200 OK`` (no token needed). With a
token, the websocket upgrade needs ``Authorization: Bearer <token>`` (``Api-Key <token>``, what
openpi-client sends, is accepted too) or ``?token=<token>``; anything else gets HTTP 401 before
the upgrade. Nothing here uses pickle.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import hmac
import ipaddress
import itertools
import json
import logging
import os
import threading
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import parse_qs, urlsplit

import numpy as np

from .. import __version__
from .msgpack_numpy import WireFormatError, packb, unpackb

log = logging.getLogger("dit4dit.serve")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_SIZE = 16 * 2**20  # bytes per incoming message
HEALTH_PATH = "/healthz"
PROTOCOL_VERSION = 1
WIRE_FORMAT = "openpi-msgpack-numpy"
TOKEN_ENV = "DIT4DIT_SERVE_TOKEN"

ERROR_TYPES = ("bad_message", "malformed_msgpack", "bad_observation", "non_finite_actions", "inference_failed")


class NonFiniteActions(RuntimeError):
    pass


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _jsonable(obj: Any) -> Any:
    """Plain msgpack/JSON values only (tuples -> lists, numpy -> Python)."""
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def error_payload(kind: str, message: str, request: int | None = None) -> str:
    """The JSON text of an error frame."""
    return json.dumps({"error": {"type": kind, "message": message, "request": request}})


# --------------------------------------------------------------------------------------------
# metadata
# --------------------------------------------------------------------------------------------


def policy_metadata(policy: Any, extra: Mapping[str, Any] | None = None, *, max_size: int | None = None,
                    auth: bool = False) -> dict[str, Any]:
    """The metadata dict sent on connect: the policy's evaluation protocol plus server facts."""
    meta: dict[str, Any] = dict(policy.metadata()) if hasattr(policy, "metadata") else {}
    cfg = getattr(policy, "cfg", None)
    if meta.get("action_horizon") is None and cfg is not None:
        meta["action_horizon"] = int(cfg.action.action_horizon)
    meta.setdefault("embodiment", meta.get("schema"))
    meta.update({
        "server": "dit4dit",
        "server_version": __version__,
        "protocol_version": PROTOCOL_VERSION,
        "wire_format": WIRE_FORMAT,
        "error_frames": "text-json",
        "max_message_bytes": max_size,
        "auth": "token" if auth else None,
        "observation_keys": _observation_keys(meta),
    })
    meta.setdefault("model_version", "unknown")
    if extra:
        meta.update(extra)
    return _jsonable(meta)


def _observation_keys(meta: Mapping[str, Any]) -> list[str]:
    keys = list(meta.get("cameras") or [])
    for sk in meta.get("state_keys") or []:
        k = str(sk).split("[", 1)[0]
        if k not in keys:
            keys.append(k)
    keys.append("prompt")
    return keys


def weights_fingerprint(path: str | os.PathLike) -> str:
    """A cheap identity of a safetensors file: sha256 of its header, first and last MiB and size."""
    p = Path(path)
    h = hashlib.sha256()
    size = p.stat().st_size
    h.update(str(size).encode())
    with open(p, "rb") as f:
        h.update(f.read(2**20))
        if size > 2**20:
            f.seek(max(2**20, size - 2**20))
            h.update(f.read(2**20))
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# the server
# --------------------------------------------------------------------------------------------


class PolicyServer:
    """Serve ``policy`` (anything with ``infer(obs) -> {"actions": ...}`` and ``metadata()``).

    ``port=0`` picks a free port (read it from :attr:`port` once started). ``token``: shared
    secret for the upgrade (None = no authentication). ``max_size``: largest accepted incoming
    message in bytes. ``max_clients``: concurrent connections beyond which upgrades get 503.
    """

    def __init__(self, policy: Any, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *,
                 token: str | None = None, max_size: int | None = DEFAULT_MAX_SIZE, max_clients: int = 64,
                 metadata: Mapping[str, Any] | None = None, ping_interval: float | None = 20.0,
                 ping_timeout: float | None = 20.0, check_finite: bool = True) -> None:
        if token is not None and not token:
            raise ValueError("token must be a non-empty string (or None for no authentication)")
        self.policy = policy
        self.host = host
        self.port = int(port)
        self.token = token
        self.max_size = max_size
        self.max_clients = int(max_clients)
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.check_finite = check_finite
        # imported here, not in the handler: a first import (torch) must never stall the event loop
        from ..data.processor import ProcessorError

        self._processor_error = ProcessorError
        self.metadata = policy_metadata(policy, metadata, max_size=max_size, auth=token is not None)
        self._metadata_bytes = packb(self.metadata)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._ids = itertools.count(1)
        self.active_clients = 0
        self.stats = {"connections": 0, "requests": 0, "errors": 0, "rejected_upgrades": 0}
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        if not _is_loopback(host) and token is None:
            log.warning("serving on %s without a token: anyone who can reach this port can drive the robot "
                        "(set --token or %s)", host, TOKEN_ENV)

    # ---------------------------------------------------------------------------- HTTP side
    def _authorized(self, request: Any) -> bool:
        assert self.token is not None
        want = self.token.encode()
        header = request.headers.get("Authorization")
        if header:
            scheme, _, value = header.strip().partition(" ")
            if scheme.lower() in ("bearer", "api-key", "token") and hmac.compare_digest(value.strip().encode(), want):
                return True
        for value in parse_qs(urlsplit(request.path).query).get("token", []):
            if hmac.compare_digest(value.encode(), want):
                return True
        return False

    def _process_request(self, connection: Any, request: Any) -> Any:
        path = urlsplit(request.path).path
        if path == HEALTH_PATH:
            return connection.respond(HTTPStatus.OK, "OK\n")
        if self.token is not None and not self._authorized(request):
            self.stats["rejected_upgrades"] += 1
            log.warning("rejected connection from %s: missing or wrong token", connection.remote_address)
            resp = connection.respond(HTTPStatus.UNAUTHORIZED,
                                      "401 Unauthorized: send 'Authorization: Bearer <token>' or ?token=<token>\n")
            resp.headers["WWW-Authenticate"] = 'Bearer realm="dit4dit"'
            return resp
        if self.active_clients >= self.max_clients:
            self.stats["rejected_upgrades"] += 1
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE,
                                      f"503: the server already has {self.max_clients} clients\n")
        return None

    # ---------------------------------------------------------------------------- websocket side
    def _infer(self, obs: dict[str, Any]) -> tuple[dict[str, Any], float, float]:
        t0 = time.perf_counter()
        result = self.policy.infer(obs)
        t1 = time.perf_counter()
        if not isinstance(result, Mapping) or "actions" not in result:
            raise RuntimeError(f"policy.infer returned {type(result).__name__} without 'actions'")
        result = dict(result)
        actions = np.asarray(result["actions"], dtype=np.float32)
        if self.check_finite and not np.isfinite(actions).all():
            bad = np.argwhere(~np.isfinite(actions))[0].tolist()
            raise NonFiniteActions(f"the model produced non-finite actions (first at index {bad}); "
                                   "nothing was sent to the robot")
        result["actions"] = actions
        return result, t0, t1

    async def _send_error(self, ws: Any, cid: int, kind: str, message: str, request: int | None) -> None:
        self.stats["errors"] += 1
        log.info("client %d request %s: %s: %s", cid, request, kind, message)
        await ws.send(error_payload(kind, message, request))

    async def _handle(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        ProcessorError = self._processor_error
        cid = next(self._ids)
        self.active_clients += 1
        self.stats["connections"] += 1
        log.info("client %d connected from %s (%d active)", cid, ws.remote_address, self.active_clients)
        loop = asyncio.get_running_loop()
        prev_total_ms = None
        n = 0
        try:
            await ws.send(self._metadata_bytes)
            while True:
                msg = await ws.recv()
                t0 = time.perf_counter()
                n += 1
                self.stats["requests"] += 1
                if isinstance(msg, str):
                    await self._send_error(ws, cid, "bad_message", "expected one binary msgpack message holding the "
                                           "observation dict, got a text frame", n)
                    continue
                try:
                    obs = unpackb(msg)
                except WireFormatError as e:
                    await self._send_error(ws, cid, "malformed_msgpack", str(e), n)
                    continue
                if not isinstance(obs, dict):
                    await self._send_error(ws, cid, "bad_message", "the observation must be a msgpack map (dict) of "
                                           f"key -> value, got {type(obs).__name__}", n)
                    continue
                try:
                    obs = {(k.decode("utf-8") if isinstance(k, bytes) else k): v for k, v in obs.items()}
                except UnicodeDecodeError:
                    await self._send_error(ws, cid, "bad_message", "observation keys must be UTF-8 strings", n)
                    continue
                t1 = time.perf_counter()
                try:
                    result, ts, te = await loop.run_in_executor(self._executor, self._infer, obs)
                except ProcessorError as e:
                    await self._send_error(ws, cid, "bad_observation", str(e), n)
                    continue
                except NonFiniteActions as e:
                    await self._send_error(ws, cid, "non_finite_actions", str(e), n)
                    continue
                except Exception as e:  # noqa: BLE001 - report, log, keep serving
                    log.exception("client %d request %d: inference failed", cid, n)
                    await self._send_error(ws, cid, "inference_failed", f"{type(e).__name__}: {e}", n)
                    continue
                result["server_timing"] = {
                    "decode_ms": (t1 - t0) * 1e3,
                    "queue_ms": (ts - t1) * 1e3,
                    "infer_ms": (te - ts) * 1e3,
                    "prev_total_ms": prev_total_ms,
                }
                try:
                    reply = packb(result)
                except TypeError as e:
                    await self._send_error(ws, cid, "inference_failed", f"cannot serialise the result: {e}", n)
                    continue
                await ws.send(reply)
                prev_total_ms = (time.perf_counter() - t0) * 1e3
        except ConnectionClosed as e:
            rcvd = e.rcvd
            if rcvd is not None and rcvd.code == 1009 or (e.sent is not None and e.sent.code == 1009):
                log.warning("client %d: closed, message too big (limit %s bytes)", cid, self.max_size)
            else:
                log.info("client %d disconnected after %d requests", cid, n)
        finally:
            self.active_clients -= 1

    # ---------------------------------------------------------------------------- lifecycle
    async def run(self, ready: Callable[["PolicyServer"], None] | None = None,
                  stop: asyncio.Event | None = None) -> None:
        """Serve until ``stop`` is set (or the task is cancelled)."""
        from websockets.asyncio.server import serve

        self._loop = asyncio.get_running_loop()
        self._stop = stop or asyncio.Event()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="dit4dit-infer")
        logging.getLogger("websockets").setLevel(max(logging.getLogger("websockets").level, logging.WARNING))
        try:
            async with serve(self._handle, self.host, self.port, process_request=self._process_request,
                             max_size=self.max_size, compression=None, ping_interval=self.ping_interval,
                             ping_timeout=self.ping_timeout, server_header=f"dit4dit/{__version__}") as srv:
                sock = next(iter(srv.sockets))
                self.port = int(sock.getsockname()[1])
                log.info("serving %s on ws://%s:%d (health: http://%s:%d%s)%s", self.metadata.get("model_version"),
                         self.host, self.port, self.host, self.port, HEALTH_PATH,
                         " with token authentication" if self.token else "")
                if ready is not None:
                    ready(self)
                await self._stop.wait()
        finally:
            self._executor.shutdown(wait=True, cancel_futures=True)

    def request_stop(self) -> None:
        """Thread-safe: ask :meth:`run` to return."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def serve_forever(self, port_file: str | os.PathLike | None = None) -> None:
        """Blocking: serve until SIGINT/SIGTERM (graceful: open connections are closed)."""
        import signal

        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.add_signal_handler(sig, stop.set)
                except (NotImplementedError, RuntimeError):  # pragma: no cover - non-main thread / Windows
                    pass

            def ready(srv: PolicyServer) -> None:
                if port_file:
                    p = Path(port_file)
                    tmp = p.with_name(p.name + ".tmp")
                    tmp.write_text(f"{srv.port}\n")
                    tmp.replace(p)

            await self.run(ready=ready, stop=stop)

        asyncio.run(main())
        log.info("server stopped (%s)", self.stats)

    def start_in_thread(self, timeout: float = 30.0) -> "ServerThread":
        return ServerThread(self).start(timeout)


class ServerThread:
    """Run a :class:`PolicyServer` on a background thread (tests, benchmarks, notebooks)::

        with PolicyServer(policy, port=0).start_in_thread() as st:
            client = WebsocketClientPolicy("127.0.0.1", st.port)
    """

    def __init__(self, server: PolicyServer) -> None:
        self.server = server
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="dit4dit-server", daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(self.server.run(ready=lambda s: self._ready.set()))
        except BaseException as e:  # noqa: BLE001 - surfaced by start()
            self._error = e
            self._ready.set()

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the policy server did not start within {timeout} s")
        if self._error is not None:
            raise RuntimeError(f"the policy server failed to start: {self._error}") from self._error
        return self

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def host(self) -> str:
        return self.server.host

    def stop(self, timeout: float = 10.0) -> None:
        self.server.request_stop()
        self._thread.join(timeout)

    def __enter__(self) -> "ServerThread":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# building policies to serve
# --------------------------------------------------------------------------------------------


def load_served_policy(checkpoint: str | os.PathLike, *, backbone: str | None = None, device: str = "cpu",
                       video_dtype: Any = None, seed: int | None = 0) -> tuple[Any, dict[str, Any]]:
    """(Policy, metadata extras) from a run or checkpoint folder."""
    from ..policy import Policy
    from ..train.checkpoint import EMA_FILE, MODEL_FILE, CheckpointError, load_policy, resolve_checkpoint

    ck = resolve_checkpoint(checkpoint)
    model, processor, cfg = load_policy(ck, device, backbone=backbone, video_dtype=video_dtype)
    if processor is None:
        raise CheckpointError(f"{ck}: no processor.json; a served checkpoint needs its processor (schema, "
                              "normalisation statistics, input protocol)")
    step = None
    try:
        step = int(json.loads((ck / "trainer_state.json").read_text()).get("step"))
    except Exception:  # noqa: BLE001
        pass
    weights = ck / EMA_FILE if (ck / EMA_FILE).is_file() else ck / MODEL_FILE
    extra = {
        "model_version": f"{ck.parent.parent.name}/{ck.name}" if ck.parent.name == "checkpoints" else ck.name,
        "checkpoint": str(ck),
        "checkpoint_step": step,
        "weights": weights.name,
        "weights_fingerprint": weights_fingerprint(weights),
        "device": str(device),
    }
    return Policy(model, processor, seed=seed), extra


TINY_SERVE_OVERRIDES = ("video.num_layers=2", "feature_blocks=2", "action.num_layers=2", "action.dropout=0.0")


def random_policy(schema: str = "toy_reach", *, preset: str = "tiny", overrides: tuple[str, ...] | list[str] = (),
                  seed: int = 0, camera_size: tuple[int, int] | None = None, device: str = "cpu") -> Any:
    """A policy with random weights and unit statistics (min -1, max 1) for ``schema``: for
    benchmarks, client development and tests. ``camera_size`` (H, W): the client image size
    enforced for every camera (default: the model's input size per camera cell)."""
    import torch

    from ..config import get_preset
    from ..data.normalize import Normalizer
    from ..data.processor import Processor
    from ..data.schema import get_schema
    from ..envs import toy  # noqa: F401 - registers toy_reach
    from ..models.dit4dit import DiT4DiT
    from ..policy import Policy

    cfg = get_preset(preset, [f"schema={schema}", *overrides])
    sch = get_schema(schema)
    inputs = cfg.inputs
    wanted = tuple(c.short for c in sch.cameras)
    if tuple(inputs.cameras) != wanted:
        # the preset's inputs name its own default camera: use every camera of the schema, side by side
        h, w = inputs.image_size
        layout = "single" if len(wanted) == 1 else "side_by_side"
        extra = [f"inputs.cameras={json.dumps(list(wanted))}", f"inputs.camera_layout={layout}"]
        if len(wanted) > 1 and not any(o.startswith("inputs.image_size=") for o in overrides):
            extra.append(f"inputs.image_size={json.dumps([h, w * len(wanted)])}")
        cfg = get_preset(preset, [f"schema={schema}", *extra, *overrides])
        inputs = cfg.inputs
    torch.manual_seed(seed)
    model = DiT4DiT.from_config(cfg, random_weights=True).to(device)
    unit = {"state": {"min": [-1.0] * sch.state_dim, "max": [1.0] * sch.state_dim},
            "action": {"min": [-1.0] * sch.action_dim, "max": [1.0] * sch.action_dim}}
    proc = Processor(sch, Normalizer.from_stats(unit, sch, mode="min_max"), inputs,
                     action_horizon=cfg.action.action_horizon)
    cell = proc.cell_size if camera_size is None else tuple(int(v) for v in camera_size)
    proc.camera_sizes = {k: cell for k in proc.camera_keys}
    policy = Policy(model, proc, seed=seed)
    return policy
