"""A minimal synchronous client for the policy server (and any openpi-style websocket server).

::

    from dit4dit.serve.client import WebsocketClientPolicy

    policy = WebsocketClientPolicy("127.0.0.1", 8000, token=None)
    meta = policy.get_server_metadata()          # cameras, image sizes, action horizon, ...
    out = policy.infer({"observation/image": img, "observation/state": state, "prompt": "..."})
    chunk = out["actions"]                       # float32 (H, A), robot units

Errors the server reports (bad observation, malformed message, ...) raise
:class:`PolicyServerError` with ``.type`` and ``.message``; the connection stays usable. If the
connection is lost (server restart, message over the server's size limit), the call raises and
the next call reconnects. A server at capacity answers ``server_busy`` without computing the
request; with ``busy_retry_s`` the client sends it again (backing off from 50 ms to 1 s) until
that many seconds have passed.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Mapping
from urllib.parse import quote

import numpy as np

from .msgpack_numpy import Packer, unpackb


class PolicyServerError(RuntimeError):
    """An error the server reported, or a failed connection. ``type`` is one of the server's error
    types (``bad_observation``, ``malformed_msgpack``, ``bad_message``, ``non_finite_actions``,
    ``inference_failed``, ``server_busy``) or a client-side one (``unauthorized``, ``message_too_big``,
    ``connection_closed``, ``connection_failed``, ``bad_reply``)."""

    def __init__(self, type: str, message: str, request: int | None = None) -> None:  # noqa: A002
        super().__init__(f"{type}: {message}")
        self.type = type
        self.message = message
        self.request = request


def parse_address(address: str, default_port: int = 8000) -> tuple[str, int]:
    """``"HOST:PORT"``, ``"HOST"``, ``"[::1]:8000"`` -> (host, port)."""
    m = re.fullmatch(r"\[(?P<h6>[^\]]+)\](?::(?P<p6>\d+))?|(?P<h>[^:]+)(?::(?P<p>\d+))?", address.strip())
    if not m:
        raise ValueError(f"cannot parse server address {address!r} (expected HOST:PORT)")
    host = m.group("h6") or m.group("h")
    port = m.group("p6") or m.group("p")
    return host, int(port) if port else default_port


class WebsocketClientPolicy:
    """Connects on construction (retrying for up to ``wait_for_server`` seconds) and reads the
    server metadata. ``host`` may also be a full ``ws://`` / ``wss://`` URI (then ``port`` is
    ignored). ``timeout``: seconds to wait for each reply (None = forever). ``busy_retry_s``: how
    long :meth:`infer` keeps resending a request the server refused as ``server_busy`` (0 =
    raise at once)."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = 8000, token: str | None = None, *,
                 timeout: float | None = 120.0, open_timeout: float = 10.0, wait_for_server: float = 0.0,
                 max_size: int | None = None, busy_retry_s: float = 0.0) -> None:
        if host.startswith(("ws://", "wss://")):
            self._uri = host
        else:
            h = f"[{host}]" if ":" in host else host
            self._uri = f"ws://{h}:{port if port is not None else 8000}"
        self._token = token
        self.timeout = timeout
        self._open_timeout = open_timeout
        self._max_size = max_size
        self.busy_retry_s = float(busy_retry_s)
        self._packer = Packer()
        self._ws: Any = None
        self._metadata: dict[str, Any] = {}
        self._connect(wait_for_server)

    # ------------------------------------------------------------------------------ connection
    def _connect(self, wait: float = 0.0) -> None:
        from websockets.exceptions import InvalidHandshake, InvalidStatus
        from websockets.sync.client import connect

        headers = {"Authorization": f"Bearer {self._token}"} if self._token else None
        deadline = time.monotonic() + max(0.0, wait)
        while True:
            try:
                # proxy=None: never send loopback / robot-LAN traffic through an HTTP(S)_PROXY.
                # __enter__: the context-manager form websockets >= 17.1 asks for, valid on older ones too.
                self._ws = connect(self._uri, additional_headers=headers, compression=None, max_size=self._max_size,
                                   open_timeout=self._open_timeout, proxy=None).__enter__()
                break
            except InvalidStatus as e:
                status = e.response.status_code
                if status == 401:
                    raise PolicyServerError("unauthorized", f"{self._uri} refused the connection (HTTP 401): "
                                            "missing or wrong token") from None
                raise PolicyServerError("connection_failed", f"{self._uri} answered HTTP {status}: "
                                        f"{e.response.body.decode(errors='replace').strip()}") from None
            except (OSError, TimeoutError, InvalidHandshake) as e:
                if time.monotonic() >= deadline:
                    raise PolicyServerError("connection_failed", f"cannot connect to {self._uri}: {e}") from None
                time.sleep(0.5)
        try:
            first = self._ws.recv(timeout=self._open_timeout)
        except (TimeoutError, OSError) as e:
            self._close_quietly()
            raise PolicyServerError("bad_reply", f"{self._uri} sent no metadata message on connect ({e!r}); is it "
                                    "a dit4dit / openpi policy server?") from None
        if isinstance(first, str):
            raise PolicyServerError("bad_reply", f"expected the metadata message, got text: {first[:200]}")
        meta = unpackb(first)
        if not isinstance(meta, dict):
            raise PolicyServerError("bad_reply", f"expected a metadata dict, got {type(meta).__name__}")
        self._metadata = meta

    def _ensure_connected(self) -> None:
        from websockets.protocol import State

        if self._ws is None or self._ws.state is not State.OPEN:
            self._close_quietly()
            self._connect(0.0)

    def _close_quietly(self) -> None:
        if self._ws is not None:
            try:
                self._ws.close()
            except Exception:  # noqa: BLE001
                pass
            self._ws = None

    # ------------------------------------------------------------------------------ API
    def get_server_metadata(self) -> dict[str, Any]:
        return self._metadata

    def infer(self, obs: Mapping[str, Any]) -> dict[str, Any]:
        """Send one observation dict, return the server's reply (``actions``, timings)."""
        data = self._packer.pack(dict(obs))
        deadline = time.monotonic() + self.busy_retry_s
        pause = 0.05
        while True:
            try:
                return self._request(data)
            except PolicyServerError as e:
                if e.type != "server_busy" or time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)
            pause = min(2 * pause, 1.0)

    def _request(self, data: bytes) -> dict[str, Any]:
        """One packed observation out, its reply back (or the server's error raised)."""
        from websockets.exceptions import ConnectionClosed

        self._ensure_connected()
        try:
            self._ws.send(data)
            reply = self._ws.recv(timeout=self.timeout)
        except TimeoutError:
            self._close_quietly()  # a late reply would be taken for the next request's
            raise PolicyServerError("timeout", f"no reply from {self._uri} within {self.timeout} s") from None
        except ConnectionClosed as e:
            self._close_quietly()
            code = (e.rcvd or e.sent).code if (e.rcvd or e.sent) is not None else None
            reason = (e.rcvd or e.sent).reason if (e.rcvd or e.sent) is not None else ""
            if code == 1009:
                limit = self._metadata.get("max_message_bytes")
                raise PolicyServerError("message_too_big", f"the observation ({len(data)} bytes) exceeds the server's "
                                        f"message size limit ({limit} bytes); send smaller images. "
                                        f"Server: {reason}") from None
            raise PolicyServerError("connection_closed", f"connection to {self._uri} closed (code {code}"
                                    f"{': ' + reason if reason else ''})") from None
        if isinstance(reply, str):
            raise _error_from_text(reply)
        out = unpackb(reply)
        if not isinstance(out, dict):
            raise PolicyServerError("bad_reply", f"expected a dict, got {type(out).__name__}")
        if "error" in out and "actions" not in out:
            err = out["error"]
            raise PolicyServerError(str(err.get("type", "error")), str(err.get("message", err)))
        return out

    def reset(self) -> None:
        """Start of an episode (the server keeps no per-episode state; kept for openpi compatibility)."""

    def close(self) -> None:
        self._close_quietly()

    def __enter__(self) -> "WebsocketClientPolicy":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _error_from_text(text: str) -> PolicyServerError:
    try:
        err = json.loads(text)["error"]
        return PolicyServerError(str(err["type"]), str(err["message"]), err.get("request"))
    except (ValueError, KeyError, TypeError):
        return PolicyServerError("server_error", text)  # e.g. an openpi server's traceback


