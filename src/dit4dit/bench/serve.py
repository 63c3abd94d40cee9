"""`dit4dit bench serve`: round-trip latency and throughput of the policy server over loopback.

The server runs in its own process (``dit4dit serve``, a tiny random-weight policy unless a
checkpoint is given), so client and server do not share a Python interpreter lock; with
``in_process=True`` it runs on a thread of this process instead (tests). For each client count
(default 1 and 8), every client opens its own connection, sends ``warmup`` requests, waits at a
barrier, then sends ``requests`` observations back to back (the next one as soon as the reply
arrives). Reported per run: round-trip latency p50 / p90 / p99 / mean / max (ms), throughput
(replies per second over the measured window), the server's own inference time p50, the
overhead (round trip minus server inference, p50), and the error count. The observation is a
well-formed random one for the server's protocol (:func:`dummy_observation`).

The server computes one request at a time (one inference worker; the model is not re-entrant),
so with 8 clients latency grows about 8x while throughput stays at ~1 / inference time: the
numbers show what queueing costs, and that the event loop adds little on top.

With ``fuzz=N`` the same server is attacked instead (:func:`dit4dit.bench.fuzz.run_fuzz`: N seeded
hostile messages on one connection while a watcher pings and a valid client checks its replies);
the result reports crashes, hangs, the server's memory (resident set of the server process:
start, peak, end), the ping round trip before and during the attack, the valid client's
latency and whether its replies stayed identical, and how much the server's log grew.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..serve.client import PolicyServerError, WebsocketClientPolicy, dummy_observation


def _percentile(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q)) if xs else float("nan")


def run_load(host: str, port: int, clients: int, requests: int, *, warmup: int = 2, token: str | None = None,
             timeout: float = 120.0) -> dict[str, Any]:
    """``clients`` concurrent connections x ``requests`` back-to-back requests each."""
    lat: list[list[float]] = [[] for _ in range(clients)]
    server_ms: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    barrier = threading.Barrier(clients + 1, timeout=timeout)
    marks: dict[str, list[float]] = {"start": [], "end": []}
    lock = threading.Lock()

    def worker(i: int) -> None:
        client = None
        try:
            client = WebsocketClientPolicy(host, port, token=token, timeout=timeout)
            obs = dummy_observation(client.get_server_metadata(), seed=i)
            for _ in range(warmup):
                client.infer(obs)
        except Exception as e:  # noqa: BLE001
            with lock:
                errors.append(f"client {i} setup: {type(e).__name__}: {e}")
            barrier.abort()
            return
        try:
            barrier.wait()
            t_start = time.perf_counter()
            for _ in range(requests):
                t0 = time.perf_counter()
                out = client.infer(obs)
                lat[i].append((time.perf_counter() - t0) * 1e3)
                st = out.get("server_timing") or {}
                if st.get("infer_ms") is not None:
                    server_ms[i].append(float(st["infer_ms"]))
            with lock:
                marks["start"].append(t_start)
                marks["end"].append(time.perf_counter())
        except (PolicyServerError, threading.BrokenBarrierError, OSError) as e:
            with lock:
                errors.append(f"client {i}: {type(e).__name__}: {e}")
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass
    for t in threads:
        t.join(timeout + requests * timeout)
    all_lat = [x for xs in lat for x in xs]
    all_srv = [x for xs in server_ms for x in xs]
    wall = (max(marks["end"]) - min(marks["start"])) if marks["end"] else float("nan")
    n = len(all_lat)
    return {
        "clients": clients,
        "requests_per_client": requests,
        "replies": n,
        "errors": clients * requests - n,  # requests without a reply
        "error_messages": errors[:5],
        "latency_ms": {"p50": _percentile(all_lat, 50), "p90": _percentile(all_lat, 90),
                       "p99": _percentile(all_lat, 99), "mean": float(np.mean(all_lat)) if all_lat else float("nan"),
                       "max": float(np.max(all_lat)) if all_lat else float("nan")},
        "throughput_rps": n / wall if n and wall > 0 else float("nan"),
        "wall_s": wall,
        "server_infer_ms_p50": _percentile(all_srv, 50),
        "overhead_ms_p50": (_percentile(all_lat, 50) - _percentile(all_srv, 50)) if clients == 1 else None,
    }


def _start_subprocess_server(args: list[str], startup_timeout: float, log: Callable[[str], None]
                             ) -> tuple[subprocess.Popen, int, Path]:
    tmp = Path(tempfile.mkdtemp(prefix="dit4dit-bench-serve-"))
    port_file = tmp / "port"
    cmd = [sys.executable, "-m", "dit4dit.cli", "serve", "--host", "127.0.0.1", "--port", "0",
           "--port-file", str(port_file), *args]
    log("starting: " + " ".join(cmd[2:]))
    with open(tmp / "server.log", "w") as err:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + startup_timeout
    while not port_file.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}:\n"
                               f"{(tmp / 'server.log').read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.terminate()
            raise TimeoutError(f"the server did not start within {startup_timeout} s")
        time.sleep(0.1)
    return proc, int(port_file.read_text().strip()), tmp


def bench_serve(*, checkpoint: str | None = None, backbone: str | None = None, device: str = "cpu",
                clients: Sequence[int] = (1, 8), requests: int = 50, warmup: int = 2, in_process: bool = False,
                schema: str = "toy_reach", preset: str = "tiny", overrides: Sequence[str] = (),
                threads: int | None = None, policy: Any = None, startup_timeout: float = 300.0,
                fuzz: int = 0, fuzz_seed: int = 0,
                progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Benchmark the server; returns the JSON result. ``policy``: serve this object in-process."""
    from ..policy import TINY_RANDOM_OVERRIDES, Policy
    from ..serve.server import PolicyServer

    log = progress or (lambda _m: None)
    load_start = _loadavg()
    overrides = list(overrides) if overrides else list(TINY_RANDOM_OVERRIDES)
    proc = None
    st = None
    tmp = None
    extra: dict[str, Any] = {}
    if policy is not None or in_process:
        if policy is None:
            import torch

            if threads:
                torch.set_num_threads(threads)
            if checkpoint:
                from ..serve.server import load_served_policy

                policy, extra = load_served_policy(checkpoint, backbone=backbone, device=device)
            else:
                policy = Policy.random(schema, preset=preset, overrides=overrides, device=device)
                extra = {"model_version": f"random-weights/{preset}/{schema}"}
        st = PolicyServer(policy, "127.0.0.1", 0, metadata=extra).start_in_thread()
        port = st.port
        mode = "in-process (server on a thread)"
    else:
        args = ["--device", device]
        if threads:
            args += ["--threads", str(threads)]
        if checkpoint:
            args += ["--checkpoint", checkpoint] + (["--backbone", backbone] if backbone else [])
        else:
            args += ["--random-weights", schema, "--preset", preset] + [a for o in overrides for a in ("--set", o)]
        proc, port, tmp = _start_subprocess_server(args, startup_timeout, log)
        mode = "subprocess (dit4dit serve)"
    try:
        with WebsocketClientPolicy("127.0.0.1", port, timeout=120) as c:
            meta = c.get_server_metadata()
        runs = []
        fuzz_result = None
        if fuzz:
            from .fuzz import run_fuzz

            log(f"fuzzing with {fuzz} hostile messages (seed {fuzz_seed}) ...")
            pid = proc.pid if proc is not None else os.getpid()
            log_bytes0 = (tmp / "server.log").stat().st_size if tmp is not None else None
            fuzz_result = run_fuzz("127.0.0.1", port, fuzz, seed=fuzz_seed, rss=lambda: _rss_bytes(pid),
                                   hwm=lambda: _rss_bytes(pid, "VmHWM:"), progress=log)
            if tmp is not None:
                fuzz_result["server_log_bytes"] = {"before": log_bytes0, "after": (tmp / "server.log").stat().st_size}
            fuzz_result["server_alive"] = proc.poll() is None if proc is not None else True
            clients = ()
        for n in clients:
            log(f"{n} client(s) x {requests} requests ...")
            r = run_load("127.0.0.1", port, n, requests, warmup=warmup)
            log(f"  p50 {r['latency_ms']['p50']:.1f} ms, p99 {r['latency_ms']['p99']:.1f} ms, "
                f"{r['throughput_rps']:.1f} replies/s, errors {r['errors']}")
            runs.append(r)
    finally:
        if st is not None:
            st.stop()
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "benchmark": "serve",
        "server": mode,
        "transport": "websocket over loopback (127.0.0.1), msgpack-numpy, no compression",
        "policy": {"checkpoint": checkpoint, "model_version": meta.get("model_version"),
                   "embodiment": meta.get("embodiment"), "preset": meta.get("preset"),
                   "overrides": None if checkpoint else overrides, "image_size": meta.get("image_size"),
                   "action_horizon": meta.get("action_horizon"), "num_action_steps": meta.get("num_action_steps"),
                   "device": device},
        "observation": {k: (list(np.shape(v)) if not isinstance(v, str) else "str")
                        for k, v in dummy_observation(meta).items()},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                    "server_threads": threads, "load_average_1m": {"start": load_start, "end": _loadavg()}},
        "runs": runs,
        "summary": {f"{r['clients']}_clients": {"p50_ms": r["latency_ms"]["p50"], "p99_ms": r["latency_ms"]["p99"],
                                                "throughput_rps": r["throughput_rps"], "errors": r["errors"]}
                    for r in runs},
    }
    if fuzz_result is not None:
        result["benchmark"] = "serve-fuzz"
        result["fuzz"] = fuzz_result
        rss = fuzz_result.get("server_rss_mb") or {}
        result["summary"] = {"cases": fuzz_result["cases"], "crashes": fuzz_result["crashes"],
                             "hangs": fuzz_result["hangs"], "internal_errors": fuzz_result["internal_errors"],
                             "server_rss_growth_peak_mb": rss.get("growth_peak"),
                             "server_rss_growth_end_mb": rss.get("growth_end"),
                             "server_rss_growth_hwm_mb": rss.get("growth_hwm"),
                             "ping_p99_ms": fuzz_result["ping_ms"]["p99"],
                             "ping_p99_ms_before": fuzz_result["ping_ms_before"]["p99"],
                             "valid_replies_unchanged": fuzz_result["valid_replies_unchanged"],
                             "server_alive": fuzz_result["server_alive"]}
    return result


def _loadavg() -> float | None:
    """The 1-minute load average (other jobs sharing the machine inflate latencies), None if unknown."""
    try:
        return float(os.getloadavg()[0])
    except (OSError, AttributeError):
        return None


def _rss_bytes(pid: int, field: str = "VmRSS:") -> int | None:
    """Resident set size (``VmRSS:``) or its peak (``VmHWM:``) of a process (Linux /proc), None elsewhere."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
