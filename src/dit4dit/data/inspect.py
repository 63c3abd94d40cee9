"""Inspect a local LeRobot dataset and build its caches: plain functions returning JSON-ready dicts.

`dataset_info`, `dataset_check` and `dataset_show` describe a dataset, `compute_stats` its
per-dimension statistics, `cache_frames` builds its frame cache at the training resolution. Long
work reports progress with tqdm on stderr; results are the return value (`dit4dit dataset`,
`dit4dit stats` and `dit4dit cache-frames` print them). The data-loading benchmark built on the same
inputs is :mod:`dit4dit.bench.data`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..jsonio import to_jsonable, write_json


def _open(path: str | Path) -> Any:
    from .lerobot import LeRobotDataset

    return LeRobotDataset(path)


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
    return to_jsonable({
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


def dataset_check(path: str | Path) -> dict[str, Any]:
    """Open a dataset with every check training runs (column widths against info.json, total_frames,
    episode lengths, frame indices, video time ranges); a problem raises DatasetError naming it."""
    from .lerobot import LeRobotDataset

    ds = LeRobotDataset(path, check_videos=True)
    return {"path": str(ds.root), "ok": True, "version": ds.version, "episodes": ds.num_episodes,
            "frames": ds.num_frames,
            "video_files_checked": len({v[0] for rec in ds._records.values() for v in rec.videos.values()})}


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
    return to_jsonable({
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
    stats = to_jsonable(stats)
    if out_json is not None:
        write_json(out_json, stats)
    return stats


# --------------------------------------------------------------------------------------------
# frame cache
# --------------------------------------------------------------------------------------------


def training_inputs(ds: Any, schema: Any, image_size: int | Sequence[int], num_cond_frames: int = 1,
                     num_future_frames: int = 8, frame_stride: int = 1) -> Any:
    """The InputConfig of `cache_frames` and the data-loading benchmark: every camera of ``schema``;
    ``image_size`` an int N (an N x N cell per camera, cells in the schema's grid) or the combined (H, W)."""
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
    inputs = training_inputs(ds, schema, image_size)
    t0 = time.perf_counter()
    out = build_frame_cache(ds, (schema, inputs), out_dir=out_dir, progress=progress, force=force)
    seconds = time.perf_counter() - t0
    cache = open_frame_cache(out)
    return to_jsonable({
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