def url_with_token(host: str, port: int, token: str) -> str:
    """``ws://host:port/?token=...`` for clients that cannot set headers."""
    return f"ws://{host}:{port}/?token={quote(token)}"


def dummy_observation(metadata: Mapping[str, Any], prompt: str = "do the task", seed: int = 0) -> dict[str, Any]:
    """A well-formed random observation for the server's protocol (smoke tests, benchmarks)."""
    rng = np.random.default_rng(seed)
    obs: dict[str, Any] = {}
    sizes = metadata.get("camera_sizes") or {}
    cams = list(metadata.get("cameras") or [])
    nc = int(metadata.get("num_cond_frames") or 1)
    h, w = (metadata.get("image_size") or [224, 224])[:2]
    for cam in cams:
        ch, cw = sizes.get(cam, (h, w // max(1, len(cams))))
        shape = (ch, cw, 3) if nc == 1 else (nc, ch, cw, 3)
        obs[cam] = rng.integers(0, 256, size=shape, dtype=np.uint8)
    widths: dict[str, int] = {}
    for sk in metadata.get("state_keys") or []:
        m = re.fullmatch(r"(.+)\[(\d+):(\d+)\]", str(sk))
        key, stop = (m.group(1), int(m.group(3))) if m else (str(sk), 1)
        widths[key] = max(widths.get(key, 0), stop)
    for key, width in (metadata.get("state_widths") or {}).items():  # the exact widths, when the server says
        if key in widths:
            widths[key] = int(width)
    for key, width in widths.items():
        obs[key] = rng.uniform(-0.5, 0.5, size=width).astype(np.float32)
    obs["prompt"] = prompt
    return obs
