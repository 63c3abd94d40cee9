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
the server log), ``server_busy`` (the in-flight budget's queue is full, below). A message over ``max_size`` bytes makes websockets close *that* connection
with code 1009 ("message too big", the reason names the limit) before the bytes are buffered.

Inference runs on one worker thread (the model is not re-entrant), and decoding runs on a small
pool of other threads (bounded by :class:`~dit4dit.serve.msgpack_numpy.DecodeLimits`: container
counts and lengths, so one message costs at most about twice its bytes), so the event loop keeps
answering pings, health checks and other clients while a request is decoded or computed, whatever
arrives; concurrent requests queue in arrival order. Error messages and log lines are bounded
(:data:`~dit4dit.data.validation.MAX_ERROR_CHARS`): they summarise a bad input (shape, dtype,
size, a few entries), never echo it.

In-flight budget. ``max_inflight_bytes`` (default 256 MiB) bounds the sum, over all
connections, of the requests between receipt and reply. Each request counts as
:data:`INFLIGHT_BYTES_PER_MESSAGE_BYTE` (2) times its message's bytes: the message plus its decoded
copy. It is counted from its admission (as soon as its message is received, or after waiting)
until its reply (or error frame) is built, not while the reply is sent, so a client that does not
read its replies holds none. A request that does not fit waits before it is decoded, in arrival
order. Only its connection waits:
that handler stops reading, so websockets stops reading the socket once its buffer is full and TCP
pushes back on that client, while the event loop and the other clients go on. A connection that
closes while its request waits leaves the queue, and the request is never computed. A request
larger than the whole budget is admitted alone, once nothing else is in flight (it never waits
forever; while it runs, the sum is that one request). The queue is bounded the same way: the
received messages of the waiting requests sum to at most ``max_inflight_bytes`` (or it holds one
request); a request that finds it full is answered with a ``server_busy`` error frame at once and
dropped, and its connection stays open. websockets stops reading a connection's socket as soon
as one frame waits beyond the message its handler holds (:data:`WS_MAX_QUEUE`).
``stats["inflight_waits"]`` counts the requests that waited, ``stats["busy_refused"]`` those
refused, ``stats["inflight_peak_bytes"]`` is the largest sum reached.

Idle and slow clients. A connection that sends no complete message for ``idle_timeout`` seconds
(a client that is idle, or one that sends its message too slowly) is closed with code 1001; a
reply the client does not read within ``idle_timeout`` closes it too. When all ``max_clients``
slots are taken, a new client takes the slot of the connection idle the longest, if that one has
been idle for at least ``evict_idle_after`` seconds (it is closed with code 1013, "try again
later"); otherwise the upgrade gets 503. One address may hold at most ``max_clients_per_host``
connections (503 beyond). ``GET /healthz`` answers ``200 OK`` (no token needed). With a
token, the websocket upgrade needs ``Authorization: Bearer <token>`` (``Api-Key <token>``, what
openpi-client sends, is accepted too) or ``?token=<token>``; anything else gets HTTP 401 before
the upgrade. Nothing here uses pickle.
"""

from __future__ import annotations

import asyncio
import collections
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
import traceback
from http import HTTPStatus
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import parse_qs, urlsplit

import numpy as np

from .. import __version__
from ..data.validation import MAX_ERROR_CHARS, clip_text
from ..filehash import file_sha256
from ..jsonio import to_jsonable
from ..policy import CheckpointSource, Policy
from .msgpack_numpy import DecodeLimits, WireFormatError, packb, unpackb

log = logging.getLogger("dit4dit.serve")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_SIZE = 16 * 2**20  # bytes per incoming message
DEFAULT_IDLE_TIMEOUT = 600.0  # seconds without a complete message before a connection is closed
DEFAULT_EVICT_IDLE_AFTER = 10.0  # when full: a connection idle this long gives its slot to a new client
DEFAULT_MAX_CLIENTS_PER_HOST = 16
MIN_TOKEN_CHARS = 16  # shorter tokens are accepted with a warning
DEFAULT_MAX_INFLIGHT_BYTES = 256 * 2**20  # sum over all connections of the requests between receipt and reply
# What one request holds, per byte of its message: the received message plus its decoded copy.
# DecodeLimits bounds a decode to about twice the message's bytes (arrays are copied out of the
# message; the rest is at most max_items small objects, not counted here), and the message is
# dropped once decoded, so 2 is the peak while decoding and an overestimate while the request
# waits for the inference thread. The model's own working memory is not counted: inference runs
# on one thread, so it is needed for one request at a time, whatever the number of connections.
INFLIGHT_BYTES_PER_MESSAGE_BYTE = 2
DECODE_WORKERS = 2
HEALTH_PATH = "/healthz"
PROTOCOL_VERSION = 1
WIRE_FORMAT = "openpi-msgpack-numpy"
TOKEN_ENV = "DIT4DIT_SERVE_TOKEN"

ERROR_TYPES = ("bad_message", "malformed_msgpack", "bad_observation", "non_finite_actions", "inference_failed",
               "server_busy")
# websockets' high-water mark for the frames it has read and the handler has not taken: 0 = stop
# reading a connection's socket as soon as one frame waits (the handler takes one message at a time)
WS_MAX_QUEUE = 0


class NonFiniteActions(RuntimeError):
    pass


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _peer_host(connection: Any) -> str:
    addr = getattr(connection, "remote_address", None)
    if isinstance(addr, (tuple, list)) and addr:
        return str(addr[0])
    return str(addr)


def error_payload(kind: str, message: str, request: int | None = None) -> str:
    """The JSON text of an error frame (the message cut to :data:`MAX_ERROR_CHARS`)."""
    return json.dumps({"error": {"type": kind, "message": clip_text(message, MAX_ERROR_CHARS), "request": request}})


class _Conn:
    """One open connection: its websocket, peer host and when it last completed a request."""

    __slots__ = ("ws", "host", "last_active", "busy", "evicted")

    def __init__(self, ws: Any, host: str) -> None:
        self.ws = ws
        self.host = host
        self.last_active = time.monotonic()
        self.busy = False
        self.evicted = False


class _ByteBudget:
    """A byte budget shared by the connections of one server, granted in arrival order.

    Every method runs on the server's event loop (no locks). ``limit=None``: everything fits (the
    sum is still counted). A request larger than ``limit`` fits when nothing else is held. The
    queue is bounded too: the bytes its requests hold while they wait (``held``, their received
    messages) sum to at most ``limit``, or the queue holds one request."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self.queued_bytes = 0  # the sum of `held` over the queue
        self._queue: collections.deque[tuple[int, asyncio.Future[None], int]] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def may_wait(self, held: int) -> bool:
        """Whether a request holding ``held`` bytes while it waits may join the queue."""
        return self.limit is None or not self._queue or self.queued_bytes + held <= self.limit

    def _fits(self, n: int) -> bool:
        return self.limit is None or self.used == 0 or self.used + n <= self.limit

    def _take(self, n: int) -> None:
        self.used += n
        self.peak = max(self.peak, self.used)

    def try_acquire(self, n: int) -> bool:
        """Take ``n`` bytes now if nobody waits and they fit."""
        if self._queue or not self._fits(n):
            return False
        self._take(n)
        return True

    def enqueue(self, n: int, held: int) -> asyncio.Future[None]:
        """Join the queue (holding ``held`` bytes while waiting; see :meth:`may_wait`); the future
        is resolved once the ``n`` bytes are taken for the caller."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((n, fut, held))
        self.queued_bytes += held
        return fut

    def withdraw(self, fut: asyncio.Future[None], n: int) -> None:
        """Leave the queue (or give the bytes back if they were already granted)."""
        if fut.done() and not fut.cancelled():
            self.release(n)
            return
        fut.cancel()
        for i, (_, f, held) in enumerate(self._queue):
            if f is fut:
                del self._queue[i]
                self.queued_bytes -= held
                break
        self._grant()  # the request behind it may fit now

    def release(self, n: int) -> None:
        self.used -= n
        self._grant()

    def _grant(self) -> None:
        while self._queue and self._fits(self._queue[0][0]):
            n, fut, held = self._queue.popleft()
            self.queued_bytes -= held
            if fut.done():  # cancelled
                continue
            self._take(n)
            fut.set_result(None)


class _BadRequest(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


# --------------------------------------------------------------------------------------------
# metadata
# --------------------------------------------------------------------------------------------


def policy_metadata(policy: Any, extra: Mapping[str, Any] | None = None, *, max_size: int | None = None,
                    auth: bool = False, max_inflight_bytes: int | None = None) -> dict[str, Any]:
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
        "max_inflight_bytes": max_inflight_bytes,
        "auth": "token" if auth else None,
        "observation_keys": _observation_keys(meta),
    })
    meta.setdefault("model_version", "unknown")
    if extra:
        meta.update(extra)
    return to_jsonable(meta)


def _observation_keys(meta: Mapping[str, Any]) -> list[str]:
    keys = list(meta.get("cameras") or [])
    for sk in meta.get("state_keys") or []:
        k = str(sk).split("[", 1)[0]
        if k not in keys:
            keys.append(k)
    keys.append("prompt")
    return keys


def weights_fingerprint(path: str | os.PathLike, full: bool = True) -> str:
    """The identity of a weight file: the first 16 hex digits of the sha256 of its content
    (``full=False``: a cheap stand-in, the sha256 of its size, first and last MiB)."""
    p = Path(path)
    if full:
        return file_sha256(p)[:16]
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
    secret for the upgrade (None = no authentication; an empty string is refused). ``max_size``:
    largest accepted incoming message in bytes. ``max_clients``: concurrent connections beyond
    which upgrades get 503 (after evicting a connection idle for ``evict_idle_after`` seconds, if
    any). ``max_clients_per_host``: connections one peer address may hold. ``idle_timeout``:
    seconds a connection may go without sending a complete message (or without reading a reply)
    before it is closed (None: never). ``decode_limits``: bounds on one decoded message.
    ``max_inflight_bytes``: bound on the sum of the requests between receipt and reply over all
    connections, each counted as :data:`INFLIGHT_BYTES_PER_MESSAGE_BYTE` times its message's
    bytes (None: no bound); see the module docstring.
    """

    def __init__(self, policy: Any, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *,
                 token: str | None = None, max_size: int | None = DEFAULT_MAX_SIZE, max_clients: int = 64,
                 metadata: Mapping[str, Any] | None = None, ping_interval: float | None = 20.0,
                 ping_timeout: float | None = 20.0, check_finite: bool = True,
                 idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
                 evict_idle_after: float | None = DEFAULT_EVICT_IDLE_AFTER,
                 max_clients_per_host: int | None = DEFAULT_MAX_CLIENTS_PER_HOST,
                 decode_limits: DecodeLimits | None = None,
                 max_inflight_bytes: int | None = DEFAULT_MAX_INFLIGHT_BYTES) -> None:
        if max_inflight_bytes is not None and int(max_inflight_bytes) <= 0:
            raise ValueError(f"max_inflight_bytes must be positive (or None for no bound), got {max_inflight_bytes}")
        if token is not None and (not isinstance(token, str) or not token.strip()):
            raise ValueError("the token is empty: give a non-empty secret, or no token at all (None) to serve "
                             "without authentication")
        self.policy = policy
        self.host = host
        self.port = int(port)
        self.token = token
        self.max_size = max_size
        self.max_clients = int(max_clients)
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.check_finite = check_finite
        self.idle_timeout = idle_timeout
        self.evict_idle_after = evict_idle_after
        self.max_clients_per_host = max_clients_per_host
        self.decode_limits = decode_limits or DecodeLimits()
        self.max_inflight_bytes = None if max_inflight_bytes is None else int(max_inflight_bytes)
        self._budget = _ByteBudget(self.max_inflight_bytes)
        self._conns: dict[int, _Conn] = {}
        # imported here, not in the handler: a first import (torch) must never stall the event loop
        from ..data.processor import ProcessorError

        self._processor_error = ProcessorError
        self.metadata = policy_metadata(policy, metadata, max_size=max_size, auth=token is not None,
                                        max_inflight_bytes=self.max_inflight_bytes)
        self.metadata["idle_timeout_s"] = idle_timeout
        self._metadata_bytes = packb(self.metadata)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._decoder: concurrent.futures.ThreadPoolExecutor | None = None
        self._ids = itertools.count(1)
        self.active_clients = 0
        self.stats = {"connections": 0, "requests": 0, "errors": 0, "rejected_upgrades": 0, "idle_closed": 0,
                      "evicted": 0, "inflight_waits": 0, "inflight_peak_bytes": 0, "busy_refused": 0}
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        if not _is_loopback(host) and token is None:
            log.warning("serving on %s without a token: anyone who can reach this port can drive the robot "
                        "(set --token or %s)", host, TOKEN_ENV)
        if self.max_inflight_bytes is not None and max_size is not None and \
                INFLIGHT_BYTES_PER_MESSAGE_BYTE * max_size > self.max_inflight_bytes:
            log.warning("max_inflight_bytes (%d) is below %d x max_size (%d): a request over %d bytes is computed "
                        "only when nothing else is in flight", self.max_inflight_bytes,
                        INFLIGHT_BYTES_PER_MESSAGE_BYTE, max_size,
                        self.max_inflight_bytes // INFLIGHT_BYTES_PER_MESSAGE_BYTE)
        if token is not None and len(token) < MIN_TOKEN_CHARS:
            log.warning("the token is only %d characters long; use at least %d random characters (e.g. "
                        "`python -c 'import secrets; print(secrets.token_urlsafe(24))'`)", len(token), MIN_TOKEN_CHARS)

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
        peer = _peer_host(connection)
        if self.max_clients_per_host is not None and \
                sum(1 for c in self._conns.values() if c.host == peer) >= self.max_clients_per_host:
            self.stats["rejected_upgrades"] += 1
            log.warning("rejected connection from %s: it already holds %d connections", peer,
                        self.max_clients_per_host)
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, f"503: this address already holds "
                                      f"{self.max_clients_per_host} connections\n")
        if len(self._conns) >= self.max_clients and not self._evict_idlest():
            self.stats["rejected_upgrades"] += 1
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE,
                                      f"503: the server already has {self.max_clients} clients\n")
        return None

    def _evict_idlest(self) -> bool:
        """Close the connection idle the longest, if idle for ``evict_idle_after`` s; True if one was."""
        if self.evict_idle_after is None:
            return False
        now = time.monotonic()
        idle = [(now - c.last_active, cid, c) for cid, c in self._conns.items() if not c.busy and not c.evicted]
        if not idle:
            return False
        age, cid, conn = max(idle, key=lambda x: x[0])
        if age < self.evict_idle_after:
            return False
        conn.evicted = True
        self._conns.pop(cid, None)
        self.stats["evicted"] += 1
        log.info("client %d: closed after %.0f s idle to free a slot for a new client", cid, age)
        asyncio.ensure_future(conn.ws.close(1013, f"idle for {age:.0f} s; the slot was given to a new client"))
        return True

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

    async def _send(self, ws: Any, data: Any) -> None:
        """Send one frame; a client that does not read it within ``idle_timeout`` is cut off."""
        if self.idle_timeout is None:
            await ws.send(data)
        else:
            await asyncio.wait_for(ws.send(data), self.idle_timeout)

    def _error(self, cid: int, kind: str, message: str, request: int | None) -> str:
        """Count and log an error; the text of its error frame."""
        self.stats["errors"] += 1
        message = clip_text(message, MAX_ERROR_CHARS)
        log.info("client %d request %s: %s: %s", cid, request, kind, clip_text(message, 300))
        return error_payload(kind, message, request)

    @property
    def inflight_bytes(self) -> int:
        """The in-flight budget in use now (bytes, as counted against ``max_inflight_bytes``)."""
        return self._budget.used

    @staticmethod
    def _request_cost(msg: bytes | str) -> int:
        return INFLIGHT_BYTES_PER_MESSAGE_BYTE * len(msg)

    async def _admit(self, ws: Any, cid: int, request: int, cost: int, held: int) -> str:
        """Take ``cost`` bytes of the in-flight budget, waiting in arrival order if they do not fit
        (only this connection waits; its message, ``held`` bytes, waits with it). ``"admitted"``;
        ``"busy"`` (nothing taken) if the queue is full (:meth:`_ByteBudget.may_wait`);
        ``"closed"`` (nothing taken) if the connection closed while waiting."""
        budget = self._budget
        if not budget.try_acquire(cost):
            if not budget.may_wait(held):
                self.stats["busy_refused"] += 1
                return "busy"
            self.stats["inflight_waits"] += 1
            log.debug("client %d request %d: waits for %d bytes of the in-flight budget (%d of %s in use)", cid,
                      request, cost, budget.used, budget.limit)
            granted = budget.enqueue(cost, held)
            closed = asyncio.ensure_future(ws.wait_closed())
            admitted = False
            try:
                await asyncio.wait((granted, closed), return_when=asyncio.FIRST_COMPLETED)
                admitted = granted.done() and not closed.done()
            finally:
                closed.cancel()
                if not admitted:  # closed, or this task was cancelled: leave the queue, give back a grant
                    budget.withdraw(granted, cost)
            if not admitted:
                return "closed"
        self.stats["inflight_peak_bytes"] = budget.peak
        return "admitted"

    async def _answer(self, cid: int, n: int, box: list[bytes | str], t0: float, ta: float,
                      prev_total_ms: float | None) -> tuple[bytes | str, bool]:
        """The reply to one admitted request: (packed result, True) or (error frame text, False).
        ``box`` holds the message and is emptied, so the message is freed once decoded. ``t0``: when
        the message was received, ``ta``: when it was admitted to the in-flight budget."""
        ProcessorError = self._processor_error
        loop = asyncio.get_running_loop()
        msg = box.pop()
        if isinstance(msg, str):
            return self._error(cid, "bad_message", "expected one binary msgpack message holding the observation "
                               f"dict, got a text frame ({len(msg)} characters)", n), False
        try:
            obs = await loop.run_in_executor(self._decoder, self._decode, msg)
        except _BadRequest as e:
            return self._error(cid, e.kind, e.message, n), False
        finally:
            del msg
        t1 = time.perf_counter()
        try:
            result, ts, te = await loop.run_in_executor(self._executor, self._infer, obs)
        except ProcessorError as e:
            return self._error(cid, "bad_observation", str(e), n), False
        except NonFiniteActions as e:
            return self._error(cid, "non_finite_actions", str(e), n), False
        except Exception as e:  # noqa: BLE001 - report, log, keep serving
            log.error("client %d request %d: inference failed:\n%s", cid, n,
                      clip_text(traceback.format_exc(), 4 * MAX_ERROR_CHARS))
            return self._error(cid, "inference_failed", f"{type(e).__name__}: {e}", n), False
        finally:
            del obs
        result["server_timing"] = {
            "budget_wait_ms": (ta - t0) * 1e3,
            "decode_ms": (t1 - ta) * 1e3,
            "queue_ms": (ts - t1) * 1e3,
            "infer_ms": (te - ts) * 1e3,
            "prev_total_ms": prev_total_ms,
        }
        try:
            return packb(result), True
        except TypeError as e:
            return self._error(cid, "inference_failed", f"cannot serialise the result: {e}", n), False

    def _decode(self, msg: bytes) -> dict[str, Any]:
        """Bytes -> observation dict, on a decode thread (never the event loop)."""
        try:
            obs = unpackb(msg, self.decode_limits)
        except WireFormatError as e:
            raise _BadRequest("malformed_msgpack", str(e)) from None
        if not isinstance(obs, dict):
            raise _BadRequest("bad_message", "the observation must be a msgpack map (dict) of key -> value, got "
                              f"{type(obs).__name__}")
        out = {}
        for k, v in obs.items():
            if isinstance(k, bytes):
                try:
                    k = k.decode("utf-8")
                except UnicodeDecodeError:
                    raise _BadRequest("bad_message", "observation keys must be UTF-8 strings; got bytes of length "
                                      f"{len(k)} that are not") from None
            if not isinstance(k, str):
                raise _BadRequest("bad_message", f"observation keys must be strings, got {type(k).__name__}")
            out[k] = v
        return out

    async def _handle(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        cid = next(self._ids)
        conn = _Conn(ws, _peer_host(ws))
        self._conns[cid] = conn
        self.active_clients = len(self._conns)
        self.stats["connections"] += 1
        log.info("client %d connected from %s (%d active)", cid, ws.remote_address, self.active_clients)
        prev_total_ms = None
        n = 0
        try:
            await self._send(ws, self._metadata_bytes)
            while True:
                try:
                    if self.idle_timeout is None:
                        msg = await ws.recv()
                    else:
                        msg = await asyncio.wait_for(ws.recv(), self.idle_timeout)
                except (asyncio.TimeoutError, TimeoutError):
                    self.stats["idle_closed"] += 1
                    log.info("client %d: no complete message for %.0f s; closing", cid, self.idle_timeout)
                    await ws.close(1001, f"idle for {self.idle_timeout:.0f} s without a complete message")
                    break
                conn.busy = True
                t0 = time.perf_counter()
                n += 1
                self.stats["requests"] += 1
                cost = self._request_cost(msg)
                box = [msg]
                del msg
                try:
                    # the budget is held from here until the reply is built, never while it is sent:
                    # a client that does not read its replies holds none
                    admission = await self._admit(ws, cid, n, cost, len(box[0]))
                    if admission == "closed":
                        log.info("client %d: closed while request %d waited for the in-flight budget", cid, n)
                        break
                    if admission == "busy":
                        box.clear()
                        b = self._budget
                        await self._send(ws, self._error(
                            cid, "server_busy", f"the server is at capacity: {b.used} bytes of requests in flight "
                            f"and {b.queued_bytes} bytes waiting (each bounded by max_inflight_bytes = {b.limit}); "
                            "the request was not computed, send it again later", n))
                        continue
                    try:
                        reply, ok = await self._answer(cid, n, box, t0, time.perf_counter(), prev_total_ms)
                    finally:
                        box.clear()
                        self._budget.release(cost)
                    await self._send(ws, reply)
                    if ok:
                        prev_total_ms = (time.perf_counter() - t0) * 1e3
                finally:
                    conn.busy = False
                    conn.last_active = time.monotonic()
        except (asyncio.TimeoutError, TimeoutError):
            self.stats["idle_closed"] += 1
            log.info("client %d: did not read a reply within %s s; closing", cid, self.idle_timeout)
            ws.transport.abort()
        except ConnectionClosed as e:
            rcvd = e.rcvd
            if rcvd is not None and rcvd.code == 1009 or (e.sent is not None and e.sent.code == 1009):
                log.warning("client %d: closed, message too big (limit %s bytes)", cid, self.max_size)
            else:
                log.info("client %d disconnected after %d requests", cid, n)
        finally:
            self._conns.pop(cid, None)
            self.active_clients = len(self._conns)

    # ---------------------------------------------------------------------------- lifecycle
    async def run(self, ready: Callable[["PolicyServer"], None] | None = None,
                  stop: asyncio.Event | None = None) -> None:
        """Serve until ``stop`` is set (or the task is cancelled)."""
        from websockets.asyncio.server import serve

        self._loop = asyncio.get_running_loop()
        self._stop = stop or asyncio.Event()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="dit4dit-infer")
        self._decoder = concurrent.futures.ThreadPoolExecutor(max_workers=DECODE_WORKERS,
                                                              thread_name_prefix="dit4dit-decode")
        logging.getLogger("websockets").setLevel(max(logging.getLogger("websockets").level, logging.WARNING))
        try:
            async with serve(self._handle, self.host, self.port, process_request=self._process_request,
                             max_size=self.max_size, max_queue=WS_MAX_QUEUE, compression=None,
                             ping_interval=self.ping_interval,
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
            self._decoder.shutdown(wait=True, cancel_futures=True)

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
                       video_dtype: Any = None, seed: int | None = 0,
                       verify_hashes: bool = True) -> tuple[Policy, dict[str, Any]]:
    """(Policy, metadata extras) from a run or checkpoint folder (:meth:`Policy.from_checkpoint`).
    The weight files are checked against their recorded content hashes unless
    ``verify_hashes=False``. The metadata names the checkpoint relative to its run
    (``checkpoints/step_000300``), never by absolute path."""
    policy = Policy.from_checkpoint(checkpoint, device=device, backbone=backbone, video_dtype=video_dtype,
                                    seed=seed, verify_hashes=verify_hashes)
    return policy, checkpoint_metadata(policy.source, device=device)


def checkpoint_metadata(source: CheckpointSource, *, device: Any = "cpu") -> dict[str, Any]:
    """The metadata a server adds for a policy loaded from a checkpoint: model version, checkpoint
    (relative to its run), step, weight file and its fingerprint, device."""
    if source.hashes_verified and source.recorded_sha256:  # verified at load: the content hash itself
        fingerprint = source.recorded_sha256[:16]
    else:
        fingerprint = weights_fingerprint(source.weights, full=source.hashes_verified)
    return {
        "model_version": source.run_name,
        "checkpoint": f"checkpoints/{source.path.name}" if source.in_run else source.path.name,
        "checkpoint_step": source.step,
        "weights": source.weights.name,
        "weights_fingerprint": fingerprint,
        "device": str(device),
    }
