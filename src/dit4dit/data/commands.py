"""Dataset commands for the CLI (`dit4dit data ...`): plain functions returning JSON-ready dicts.

Long work reports progress with tqdm on stderr; results go to the return value (the CLI prints
them as JSON).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np


def _open(path: str | Path) -> Any:
    from .lerobot import LeRobotDataset

    return LeRobotDataset(path)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def _matching_schemas(ds: Any) -> list[str]:
    from .schema import SCHEMAS, SchemaError

    out = []
    for name, s in sorted(SCHEMAS.items()):
        try:
            s.check(ds)
            out.append(name)
        except SchemaError:
            pass
    return out


# --------------------------------------------------------------------------------------------
# info / show
# --------------------------------------------------------------------------------------------


def dataset_info(path: str | Path) -> dict[str, Any]:
    """Layout version, episodes, frames, fps, features (dtype, shape, names), tasks, robot type,
    and which built-in schemas fit the dataset."""
    ds = _open(path)
    lengths = np.array([e.length for e in ds.episodes]) if ds.episodes else np.zeros(1, int)
    feats = {}
    for k, f in ds.features.items():
        entry = {"dtype": f.get("dtype"), "shape": list(f.get("shape") or [])}
        if f.get("names") is not None:
            entry["names"] = f.get("names")
        feats[k] = entry
    return _jsonable({
        "root": str(ds.root),
        "version": ds.version,
        "robot_type": ds.robot_type,
        "fps": ds.fps,
        "episodes": ds.num_episodes,
        "frames": ds.num_frames,
        "episode_length": {"min": int(lengths.min()), "max": int(lengths.max()), "mean": float(lengths.mean())},
        "video_keys": list(ds.video_keys),
        "image_keys": list(ds.image_keys),
        "features": feats,
        "num_tasks": len(ds.tasks),
        "tasks": list(ds.tasks),
        "matching_schemas": _matching_schemas(ds),
    })


def dataset_show(path: str | Path, episode: int = 0, frame: int = 0, out_png: str | Path = "frame.png") -> dict[str, Any]:
    """Write a PNG with the decoded frame of every camera side by side; return the frame's
    numeric values (state, action, ...) and the instruction."""
    from PIL import Image

    ds = _open(path)
    ep = ds.episode(episode)
    if not 0 <= frame < ep.length:
        raise IndexError(f"episode {episode} has frames 0..{ep.length - 1}; asked for {frame}")
    cams = list(ds.video_keys) + list(ds.image_keys)
    imgs = {k: np.asarray(ds.frames(k, episode, [frame])[0]) for k in cams}
    out = Path(out_png)
    if imgs:
        h = max(im.shape[0] for im in imgs.values())
        w = sum(im.shape[1] for im in imgs.values())
        canvas = np.zeros((h, w, 3), np.uint8)
        x = 0
        for im in imgs.values():
            canvas[: im.shape[0], x:x + im.shape[1]] = im
            x += im.shape[1]
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(canvas).save(out)
    data = ds.episode_data(episode)
    values = {k: np.asarray(v[frame]).tolist() for k, v in data.items()}
    return _jsonable({
        "episode": int(episode),
        "frame": int(frame),
        "episode_length": ep.length,
        "task": ds.task(episode, frame),
        "png": str(out) if imgs else None,
        "cameras": {k: list(im.shape[:2]) for k, im in imgs.items()},
        "state": values.get("observation.state"),
        "action": values.get("action", values.get("actions")),
        "values": values,
    })


# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------


def compute_stats(path: str | Path, schema_name: str | None = None, out_json: str | Path | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Per-dimension statistics (mean, std, min, max, q01, q99, count) of every numeric key and,
    with a schema, of its state and action vectors. Written to ``out_json`` when given."""
    from .normalize import compute_dataset_stats

    ds = _open(path)
    t0 = time.perf_counter()
    stats = compute_dataset_stats(ds, schema_name, progress=progress)
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    stats["dataset"] = str(ds.root)
    stats = _jsonable(stats)
    if out_json is not None:
        p = Path(out_json)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(stats, indent=2))
    return stats


# --------------------------------------------------------------------------------------------
# data-loading benchmark
# --------------------------------------------------------------------------------------------


def _training_inputs(ds: Any, schema: Any, image_size: int | Sequence[int], num_cond_frames: int = 1,
                     num_future_frames: int = 8, frame_stride: int = 1) -> Any:
    """The InputConfig of the data commands: every camera of ``schema``; ``image_size`` an int N
    (an N x N cell per camera, cells in the schema's grid) or the combined (H, W)."""
    from ..config import InputConfig

    rows, cols = schema.grid_shape()
    if isinstance(image_size, (int, np.integer)):
        size = (int(image_size) * rows, int(image_size) * cols)
    else:
        size = (int(image_size[0]), int(image_size[1]))
    return InputConfig(cameras=tuple(c.key for c in schema.cameras),
                       camera_layout="single" if len(schema.cameras) == 1 else "side_by_side",
                       image_size=size, num_cond_frames=num_cond_frames, num_future_frames=num_future_frames,
                       frame_stride=frame_stride, fps=float(ds.fps))


def cache_frames(path: str | Path, schema_name: str, image_size: int | Sequence[int] = 224,
                 out_dir: str | Path | None = None, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Build (or reuse, when complete and up to date) the pre-extracted frame cache of a dataset
    at the training resolution; see :mod:`dit4dit.data.frame_cache`."""
    from .frame_cache import build_frame_cache, open_frame_cache
    from .schema import get_schema

    ds = _open(path)
    schema = get_schema(schema_name).check(ds)
    inputs = _training_inputs(ds, schema, image_size)
    t0 = time.perf_counter()
    out = build_frame_cache(ds, (schema, inputs), out_dir=out_dir, progress=progress, force=force)
    seconds = time.perf_counter() - t0
    cache = open_frame_cache(out)
    return _jsonable({
        "dataset": str(ds.root),
        "schema": schema.name,
        "cache": str(out),
        "fingerprint": cache.fingerprint,
        "frames": cache.shape[0],
        "image_size": list(cache.image_size),
        "cameras": cache.index["image_settings"].get("dataset_cameras"),
        "bytes": cache.nbytes,
        "build_seconds": cache.index.get("build_seconds"),
        "seconds": seconds,
    })


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

    from .frame_cache import build_frame_cache
    from .loader import make_loader
    from .processor import Processor
    from .samples import TrainingSamples
    from .schema import get_schema

    ds = _open(path)
    schema = get_schema(schema_name).check(ds)
    inputs = _training_inputs(ds, schema, image_size, num_cond_frames, num_future_frames, frame_stride)
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
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=num_batches, desc="bench_data", unit="batch", file=sys.stderr, leave=False)
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
    return _jsonable({
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
