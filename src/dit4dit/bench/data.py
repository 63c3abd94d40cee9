"""`dit4dit bench data`: data-loading throughput of the training pipeline (samples/s with decoding).

Exact video decoding (or a pre-extracted frame cache), resize to the training resolution,
normalisation and collation, with the DataLoader workers training uses; besides the rate, the CPU
time per sample of the main process and the workers (independent of what else the machine runs)
and a description of the machine.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from ..jsonio import to_jsonable
from ..progress import tqdm_bar


def bench_data(path: str | Path, schema_name: str, image_size: int | Sequence[int] = 224, batch_size: int = 8,
               num_workers: int = 2, num_batches: int = 20, num_cond_frames: int = 1, num_future_frames: int = 8,
               frame_stride: int = 1, action_horizon: int = 16, seed: int = 0, progress: bool = True,
               frame_cache: str | Path | bool | None = None) -> dict[str, Any]:
    """Samples/s of the training pipeline (exact video decoding, resize to the training resolution,
    normalisation, collation) with ``num_workers`` DataLoader workers.

    ``image_size``: an int N gives each camera an N x N cell (so two side-by-side cameras make
    N x 2N); a pair (H, W) is the combined image size. ``frame_cache``: read the frames from a
    pre-extracted frame cache instead of decoding them: a cache directory, or True for the
    default one (built first when missing or stale; the build time is reported apart).
    """
    import torch

    from ..data.frame_cache import build_frame_cache
    from ..data.inspect import training_inputs
    from ..data.lerobot import LeRobotDataset
    from ..data.loader import make_loader
    from ..data.processor import Processor
    from ..data.samples import TrainingSamples
    from ..data.schema import get_schema

    ds = LeRobotDataset(path)
    schema = get_schema(schema_name).check(ds)
    inputs = training_inputs(ds, schema, image_size, num_cond_frames, num_future_frames, frame_stride)
    size = inputs.image_size
    t0 = time.perf_counter()
    proc = Processor.for_dataset(ds, schema, inputs, action_horizon=action_horizon, progress=progress)
    t_stats = time.perf_counter() - t0
    t_cache = None
    if frame_cache is True or frame_cache == "auto":
        t0 = time.perf_counter()
        frame_cache = build_frame_cache(ds, proc, progress=progress)
        t_cache = time.perf_counter() - t0
    t0 = time.perf_counter()
    samples = TrainingSamples(ds, processor=proc, action_horizon=action_horizon, frame_cache=frame_cache or None)
    t_index = time.perf_counter() - t0
    loader = make_loader(samples, batch_size=batch_size, num_workers=num_workers, shuffle=True, seed=seed,
                         drop_last=True)
    stream = loader.batches()
    t0 = time.perf_counter()
    first = next(stream)
    t_first = time.perf_counter() - t0
    video_shape = list(first["video"].shape)
    del first  # (its buffer goes back to the worker)
    bar = tqdm_bar(num_batches, "bench_data", unit="batch", leave=False) if progress else None
    workers = _worker_pids(loader)
    cpu0 = time.process_time(), _cpu_seconds(workers)
    t0 = time.perf_counter()
    for _ in range(num_batches):
        next(stream)
        if bar is not None:
            bar.update(1)
    elapsed = time.perf_counter() - t0
    cpu_main = time.process_time() - cpu0[0]
    cpu_workers = None if cpu0[1] is None or _cpu_seconds(workers) is None else _cpu_seconds(workers) - cpu0[1]
    if bar is not None:
        bar.close()
    loader.close()
    n = num_batches * batch_size
    return to_jsonable({
        "dataset": str(ds.root),
        "schema": schema.name,
        "cameras": schema.camera_keys,
        "image_size": list(size),
        "frames_per_sample": inputs.num_frames,
        "frame_stride": frame_stride,
        "action_horizon": action_horizon,
        "batch_size": batch_size,
        "num_workers": num_workers,
        "num_batches": num_batches,
        "samples_per_s": n / elapsed if elapsed > 0 else None,
        "batches_per_s": num_batches / elapsed if elapsed > 0 else None,
        "seconds": elapsed,
        # CPU time of the main process and the workers per sample: unlike samples_per_s, it does
        # not depend on what else the machine runs; cores / cpu time = the rate on idle cores
        "cpu_ms_per_sample": None if cpu_workers is None else 1e3 * (cpu_main + cpu_workers) / n,
        "cpu_ms_per_sample_main": 1e3 * cpu_main / n,
        "first_batch_s": t_first,
        "stats_s": t_stats,
        "index_s": t_index,
        "frame_cache": None if samples.frame_cache is None else str(samples.frame_cache.directory),
        "cache_build_s": t_cache,
        "video_shape": video_shape,
        "machine": {
            "cpu_count": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch_threads": torch.get_num_threads(),
            "torch_version": torch.__version__,
            "python": sys.version.split()[0],
            "cpu_model": _cpu_model(),
            "memory_gib": _memory_gib(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
    })


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or None


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _worker_pids(loader: Any) -> list[int]:
    it = getattr(getattr(loader, "loader", None), "_iterator", None)
    return [int(w.pid) for w in getattr(it, "_workers", []) or [] if getattr(w, "pid", None)]


def _cpu_seconds(pids: Sequence[int]) -> float | None:
    """user + system CPU seconds of these processes (Linux /proc), None if unknown."""
    if not pids:
        return 0.0
    try:
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in pids:
            with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / tick
    except (OSError, ValueError, IndexError):
        return None
