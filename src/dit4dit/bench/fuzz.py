"""Seeded fuzzing of a running policy server (``dit4dit bench serve --fuzz N`` and the test suite).

One attacker connection sends ``cases`` hostile or careless messages, drawn with a seeded RNG from
these classes (each a few bytes to ~16 MB):

- ``bytes``: random bytes, truncated and bit-flipped valid messages, text frames;
- ``bomb``: msgpack container floods (millions of empty maps or arrays, nested, wide maps, deep
  nesting), oversized declared lengths;
- ``array``: ndarray wrappers with bad dtypes (object, structured, unknown), bad or huge shapes,
  data of the wrong length, numpy scalars of the wrong kind;
- ``observation``: structurally valid messages with wrong content: state of the wrong width,
  complex / string / ragged / NaN states, images of the wrong size, dtype or rank, missing keys,
  thousands of extra keys, prompts that are not strings or not UTF-8, huge NaN arrays.

Meanwhile a watcher connection pings the server every ``ping_every`` seconds (round-trip times
reported), and a valid client sends one fixed observation every ``check_every`` cases; its replies
must equal the first one (the server's replies are seeded). Per case: a reply (an error frame or
actions) within ``hang_timeout`` seconds is expected; no reply is a *hang*; a server that stops
accepting connections or answering its health check is a *crash*. A connection the server closes
(message over ``max_size``) is counted and reopened. ``inference_failed`` replies (an input the
validation did not catch) are counted as ``internal_errors``.
"""

from __future__ import annotations

import json
import multiprocessing
import time
import urllib.request
from typing import Any, Callable

import msgpack
import numpy as np

from ..serve.client import dummy_observation
from ..serve.msgpack_numpy import packb

CLASSES = ("bytes", "bomb", "array", "observation")


def _arr(dtype: str, shape: list, data: bytes) -> dict:
    return {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape}


class _Cases:
    """Deterministic hostile messages for one server's protocol."""

    def __init__(self, meta: dict[str, Any], seed: int, max_bytes: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.meta = meta
        self.good = dummy_observation(meta, seed=seed)
        self.good_bytes = packb(self.good)
        self.state_key = next((k for k in self.good if k not in (meta.get("cameras") or []) and k != "prompt"), None)
        self.cams = [k for k in (meta.get("cameras") or []) if k in self.good]
        self.max_bytes = max_bytes

    def _big(self) -> int:
        """A size up to ~0.9 x the server's message limit, mostly small."""
        r = self.rng.random()
        top = int(self.max_bytes * 0.9)
        return int(min(top, 2 ** self.rng.uniform(4, 16))) if r < 0.8 else int(self.rng.integers(top // 4, top))

    def draw(self, kind: str) -> tuple[str, Any]:
        rng = self.rng
        if kind == "bytes":
            c = int(rng.integers(5))
            if c == 0:
                return "random_bytes", rng.integers(0, 256, self._big(), dtype=np.uint8).tobytes()
            if c == 1:
                return "truncated", self.good_bytes[:int(rng.integers(1, len(self.good_bytes)))]
            if c == 2:
                b = bytearray(self.good_bytes)
                for _ in range(int(rng.integers(1, 20))):
                    b[int(rng.integers(len(b)))] ^= 1 << int(rng.integers(8))
                return "bit_flips", bytes(b)
            if c == 3:
                return "text_frame", "x" * int(rng.integers(1, 4096))
            return "trailing_bytes", self.good_bytes + b"\xc0" * int(rng.integers(1, 64))
        if kind == "bomb":
            c = int(rng.integers(6))
            n = self._big()
            if c == 0:
                return "empty_map_flood", b"\xdd" + n.to_bytes(4, "big") + b"\x80" * n
            if c == 1:
                return "empty_array_flood", b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n
            if c == 2:
                w = int(rng.integers(64, 4096))
                return "nested_flood", msgpack.packb([[{}] * w] * max(1, n // max(w, 1)))
            if c == 3:
                return "deep_nesting", b"\x91" * min(n, 100_000) + b"\xc0"
            if c == 4:
                return "wide_map", msgpack.packb({str(i): i for i in range(int(rng.integers(1025, 200_000)))})
            return "declared_too_long", b"\xdf\xff\xff\xff\xff" + b"\x80" * 16
        if kind == "array":
            c = int(rng.integers(7))
            if c == 0:
                dt = str(rng.choice(["|O", "O", "V8", "[('a','<f4')]", "<M8[s]", "xyz", "<f16", ""]))
                return "bad_dtype", msgpack.packb({"a": _arr(dt, [2], b"\x00" * 16)}, use_bin_type=True)
            if c == 1:
                shape = [int(rng.integers(-5, 3)), 2**int(rng.integers(20, 63))]
                return "bad_shape", msgpack.packb({"a": _arr("<f4", shape, b"\x00" * 16)}, use_bin_type=True)
            if c == 2:
                return "wrong_length", msgpack.packb({"a": _arr("<f4", [4, 4], b"\x00" * int(rng.integers(0, 100)))},
                                                     use_bin_type=True)
            if c == 3:
                return "dtype_not_str", msgpack.packb({"a": _arr(7, [1], b"\x00" * 4)}, use_bin_type=True)  # type: ignore[arg-type]
            if c == 4:
                return "bad_scalar", msgpack.packb({"a": {b"__npgeneric__": True, b"data": "x", b"dtype": "<f4"}},
                                                   use_bin_type=True)
            if c == 5:
                return "too_many_dims", msgpack.packb({"a": _arr("<f4", [1] * 40, b"\x00" * 4)}, use_bin_type=True)
            return "shape_not_list", msgpack.packb({"a": _arr("<f4", {"x": 1}, b"\x00" * 4)}, use_bin_type=True)  # type: ignore[arg-type]
        # observation
        obs = dict(self.good)
        c = int(rng.integers(12))
        sk = self.state_key
        if c == 0 and sk:
            obs[sk] = rng.normal(size=int(rng.choice([0, 1, 3, 5, 64, 1000, 100_000]))).astype(np.float32)
            return "state_width", packb(obs)
        if c == 1 and sk:
            obs[sk] = np.asarray(obs[sk]).astype(np.complex64)
            return "state_complex", packb(obs)
        if c == 2 and sk:
            obs[sk] = [[1.0, 2.0], [3.0]]
            return "state_ragged", packb(obs)
        if c == 3 and sk:
            obs[sk] = np.full(int(rng.choice([np.asarray(obs[sk]).size, 3 * 2**20])), np.nan, np.float32)
            return "state_nan", packb(obs)
        if c == 4 and sk:
            obs[sk] = np.array(["a"] * np.asarray(obs[sk]).size)
            return "state_strings", packb(obs)
        if c == 5 and self.cams:
            cam = self.cams[int(rng.integers(len(self.cams)))]
            img = np.asarray(obs[cam])
            choice = int(rng.integers(4))
            if choice == 0:
                obs[cam] = img.astype(np.float32)
            elif choice == 1:
                obs[cam] = np.zeros((img.shape[-3] + 1, img.shape[-2], 3), np.uint8)
            elif choice == 2:
                obs[cam] = np.zeros(img.shape[:-1] + (4,), np.uint8)
            else:
                obs[cam] = np.zeros((2, 2), np.uint8)
            return "image", packb(obs)
        if c == 6:
            obs.pop(str(rng.choice(list(obs))))
            return "missing_key", packb(obs)
        if c == 7:
            for i in range(int(rng.integers(100, 1000))):
                obs["k" * int(rng.integers(1, 300)) + str(i)] = i
            return "extra_keys", packb(obs)
        if c == 8:
            obs["prompt"] = rng.integers(128, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
            return "prompt_not_utf8", packb(obs)
        if c == 9:
            obs["prompt"] = [["a"], 1, None][int(rng.integers(3))]
            return "prompt_not_str", packb(obs)
        if c == 10:
            obs["prompt"] = "p" * int(rng.integers(1, 100_000))
            return "prompt_long", packb(obs)
        return "not_a_map", packb([obs.get("prompt"), 1, 2])


def _ping_process(uri: str, headers: dict | None, every: float, timeout: float, conn: Any) -> None:
    """Child process: ping ``uri`` every ``every`` s; "start" begins the recorded phase, "stop"
    ends it and sends back (round-trip times in ms, errors). Before "start", one second of pings is
    answered on request (the baseline)."""
    from websockets.sync.client import connect

    ws = connect(uri, additional_headers=headers, compression=None, max_size=None, proxy=None,
                 open_timeout=30).__enter__()
    ws.recv(timeout=30)
    conn.send("ready")
    rtts: list[float] = []
    errors: list[str] = []
    while True:
        if conn.poll(0):
            cmd = conn.recv()
            if cmd == "baseline":
                conn.send((rtts, errors))
                rtts, errors = [], []
            elif cmd == "start":
                rtts, errors = [], []
            elif cmd == "stop":
                conn.send((rtts, errors))
                break
        t = time.perf_counter()
        try:
            if ws.ping().wait(timeout):
                rtts.append((time.perf_counter() - t) * 1e3)
            else:
                errors.append(f"no pong within {timeout} s")
        except Exception as e:  # noqa: BLE001
            errors.append(f"{type(e).__name__}: {e}")
            break
        time.sleep(every)
    try:
        ws.close()
    except Exception:  # noqa: BLE001
        pass


def _collect_pings(conn: Any, seconds: float, timeout: float) -> list[float]:
    time.sleep(seconds)
    conn.send("baseline")
    rtts, _ = conn.recv() if conn.poll(timeout + 10) else ([], [])
    return rtts


def _percentiles(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan"), "n": 0}
    a = np.asarray(xs, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "max": float(a.max()),
            "n": int(a.size)}


def run_fuzz(host: str, port: int, cases: int = 1000, *, seed: int = 0, token: str | None = None,
             hang_timeout: float = 30.0, ping_every: float = 0.02, check_every: int = 50,
             time_limit: float | None = None, rss: Callable[[], int | None] | None = None,
             hwm: Callable[[], int | None] | None = None,
             progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Fuzz the server at ``host:port`` (see the module docstring); returns the JSON result.
    ``rss``: a callable giving the server's resident memory in bytes, sampled every 10 cases
    (memory growth is reported when given); ``hwm``: one giving its peak resident memory since
    it started (Linux ``VmHWM``), which catches peaks between samples. ``time_limit``: stop
    drawing new cases after this many seconds."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    from ..serve.client import WebsocketClientPolicy

    log = progress or (lambda _m: None)
    uri = f"ws://{host}:{port}"
    headers = {"Authorization": f"Bearer {token}"} if token else None

    def open_ws():
        ws = connect(uri, additional_headers=headers, compression=None, max_size=None, proxy=None,
                     open_timeout=30).__enter__()
        ws.recv(timeout=30)  # metadata
        return ws

    valid = WebsocketClientPolicy(host, port, token=token, timeout=hang_timeout)
    meta = valid.get_server_metadata()
    max_bytes = int(meta.get("max_message_bytes") or 16 * 2**20)
    gen = _Cases(meta, seed, max_bytes)
    ref_obs = dummy_observation(meta, seed=seed + 1)
    ref = valid.infer(ref_obs)["actions"]
    valid_ms: list[float] = []
    base_valid: list[float] = []
    for _ in range(5):  # before the attack: the valid client's latency and the ping round trip
        t0 = time.perf_counter()
        valid.infer(ref_obs)
        base_valid.append((time.perf_counter() - t0) * 1e3)

    # the watcher runs in its own process: building big hostile messages here holds this
    # interpreter's lock, which would otherwise delay the pongs' processing and inflate the times
    ctx = multiprocessing.get_context("spawn")
    parent_end, child_end = ctx.Pipe()
    watcher = ctx.Process(target=_ping_process, args=(uri, headers, ping_every, hang_timeout, child_end),
                          daemon=True, name="fuzz-ping")
    watcher.start()
    if not parent_end.poll(60) or parent_end.recv() != "ready":
        raise RuntimeError("the ping watcher did not connect")
    base_pings = _collect_pings(parent_end, 1.0, hang_timeout)
    rss0 = rss() if rss else None
    hwm0 = hwm() if hwm else None
    peak = rss0 or 0
    parent_end.send("start")
    attacker = open_ws()
    replies: dict[str, int] = {}
    by_name: dict[str, int] = {}
    hangs: list[str] = []
    crashes: list[str] = []
    closed = 0
    mismatched = 0
    checks = 0
    sent_bytes = 0
    t_start = time.perf_counter()
    done = 0
    for i in range(cases):
        if time_limit is not None and time.perf_counter() - t_start > time_limit:
            break
        kind = CLASSES[i % len(CLASSES)]
        name, msg = gen.draw(kind)
        by_name[name] = by_name.get(name, 0) + 1
        sent_bytes += len(msg)
        try:
            attacker.send(msg)
            reply = attacker.recv(timeout=hang_timeout)
            if isinstance(reply, str):
                try:
                    t = json.loads(reply)["error"]["type"]
                except (ValueError, KeyError, TypeError):
                    t = "unparsable_error"
            else:
                t = "actions"
            replies[t] = replies.get(t, 0) + 1
        except TimeoutError:
            hangs.append(f"case {i} ({name})")
            attacker.close()
            attacker = open_ws()
        except (ConnectionClosed, OSError) as e:
            closed += 1
            replies["connection_closed"] = replies.get("connection_closed", 0) + 1
            try:
                attacker = open_ws()
            except Exception as e2:  # noqa: BLE001
                crashes.append(f"case {i} ({name}): cannot reconnect after {type(e).__name__}: {e2}")
                break
        done += 1
        if rss and i % 10 == 0:
            peak = max(peak, rss() or 0)
        if (i + 1) % check_every == 0 or i == cases - 1:
            try:
                t0 = time.perf_counter()
                out = valid.infer(ref_obs)["actions"]
                valid_ms.append((time.perf_counter() - t0) * 1e3)
                checks += 1
                if not np.array_equal(out, ref):
                    mismatched += 1
            except Exception as e:  # noqa: BLE001
                crashes.append(f"valid client after case {i}: {type(e).__name__}: {e}")
                break
            try:
                with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=hang_timeout) as r:
                    if r.status != 200:
                        crashes.append(f"health check after case {i}: HTTP {r.status}")
                        break
            except Exception as e:  # noqa: BLE001
                crashes.append(f"health check after case {i}: {type(e).__name__}: {e}")
                break
            log(f"{i + 1}/{cases} cases: hangs {len(hangs)}, crashes {len(crashes)}, internal errors "
                f"{replies.get('inference_failed', 0)}")
    wall = time.perf_counter() - t_start
    parent_end.send("stop")
    pings, ping_errors = parent_end.recv() if parent_end.poll(hang_timeout + 10) else ([], ["watcher gave no result"])
    watcher.join(10)
    rss1 = rss() if rss else None
    hwm1 = hwm() if hwm else None
    if rss1:
        peak = max(peak, rss1)
    try:
        attacker.close()
    except Exception:  # noqa: BLE001
        pass
    valid.close()
    return {
        "cases": done,
        "seed": seed,
        "wall_s": wall,
        "sent_mb": sent_bytes / 2**20,
        "crashes": len(crashes),
        "crash_messages": crashes[:5],
        "hangs": len(hangs),
        "hang_cases": hangs[:10],
        "connections_closed_by_server": closed,
        "internal_errors": replies.get("inference_failed", 0),
        "replies": dict(sorted(replies.items())),
        "cases_by_kind": dict(sorted(by_name.items())),
        "ping_ms_before": _percentiles(base_pings),
        "ping_ms": _percentiles(pings),
        "ping_errors": ping_errors[:3],
        "valid_checks": checks,
        "valid_replies_unchanged": checks > 0 and mismatched == 0,
        "valid_latency_ms_before": _percentiles(base_valid),
        "valid_latency_ms": _percentiles(valid_ms),
        "server_rss_mb": None if rss0 is None else {"start": rss0 / 2**20, "peak": peak / 2**20,
                                                    "end": (rss1 or 0) / 2**20,
                                                    "growth_end": ((rss1 or 0) - rss0) / 2**20,
                                                    "growth_peak": (peak - rss0) / 2**20,
                                                    "hwm_start": None if hwm0 is None else hwm0 / 2**20,
                                                    "hwm_end": None if hwm1 is None else hwm1 / 2**20,
                                                    # an upper bound of the peak growth during the attack
                                                    "growth_hwm": None if hwm1 is None else (hwm1 - rss0) / 2**20},
    }
